r"""Drop-in twins of ``torch.nn`` modules whose backward passes are manualgrad's.

For every operation of the registry that backs a ``torch.nn`` module
(:mod:`manualgrad.registry`), this module has a class of the same name that
subclasses it and replaces only ``forward``: constructor signature,
parameters, initialisation, ``repr``, ``state_dict`` keys and ``isinstance``
checks are torch's own, so a checkpoint saved from one loads into the other.
``forward`` calls the operation's wrapper in :mod:`manualgrad.functional`,
passing each of its parameters that the module stores under the same name
(``self.weight``, ``self.negative_slope``, ``self.training``, ...).

Every other name of ``torch.nn`` (``Module``, ``Sequential``, ``Parameter``,
``init``, ``Conv3d``, ...) is handed on to torch, so ``import manualgrad.nn as
nn`` never breaks a script; ``nn.functional`` is :mod:`manualgrad.functional`.
So are torch.nn's submodules: ``import manualgrad.nn.functional as F`` gives
:mod:`manualgrad.functional`, and ``import manualgrad.nn.init``, ``from
manualgrad.nn.utils import parametrize``, ``from manualgrad.nn.parameter
import Parameter``, ... give torch's own modules (:class:`_TorchSubmodules`), so
swapping ``torch`` for ``manualgrad`` in a ``torch.nn`` import line never breaks
it. Only this package's names are ours: ``manualgrad.nn.modules.Linear`` is
torch's. ``dir()`` and ``from manualgrad.nn import *`` list only what is ours.

:class:`MLP` is the whole network as one Function.
"""

from __future__ import annotations

import copy
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import sys
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from .. import _checks, _compat
from .. import functional as _functional
from ..errors import InputError
from ..functions import MLPCrossEntropyFunction, MLPFunction, MLPSpec
from ..functions.base import apply
from ..registry import OPS, Op, ops

_TWINS: dict[str, type[torch.nn.Module]] = {}  # class name -> twin, made once per operation


def twin(op: Op) -> type[torch.nn.Module]:
    """The manualgrad twin of ``op.module``: a subclass whose forward calls ``op.functional``."""
    name = op.module.__name__
    if name not in _TWINS:
        _TWINS[name] = type(
            name,
            (op.module,),
            {
                "forward": op.module_forward or _twin_forward,
                "_op": op,
                "__module__": __name__,
                "__doc__": _twin_doc(op),
            },
        )
    return _TWINS[name]


def _twin_forward(self, *inputs):
    """``functional(*inputs, <each further parameter: the module's attribute of that name, or its default>)``."""
    arguments = type(self).__dict__.get("_arguments")
    if arguments is None or len(inputs) != arguments[0]:
        arguments = _arguments(self, len(inputs))
    return self._op.functional(
        *inputs, *[getattr(self, name) if own else default for name, own, default in arguments[1]]
    )


def _arguments(module: torch.nn.Module, n_inputs: int):
    """Which of the functional's parameters after the first ``n_inputs`` the module stores (once per class)."""
    parameters = list(inspect.signature(module._op.functional).parameters.values())[n_inputs:]
    arguments = (n_inputs, [(p.name, hasattr(module, p.name), p.default) for p in parameters])
    type(module)._arguments = arguments
    return arguments


def _twin_doc(op: Op) -> str:
    math = (op.function.__doc__ or "").strip().split("\n\n")[0]
    return (
        f"``torch.nn.{op.module.__name__}`` with a hand-written backward: {math}\n\n"
        f"Same constructor, arguments, attributes and shapes as ``torch.nn.{op.module.__name__}`` (a subclass of it);\n"
        f"``forward`` applies :func:`manualgrad.functional.{op.name}` "
        f"(:class:`manualgrad.functions.{op.function.__name__}`).\n"
    )


def _twins_by_name() -> dict[str, type[torch.nn.Module]]:
    return {op.module.__name__: twin(op) for op in ops() if op.module is not None}


globals().update(_twins_by_name())


def activation_of(module: torch.nn.Module) -> tuple[Op, tuple] | None:
    """The registered activation ``module`` computes, with its Function's parameters (``inplace`` off), or None.

    A module counts if its class is the torch.nn activation or our twin, or a
    subclass of either that keeps their ``forward``.
    """
    op = _role(type(module))
    if not isinstance(op, Op):
        return None
    return op, tuple(False if name == "inplace" else getattr(module, name) for name in op.parameters)


