"""``check``: the battery our own operations pass, for any Function, functional or registered operation."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.autograd.forward_ad as fwAD

from ..functions.activations import Elementwise
from ..functions.base import ManualFunction, apply
from ..registry import OPS, Op
from . import _diagnose
from ._tools import RecordOps, manual_seed, nudge_off_kinks, saved_bytes, seeded
from .samples import Example, examples, is_random, kinks

__all__ = [
    "CONSISTENCY",
    "CORRECTNESS",
    "PROPERTIES",
    "TOLERANCES",
    "CheckFailed",
    "Report",
    "Result",
    "check",
    "compare",
]

CORRECTNESS = "correctness"  #: against finite differences or the reference: a wrong derivative fails
CONSISTENCY = "consistency"  #: against your own first derivative or eager mode: a wrong derivative may pass
IMPLEMENTATION = "implementation"
INFO = "info"

#: Every property, in the report's order, with what it checks.
PROPERTIES: dict[str, str] = {
    "gradcheck": CORRECTNESS,
    "kinks": CORRECTNESS,
    "jvp": CORRECTNESS,
    "parity float64": CORRECTNESS,
    "parity float32": CORRECTNESS,
    "parity float16": CORRECTNESS,
    "parity bfloat16": CORRECTNESS,
    "gradgradcheck": CONSISTENCY,
    "vmap": CONSISTENCY,
    "jacrev/jacfwd": CONSISTENCY,
    "compile": CONSISTENCY,
    "derivative kernels": IMPLEMENTATION,
    "saved bytes": INFO,
}

_DTYPES = {
    f"parity {str(d).removeprefix('torch.')}": d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
}

#: Parity with the reference, per dtype. float64: ``|ours - ref| <= atol + rtol |ref|`` (two correct formulas
#: differ by rounding, ~1e-15; a wrong one by far more). Lower precisions: ours is at least as close to the float64
#: truth (the reference in float64) as the reference in that dtype is, within ``slack`` x its error, or within
#: ``units`` x the dtype's eps at the result's magnitude (two correct implementations round differently; a formula
#: of several rounded operations, or a sum of many terms, is a few units off). Measured on every registered
#: operation over 30 seeds: at most 4.9 units in float32 (conv2d's bias gradient, a sum), 1.2 in float16/bfloat16.
#: A wrong derivative is off by a fraction of the value itself, thousands of units in float32.
TOLERANCES = {
    torch.float64: {"rtol": 1e-7, "atol": 1e-10},
    torch.float32: {"slack": 1.1, "units": 8},
    torch.float16: {"slack": 1.1, "units": 2},
    torch.bfloat16: {"slack": 1.1, "units": 2},
    #: a random op in a lower precision: against the reference in that dtype, with the same mask
    "same mask": {
        torch.float32: {"rtol": 1e-5, "atol": 1e-5},
        torch.float16: {"rtol": 1e-2, "atol": 1e-2},
        torch.bfloat16: {"rtol": 1e-2, "atol": 1e-2},
    },
}

#: finite differences: step, and gradcheck's own closeness
EPS, ATOL, RTOL = 1e-6, _diagnose.ATOL, _diagnose.RTOL
#: where the kink property looks: a finite-difference step (1e-6) is far smaller than the nearest
#: the largest input or output (in numbers) whose full Jacobians the finite-difference properties build
MAX_ELEMENTS = 4096
KINK_OFFSETS = (-3e-2, -1e-2, -1e-3, -1e-4, 1e-4, 1e-3, 1e-2, 3e-2)


class CheckFailed(AssertionError):
    """Raised by :meth:`Report.assert_ok`; its message is the whole report."""


@dataclass
class Result:
    """One property's verdict: ``status`` is ``"ok"``, ``"FAIL"``, ``"skipped"`` or ``"info"``."""

    name: str
    kind: str
    status: str
    message: str
    diagnoses: list[_diagnose.Diagnosis] = field(default_factory=list)

    @property
    def mistakes(self) -> list[str]:
        return [k for d in self.diagnoses for k in d.kinds]


