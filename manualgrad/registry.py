r"""The registry: each hand-written operation is declared once, next to its Function; the rest derives from it.

An operation is a function of ``torch.nn.functional`` that manualgrad
replaces (``relu``), the autograd Function(s) it applies (``ReLUFunction``)
and the ``torch.nn`` module it backs (``torch.nn.ReLU``). Its declaration
gives, with nothing else to edit:

* ``manualgrad.functional.relu``: the wrapper, with torch's signature;
* ``manualgrad.nn.ReLU``: a subclass of ``torch.nn.ReLU`` whose ``forward``
  calls the wrapper with the module's own attributes (:mod:`manualgrad.nn`);
* :func:`manualgrad.convert`: ``torch.nn.ReLU`` modules become that twin;
* the fused :class:`manualgrad.nn.MLP`: an activation module maps to its Function;
* :func:`manualgrad.testing.check` and the test suite (gradcheck, gradgradcheck,
  forward AD, parity in every dtype with :attr:`Op.reference`, no derivative
  kernel, vmap, compile) and ``python -m benchmarks``. The calls they make
  (examples, kinks, random operations) are not here: they are
  :mod:`manualgrad.testing`'s table, as OpInfo's samples live in
  ``torch.testing``; an operation missing there gets examples made from its
  signature (an activation) or from the inputs given to ``check``.

Three ways to declare:

* an elementwise activation is a Function and one line,
  ``relu = activation("relu", ReLUFunction, torch.nn.ReLU)``:
  the wrapper takes ``forward``'s parameters after the input, in order;
* a loss is a Function and one line too, ``mse_loss = loss(MSELossFunction,
  torch.nn.MSELoss, "mse_loss")`` (:func:`manualgrad.functions.losses.loss`,
  which calls :func:`operation`): the wrapper takes torch's signature;
* anything else is its wrapper, written out and decorated:
  ``@operation(torch.nn.Linear, LinearFunction, kind="layer")``.

All take ``reference=``: a function computing the same thing with PyTorch's
own backward, which the checks compare with. Without one, an operation that
backs a ``torch.nn`` module is compared with torch's function of the same
name, and any other with autograd through its Function's plain ``forward``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import _checks
from .functions.base import ManualFunction, apply

__all__ = ["OPS", "Op", "activation", "operation", "ops"]


@dataclass(eq=False)
class Op:
    """One operation: see the module docstring."""

    name: str  #: its name in ``torch.nn.functional`` (or ``torch``): ``"relu"``
    functional: Callable  #: ours, with torch's signature
    functions: tuple[type[ManualFunction], ...]  #: the Functions it applies
    module: type[torch.nn.Module] | None  #: the torch.nn class its twin subclasses
    kind: str  #: ``"activation"``, ``"loss"`` or ``"layer"``
    parameters: tuple[str, ...] = ()  #: an activation's parameters after the input, in order (its forward's)
    #: the twin's ``forward(self, input)``, for a module whose attributes are not named as the wrapper's
    #: parameters (``Unflatten.unflattened_size``); None: the generic one of :mod:`manualgrad.nn`
    module_forward: Callable | None = None
    #: what the checks compare with (see :attr:`reference`); None: the default
    given_reference: Callable | None = None
    #: its backward calls :mod:`manualgrad.functions.recorder` for the parameters' per-sample norms, gradients and
    #: clipping (:func:`manualgrad.per_sample`, :mod:`manualgrad.privacy`)
    per_sample: bool = False

    @property
    def reference(self) -> Callable | None:
        """The function the checks compare with: the one declared (``reference=``), else, for an operation that
        backs a ``torch.nn`` module, PyTorch's own function of the same name; else None (the checks then use
        autograd through the Function's plain ``forward``)."""
        if self.given_reference is not None:
            return self.given_reference
        if self.module is None or not self.module.__module__.startswith("torch."):
            return None
        return getattr(torch.nn.functional, self.name, None) or getattr(torch, self.name, None)

    @property
    def function(self) -> type[ManualFunction]:
        return self.functions[0]


