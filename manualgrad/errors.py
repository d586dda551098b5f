"""The error manualgrad raises for bad input."""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError, RuntimeError):
    """Bad input to a manualgrad layer: the message names the layer and the offending shapes, dtypes,
    devices or values.

    A ``ValueError``, and a ``RuntimeError`` too, so code written against the errors
    ``torch.nn.functional`` raises for the same mistakes still catches it.
    """
