"""``python -m manualgrad.check TARGET``: print :func:`manualgrad.testing.check`'s report; exit 1 if a property fails.

``TARGET`` is ``path/to/file.py:Name`` or ``module:name`` (a Function class or
a function; a function needs ``--shape``), or a registered operation's name
(``relu``). ``--shape 4,5 --shape 3,5`` makes float64 ``randn`` inputs of
those shapes; ``--compile`` adds ``torch.compile``; ``--kinks 0``; exit
status 2 for a target that cannot be loaded.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

import torch

__all__ = ["load", "main"]


def load(target: str):
    """The object ``target`` names: ``file.py:Name``, ``module:name``, or a registered name (returned as is)."""
    if ":" not in target:
        return target
    where, name = target.rsplit(":", 1)
    if where.endswith(".py"):
        path = Path(where).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no file {where}")
        module = next((m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == str(path)), None)
        if module is None:  # once: a second run would register its operations again
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[path.stem] = module
            sys.path.insert(0, str(path.parent))
            spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    try:
        return getattr(module, name)
    except AttributeError:
        raise AttributeError(f"{where} has no attribute {name!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m manualgrad.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="path/to/file.py:Name, module:name, or a registered operation's name")
    parser.add_argument("--shape", action="append", default=[], help="an input's shape, e.g. 4,5 (repeat per input)")
    parser.add_argument("--kinks", default=None, help="where the derivative jumps, comma-separated (e.g. 0)")
    parser.add_argument(
        "--compile", action="store_true", help="also check torch.compile (backend aot_eager; a few seconds)"
    )
    args = parser.parse_args(argv)
    from .testing import check

    try:
        fn = load(args.target)
        inputs = [torch.randn(*[int(n) for n in s.split(",") if n], dtype=torch.float64) for s in args.shape]
        kinks = None if args.kinks is None else tuple(float(k) for k in args.kinks.split(","))
        report = check(fn, *inputs, kinks=kinks, compile=args.compile)
    except (ImportError, OSError, AttributeError, KeyError, ValueError, TypeError) as error:
        print(f"python -m manualgrad.check: {error}", file=sys.stderr)
        return 2
    print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