@dataclass
class Report:
    """What :func:`check` found: one :class:`Result` per property; prints as a table, one line per property."""

    title: str
    results: list[Result]
    table: list[str] = field(default_factory=list)  #: an elementwise op's z, h', autograd's h', ratio
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.status != "FAIL" for r in self.results)

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results if r.status == "FAIL"]

    @property
    def mistakes(self) -> list[str]:
        """The kinds of mistake the diagnoses name (``"factor"``, ``"sign"``, ...), without repeats."""
        return list(dict.fromkeys(k for r in self.results for k in r.mistakes))

    def __getitem__(self, name: str) -> Result:
        return next(r for r in self.results if r.name == name)

    def __str__(self) -> str:
        verdict = "all properties hold" if self.ok else f"{len(self.failed)} FAILED"
        lines = [f"check({self.title}): {verdict} ({self.seconds:.1f} s)"]
        for r in self.results:
            status = {"ok": "ok", "FAIL": "FAIL", "skipped": "skip", "info": "info"}[r.status]
            lines.append(f"  {status:<5}{r.name:<20}{r.kind:<15}{r.message}")
        if self.table:
            lines += ["", *self.table]
        for r in self.failed:
            for d in r.diagnoses:
                lines += ["", f"{r.name}: " + d.lines()[0], *("  " + line for line in d.lines()[1:])]
        lines += [
            "",
            "correctness: against finite differences or the reference (a wrong derivative fails these); "
            "consistency: against your own first derivative or eager mode (a wrong derivative can pass these).",
        ]
        return "\n".join(lines)

    __repr__ = __str__

    def assert_ok(self) -> Report:
        """Raise :class:`CheckFailed`, whose message is the report, if a property failed; else return self."""
        if not self.ok:
            raise CheckFailed("\n" + str(self))
        return self


class _Skip(Exception):
    """A property that cannot run here; its message says why."""


# ---- what is checked ------------------------------------------------------------------------------


