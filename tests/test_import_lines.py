"""The commonest ``torch.nn`` import lines work with ``torch`` swapped for ``manualgrad``.

Each line is run twice, as written and swapped; every name it binds must be the same object as
torch's, or, where manualgrad has its own (``functional``, the twins of torch.nn's modules, the
wrappers of torch.nn.functional's functions), manualgrad's counterpart of it.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

import manualgrad
import manualgrad.nn as mnn

LINES = [
    "import torch.nn as nn",
    "import torch.nn.functional as F",
    "import torch.nn.functional",
    "from torch.nn import functional as F",
    "from torch.nn.functional import relu, cross_entropy, pad",
    "import torch.nn.init as init",
    "import torch.nn.init",
    "from torch.nn import init",
    "from torch.nn.init import kaiming_uniform_, zeros_",
    "import torch.nn.utils.parametrize as parametrize",
    "from torch.nn.utils import parametrize",
    "import torch.nn.utils.parametrizations as parametrizations",
    "from torch.nn.utils.parametrizations import weight_norm, spectral_norm",
    "import torch.nn.utils.prune as prune",
    "from torch.nn.utils import clip_grad_norm_, parameters_to_vector",
    "from torch.nn.utils.rnn import pad_sequence",
    "import torch.nn.utils",
    "from torch.nn.parameter import Parameter",
    "from torch.nn import Parameter, Module, Sequential, ModuleList",
    "from torch.nn import Linear, ReLU, Conv2d, CrossEntropyLoss, Dropout",
    "from torch.nn.modules.loss import _Loss",
    "from torch.nn.modules import Module",
    "from torch.nn.parallel import DistributedDataParallel",
    "from torch.nn.common_types import _size_2_t",
]


def _swap(line: str) -> str:
    return line.replace("torch.nn", "manualgrad.nn")


def _run(line: str) -> dict:
    namespace: dict = {}
    exec(line, namespace)
    namespace.pop("__builtins__")
    return namespace


def _counterpart(theirs):
    """What the swapped line should bind where torch's binds ``theirs``."""
    if theirs is torch.nn:
        return mnn
    if theirs is torch.nn.functional:
        return manualgrad.functional
    if isinstance(theirs, type) and theirs.__module__.startswith("torch.nn.modules") and theirs.__name__ in dir(mnn):
        return getattr(mnn, theirs.__name__)
    if callable(theirs) and getattr(theirs, "__module__", None) == "torch.nn.functional":
        return getattr(manualgrad.functional, theirs.__name__)
    return theirs


@pytest.mark.parametrize("line", LINES)
def test_a_torch_nn_import_line_works_with_torch_swapped_for_manualgrad(line):
    theirs, ours = _run(line), _run(_swap(line))
    if line.startswith("import ") and " as " not in line:  # binds the top-level package: follow the dotted path
        dotted = line.split()[1].split(".")[1:]
        theirs, ours = {".".join(dotted): theirs["torch"]}, {".".join(dotted): ours["manualgrad"]}
        for attribute in dotted:
            theirs = {k: getattr(v, attribute) for k, v in theirs.items()}
            ours = {k: getattr(v, attribute) for k, v in ours.items()}
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert ours[name] is _counterpart(value), (line, name)


def test_the_swapped_dotted_import_reaches_torch_s_submodule():
    namespace = _run("import manualgrad.nn.utils.parametrize")
    assert namespace["manualgrad"].nn.utils.parametrize is torch.nn.utils.parametrize


def test_an_aliased_submodule_keeps_its_own_name_and_spec():
    import manualgrad.nn.functional
    import manualgrad.nn.init

    assert sys.modules["manualgrad.nn.init"] is torch.nn.init
    assert torch.nn.init.__name__ == torch.nn.init.__spec__.name == "torch.nn.init"
    assert manualgrad.functional.__spec__.name == "manualgrad.functional"


def test_a_submodule_torch_nn_lacks_is_missing_here_too():
    with pytest.raises(ModuleNotFoundError, match="manualgrad.nn.no_such_module"):
        exec("import manualgrad.nn.no_such_module")


def test_manualgrad_nn_is_a_package():
    assert isinstance(mnn, types.ModuleType) and hasattr(mnn, "__path__")