def _role(cls: type) -> str | Op | None:
    """What a module of class ``cls`` computes for the fused MLP: ``"Linear"``, ``"Dropout"``, a registered
    activation's Op, or None (something else, e.g. a subclass with its own forward). Worked out once per class."""
    key = (cls, len(OPS))  # an operation registered later may claim a class
    if key not in _ROLES:
        _ROLES[key] = _role_of(cls)
    return _ROLES[key]


def _role_of(cls: type) -> str | Op | None:
    for torch_class in (torch.nn.Linear, torch.nn.Dropout):
        if issubclass(cls, torch_class):
            return torch_class.__name__ if cls.forward in (torch_class.forward, _twin_forward) else None
    for op in ops("activation"):
        if op.module is not None and issubclass(cls, op.module):
            return op if cls.forward in (op.module.forward, _twin_forward) else None
        if op.module is None and getattr(cls, "_op", None) is op:  # the module of an activation without one
            return op if cls.forward is _twin_forward else None
    return None


_ROLES: dict[tuple, str | Op | None] = {}


def activation_module(op: Op) -> type[torch.nn.Module]:
    """The module class of a registered activation: its twin, or for one declared without a ``torch.nn`` class
    (``activation("squareplus", SquarePlusFunction, None)``) a ``torch.nn.Module`` whose constructor takes the
    activation's parameters (``SquarePlus(b=1.0)``) and whose forward applies it."""
    if op.module is not None:
        return twin(op)
    if op.name not in _MODULES or _MODULES[op.name]._op is not op:  # made once per registration
        defaults = {p.name: p.default for p in inspect.signature(op.functional).parameters.values()}

        def __init__(self, **kwargs):
            torch.nn.Module.__init__(self)
            unknown = set(kwargs) - set(op.parameters)
            if unknown:
                raise TypeError(f"{op.name}: unexpected arguments {sorted(unknown)}")
            for name in op.parameters:
                setattr(self, name, kwargs.get(name, defaults[name]))

        def extra_repr(self):
            return ", ".join(f"{name}={getattr(self, name)!r}" for name in op.parameters)

        name = "".join(part.capitalize() for part in op.name.split("_"))
        _MODULES[op.name] = type(
            name,
            (torch.nn.Module,),
            {
                "__init__": __init__,
                "forward": _twin_forward,
                "extra_repr": extra_repr,
                "_op": op,
                "__module__": __name__,
            },
        )
    return _MODULES[op.name]


_MODULES: dict[str, type[torch.nn.Module]] = {}


class _Activations(Mapping):
    """Name -> module class of every registered activation, read from the registry at each use: an activation
    registered after import (a user's own) is there too."""

    def _table(self) -> dict[str, type[torch.nn.Module]]:
        return {op.name: activation_module(op) for op in ops("activation")}

    def __getitem__(self, name: str) -> type[torch.nn.Module]:
        return self._table()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def __repr__(self) -> str:
        return f"ACTIVATIONS({', '.join(self)})"


#: The activation names :class:`MLP` (and the training program) accept, with the module each one builds (live).
ACTIVATIONS: Mapping[str, type[torch.nn.Module]] = _Activations()