@dataclass
class _Target:
    title: str
    call: Callable  #: ``call(*args, **kwargs)``: the output (the first of a tuple)
    cases: Callable[[torch.dtype], list[Example]]
    reference: Callable | None
    reference_label: str
    kinks: Callable[[dict], tuple]
    random: bool
    elementwise: bool
    has_jvp: bool


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _positional(function: type, args: tuple, kwargs: dict) -> tuple:
    bound = inspect.signature(function.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return tuple(bound.args)


def _defines_jvp(function: type) -> bool:
    return function.jvp is not torch.autograd.Function.jvp


def _given_cases(inputs: tuple, kwargs: dict, name: str = "given"):
    def cases(dtype):
        cast = tuple(
            a.detach().to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in inputs
        )
        return [Example(name, cast, dict(kwargs))]

    return cases


def _default_cases(dtype):
    return [Example("6x7", (torch.randn(6, 7).mul_(3).to(dtype),), {})]


def _target(fn, inputs: tuple, kwargs: dict, reference, kink_list, random) -> _Target:
    op = fn if isinstance(fn, Op) else OPS.get(fn) if isinstance(fn, str) else None
    if op is None and callable(fn) and not isinstance(fn, type):
        op = next((o for o in OPS.values() if o.functional is fn), None)
    if isinstance(fn, str) and op is None:
        raise KeyError(f"no registered operation named {fn!r} (registered: {', '.join(OPS)})")
    if op is not None:
        if inputs:
            cases = _given_cases(inputs, kwargs)
        else:
            cases = lambda dtype: examples(op, dtype)  # noqa: E731
            if not cases(torch.float64):
                raise ValueError(f"{op.name}: no examples in manualgrad.testing's table; pass example inputs")
        ref = reference or op.reference
        function = op.function
        label = "reference" if reference else _name(op.reference) if op.reference else ""
        if ref is None:  # autograd through the plain forward (an activation's Function takes its parameters)
            ref, label = _plain_forward(function), f"autograd through {function.__name__}.forward"
        return _Target(
            op.name,
            op.functional,
            cases,
            ref,
            label,
            (lambda kw: kink_list) if kink_list is not None else (lambda kw: kinks(op, kw)),
            is_random(op) if random is None else random,
            op.kind == "activation",
            _defines_jvp(function),
        )
    if isinstance(fn, type) and issubclass(fn, torch.autograd.Function):
        elementwise = issubclass(fn, Elementwise)
        if inputs:
            cases = _given_cases(inputs, kwargs)
        elif elementwise:
            cases = (
                _default_cases
                if not kwargs
                else lambda dt: [Example("6x7", e.args, dict(kwargs)) for e in _default_cases(dt)]
            )
        else:
            raise ValueError(f"{fn.__name__}: pass example inputs, check({fn.__name__}, x, ...)")
        old_style = next(iter(inspect.signature(fn.forward).parameters), None) == "ctx"  # forward(ctx, ...)
        if reference:
            ref, label = reference, "reference"
        elif old_style:  # its forward needs a ctx: it cannot run as a plain function
            ref, label = None, ""
        else:
            ref, label = _plain_forward(fn), f"autograd through {fn.__name__}.forward"
        if old_style:
            run = lambda *a, **kw: fn.apply(*a, *kw.values())  # noqa: E731
        elif issubclass(fn, ManualFunction):
            run = lambda *a, **kw: apply(fn, *_positional(fn, a, kw))  # noqa: E731
        else:
            run = lambda *a, **kw: fn.apply(*_positional(fn, a, kw))  # noqa: E731
        return _Target(
            fn.__name__,
            run,
            cases,
            ref,
            label,
            lambda kw: tuple(kink_list or ()),
            bool(random),
            elementwise,
            _defines_jvp(fn),
        )
    if callable(fn):
        if not inputs:
            raise ValueError(f"{_name(fn)}: pass example inputs, check(fn, x, ...)")
        return _Target(
            _name(fn),
            fn,
            _given_cases(inputs, kwargs),
            reference,
            "reference" if reference else "",
            lambda kw: tuple(kink_list or ()),
            bool(random),
            False,
            True,
        )
    raise TypeError(f"check: expected a Function class, a function or a registered operation's name, got {fn!r}")


def _name(fn) -> str:
    module = getattr(fn, "__module__", None) or ""
    return f"{module}.{getattr(fn, '__name__', repr(fn))}".lstrip(".")


def _plain_forward(function: type) -> Callable:
    """The Function's ``forward`` called as a plain function: autograd differentiates its formula."""

    def reference(*args, **kwargs):
        return function.forward(*_positional(function, args, kwargs))

    return reference


# ---- the battery ----------------------------------------------------------------------------------


def check(
    fn,
    *example_inputs,
    reference: Callable | None = None,
    kwargs: dict | None = None,
    kinks: tuple[float, ...] | None = None,
    random: bool | None = None,
    compile: bool = False,
    properties: list[str] | None = None,
    seed: int = 0,
) -> Report:
    r"""Check a hand-written backward: the battery manualgrad's own operations pass, with a diagnosis.

    ``fn`` is a Function class (``SquarePlusFunction``), a function (``my_op``,
    or a registered wrapper such as ``manualgrad.functional.relu``) or a
    registered operation's name (``"relu"``). The calls checked are
    ``fn(*example_inputs, **kwargs)`` in float64 (and, for parity, in float32,
    float16 and bfloat16), or without inputs: the operation's examples in
    :mod:`manualgrad.testing.samples`, or ``randn(6, 7) * 3`` for an
    elementwise Function. Every floating-point tensor argument is
    differentiated. Properties (:data:`PROPERTIES`):

    * correctness, against finite differences: ``gradcheck`` (your backward's
      Jacobian, entry by entry, with a diagnosis of a mismatch), ``kinks``
      (both sides of each declared kink), ``jvp`` (forward mode);
    * correctness, against ``reference`` (default: the registered one, else
      autograd through the Function's plain ``forward``): ``parity`` in four
      dtypes (:data:`TOLERANCES`);
    * consistency, which a wrong derivative can pass: ``gradgradcheck`` (your
      second derivative against your own first), ``vmap``, ``jacrev/jacfwd``,
      ``compile`` (``torch.compile(fullgraph=True, backend="aot_eager")``: no
      graph break, same output and gradients; opt-in, ``compile=True``, a few
      seconds);
    * ``derivative kernels``: no PyTorch ``*_backward`` kernel ran in the
      backward, double backward or forward mode; ``saved bytes``: what autograd
      keeps for the backward, against the reference (information).

    A property that cannot run says ``skipped`` and why; it never fails.

    What a numeric check cannot see: finite differences need a smooth function
    near each point (points within 0.01 of a declared kink are moved off; the
    ``kinks`` property probes 1e-4 to 3e-2 away; an undeclared kink can fail
    ``gradcheck`` for a correct op, or hide a wrong one-sided derivative);
    float16/bfloat16 are compared by error against the float64 truth, not
    bitwise; a random operation (dropout) is checked as the fixed function of
    one seed (``random=True`` reseeds before every call); an in-place input is
    cloned for every call, so what the op does to it in place is not checked.

    Args:
        reference: a function with ``fn``'s signature, differentiated by PyTorch.
        kwargs: keyword arguments for every call.
        kinks: where the derivative of an elementwise op jumps.
        random: ``fn`` draws random numbers (reseed before every call).
        compile: also run ``torch.compile``.
        properties: only these (names of :data:`PROPERTIES`).

    Returns:
        a :class:`Report`; ``report.assert_ok()`` raises :class:`CheckFailed` with it.

    Example::

        >>> from manualgrad.testing import check
        >>> print(check("tanh"))  # doctest: +SKIP
    """
    start = time.perf_counter()
    target = _target(fn, example_inputs, dict(kwargs or {}), reference, kinks, random)
    wanted = list(PROPERTIES) if properties is None else list(properties)
    unknown = set(wanted) - set(PROPERTIES)
    if unknown:
        raise ValueError(f"check: unknown properties {sorted(unknown)}; known: {list(PROPERTIES)}")
    manual_seed(seed)
    cases = target.cases(torch.float64)
    state = {}
    results = []
    for name in PROPERTIES:
        if name not in wanted:
            continue
        try:
            if name == "compile" and not compile:
                raise _Skip("compile=False (pass compile=True, or --compile; it adds a few seconds)")
            run = _PROPERTY[name] if name not in _DTYPES else _parity
            out = run(target, cases, state, name=name, seed=seed)
            status, message, diagnoses = out if len(out) == 3 else (*out, [])
        except _Skip as why:
            status, message, diagnoses = "skipped", f"skipped: {why}", []
        except Exception as error:  # a property that raises has failed, with the error as its message
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            prefix = "" if type(error) is AssertionError else f"{type(error).__name__}: "
            status, message, diagnoses = "FAIL", f"{prefix}{first}"[:300], []
        results.append(Result(name, PROPERTIES[name], status, message, diagnoses))
    table = []
    if target.elementwise and target.reference is not None:
        try:
            table = _table(target, cases)
            if any(r.status == "FAIL" for r in results):
                _add_saved_tensor(target, cases, results)
        except Exception as error:  # the properties above say what is wrong; the table is extra
            table = [f"(no table of h': {type(error).__name__}: {str(error).strip()[:200]})"]
    return Report(target.title, results, table, time.perf_counter() - start)


def _leaves_of(target: _Target, case: Example, nudge: bool = True, reseed: bool = True):
    """``f(*leaves)`` over the case's floating tensors (reseeded if random, unless not ``reseed``), and those
    leaves (copies)."""
    args = list(case.args)
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    if nudge and target.elementwise and positions:
        args[positions[0]] = nudge_off_kinks(args[positions[0]], target.kinks(case.kwargs))
    leaves = [args[i].detach().clone().requires_grad_() for i in positions]

    def f(*values):
        full = list(args)
        for i, v in zip(positions, values):
            full[i] = v
        return _first(target.call(*full, **case.kwargs))

    return (seeded(f) if target.random and reseed else f), leaves


def _jacobians(f, leaves):
    """Analytic (backward) and numeric Jacobians, one ``(out elements, leaf elements)`` pair per leaf."""
    out = f(*leaves)
    m = out.numel()
    if max(m, *(x.numel() for x in leaves)) > MAX_ELEMENTS:
        raise _Skip(
            f"an example of {m} output and {[x.numel() for x in leaves]} input numbers: full Jacobians need "
            f"small examples (at most {MAX_ELEMENTS} numbers each); pass smaller inputs"
        )
    analytic = [torch.zeros(m, leaf.numel(), dtype=torch.float64) for leaf in leaves]
    for r in range(m):
        e = torch.zeros(m, dtype=out.dtype)
        e[r] = 1
        grads = torch.autograd.grad(out, leaves, e.reshape(out.shape), retain_graph=True, allow_unused=True)
        for j, g in enumerate(grads):
            if g is not None:
                analytic[j][r] = g.reshape(-1).double()
    numeric = []
    with torch.no_grad():
        for j, leaf in enumerate(leaves):
            columns = torch.zeros(m, leaf.numel(), dtype=torch.float64)
            flat = leaf.detach().clone().reshape(-1)
            for k in range(leaf.numel()):
                values = []
                for sign in (1, -1):
                    moved = flat.clone()
                    moved[k] += sign * EPS
                    inputs = [moved.reshape(leaf.shape) if i == j else x.detach() for i, x in enumerate(leaves)]
                    values.append(f(*inputs).reshape(-1).double())
                columns[:, k] = (values[0] - values[1]) / (2 * EPS)
            numeric.append(columns)
    return out, analytic, numeric


def _compare(jacobians, leaves, out, target, case, what: str):
    diagnoses = []
    worst = 0.0
    for j, (a, n) in enumerate(jacobians):
        if a.numel():
            worst = max(worst, (a - n).abs().nan_to_num(nan=float("inf")).max().item())
        values = leaves[j].detach() if target.elementwise and j == 0 else None
        d = _diagnose.jacobian(
            a, n, tuple(leaves[j].shape), tuple(out.shape), f"input {j}", values, target.kinks(case.kwargs)
        )
        if d is not None:
            d.where = f"{what}, example {case.id!r}: {d.where}"
            diagnoses.append(d)
    return worst, diagnoses


def _gradcheck(target, cases, state, **_):
    worst, diagnoses, sizes = 0.0, [], []
    for case in cases:
        f, leaves = _leaves_of(target, case)
        if not leaves:
            continue
        out, analytic, numeric = _jacobians(f, leaves)
        state.setdefault("numeric", {})[case.id] = (f, leaves, out, numeric)
        w, found = _compare(list(zip(analytic, numeric)), leaves, out, target, case, "backward")
        worst, diagnoses = max(worst, w), diagnoses + found
        sizes.append(f"{out.numel()}x{sum(x.numel() for x in leaves)}")
        if not found and out.numel():  # the rest of torch's gradcheck: undefined and batched gradients
            torch.autograd.gradcheck(f, leaves, check_undefined_grad=True, check_batched_grad=True, fast_mode=True)
    if not sizes:
        raise _Skip("no floating-point input to differentiate")
    if diagnoses:
        kinds = sorted({k for d in diagnoses for k in d.kinds})
        return (
            "FAIL",
            f"backward != finite differences (max |err| {worst:.3g}; {', '.join(kinds) or 'see below'})",
            diagnoses,
        )
    return (
        "ok",
        f"backward = finite differences on {len(sizes)} example(s), Jacobians {', '.join(sizes[:3])} "
        f"(max |err| {worst:.1e})",
    )


def _kinks(target, cases, state, **_):
    if not target.elementwise:
        raise _Skip("not an elementwise op")
    offsets = torch.tensor(KINK_OFFSETS, dtype=torch.float64)
    diagnoses, seen = [], 0
    for case in cases:
        points = target.kinks(case.kwargs)
        for kink in points:
            seen += 1
            z = (kink + offsets).requires_grad_()
            ours = torch.autograd.grad(_first(target.call(z, *case.args[1:], **case.kwargs)).sum(), z)[0]
            with torch.no_grad():
                up = _first(target.call(z.detach() + EPS, *case.args[1:], **case.kwargs))
                down = _first(target.call(z.detach() - EPS, *case.args[1:], **case.kwargs))
            numeric = (up - down) / (2 * EPS)
            d = _diagnose.jacobian(
                torch.diag(ours.double()),
                torch.diag(numeric.double()),
                tuple(z.shape),
                tuple(z.shape),
                "input 0",
                z.detach(),
                points,
            )
            if d is not None:
                d.where = f"near the kink at {kink:g}, example {case.id!r}: {d.where}"
                diagnoses.append(d)
    if not seen:
        raise _Skip("no kinks declared (pass kinks=(0.0,) for a derivative that jumps at 0)")
    if diagnoses:
        return "FAIL", f"one-sided derivatives wrong near a kink ({len(diagnoses)} of {seen})", diagnoses
    return "ok", f"both sides of {seen} kink(s), 1e-4 to 3e-2 away, = finite differences"


def _jvp(target, cases, state, **_):
    if not target.has_jvp:
        raise _Skip("the Function defines no jvp (forward-mode AD)")
    worst, diagnoses = 0.0, []
    for case in cases:
        f, leaves, out, numeric = state.get("numeric", {}).get(case.id) or (None, None, None, None)
        if f is None:
            f, leaves = _leaves_of(target, case)
            if not leaves:
                continue
            out, _, numeric = _jacobians(f, leaves)
        forward = []
        for j, leaf in enumerate(leaves):
            columns = torch.zeros(out.numel(), leaf.numel(), dtype=torch.float64)
            for k in range(leaf.numel()):
                tangent = torch.zeros(leaf.numel(), dtype=leaf.dtype)
                tangent[k] = 1
                with fwAD.dual_level():
                    inputs = [
                        fwAD.make_dual(x.detach(), tangent.reshape(x.shape)) if i == j else x.detach()
                        for i, x in enumerate(leaves)
                    ]
                    t = fwAD.unpack_dual(f(*inputs)).tangent
                if t is not None:
                    columns[:, k] = t.reshape(-1).double()
            forward.append(columns)
        w, found = _compare(list(zip(forward, numeric)), leaves, out, target, case, "jvp")
        worst, diagnoses = max(worst, w), diagnoses + found
    if diagnoses:
        kinds = sorted({k for d in diagnoses for k in d.kinds})
        return (
            "FAIL",
            f"jvp != finite differences (max |err| {worst:.3g}; {', '.join(kinds) or 'see below'})",
            diagnoses,
        )
    return "ok", f"jvp = finite differences (max |err| {worst:.1e})"


def _gradgradcheck(target, cases, state, **_):
    count = 0
    for case in cases:
        f, leaves = _leaves_of(target, case)
        if not leaves or not f(*leaves).numel():
            continue
        torch.autograd.gradgradcheck(f, leaves, check_fwd_over_rev=target.has_jvp, fast_mode=True)
        count += 1
    if not count:
        raise _Skip("no floating-point input to differentiate")
    return "ok", f"second derivative = finite differences of your first, on {count} example(s)"


def _no_vmap_rule(error: Exception) -> bool:
    return "generate_vmap_rule" in str(error) or "must override the setup_context" in str(error)


def _needs_vmap_rule(check):
    """``check(target, cases)`` as a property, skipped (not failed) when the Function has no vmap rule."""

    def run(target, cases, state, **_):
        try:
            return check(target, cases)
        except RuntimeError as error:
            if _no_vmap_rule(error):
                raise _Skip(
                    "the Function has no vmap rule (torch.func needs setup_context and generate_vmap_rule = True)"
                ) from None
            raise

    return run


@_needs_vmap_rule
def _vmap(target, cases):
    from torch.func import vjp, vmap

    count = 0
    for case in cases:
        f, leaves = _leaves_of(target, case)
        if not leaves:
            continue
        batch = [torch.stack([x.detach() * (1 - 0.1 * b) for b in range(3)]) for x in leaves]
        out = f(*leaves)
        grads_out = torch.randn(3, *out.shape, dtype=out.dtype)
        randomness = "same" if target.random else "error"
        batched = vmap(f, randomness=randomness)(*batch)
        batched_grads = vmap(lambda g, *xs, f=f: vjp(f, *xs)[1](g), randomness=randomness)(grads_out, *batch)
        for b in range(3):
            xs = [x[b].clone().requires_grad_() for x in batch]
            y = f(*xs)
            torch.testing.assert_close(
                batched[b], y, msg=lambda m, c=case: f"vmap output != loop, example {c.id!r}: {m}"
            )
            loop = torch.autograd.grad(y, xs, grads_out[b], allow_unused=True)
            for got, want in zip(batched_grads, loop):
                if want is not None:
                    torch.testing.assert_close(got[b], want, msg=lambda m: f"vmap of the backward != loop: {m}")
        count += 1
    if not count:
        raise _Skip("no floating-point input to differentiate")
    return "ok", f"vmap of forward and backward = a loop, on {count} example(s)"


@_needs_vmap_rule
def _jacrev_jacfwd(target, cases):
    from torch.func import jacfwd, jacrev

    if not target.has_jvp:
        raise _Skip("the Function defines no jvp (forward-mode AD)")
    if target.random:
        raise _Skip("a random op: jacrev/jacfwd batch its calls, each would draw its own numbers")
    count = 0
    for case in cases:
        f, leaves = _leaves_of(target, case)
        if not leaves:
            continue
        argnums = tuple(range(len(leaves)))
        reverse = jacrev(f, argnums=argnums)(*[x.detach() for x in leaves])
        forward = jacfwd(f, argnums=argnums)(*[x.detach() for x in leaves])
        for a, b in zip(reverse, forward):
            torch.testing.assert_close(a, b, msg=lambda m, c=case: f"jacrev != jacfwd, example {c.id!r}: {m}")
        count += 1
    if not count:
        raise _Skip("no floating-point input to differentiate")
    return "ok", f"torch.func.jacrev = jacfwd on {count} example(s)"


def _compile(target, cases, state, **_):
    case = cases[0]
    f, leaves = _leaves_of(target, case, reseed=False)  # seeded below, outside the compiled code
    if not leaves:
        raise _Skip("no floating-point input to differentiate")
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    manual_seed(7)
    out = compiled(*leaves)
    manual_seed(7)
    expected = f(*leaves)
    torch.testing.assert_close(out, expected, msg=lambda m: f"compiled output != eager: {m}")
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(expected, leaves, g)):
        torch.testing.assert_close(a, b, msg=lambda m: f"compiled gradient != eager: {m}")
    return (
        "ok",
        f"torch.compile(fullgraph=True, backend='aot_eager'): no graph break, same output and gradients ({case.id})",
    )


