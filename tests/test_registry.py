"""The registry: one declaration per operation, and everything derived from it; the import swap never crashes."""

from __future__ import annotations

import pytest
import torch
from support import F64
from torch.autograd import gradcheck, gradgradcheck

import manualgrad
import manualgrad.functional as MF
import manualgrad.nn as mnn
from manualgrad import registry
from manualgrad.functions import Elementwise
from manualgrad.registry import OPS, activation, ops


@pytest.fixture
def squareplus():
    """The README's example: an activation declared in the user's own file (and removed afterwards)."""

    class SquarePlusFunction(Elementwise):
        r""":math:`h(z) = (z + \sqrt{z^2 + b})/2`, :math:`h'(z) = (1 + z/\sqrt{z^2 + b})/2`."""

        @staticmethod
        def forward(z, b=4.0):
            return (z + torch.sqrt(z * z + b)) / 2

        @staticmethod
        def derivative(z, b=4.0):
            return (1 + z / torch.sqrt(z * z + b)) / 2

    yield activation("squareplus", SquarePlusFunction, None)
    del OPS["squareplus"]


def test_a_users_own_activation_is_a_functional_with_every_check(squareplus):
    assert MF.squareplus is squareplus and "squareplus" in dir(MF)
    z = torch.randn(6, dtype=F64, requires_grad=True)
    assert gradcheck(MF.squareplus, (z,), check_forward_ad=True, check_batched_grad=True)
    assert gradgradcheck(MF.squareplus, (z,))
    assert squareplus(z, b=1.0).shape == (6,)
    with pytest.raises(TypeError, match="unexpected keyword argument 'c'"):
        squareplus(z, c=1.0)
    model = torch.nn.Sequential(mnn.Linear(6, 3)).double()
    loss = MF.cross_entropy(MF.squareplus(model(z.detach().unsqueeze(0))), torch.tensor([1]))
    assert manualgrad.manual_coverage(loss).complete


def test_mish_is_one_class_and_one_line_and_everything_follows():
    """Mish was added as the README says: MishFunction and `mish = activation(...)` in activations.py."""
    op = OPS["mish"]
    assert op.kind == "activation" and op.module is torch.nn.Mish
    assert MF.mish is op.functional and issubclass(mnn.Mish, torch.nn.Mish)
    assert manualgrad.convert(torch.nn.Sequential(torch.nn.Mish()))[0].__class__ is mnn.Mish
    model = mnn.MLP([4, 5, 3], activation="mish").double()
    x, y = torch.randn(6, 4, dtype=F64), torch.randint(0, 3, (6,))
    torch.testing.assert_close(model.loss(x, y), MF.cross_entropy(model.per_layer()(x), y))
    assert "mish" in mnn.ACTIVATIONS


def test_registries_are_live_mlp_train_and_convert_see_an_operation_registered_after_import(squareplus, tmp_path):
    from train.config import parse_args

    model = mnn.MLP([4, 5, 3], activation="squareplus").double()
    assert type(model[1]).__name__ == "Squareplus" and model[1].b == 4.0
    x, y = torch.randn(6, 4, dtype=F64), torch.randint(0, 3, (6,))
    torch.testing.assert_close(model.loss(x, y), MF.cross_entropy(model.per_layer()(x), y))
    assert "squareplus" in mnn.ACTIVATIONS
    cfg, _ = parse_args(["--activation", "squareplus"])
    assert cfg.activation == "squareplus"

    class Cube(torch.nn.Module):
        def forward(self, x):
            return x**3

    class CubeFunction(Elementwise):
        @staticmethod
        def forward(z):
            return z**3

        @staticmethod
        def derivative(z):
            return 3 * z * z

    activation("cube", CubeFunction, Cube)
    try:
        converted = manualgrad.convert(torch.nn.Sequential(Cube()))
        assert isinstance(converted[0], Cube) and type(converted[0]) is mnn.twin(OPS["cube"])
    finally:
        del OPS["cube"]


def test_train_imports_a_users_activation_given_as_file_and_name(tmp_path):
    from train.config import parse_args

    (tmp_path / "my_acts.py").write_text(
        "import torch\n"
        "from manualgrad.functions import Elementwise\n"
        "from manualgrad.registry import activation\n\n\n"
        "class HalfFunction(Elementwise):\n"
        "    @staticmethod\n"
        "    def forward(z):\n"
        "        return z / 2\n\n"
        "    @staticmethod\n"
        "    def derivative(z):\n"
        "        return torch.full_like(z, 0.5)\n\n\n"
        "half = activation('half', HalfFunction, None)\n"
    )
    try:
        cfg, _ = parse_args(["--activation", f"{tmp_path / 'my_acts.py'}:half"])
        assert cfg.activation == "half"
        assert mnn.MLP([3, 4, 2], activation=cfg.activation)(torch.randn(2, 3)).shape == (2, 2)
    finally:
        OPS.pop("half", None)


def test_registering_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="an operation named 'relu' is registered already"):
        activation("relu", OPS["tanh"].function, None)


def test_every_operation_is_reachable_by_its_torch_name():
    for op in ops():
        assert getattr(MF, op.name) is op.functional
        assert op.reference is not None, f"{op.name}: no torch function of that name to compare with"
        if op.module is not None:
            assert getattr(mnn, op.module.__name__) is mnn.twin(op)
    assert set(manualgrad.convert.__globals__["twins"]()) == {op.module for op in ops() if op.module is not None}


def test_the_swap_hands_every_other_name_to_torch():
    """`import manualgrad.nn as nn` and `import manualgrad.functional as F` never break a script."""
    for name in ("Module", "Sequential", "ModuleList", "Parameter", "Identity", "BatchNorm2d", "init", "utils"):
        assert getattr(mnn, name) is getattr(torch.nn, name)
    for name in ("pad", "one_hot", "interpolate", "normalize"):
        assert getattr(MF, name) is getattr(torch.nn.functional, name)
    assert mnn.functional is MF
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchLayer'"):
        mnn.NoSuchLayer  # noqa: B018


def test_dir_and_star_import_list_only_what_is_ours():
    ours = {op.module.__name__ for op in ops() if op.module is not None}
    assert set(dir(mnn)) >= ours and "Module" not in dir(mnn) and "MLP" in dir(mnn)
    assert set(dir(MF)) == set(OPS) and "pad" not in dir(MF)
    namespace: dict = {}
    exec("from manualgrad.nn import *", namespace)
    assert "Linear" in namespace and "MLP" in namespace and "Module" not in namespace
    namespace = {}
    exec("from manualgrad.functional import *", namespace)
    assert "relu" in namespace and "pad" not in namespace


def test_kinds_are_known():
    assert {op.kind for op in ops()} <= {"activation", "loss", "layer"}
    assert registry.ops("activation") and registry.ops("loss") and registry.ops("layer")