#: Every registered operation, by name, in the order of registration.
OPS: dict[str, Op] = {}


def ops(kind: str | None = None) -> list[Op]:
    """The registered operations, all or of one kind."""
    return [op for op in OPS.values() if kind is None or op.kind == kind]


def _register(op: Op) -> Op:
    if op.name in OPS and OPS[op.name].functions != op.functions:
        raise ValueError(f"an operation named {op.name!r} is registered already ({OPS[op.name].function.__name__})")
    OPS[op.name] = op
    return op


def operation(
    module: type[torch.nn.Module] | None,
    *functions: type[ManualFunction],
    kind: str,
    reference: Callable | None = None,
    module_forward: Callable | None = None,
    per_sample: bool = False,
):
    """Decorator: register a written-out wrapper (named as in torch) applying ``functions``."""

    def register(functional: Callable) -> Callable:
        name = functional.__name__
        op = Op(
            name,
            functional,
            functions,
            module,
            kind,
            module_forward=module_forward,
            given_reference=reference,
            per_sample=per_sample,
        )
        _register(op)
        return functional

    return register


def activation(
    name: str,
    function: type[ManualFunction],
    module: type[torch.nn.Module] | None,
    *,
    reference: Callable | None = None,
) -> Callable:
    """Register an elementwise activation; return its wrapper ``name(input, <forward's parameters>)``.

    The wrapper checks that the input is a real floating-point tensor and the
    options are valid (``function.check``), handles ``inplace=True`` (see
    :func:`_elementwise`), and applies the Function. ``reference``: see the
    module docstring.
    """
    params = list(inspect.signature(function.forward).parameters.values())[1:]
    call = _elementwise(name, function, inplace=any(p.name == "inplace" for p in params))
    functional = _with_signature(name, params, call, function.__doc__)

    names = tuple(p.name for p in params)
    op = Op(name, functional, (function,), module, "activation", parameters=names, given_reference=reference)
    _register(op)
    return functional


def _with_signature(name: str, params: list[inspect.Parameter], call: Callable, doc: str | None) -> Callable:
    """``def name(input, <params>): return call(input, <params>)``, with the exact signature written out,
    the way ``dataclasses`` writes ``__init__`` (keywords and errors are then Python's own, at no cost)."""
    declared = ", ".join(["input", *(p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in params)])
    passed = ", ".join(["input", *(p.name for p in params)])
    namespace = {"call": call}
    exec(f"def {name}({declared}):\n    return call({passed})\n", namespace)
    functional = namespace[name]
    functional.__module__ = "manualgrad.functional"
    functional.__doc__ = doc
    return functional


def _elementwise(name: str, function, inplace: bool) -> Callable:
    """The body of an activation's wrapper: validate, then apply ``function`` (with ``inplace`` last, if any).

    ``inplace=True`` applies the Function in place (it marks its input dirty),
    with two exceptions, where the result is computed out of place and copied
    back: under ``torch.compile``, which cannot trace a Function that dirties
    its input, and when the derivative needs the input (SiLU) while autograd
    records; the Function then keeps a copy of the input (as PyTorch's own
    ``silu_`` does) unless it keeps its output.
    """

    def call(input, *params):
        _checks.real_floating(name, "input", input)
        function.check(*params)
        if not (inplace and params[-1]):
            return apply(function, input, *params)
        records = input.requires_grad and torch.is_grad_enabled()
        if not torch.compiler.is_compiling() and (function.saves_output(*params) or not records):
            return apply(function, input, *params)  # in place: the Function keeps what it needs
        out_of_place = (*params[:-1], False)
        kept = input.clone() if records and not function.saves_output(*out_of_place) else input
        return input.copy_(apply(function, kept, *out_of_place))

    return call