def _outputs_and_grads(fn, args, kwargs, grad_output, random):
    args = [
        a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in args
    ]
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    call = seeded(fn) if random else fn
    out = _first(call(*args, **kwargs))
    if grad_output is None:
        return out, ()
    grads = torch.autograd.grad(out, leaves, grad_output.to(out.dtype), allow_unused=True) if leaves else ()
    return out, grads


def _parity(target, cases, state, name, seed, **_):
    dtype = _DTYPES[name]
    if target.reference is None:
        raise _Skip("no reference (pass reference=a function with PyTorch's own backward)")
    manual_seed(seed)
    worst = 0.0
    for case in target.cases(dtype):
        case = _at_kinks(target, case)
        exact = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in case.args]
        kw64 = {
            k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in case.kwargs.items()
        }
        out, _ = _outputs_and_grads(target.call, case.args, case.kwargs, None, target.random)
        if not out.numel():
            continue
        g = torch.randn(out.shape, dtype=torch.float64)
        ours = _outputs_and_grads(target.call, case.args, case.kwargs, g, target.random)
        theirs = _outputs_and_grads(target.reference, case.args, case.kwargs, g, target.random)
        truth = _outputs_and_grads(target.reference, exact, kw64, g, target.random)
        labels = ["output"] + [f"gradient of input {i}" for i in range(len(ours[1]))]
        for label, mine, ref, true in zip(labels, (ours[0], *ours[1]), (theirs[0], *theirs[1]), (truth[0], *truth[1])):
            if ref is None or mine is None:
                if (ref is None) != (mine is None) and (mine if ref is None else ref).abs().max() > 0:
                    raise AssertionError(f"{label}: one side has no gradient, example {case.id!r}")
                continue
            if mine.dtype != ref.dtype or mine.shape != ref.shape:
                raise AssertionError(
                    f"{label}: dtype/shape {mine.dtype} {tuple(mine.shape)} != the reference's "
                    f"{ref.dtype} {tuple(ref.shape)}"
                )
            if not true.numel():
                continue
            error, failure = compare(mine, ref, true, dtype, same_mask=target.random)
            points = target.kinks(case.kwargs) if target.elementwise else ()
            if failure and points and mine.shape == case.args[0].shape:
                rest = slice(len(points), None)
                flat = [t.reshape(-1)[rest] for t in (mine, ref, true)]
                if compare(*flat, dtype, same_mask=target.random)[1] is None:
                    at = ", ".join(f"{k:g}" for k in points)
                    failure = f"only exactly at the kink ({at}): h' there is a convention, yours is not the reference's"
            if failure:
                raise AssertionError(f"{label}: {failure} ({case.id})")
            worst = max(worst, error)
    how = "error vs float64 truth" if dtype != torch.float64 else "|ours - ref|"
    return "ok", f"= {target.reference_label} ({how} <= {worst:.2g})"


