"""``manual_coverage``: which backward nodes behind a tensor are manualgrad formulas, and which are not."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from .functions import ManualFunction

__all__ = ["Coverage", "manual_coverage"]


@dataclass
class Coverage:
    """The backward graph behind a tensor, node kinds counted.

    ``manual``: our Functions' nodes (e.g. ``{"LinearFunctionBackward": 3}``);
    ``foreign``: every other node that computes a gradient (e.g. a
    ``ViewBackward0`` from ``torch.flatten``); ``leaves``: the tensors
    gradients land in (``AccumulateGrad``). ``complete`` is true when the whole
    backward is ours.
    """

    manual: Counter = field(default_factory=Counter)
    foreign: Counter = field(default_factory=Counter)
    leaves: int = 0

    @property
    def complete(self) -> bool:
        return not self.foreign and bool(self.manual)

    def __str__(self) -> str:
        def fmt(counter):
            return ", ".join(f"{name} x{n}" for name, n in sorted(counter.items())) or "none"

        verdict = "every backward node is manualgrad's" if self.complete else "NOT all manualgrad"
        return f"{verdict}: manual: {fmt(self.manual)}; foreign: {fmt(self.foreign)}; leaves: {self.leaves}"


def manual_coverage(output: torch.Tensor) -> Coverage:
    """Walk the autograd graph behind ``output`` and sort its nodes into ours and not ours.

    Example::

        >>> loss = manualgrad.functional.cross_entropy(model(x), y)
        >>> coverage = manualgrad.manual_coverage(loss)
        >>> assert coverage.complete, coverage
    """
    coverage = Coverage()
    root = output.grad_fn
    if root is None:
        return coverage
    seen, stack = {root}, [root]
    while stack:
        node = stack.pop()
        forward_cls = getattr(node, "_forward_cls", None)
        if isinstance(forward_cls, type) and issubclass(forward_cls, ManualFunction):
            coverage.manual[type(node).__name__] += 1
        elif type(node).__name__ == "AccumulateGrad":
            coverage.leaves += 1
        else:
            coverage.foreign[type(node).__name__] += 1
        for parent, _ in node.next_functions:
            if parent is not None and parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return coverage
