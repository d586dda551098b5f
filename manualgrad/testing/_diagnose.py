"""What a Jacobian mismatch looks like: the worst entries, and the kind of mistake the pattern fits.

Every test here compares the analytic Jacobian ``A`` (your backward, or your
jvp) with the numeric one ``N`` (central differences) of one input and the
output, both ``(output elements, input elements)``, under gradcheck's own
closeness ``|a - n| <= atol + rtol |n|``. The kinds, tried in this order:

* ``sign``: ``A = -N``;
* ``factor`` / ``dimension``: ``A = c N`` for one constant ``c``; named
  ``dimension`` when ``c`` (or ``1/c``) is the size of a dimension, a product
  of sizes or the element count (a sum where a mean was meant);
* ``transpose``: ``A = N^T`` (a square Jacobian read the wrong way round);
* ``kink``: the mismatch only at inputs within 0.1 of a declared kink;
* ``broadcast``: the input is broadcast along a dimension of the output and
  the mismatch lies along that dimension (a gradient not summed over it);
* ``zero-branch``: ``A`` is zero exactly where it disagrees (a branch never
  taken, e.g. the z < 0 side);
* ``saved-tensor`` (elementwise only, :func:`saved_tensor`): your h' equals
  the true h' at the output ``y`` (h' evaluated at the output where it should
  be at the input), or a formula written in ``y`` evaluated at the input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

ATOL, RTOL = 1e-5, 1e-3  # gradcheck's own


@dataclass
class Diagnosis:
    """The mismatch of one input's Jacobian: where (``worst``) and, where the pattern fits, which mistake."""

    where: str  #: "input 0 (shape (6, 7)) -> output (shape (6, 7))"
    worst: list[str]  #: the worst entries, as text
    kinds: list[str] = field(default_factory=list)  #: tags: "factor", "dimension", "sign", ...
    hints: list[str] = field(default_factory=list)  #: one sentence per kind

    def lines(self) -> list[str]:
        out = [f"mismatch in {self.where}; worst entries:"] + [f"  {w}" for w in self.worst]
        if self.hints:
            out += [f"likely: {h}" for h in self.hints]
        else:
            out.append("likely: no simple pattern (not a constant factor, sign, transpose, kink, broadcast or branch)")
        return out


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL, rtol: float = RTOL) -> torch.Tensor:
    return (a - b).abs() <= atol + rtol * b.abs()


def _index(flat: int, shape: tuple) -> tuple:
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), shape)) if shape else ()


def _sizes(*shapes) -> dict[int, str]:
    """Candidate factors: each dimension's size, products of leading dimensions, element counts."""
    found: dict[int, str] = {}
    for label, shape in shapes:
        for d, n in enumerate(shape):
            found.setdefault(int(n), f"the size of {label} dimension {d} ({n})")
        if shape:
            found.setdefault(math.prod(shape), f"the number of elements of {label} ({math.prod(shape)})")
        for d in range(2, len(shape)):
            found.setdefault(math.prod(shape[:d]), f"the product of {label}'s first {d} dimension sizes")
    return {n: text for n, text in found.items() if n >= 3}


def jacobian(
    analytic: torch.Tensor,
    numeric: torch.Tensor,
    in_shape: tuple,
    out_shape: tuple,
    name: str = "input 0",
    values: torch.Tensor | None = None,
    kinks: tuple = (),
) -> Diagnosis | None:
    """The diagnosis of one (output, input) Jacobian pair, or None where they agree."""
    a, n = analytic.double(), numeric.double()
    bad = ~_close(a, n) | (a.isnan() != n.isnan())
    if not bad.any():
        return None
    where = f"{name} (shape {tuple(in_shape)}) -> output (shape {tuple(out_shape)})"
    error = (a - n).abs().nan_to_num(nan=float("inf"))
    worst = []
    for flat in error.flatten().topk(min(3, int(bad.sum()))).indices.tolist():
        row, col = divmod(flat, a.shape[1])
        worst.append(
            f"d output{list(_index(row, tuple(out_shape)))} / d {name}{list(_index(col, tuple(in_shape)))}: "
            f"yours {a[row, col].item():.6g}, finite differences {n[row, col].item():.6g}"
        )
    d = Diagnosis(where, worst)
    signal = n.abs() > ATOL
    if signal.any() and _close(a, -n).all():
        d.kinds.append("sign")
        d.hints.append("a sign flip: yours = -1 x finite differences (a minus sign lost or added)")
        return d
    if signal.any():
        c = ((a[signal] * n[signal]).sum() / (n[signal] ** 2).sum()).item()
        if (
            math.isfinite(c)
            and abs(c) > 1e-6
            and abs(c - 1) > 1e-3
            and _close(a, c * n, atol=ATOL * max(1.0, abs(c))).all()
        ):
            _factor(d, c, in_shape, out_shape, name)
            return d
    if a.shape[0] == a.shape[1] and _close(a, n.T).all():
        d.kinds.append("transpose")
        d.hints.append("a transposed Jacobian: yours = (finite differences)^T (a matrix used the wrong way round)")
        return d
    columns = bad.any(0)
    if values is not None and kinks and values.numel() == a.shape[1]:
        near = torch.zeros_like(columns)
        for k in kinks:
            near |= (values.flatten().double() - k).abs() < 0.1
        if (columns & ~near).sum() == 0:
            spots = ", ".join(f"{k:g}" for k in kinks)
            d.kinds.append("kink")
            d.hints.append(
                f"a mismatch only near a kink (at {spots}): the derivative's branch condition is off there "
                "(> where >= was meant, or the switch at the wrong point)"
            )
            return d
    dims = _broadcast_dims(tuple(in_shape), tuple(out_shape))
    if dims:
        per_out = bad.any(1).reshape(out_shape)
        for dim in dims:
            rows = per_out.movedim(dim, 0).reshape(out_shape[dim], -1).any(1)
            if rows.any() and not rows.all():
                d.kinds.append("broadcast")
                d.hints.append(
                    f"a gradient not summed over the broadcast dimension {dim} of the output (size "
                    f"{out_shape[dim]}): {name} is broadcast along it, and only some of its slices reach your gradient"
                )
                return d
    if (a[bad].abs() <= ATOL).all():
        d.kinds.append("zero-branch")
        side = ""
        if values is not None and values.numel() == a.shape[1]:
            z = values.flatten().double()[columns]
            side = " (the z < 0 side)" if (z < 0).all() else " (the z > 0 side)" if (z > 0).all() else ""
        d.hints.append(f"a block that is zero where finite differences are not: a branch never taken{side}")
    return d