def _at_kinks(target, case: Example) -> Example:
    """An elementwise op's example with its first values exactly at the kinks: the derivative there is a
    convention (ReLU's h'(0) = 0), which parity compares with the reference's."""
    points = target.kinks(case.kwargs) if target.elementwise else ()
    z = case.args[0] if case.args else None
    if not points or not isinstance(z, torch.Tensor) or z.numel() < len(points):
        return case
    z = z.detach().clone()
    z.view(-1)[: len(points)] = torch.tensor(points, dtype=z.dtype)
    return Example(case.id, (z, *case.args[1:]), case.kwargs)


def compare(mine, reference, truth, dtype, same_mask: bool = False, units: float | None = None):
    """Ours against the reference by :data:`TOLERANCES` (``units``: another number of units of precision):
    (our error, None) or (our error, why it fails).

    ``truth`` is the reference computed in float64. In float64, and for a random op (whose float64 run
    draws other numbers), ours is compared with the reference itself; in lower precisions with the truth.
    """
    if dtype == torch.float64 or same_mask:
        tol = TOLERANCES[torch.float64] if dtype == torch.float64 else TOLERANCES["same mask"][dtype]
        error = (mine.double() - reference.double()).abs().nan_to_num().max().item()
        if not torch.isclose(mine, reference, rtol=tol["rtol"], atol=tol["atol"], equal_nan=True).all():
            return error, f"max |ours - reference| {error:.3g}"
        return error, None
    tol = TOLERANCES[dtype]
    scale = truth.abs().nan_to_num().max().clamp(min=torch.finfo(dtype).tiny).item()
    allowed = max(
        tol["slack"] * (reference.double() - truth).abs().nan_to_num(nan=float("inf")).max().item(),
        (tol["units"] if units is None else units) * torch.finfo(dtype).eps * scale,
    )
    error = (mine.double() - truth).abs().nan_to_num(nan=float("inf")).max().item()
    if not error <= allowed:
        return error, f"error {error:.3g} against the float64 truth, allowed {allowed:.2g} (see TOLERANCES)"
    return error, None


