"""convert() and manual_coverage(): a whole network whose every gradient is hand-written, checkably."""

from __future__ import annotations

import warnings

import pytest
import torch
from support import RecordOps

import manualgrad
import manualgrad.functional as MF
import manualgrad.nn as mnn
from manualgrad import ConversionWarning, InputError


def torch_mlp():
    return torch.nn.Sequential(
        torch.nn.Linear(12, 16),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.0),
        torch.nn.Linear(16, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 5),
    ).double()


def test_every_gradient_of_the_step_is_ours_and_matches_torch():
    """The issue's end-to-end check: ours-only graph, no derivative kernel, gradients equal torch's to 1e-10."""
    torch.manual_seed(0)
    twin = torch_mlp()
    ours = torch.nn.Sequential(
        mnn.Linear(12, 16), mnn.ReLU(), mnn.Dropout(0.0), mnn.Linear(16, 16), mnn.Tanh(), mnn.Linear(16, 5)
    ).double()
    ours.load_state_dict(twin.state_dict())
    x, y = torch.randn(32, 12, dtype=torch.float64), torch.randint(0, 5, (32,))

    loss = mnn.CrossEntropyLoss(label_smoothing=0.05)(ours(x), y)
    coverage = manualgrad.manual_coverage(loss)
    assert coverage.complete, coverage
    assert coverage.manual["LinearFunctionBackward"] == 3 and coverage.leaves == 6
    with RecordOps() as kernels:
        loss.backward()
    assert kernels.ops and kernels.derivative_kernels == []

    ref = torch.nn.CrossEntropyLoss(label_smoothing=0.05)(twin(x), y)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-12)
    for a, b in zip(ours.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-10)


def test_coverage_finds_foreign_nodes():
    model = torch.nn.Sequential(mnn.Linear(4, 4), mnn.ReLU(), mnn.Linear(4, 2))
    x = torch.randn(3, 4, requires_grad=True)
    loss = MF.cross_entropy(model(x.view(3, 2, 2).flatten(1) * 2), torch.tensor([0, 1, 1]))
    coverage = manualgrad.manual_coverage(loss)
    assert not coverage.complete
    assert set(coverage.foreign) == {"MulBackward0", "ViewBackward0"}
    assert "NOT all manualgrad" in str(coverage) and "ViewBackward0 x2" in str(coverage)
    native = torch.nn.functional.cross_entropy(torch.nn.Linear(4, 2)(x), torch.tensor([0, 1, 1]))
    assert not manualgrad.manual_coverage(native).manual
    assert not manualgrad.manual_coverage(torch.ones(2)).complete  # no graph at all


def test_convert_keeps_parameters_and_the_optimizer():
    torch.manual_seed(0)
    model = torch_mlp().float()
    reference = torch_mlp().float()
    reference.load_state_dict(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    before = [id(p) for p in model.parameters()]

    assert manualgrad.convert(model) is model
    assert [id(p) for p in model.parameters()] == before
    assert [type(m) for m in model] == [mnn.Linear, mnn.ReLU, mnn.Dropout, mnn.Linear, mnn.Tanh, mnn.Linear]

    x, y = torch.randn(16, 12), torch.randint(0, 5, (16,))
    for _ in range(3):
        for m, opt, ce in (
            (model, optimizer, MF.cross_entropy),
            (reference, ref_optimizer, torch.nn.functional.cross_entropy),
        ):
            opt.zero_grad()
            loss = ce(m(x), y)
            loss.backward()
            opt.step()
        assert manualgrad.manual_coverage(MF.cross_entropy(model(x), y)).complete
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_convert_reports_what_it_leaves_alone():
    class Block(torch.nn.Module):  # a custom module with its own parameter and a child
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(4))
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.linear(x) * self.scale

    class MyLinear(torch.nn.Linear):
        pass

    model = torch.nn.Sequential(
        torch.nn.BatchNorm1d(4), Block(), torch.nn.GELU(), MyLinear(4, 3), torch.nn.CrossEntropyLoss()
    )
    with pytest.warns(ConversionWarning) as record:
        manualgrad.convert(model)
    message = str(record[0].message)
    assert (
        "0 (BatchNorm1d)" in message
        and "1 (Block)" in message
        and "3 (MyLinear): a subclass of torch.nn.Linear" in message
    )
    assert "GELU" not in message and "1.linear" not in message
    assert type(model[1].linear) is mnn.Linear and type(model[2]) is mnn.GELU and type(model[4]) is mnn.CrossEntropyLoss
    with pytest.raises(InputError, match="BatchNorm1d"):
        manualgrad.convert(torch.nn.Sequential(torch.nn.BatchNorm1d(3)), strict=True)


def test_convert_reports_a_twin_subclass_with_its_own_forward():
    """A subclass of a manualgrad module that computes its own forward with torch ops is not silently 'ours'."""

    class ScaledLinear(mnn.Linear):
        def forward(self, input):
            return torch.nn.functional.linear(input, self.weight * 2, self.bias)

    class QuietLinear(mnn.Linear):  # keeps the twin's forward: nothing to report
        pass

    with pytest.warns(ConversionWarning, match=r"0 \(ScaledLinear\): a subclass of Linear with its own forward"):
        manualgrad.convert(torch.nn.Sequential(ScaledLinear(3, 2), QuietLinear(2, 2)))


def test_convert_names_the_function_calls_it_cannot_reach():
    import torch.nn.functional as F

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            return F.log_softmax(torch.tanh(F.relu(self.fc(x))), dim=1)

    with pytest.warns(ConversionWarning) as record:
        manualgrad.convert(Net())
    message = str(record[0].message)
    assert "Net.forward calls torch.nn.functional.log_softmax, torch.nn.functional.relu, torch.tanh" in message
    assert "manual_coverage" in message and "import manualgrad.functional as F" in message
    assert "(Net)" not in message  # the container itself holds no parameters of its own


def test_convert_converts_a_loss_module_alone_and_skips_layers_without_a_node():
    loss_fn = torch.nn.NLLLoss(reduction="sum")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert manualgrad.convert(loss_fn) is loss_fn
        manualgrad.convert(torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(2, 2)))
    assert type(loss_fn) is mnn.NLLLoss and loss_fn.reduction == "sum"


def test_convert_is_quiet_and_idempotent_on_a_clean_model():
    model = torch_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        manualgrad.convert(model)
        manualgrad.convert(model)
        manualgrad.convert(mnn.MLP([3, 4, 2]))


def test_converted_modules_keep_their_settings():
    model = torch.nn.Sequential(
        torch.nn.LeakyReLU(0.2, inplace=True),
        torch.nn.ELU(alpha=0.5),
        torch.nn.Softplus(2.0, 5.0),
        torch.nn.MSELoss(reduction="sum"),
        torch.nn.Dropout(1.0),
    )
    manualgrad.convert(model)
    assert repr(model[0]) == "LeakyReLU(negative_slope=0.2, inplace=True)" and isinstance(model[0], mnn.LeakyReLU)
    assert model[1].alpha == 0.5 and model[2].beta == 2.0 and model[3].reduction == "sum"
    assert type(model[4]) is mnn.Dropout and model[4].p == 1.0