class MLP(torch.nn.Sequential):
    r"""A multilayer perceptron whose forward and backward are ONE autograd Function.

    .. math::

        Z_l = A_{l-1} W_l^\top + b_l, \quad A_l = \text{dropout}(h(Z_l)) \ (l < L), \quad \text{output } Z_L

    Backward: the notes' chain :math:`G \leftarrow (G W_l) \odot M_{l-1} \odot h'(Z_{l-1})`
    with :math:`G_{W_l} = G^\top A_{l-1}`, :math:`G_{b_l} = \sum_n G[n]` on the way
    down (:class:`~manualgrad.functions.MLPFunction`). :meth:`loss` fuses the
    softmax cross-entropy too.

    It *is* the ``nn.Sequential`` a per-layer MLP would be, ``Linear,
    activation, [Dropout,] Linear, ...``: same children, same parameters, same
    ``state_dict`` keys (``"0.weight", "0.bias", "2.weight", ...`` without
    dropout, ``"0.weight", "3.weight", ...`` with it), so checkpoints move
    between the two. Every call reads its children as they are then: replace
    a layer (``mlp[-1] = Linear(256, 5)``), change an activation's parameter
    or a dropout probability, parametrise a weight
    (``torch.nn.utils.parametrize``), put one dropout child alone in training
    mode (``mlp.eval(); mlp[2].train()``, Monte Carlo dropout: each dropout
    child drops as its own ``training`` says), and the fused Function computes
    that, with the masks a per-layer model would draw under the same seed. A
    child with hooks (``register_forward_hook`` and the like, also
    ``torch.nn.utils.prune``'s and the old ``weight_norm``'s), or any global
    module hook, is called as a module, so its hooks run: the call then runs
    the children one by one, as ``per_layer()`` does (slower, same result). A
    child it cannot compute (e.g. a subclass with its own ``forward``) raises an
    :class:`~manualgrad.InputError` that points to ``per_layer()``, which runs the
    same modules one by one. The fused path is first-order only (a double
    backward raises); ``torch.compile`` traces it without a graph break. For
    ``torch.func`` or forward-mode AD use ``per_layer()``.

    Args:
        sizes: layer widths, input first, e.g. ``(784, 512, 256, 10)``
        activation: a name in :data:`ACTIVATIONS` or an activation module (copied
            after every hidden layer). Default: ``"relu"``
        dropout: dropout probability after every hidden activation. Default: ``0.0``
        bias: whether the Linear layers have biases. Default: ``True``
        device, dtype: factory arguments for the parameters

    Shape:
        - Input: :math:`(*, \text{sizes}[0])`; output: :math:`(*, \text{sizes}[-1])`

    Examples::

        >>> import manualgrad.nn as mnn
        >>> model = mnn.MLP([784, 512, 256, 10], activation="relu", dropout=0.1)
        >>> logits = model(torch.randn(128, 784))
        >>> loss = model.loss(torch.randn(128, 784), torch.randint(0, 10, (128,)))
    """

    def __init__(
        self,
        sizes: Sequence[int],
        activation: str | torch.nn.Module = "relu",
        dropout: float = 0.0,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        sizes = tuple(int(s) for s in sizes)
        if len(sizes) < 2 or min(sizes) < 1:
            raise InputError(f"MLP: sizes needs an input and an output width, all positive, got {sizes}")
        if isinstance(activation, str):
            _checks.choice("MLP", "activation", activation, tuple(ACTIVATIONS))
            activation = ACTIVATIONS[activation]()
        if activation_of(activation) is None:
            raise InputError(f"MLP: activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
        _checks.dropout_p("MLP", dropout)
        layers = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
            layers.append(Linear(fan_in, fan_out, bias=bias, device=device, dtype=dtype))  # noqa: F821 (a twin)
            if i < len(sizes) - 2:
                layers.append(copy.deepcopy(activation))
                if dropout > 0:
                    layers.append(Dropout(dropout))  # noqa: F821 (a twin)
        super().__init__(*layers)

    def __getitem__(self, idx):
        if isinstance(idx, slice):  # a slice is a plain Sequential of the same modules
            return torch.nn.Sequential(*list(self)[idx])
        return super().__getitem__(idx)

    @property
    def sizes(self) -> tuple[int, ...]:
        """The layer widths, input first, as the Linear children are now."""
        linears = [m for m in self if isinstance(m, torch.nn.Linear)]
        return (linears[0].in_features, *(m.out_features for m in linears)) if linears else ()

    def _structure(self, layer: str, label_smoothing: float = 0.0) -> tuple[MLPSpec, list]:
        """The spec and the parameters ``(W1, b1, ..., WL, bL)`` of the children as they are now:
        ``Linear, activation, [Dropout,] Linear, ...``, ending in a Linear."""
        params, activations, dropouts = [], [], []
        expect = ("Linear",)
        for index, module in enumerate(self):
            role = _role(type(module))
            name = role if isinstance(role, str) else "activation" if role is not None else None
            if name not in expect:
                wanted = " or ".join(expect)
                raise InputError(
                    f"{layer}: child {index} ({type(module).__name__}) is not what the fused MLP can compute here "
                    f"(expected {wanted}: torch.nn's or manualgrad's, keeping their forward); "
                    "mlp.per_layer() runs any modules one by one"
                )
            if name == "Linear":
                params += [module.weight, module.bias]
                expect = ("activation",)
            elif name == "activation":
                args = tuple(False if arg == "inplace" else getattr(module, arg) for arg in role.parameters)
                activations.append((role.function, args))
                dropouts.append(0.0)
                expect = ("Linear", "Dropout")
            else:
                dropouts[-1] = module.p if module.training else 0.0  # each dropout child drops as it says
                expect = ("Linear",)
        if expect != ("activation",):
            raise InputError(f"{layer}: the last child must be a Linear layer, got {type(self[-1]).__name__}")
        spec = MLPSpec(tuple(activations), tuple(dropouts), any(dropouts), float(label_smoothing))
        return spec, params

    def _hooked(self) -> bool:
        """Whether calling some child runs hooks, which the fused Function would skip."""
        return any(_compat.has_call_hooks(module) for module in self)

    def forward(self, input: Tensor) -> Tensor:
        if self._hooked():  # the children one by one, as modules, so that their hooks run
            return super().forward(input)
        spec, params = self._structure("MLP")
        _checks.linear(input, params[0], params[1], layer="MLP")
        return apply(MLPFunction, input, spec, *params)[0]

    def loss(self, input: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
        """Mean softmax cross-entropy of ``self(input)`` against class indices, fused into the same Function.

        Equal to ``manualgrad.functional.cross_entropy(self(input), target,
        label_smoothing=label_smoothing)``, with the whole training step's
        backward in one autograd node. Shape: input ``(N, sizes[0])``, target ``(N,)``.
        """
        _checks.probability("MLP.loss", "label_smoothing", label_smoothing)
        if self._hooked():  # the children one by one, as modules, so that their hooks run
            return _functional.cross_entropy(super().forward(input), target, label_smoothing=label_smoothing)
        spec, params = self._structure("MLP.loss", label_smoothing)
        _checks.linear(input, params[0], params[1], layer="MLP.loss")
        _checks.class_indices("MLP.loss", input, target, params[-2].shape[0])
        target = target.long()  # uint8 class indices (as cross_entropy takes them) as the index dtype
        wants_grad = torch.is_grad_enabled() and (
            input.requires_grad or any(p is not None and p.requires_grad for p in params)
        )
        return apply(MLPCrossEntropyFunction, input, target, spec, wants_grad, *params)[0]

    def per_layer(self) -> torch.nn.Sequential:
        """The same modules (shared parameters) as a plain ``nn.Sequential``: one Function per layer."""
        return torch.nn.Sequential(*self)


def __getattr__(name: str):
    if name == "functional":
        return _functional
    op = next((op for op in OPS.values() if op.module is not None and op.module.__name__ == name), None)
    if op is not None:  # registered after this module was imported (a user's own operation)
        return twin(op)
    if name == "__all__":
        return sorted([*_twins_by_name(), "MLP", "ACTIVATIONS"])
    if not name.startswith("__") and hasattr(torch.nn, name):
        return getattr(torch.nn, name)  # not ours: torch's own, with torch's backward
    return _missing(name)


def _missing(name: str):
    raise AttributeError(f"module {__name__!r} has no attribute {name!r} (nor has torch.nn)")


def __dir__() -> list[str]:
    return sorted([*_twins_by_name(), "MLP", "ACTIVATIONS", "twin", "activation_of", "activation_module"])


class _TorchSubmodules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``manualgrad.nn.<name>`` as :mod:`manualgrad.functional` (``functional``) or as torch's own
    ``torch.nn.<name>`` (``init``, ``utils.parametrize``, ``parameter``, ...): the same module object, so
    that ``import torch.nn.X`` lines work with ``torch`` swapped for ``manualgrad``."""

    PREFIX = __name__ + "."

    def __init__(self) -> None:
        self._specs: dict[str, importlib.machinery.ModuleSpec] = {}  # the aliased modules' own specs

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(self.PREFIX) or importlib.util.find_spec(self._target(fullname)) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    @classmethod
    def _target(cls, fullname: str) -> str:
        name = fullname[len(cls.PREFIX) :]
        return _functional.__name__ if name == "functional" else f"torch.nn.{name}"

    def create_module(self, spec):
        module = importlib.import_module(self._target(spec.name))  # that module itself, not a copy
        self._specs[module.__name__] = module.__spec__
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self._specs.pop(module.__name__)  # the import system set it to the alias's


if not any(isinstance(finder, _TorchSubmodules) for finder in sys.meta_path):  # once, even if reloaded
    sys.meta_path.insert(0, _TorchSubmodules())  # before the path finder, which would load a second copy