def _derivative_kernels(target, cases, state, **_):
    found, count = set(), 0
    for case in cases:
        f, leaves = _leaves_of(target, case)
        if not leaves:
            continue
        out = f(*leaves)
        if not out.numel():
            continue
        count += 1
        with RecordOps() as recorder:
            grads = torch.autograd.grad(out, leaves, torch.randn_like(out), create_graph=True, allow_unused=True)
        found |= {f"backward: {k}" for k in recorder.derivative_kernels}
        live = [g for g in grads if g is not None and g.requires_grad]
        if live:
            with RecordOps() as recorder:
                torch.autograd.grad(sum((g * torch.randn_like(g)).sum() for g in live), leaves, allow_unused=True)
            found |= {f"double backward: {k}" for k in recorder.derivative_kernels}
        if target.has_jvp:
            with RecordOps() as recorder, fwAD.dual_level():
                f(*[fwAD.make_dual(x.detach(), torch.randn_like(x)) for x in leaves])
            found |= {f"forward mode: {k}" for k in recorder.derivative_kernels}
    if not count:
        raise _Skip("no floating-point input to differentiate")
    if found:
        return "FAIL", f"PyTorch's own derivative kernels ran: {', '.join(sorted(found))}"
    return "ok", "no aten *_backward kernel ran (backward, double backward" + (
        ", forward mode)" if target.has_jvp else ")"
    )