def _factor(d: Diagnosis, c: float, in_shape, out_shape, name: str) -> None:
    sizes = _sizes((name, tuple(in_shape)), ("the output", tuple(out_shape)))
    for value, inverse in ((c, False), (1 / c, True)):
        k = round(value)
        if k in sizes and abs(value - k) < 1e-3 * k:
            d.kinds.append("dimension")
            what = "divided by" if inverse else "multiplied by"
            why = "a mean where a sum was meant" if inverse else "a sum where a mean was meant"
            d.hints.append(f"yours = {c:.4g} x finite differences: {what} {sizes[k]} ({why}, or a batch size applied)")
            return
    d.kinds.append("factor")
    hint = {2.0: "a missing 1/2", 0.5: "a 1/2 too many, or a factor 2 lost"}.get(round(c, 3), "a wrong constant")
    d.hints.append(f"a constant factor: yours = {c:.4g} x finite differences ({hint}, or a sum where a mean was meant)")


def _broadcast_dims(in_shape: tuple, out_shape: tuple) -> list[int]:
    """Dimensions of the output along which an input of ``in_shape`` is broadcast (right-aligned)."""
    if len(in_shape) > len(out_shape) or math.prod(in_shape) >= math.prod(out_shape):
        return []
    padded = (1,) * (len(out_shape) - len(in_shape)) + in_shape
    if any(i not in (1, o) for i, o in zip(padded, out_shape)):
        return []
    return [k for k, (i, o) in enumerate(zip(padded, out_shape)) if i == 1 and o > 1]


def saved_tensor(h, ours, truth, lo: float = -6.0, hi: float = 6.0) -> str | None:
    """For an elementwise op: does your h' fit a derivative evaluated at the wrong tensor?

    ``h(z)``, ``ours(z)`` (your h') and ``truth(z)`` (autograd's h' through the
    reference) are functions of a float64 tensor. Two mistakes are tried:
    h' written in z but evaluated at the output y (``ours(z) = truth(h(z))``),
    and h' written in y (``f(y) = truth(z)``) but evaluated at the input z
    (``ours(z) = truth(h^{-1}(z))``, where h is increasing).
    """
    z = torch.linspace(lo, hi, 241, dtype=torch.float64)
    z = z[(z.abs() > 1e-3)]
    mine, true = ours(z), truth(z)
    wrong = ~_close(mine, true, atol=1e-6, rtol=1e-4)
    if not wrong.any():
        return None
    at_output = truth(h(z))
    if _close(mine, at_output, atol=1e-6, rtol=1e-4).all():
        return "the wrong saved tensor: your h' is the true h' evaluated at the output y; it should be at the input z"
    y = h(z)
    if (y.diff() > 0).all():  # h increasing: find h^{-1}(z) by bisection where z is in h's range
        inside = (z > y[0]) & (z < y[-1])
        if inside.sum() >= 5:
            target = z[inside]
            low, high = torch.full_like(target, lo), torch.full_like(target, hi)
            for _ in range(80):
                mid = (low + high) / 2
                above = h(mid) > target
                high, low = torch.where(above, mid, high), torch.where(above, low, mid)
            if _close(mine[inside], truth((low + high) / 2), atol=1e-6, rtol=1e-4).all():
                return (
                    "the wrong saved tensor: your h' is a formula in the output y evaluated at the input z "
                    "(saves_output and derivative disagree)"
                )
    return None
