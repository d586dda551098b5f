"""Public training scripts, switched to manualgrad by their import lines alone.

Each constant below is a compact transcription of one script's model, loss and training step, with the
script's own torch imports; as in ``test_client.py``, each test runs it twice, as written and with the
``nn``/``F`` import lines swapped for ``manualgrad.nn``/``manualgrad.functional`` (nothing else changes),
from the same weights and seeds, in float64:

* pytorch/examples ``vae/main.py`` (the VAE, its BCE + KL loss, Adam);
* pytorch/examples ``regression/main.py`` (polynomial regression, ``F.smooth_l1_loss``, hand-written SGD);
* pytorch/examples ``mnist_hogwild/main.py`` and ``train.py`` (the older MNIST CNN, ``share_memory``, SGD
  with momentum);
* the PyTorch tutorial "Quickstart" (``NeuralNetwork``: ``nn.Flatten`` and a ``Linear``/``ReLU`` stack,
  ``nn.CrossEntropyLoss``, SGD);
* the PyTorch tutorial "Per-sample-gradients" (``SimpleCNN``, ``torch.func.functional_call`` and
  ``vmap(grad(compute_loss))``);
* a course notebook's MNIST MLP (Udacity's deep-learning-v2-pytorch ``mnist_mlp`` solution, the ``Net``
  many course notebooks copy: 784-512-512-10, ``x.view``, ``nn.Dropout(0.2)``, ``nn.CrossEntropyLoss``).

Every test checks the swapped script against its torch run (the same losses, gradients, parameters or
per-sample gradients) and names exactly which backward nodes stay torch's: what an import swap cannot
reach (``torch.sigmoid``, ``torch.flatten``, a ``.view`` of an activation, the VAE's arithmetic, a
``torch.nn.Linear`` written out in full) is listed node by node. A view or ``nn.Flatten`` of the input
itself adds no backward node (the input needs no gradient): the quickstart and the course MLP are all ours.
The scripts that spell the imports ``from torch import nn`` or ``from torch.nn import functional as F``
keep that spelling; ``FROM_SWAP`` swaps those lines.

The scripts' own module-level code (argument parsing, datasets, the loops over epochs) is left out; where
the test stands in for it, a comment says so. Every script is run with float64 as the default dtype, so
its own tensors (the regression's batches) are float64 without editing it.
"""

from __future__ import annotations

import types
import warnings
from collections import Counter

import pytest
import torch
from support import RecordOps
from test_client import SWAP, load

import manualgrad

#: ``from torch import ...`` spellings of the same two imports, and what the swap writes instead.
FROM_SWAP = {
    "from torch import nn, optim\n": "from manualgrad import nn\nfrom torch import optim\n",
    "from torch.nn import functional as F\n": "from manualgrad import functional as F\n",
    "from torch import nn\n": "from manualgrad import nn\n",
}


def load_script(source: str, swap: bool) -> dict:
    """``test_client.load``, for scripts that spell their imports as ``SWAP`` does or as ``FROM_SWAP`` does,
    or import only one of the two: every swappable import line the script has is swapped (at least one)."""
    if swap:
        lines = {theirs: ours for theirs, ours in {**SWAP, **FROM_SWAP}.items() if theirs in source}
        assert lines, "no import line to swap"
        for theirs, ours in lines.items():
            source = source.replace(theirs, ours)
    namespace = load(source, swap=False)
    if swap:
        assert namespace.get("F", manualgrad.functional) is manualgrad.functional
        assert namespace.get("nn", manualgrad.nn) is manualgrad.nn
    return namespace


@pytest.fixture(autouse=True)
def _float64():
    """The scripts make their own tensors (parameters, the regression's batches): float64 by default."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def assert_same_parameters(ours: torch.nn.Module, theirs: torch.nn.Module, grads: bool = True) -> None:
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        if grads:
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-10, msg=lambda m, n=name: f"{n}.grad: {m}")
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


def images(step: int, n: int = 4, uniform: bool = False):
    """A batch of MNIST-shaped images and labels (``uniform``: pixels in [0, 1], as ``ToTensor`` gives)."""
    generator = torch.Generator().manual_seed(100 + step)
    data = torch.rand if uniform else torch.randn
    return data(n, 1, 28, 28, generator=generator), torch.randint(0, 10, (n,), generator=generator)


# ---------------------------------------------------------------------------------------------------------
# pytorch/examples vae/main.py

VAE = """
import torch
import torch.utils.data
from torch import nn, optim
from torch.nn import functional as F