def _saved_bytes(target, cases, state, **_):
    case = cases[0]
    f, leaves = _leaves_of(target, case)
    if not leaves:
        raise _Skip("no floating-point input to differentiate")
    ours = saved_bytes(f, *leaves)
    if target.reference is None:
        return "info", f"keeps {ours:,} bytes for backward ({case.id})"
    positions = [i for i, a in enumerate(case.args) if isinstance(a, torch.Tensor) and a.is_floating_point()]

    def ref(*values):
        full = list(case.args)
        for i, v in zip(positions, values):
            full[i] = v
        return _first(target.reference(*full, **case.kwargs))

    theirs = saved_bytes(seeded(ref) if target.random else ref, *[x.detach().clone().requires_grad_() for x in leaves])
    return "info", f"keeps {ours:,} bytes for backward; {target.reference_label}: {theirs:,} ({case.id})"


_PROPERTY = {
    "gradcheck": _gradcheck,
    "kinks": _kinks,
    "jvp": _jvp,
    "gradgradcheck": _gradgradcheck,
    "vmap": _vmap,
    "jacrev/jacfwd": _jacrev_jacfwd,
    "compile": _compile,
    "derivative kernels": _derivative_kernels,
    "saved bytes": _saved_bytes,
}


# ---- an elementwise op's derivative, side by side ----------------------------------------------


