r"""Check a hand-written backward, and learn why it is wrong: the battery manualgrad's own operations pass.

* :func:`check` runs it on a Function class, a function or a registered
  operation's name and returns a :class:`Report` (one line per property,
  correctness and consistency labelled, a diagnosis of each Jacobian
  mismatch); ``report.assert_ok()`` raises :class:`CheckFailed` with it.
* :func:`battery`: the same, as separate pytest items, in three lines of a
  test file::

      from manualgrad.testing import battery
      from my_ops import SquarePlusFunction
      test_squareplus = battery(SquarePlusFunction)

* ``python -m manualgrad.check path/to/file.py:SquarePlusFunction`` (or
  ``module:name``, or a registered name) prints the report; exit status 1 if
  a property failed.
* :mod:`manualgrad.testing.samples`: the examples every check, test and
  benchmark runs, per registered operation (as OpInfo's samples in
  ``torch.testing``).

What a numeric check can and cannot see: see :func:`check`.
"""

from __future__ import annotations

from ._check import CONSISTENCY, CORRECTNESS, PROPERTIES, TOLERANCES, CheckFailed, Report, Result, check, compare
from ._diagnose import Diagnosis
from ._tools import RecordOps, grads_of, manual_seed, non_contiguous_like, nudge_off_kinks, saved_bytes, seeded
from .samples import SAMPLES, Example, Samples, examples, is_random, kinks, samples

__all__ = [
    "CONSISTENCY",
    "CORRECTNESS",
    "PROPERTIES",
    "SAMPLES",
    "TOLERANCES",
    "CheckFailed",
    "Diagnosis",
    "Example",
    "RecordOps",
    "Report",
    "Result",
    "Samples",
    "battery",
    "check",
    "compare",
    "examples",
    "grads_of",
    "is_random",
    "kinks",
    "manual_seed",
    "non_contiguous_like",
    "nudge_off_kinks",
    "samples",
    "saved_bytes",
    "seeded",
]


def battery(fn, *example_inputs, compile: bool = False, **options):
    """A pytest test function giving ``fn`` every property of :func:`check` as its own test item.

    ``test_mine = battery(MyFunction)`` in a test file collects ``test_mine[gradcheck]``,
    ``test_mine[jvp]``, ...; a property that cannot run is skipped with its reason, a failure's
    message is the report. Arguments as :func:`check`'s.
    """
    import pytest

    @pytest.mark.parametrize("property", list(PROPERTIES))
    def test(property):
        report = check(fn, *example_inputs, compile=compile, properties=[property], **options)
        result = report[property]
        if result.status == "skipped":
            pytest.skip(result.message.removeprefix("skipped: "))
        report.assert_ok()

    return test