class VAE(nn.Module):
    def __init__(self):
        super(VAE, self).__init__()

        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu, logvar):
        std = torch.exp(0.5*logvar)
        eps = torch.randn_like(std)
        return mu + eps*std

    def decode(self, z):
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, 784))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


# Reconstruction + KL divergence losses summed over all elements and batch
def loss_function(recon_x, x, mu, logvar):
    BCE = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction='sum')

    # 0.5 * sum(1 + log(sigma^2) - mu^2 - sigma^2)
    KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())

    return BCE + KLD


# the body of train(epoch)'s loop over train_loader
def train_step(model, optimizer, data):
    model.train()
    optimizer.zero_grad()
    recon_batch, mu, logvar = model(data)
    loss = loss_function(recon_batch, data, mu, logvar)
    loss.backward()
    optimizer.step()
    return loss
"""

#: What the swap cannot reach in the VAE, node by node: ``torch.sigmoid`` in ``decode``, the
#: reparameterisation ``mu + eps*std`` with ``std = torch.exp(0.5*logvar)``, and the KL term
#: ``-0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())`` added to the BCE. (``x.view(-1, 784)`` views
#: the data, which needs no gradient: it adds no node.)
VAE_FOREIGN = Counter(
    {
        "SigmoidBackward0": 1,  # torch.sigmoid(self.fc4(h3))
        "MulBackward0": 3,  # 0.5*logvar, eps*std, -0.5 * torch.sum(...)
        "ExpBackward0": 2,  # torch.exp(0.5*logvar), logvar.exp()
        "AddBackward0": 3,  # mu + eps*std, 1 + logvar, BCE + KLD
        "PowBackward0": 1,  # mu.pow(2)
        "SubBackward0": 2,  # ... - mu.pow(2) - logvar.exp()
        "SumBackward0": 1,  # torch.sum(...)
    }
)


def test_vae_every_layer_and_the_bce_are_ours_the_rest_is_exactly_the_scripts_own_torch_arithmetic():
    client = load_script(VAE, swap=True)
    model = client["VAE"]()
    data, _ = images(0, uniform=True)
    recon, mu, logvar = model(data)
    coverage = manualgrad.manual_coverage(client["loss_function"](recon, data, mu, logvar))
    assert dict(coverage.manual) == {
        "LinearFunctionBackward": 5,
        "ReLUFunctionBackward": 2,
        "BinaryCrossEntropyFunctionBackward": 1,
    }
    assert coverage.foreign == VAE_FOREIGN and coverage.leaves == 10
    # the torch run has the same torch nodes, and its own in place of ours
    torch_client = load_script(VAE, swap=False)
    recon, mu, logvar = torch_client["VAE"]()(data)
    theirs = manualgrad.manual_coverage(torch_client["loss_function"](recon, data, mu, logvar)).foreign
    assert theirs == VAE_FOREIGN + Counter(
        {"AddmmBackward0": 5, "TBackward0": 5, "ReluBackward0": 2, "BinaryCrossEntropyBackward0": 1}
    )


def test_vae_adam_steps_match_torch():
    """Three Adam steps (the script's optimizer, lr 1e-3): the same loss, gradients and parameters as the torch
    run; ``torch.randn_like`` draws the same noise from the same seed. The only derivative kernel left is
    torch's ``sigmoid_backward``, for ``torch.sigmoid``."""
    torch_client, our_client = load_script(VAE, swap=False), load_script(VAE, swap=True)
    torch.manual_seed(0)
    theirs, ours = torch_client["VAE"](), our_client["VAE"]()
    ours.load_state_dict(theirs.state_dict())
    optimizers = [
        client["optim"].Adam(m.parameters(), lr=1e-3) for client, m in ((torch_client, theirs), (our_client, ours))
    ]
    for step in range(3):
        data, _ = images(step, uniform=True)
        torch.manual_seed(step)
        ref = torch_client["train_step"](theirs, optimizers[0], data)
        torch.manual_seed(step)
        with RecordOps() as kernels:
            loss = our_client["train_step"](ours, optimizers[1], data)
        assert kernels.derivative_kernels == ["sigmoid_backward"]
        torch.testing.assert_close(loss, ref, rtol=0, atol=1e-9)
        assert_same_parameters(ours, theirs)


# ---------------------------------------------------------------------------------------------------------
# pytorch/examples regression/main.py: it imports torch.nn.functional as F, but not torch.nn, and writes
# ``torch.nn.Linear`` in full; the swap reaches F.smooth_l1_loss, manualgrad.convert(fc) reaches the Linear.

REGRESSION = """
import torch
import torch.nn.functional as F

POLY_DEGREE = 4
W_target = torch.randn(POLY_DEGREE, 1) * 5
b_target = torch.randn(1) * 5


def make_features(x):
    \"\"\"Builds features i.e. a matrix with columns [x, x^2, x^3, x^4].\"\"\"
    x = x.unsqueeze(1)
    return torch.cat([x ** i for i in range(1, POLY_DEGREE+1)], 1)


def f(x):
    \"\"\"Approximated function.\"\"\"
    return x.mm(W_target) + b_target.item()


def get_batch(batch_size=32):
    \"\"\"Builds a batch i.e. (x, f(x)) pair.\"\"\"
    random = torch.randn(batch_size)
    x = make_features(random)
    y = f(x)
    return x, y


# Define model
fc = torch.nn.Linear(W_target.size(0), 1)


# the body of the script's `for batch_idx in count(1):` loop
def train_step():
    # Get data
    batch_x, batch_y = get_batch()

    # Reset gradients
    fc.zero_grad()

    # Forward pass
    output = F.smooth_l1_loss(fc(batch_x), batch_y)
    loss = output.item()

    # Backward pass
    output.backward()

    # Apply gradients
    for param in fc.parameters():
        param.data.add_(-0.1 * param.grad)

    return loss
"""


def test_regression_the_swap_reaches_smooth_l1_and_convert_reaches_the_torch_nn_linear():
    client = load_script(REGRESSION, swap=True)
    assert "import torch.nn as nn\n" not in REGRESSION and "nn" not in client
    fc = client["fc"]
    assert type(fc) is torch.nn.Linear  # written as torch.nn.Linear: no import line names it
    batch_x, batch_y = client["get_batch"]()
    coverage = manualgrad.manual_coverage(client["F"].smooth_l1_loss(fc(batch_x), batch_y))
    assert dict(coverage.manual) == {"SmoothL1LossFunctionBackward": 1}
    assert dict(coverage.foreign) == {"AddmmBackward0": 1, "TBackward0": 1}  # torch.nn.Linear's own backward
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert manualgrad.convert(fc) is fc
    assert [str(w.message) for w in caught] == []  # nothing left for convert to report
    assert type(fc) is manualgrad.nn.Linear
    coverage = manualgrad.manual_coverage(client["F"].smooth_l1_loss(fc(batch_x), batch_y))
    assert coverage.complete and coverage.manual["LinearFunctionBackward"] == 1, coverage


def test_regression_sgd_steps_match_torch():
    """The script's hand-written SGD (lr 0.1) for three batches: the swapped script, its ``fc`` converted,
    draws the same batches and learns the same polynomial as the torch script, with no derivative kernel."""
    torch.manual_seed(0)
    torch_client = load_script(REGRESSION, swap=False)
    torch.manual_seed(0)
    our_client = load_script(REGRESSION, swap=True)  # the same W_target, b_target and fc from the same seed
    manualgrad.convert(our_client["fc"])
    for name in ("W_target", "b_target"):
        assert torch.equal(our_client[name], torch_client[name])
    for step in range(3):
        torch.manual_seed(step)
        ref = torch_client["train_step"]()
        torch.manual_seed(step)
        with RecordOps() as kernels:
            loss = our_client["train_step"]()
        assert kernels.ops and kernels.derivative_kernels == []
        assert loss == pytest.approx(ref, rel=0, abs=1e-12)
        assert_same_parameters(our_client["fc"], torch_client["fc"])


# ---------------------------------------------------------------------------------------------------------
# pytorch/examples mnist_hogwild: main.py's Net, and train.py's train and train_epoch (each file with its own
# imports; both are swapped).

HOGWILD_MAIN = """
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.multiprocessing as mp


class Net(nn.Module):
    def __init__(self):
        super(Net, self).__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = x.view(-1, 320)
        x = F.relu(self.fc1(x))
        x = F.dropout(x, training=self.training)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)
"""

HOGWILD_TRAIN = """
import os
import torch
import torch.optim as optim
import torch.nn.functional as F


def train(rank, args, model, device, dataset, dataloader_kwargs):
    torch.manual_seed(args.seed + rank)

    train_loader = torch.utils.data.DataLoader(dataset, **dataloader_kwargs)

    optimizer = optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    for epoch in range(1, args.epochs + 1):
        train_epoch(epoch, args, model, device, train_loader, optimizer)


def train_epoch(epoch, args, model, device, data_loader, optimizer):
    model.train()
    pid = os.getpid()
    for batch_idx, (data, target) in enumerate(data_loader):
        optimizer.zero_grad()
        output = model(data.to(device))
        loss = F.nll_loss(output, target.to(device))
        loss.backward()
        optimizer.step()
"""


def test_hogwild_net_leaves_exactly_its_view():
    client = load_script(HOGWILD_MAIN, swap=True)
    model = client["Net"]()
    data, target = images(0)
    coverage = manualgrad.manual_coverage(client["F"].nll_loss(model(data), target))
    assert dict(coverage.foreign) == {"ViewBackward0": 1}  # x = x.view(-1, 320)
    assert dict(coverage.manual) == {
        "Conv2dFunctionBackward": 2,
        "DropoutFunctionBackward": 2,  # nn.Dropout2d and F.dropout: one Function
        "MaxPool2dFunctionBackward": 2,
        "ReLUFunctionBackward": 3,
        "LinearFunctionBackward": 2,
        "LogSoftmaxFunctionBackward": 1,
        "NLLLossFunctionBackward": 1,
    }


def test_hogwild_training_matches_torch_with_shared_memory():
    """main.py's ``model.share_memory()`` and train.py's ``train`` (SGD, lr 0.01, momentum 0.5, the script's
    defaults; the DataLoader shuffles from the seed ``train`` sets): the same parameters as the torch run after
    three batches, dropout masks included, with no derivative kernel.

    One process: the test calls ``train(0, ...)`` where main.py starts ``args.num_processes`` processes on the
    shared model. Hogwild's lock-free updates from several processes are not reproducible step for step, and
    the manualgrad Functions change nothing there (``share_memory`` moves the parameters' storage; the
    modules are torch's own subclasses)."""
    args = types.SimpleNamespace(seed=1, lr=0.01, momentum=0.5, epochs=1, log_interval=10)
    generator = torch.Generator().manual_seed(5)
    dataset = torch.utils.data.TensorDataset(
        torch.randn(12, 1, 28, 28, generator=generator), torch.randint(0, 10, (12,), generator=generator)
    )
    kwargs = {"batch_size": 4, "shuffle": True}
    models = []
    for swap in (False, True):
        main, train = load_script(HOGWILD_MAIN, swap), load_script(HOGWILD_TRAIN, swap)
        torch.manual_seed(args.seed)
        model = main["Net"]().to("cpu")
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        model.share_memory()
        assert all(p.is_shared() for p in model.parameters())
        with RecordOps() as kernels:
            train["train"](0, args, model, "cpu", dataset, kwargs)
        if swap:
            assert kernels.ops and kernels.derivative_kernels == []
            assert type(model.conv2_drop) is manualgrad.nn.Dropout2d
        models.append(model)
    theirs, ours = models
    assert_same_parameters(ours, theirs)
    assert all(not torch.equal(p, initial[k]) for k, p in ours.named_parameters())  # it trained


# ---------------------------------------------------------------------------------------------------------
# The PyTorch tutorial "Quickstart" (Learn the Basics)

QUICKSTART = """
import torch
from torch import nn
from torch.utils.data import DataLoader

device = "cpu"  # the tutorial picks torch.accelerator's device when there is one


class NeuralNetwork(nn.Module):
    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear_relu_stack = nn.Sequential(
            nn.Linear(28*28, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, 10)
        )

    def forward(self, x):
        x = self.flatten(x)
        logits = self.linear_relu_stack(x)
        return logits


def train(dataloader, model, loss_fn, optimizer):
    size = len(dataloader.dataset)
    model.train()
    for batch, (X, y) in enumerate(dataloader):
        X, y = X.to(device), y.to(device)

        # Compute prediction error
        pred = model(X)
        loss = loss_fn(pred, y)

        # Backpropagation
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
"""


def test_quickstart_is_all_ours_and_trains_as_torch_does():
    """The tutorial's ``model``, ``loss_fn = nn.CrossEntropyLoss()`` and ``torch.optim.SGD(..., lr=1e-3)``, one
    ``train`` epoch over three batches of 4 (its DataLoader does not shuffle): every backward node is ours,
    and the parameters equal the torch run's."""
    generator = torch.Generator().manual_seed(7)
    dataset = torch.utils.data.TensorDataset(
        torch.rand(12, 1, 28, 28, generator=generator), torch.randint(0, 10, (12,), generator=generator)
    )
    models = []
    for swap in (False, True):
        client = load_script(QUICKSTART, swap)
        torch.manual_seed(0)
        model = client["NeuralNetwork"]().to(client["device"])
        loss_fn = client["nn"].CrossEntropyLoss()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        if swap:
            coverage = manualgrad.manual_coverage(loss_fn(model(dataset.tensors[0][:4]), dataset.tensors[1][:4]))
            assert coverage.complete, coverage
            assert dict(coverage.manual) == {  # nn.Flatten flattens the input, which needs no gradient: no node
                "LinearFunctionBackward": 3,
                "ReLUFunctionBackward": 2,
                "CrossEntropyFunctionBackward": 1,
            }
        with RecordOps() as kernels:
            client["train"](client["DataLoader"](dataset, batch_size=4), model, loss_fn, optimizer)
        if swap:
            assert kernels.ops and kernels.derivative_kernels == []
        models.append(model)
    theirs, ours = models
    assert_same_parameters(ours, theirs, grads=False)  # train() ends with optimizer.zero_grad()


# ---------------------------------------------------------------------------------------------------------
# The PyTorch tutorial "Per-sample-gradients" (torch.func)

PER_SAMPLE = """
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap, grad


class SimpleCNN(nn.Module):
    def __init__(self):
        super(SimpleCNN, self).__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.fc2(x)
        output = F.log_softmax(x, dim=1)
        return output


def loss_fn(predictions, targets):
    return F.nll_loss(predictions, targets)


def compute_grad(sample, target):
    sample = sample.unsqueeze(0)  # prepend batch dimension for processing
    target = target.unsqueeze(0)

    prediction = model(sample)
    loss = loss_fn(prediction, target)

    return torch.autograd.grad(loss, list(model.parameters()))


def compute_sample_grads(data, targets):
    \"\"\" manually process each sample with per sample gradient \"\"\"
    sample_grads = [compute_grad(data[i], targets[i]) for i in range(batch_size)]
    sample_grads = zip(*sample_grads)
    sample_grads = [torch.stack(shards) for shards in sample_grads]
    return sample_grads


def compute_loss(params, buffers, sample, target):
    batch = sample.unsqueeze(0)
    targets = target.unsqueeze(0)

    predictions = functional_call(model, (params, buffers), (batch,))
    loss = loss_fn(predictions, targets)
    return loss


ft_compute_grad = grad(compute_loss)
ft_compute_sample_grad = vmap(ft_compute_grad, in_dims=(None, None, 0, 0))
"""


def _per_sample_grads(client, state, data, targets):
    """The tutorial's module-level steps: ``model = SimpleCNN()``, its detached ``params``/``buffers``, then
    ``ft_compute_sample_grad(params, buffers, data, targets)``; also its loop, ``compute_sample_grads``."""
    model = client["SimpleCNN"]()
    model.load_state_dict(state)
    client.update(model=model, batch_size=len(data))
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    return client["ft_compute_sample_grad"](params, buffers, data, targets), client["compute_sample_grads"](
        data, targets
    )


def test_per_sample_gradients_of_the_swapped_cnn_equal_torchs():
    """``vmap(grad(compute_loss))`` through the swapped model: each sample's gradient equals the torch
    model's to 1e-10, and the tutorial's own per-sample loop. The one node the swap leaves is
    ``torch.flatten(x, 1)`` (as in the verbatim MNIST example of test_client)."""
    torch_client, our_client = load_script(PER_SAMPLE, swap=False), load_script(PER_SAMPLE, swap=True)
    torch.manual_seed(0)
    state = torch_client["SimpleCNN"]().state_dict()
    data, targets = images(0)
    expected, _ = _per_sample_grads(torch_client, state, data, targets)
    with RecordOps() as kernels:
        per_sample, looped = _per_sample_grads(our_client, state, data, targets)
    assert kernels.ops and kernels.derivative_kernels == []
    names = [name for name, _ in our_client["model"].named_parameters()]
    assert list(per_sample) == names and all(per_sample[n].shape[0] == len(data) for n in names)
    for name, loop in zip(names, looped):
        torch.testing.assert_close(
            per_sample[name], expected[name], rtol=0, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}"
        )
        torch.testing.assert_close(per_sample[name], loop, rtol=0, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
    model = our_client["model"]
    coverage = manualgrad.manual_coverage(our_client["loss_fn"](model(data), targets))
    assert dict(coverage.foreign) == {"ViewBackward0": 1}  # torch.flatten(x, 1)
    assert coverage.manual["Conv2dFunctionBackward"] == 2 and coverage.manual["NLLLossFunctionBackward"] == 1


# ---------------------------------------------------------------------------------------------------------
# A course notebook's MNIST MLP (Udacity deep-learning-v2-pytorch, mnist_mlp solution)

COURSE_MLP = """
import torch
import torch.nn as nn
import torch.nn.functional as F

## TODO: Define the NN architecture
class Net(nn.Module):
    def __init__(self):
        super(Net, self).__init__()
        # number of hidden nodes in each layer (512)
        hidden_1 = 512
        hidden_2 = 512
        # linear layer (784 -> hidden_1)
        self.fc1 = nn.Linear(28 * 28, hidden_1)
        # linear layer (n_hidden -> hidden_2)
        self.fc2 = nn.Linear(hidden_1, hidden_2)
        # linear layer (n_hidden -> 10)
        self.fc3 = nn.Linear(hidden_2, 10)
        # dropout layer (p=0.2)
        # dropout prevents overfitting of data
        self.dropout = nn.Dropout(0.2)

    def forward(self, x):
        # flatten image input
        x = x.view(-1, 28 * 28)
        # add hidden layer, with relu activation function
        x = F.relu(self.fc1(x))
        # add dropout layer
        x = self.dropout(x)
        # add hidden layer, with relu activation function
        x = F.relu(self.fc2(x))
        # add dropout layer
        x = self.dropout(x)
        # add output layer
        x = self.fc3(x)
        return x


# the body of the notebook's loop over train_loader
def train_step(model, criterion, optimizer, data, target):
    # clear the gradients of all optimized variables
    optimizer.zero_grad()
    # forward pass: compute predicted outputs by passing inputs to the model
    output = model(data)
    # calculate the loss
    loss = criterion(output, target)
    # backward pass: compute gradient of the loss with respect to model parameters
    loss.backward()
    # perform a single optimization step (parameter update)
    optimizer.step()
    return loss
"""


def test_course_mlp_is_all_ours_and_trains_as_torch_does():
    """The notebook's ``criterion = nn.CrossEntropyLoss()`` and ``torch.optim.SGD(..., lr=0.01)``, three steps in
    ``model.train()``: the same losses, gradients and parameters as the torch run, dropout masks included."""
    torch_client, our_client = load(COURSE_MLP, swap=False), load(COURSE_MLP, swap=True)
    torch.manual_seed(0)
    theirs, ours = torch_client["Net"](), our_client["Net"]()
    ours.load_state_dict(theirs.state_dict())
    data, target = images(0)
    criterion = our_client["nn"].CrossEntropyLoss()
    coverage = manualgrad.manual_coverage(criterion(ours(data), target))
    assert coverage.complete, coverage  # x.view(-1, 28 * 28) views the input, which needs no gradient: no node
    assert dict(coverage.manual) == {
        "LinearFunctionBackward": 3,
        "ReLUFunctionBackward": 2,
        "DropoutFunctionBackward": 2,
        "CrossEntropyFunctionBackward": 1,
    }
    runs = [(torch_client, theirs), (our_client, ours)]
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.01) for _, model in runs]
    for model in (theirs, ours):
        model.train()  # prep model for training
    for step in range(3):
        data, target = images(step)
        losses = []
        for (client, model), optimizer in zip(runs, optimizers):
            torch.manual_seed(step)
            losses.append(client["train_step"](model, client["nn"].CrossEntropyLoss(), optimizer, data, target))
        torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-12)
        assert_same_parameters(ours, theirs)