def _derivative_of(fn, kwargs, rest=()):
    """h' of an elementwise ``fn`` at a float64 tensor ``z`` (autograd through ``fn``: your backward, or
    PyTorch's through the reference)."""

    def h_prime(z):
        z = z.detach().clone().requires_grad_()
        return torch.autograd.grad(_first(fn(z, *rest, **kwargs)).sum(), z, allow_unused=True)[0].detach()

    return h_prime


def _table(target, cases) -> list[str]:
    case = cases[0]
    z = nudge_off_kinks(case.args[0].detach().double(), target.kinks(case.kwargs)).reshape(-1)
    points = z.sort().values[torch.linspace(0, z.numel() - 1, min(6, z.numel())).round().long()]
    ours = _derivative_of(target.call, case.kwargs)(points)
    theirs = _derivative_of(target.reference, case.kwargs)(points)
    lines = [f"h' at a few points of example {case.id!r}: yours, and the reference's ({target.reference_label})"]
    lines.append(f"  {'z':>10} {'your h_prime':>14} {'reference h_prime':>18} {'ratio':>8}")
    for zi, a, b in zip(points.tolist(), ours.tolist(), theirs.tolist()):
        ratio = f"{a / b:8.4f}" if b != 0 else ("       1" if a == 0 else "     inf")
        lines.append(f"  {zi:10.4f} {a:14.6g} {b:18.6g} {ratio}")
    return lines


def _add_saved_tensor(target, cases, results) -> None:
    """Where an elementwise op's backward failed: is its h' the true one at the wrong tensor?"""
    case = cases[0]

    def h(z):
        with torch.no_grad():
            return _first(target.reference(z, **case.kwargs)).double()

    found = _diagnose.saved_tensor(
        h, _derivative_of(target.call, case.kwargs), _derivative_of(target.reference, case.kwargs)
    )
    if found is None:
        return
    for r in results:
        if r.name in ("gradcheck", "jvp") and r.status == "FAIL":
            for d in r.diagnoses:
                d.kinds.insert(0, "saved-tensor")
                d.hints.insert(0, found)
            if not r.diagnoses:
                r.diagnoses.append(_diagnose.Diagnosis(r.name, [], ["saved-tensor"], [found]))
