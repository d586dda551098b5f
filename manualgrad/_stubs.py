"""The type stubs of the generated modules, written from the registry: ``functional.pyi`` and ``nn/__init__.pyi``.

:mod:`manualgrad.functional` and :mod:`manualgrad.nn` fill themselves from the registry at import time, which
IDEs and type checkers cannot see; their stubs list the same names with the same signatures, so that
``manualgrad.nn.Linear`` and ``manualgrad.functional.mse_loss(...)`` resolve. After declaring an operation, run
``python -m manualgrad._stubs`` to rewrite them; ``tests/test_stubs.py`` fails while they differ.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

from . import functional, nn
from .registry import ops

ROOT = Path(__file__).parent
PATHS = {"functional": ROOT / "functional.pyi", "nn": ROOT / "nn" / "__init__.pyi"}
_HEADER = "# Written by `python -m manualgrad._stubs` from the registry: do not edit.\n"
_LITERALS = (type(None), bool, int, float, str)


def _parameter(p: inspect.Parameter) -> str:
    """``name: annotation = default`` as the wrapper declares it (an unannotated tensor argument: ``Tensor``)."""
    text = p.name if p.kind is not p.VAR_POSITIONAL else f"*{p.name}"
    annotation = p.annotation
    if annotation is p.empty and p.default is p.empty and p.name in ("input", "target", "weight"):
        annotation = "Tensor"
    if annotation is not p.empty:
        text += f": {annotation}"
    if p.default is not p.empty:
        default = repr(p.default) if type(p.default) in _LITERALS else "..."
        text += f" = {default}" if annotation is not p.empty else f"={default}"
    return text


def _def(name: str, function, indent: str = "", returns: str = "Tensor") -> str:
    signature = inspect.signature(function)
    if signature.return_annotation is not signature.empty:
        returns = signature.return_annotation
    parameters = ", ".join(_parameter(p) for p in signature.parameters.values())
    return f"{indent}def {name}({parameters}) -> {returns}: ...\n"


def functional_stub() -> str:
    lines = [_HEADER, "from typing import Any\n\nimport torch\nfrom torch import Tensor\n\n"]
    for op in sorted(ops(), key=lambda op: op.name):
        returns = "Any" if "return_indices" in inspect.signature(op.functional).parameters else "Tensor"
        lines.append(_def(op.name, op.functional, returns=returns))
    lines.append("def __getattr__(name: str) -> Any: ...  # torch.nn.functional's other names\n")
    return "".join(lines)


def nn_stub() -> str:
    lines = [
        _HEADER,
        "from collections.abc import Mapping, Sequence\nfrom typing import Any\n\n",
        "import torch\nfrom torch import Tensor\n\n",
        "from manualgrad import functional as functional\nfrom manualgrad.registry import Op\n\n",
    ]
    twins = sorted((op.module.__name__, op.module) for op in ops() if op.module is not None)
    lines += [f"class {name}(torch.nn.{module.__name__}): ...\n" for name, module in twins]
    lines.append(f"\nACTIVATIONS: {nn.__annotations__['ACTIVATIONS']}\n\n")
    lines.append("class MLP(torch.nn.Sequential):\n")
    for name, member in vars(nn.MLP).items():
        if isinstance(member, property):
            lines.append(f"    @property\n{_def(name, member.fget, '    ')}")
        elif inspect.isfunction(member) and (not name.startswith("_") or name == "__init__"):
            lines.append(_def(name, member, "    "))
    lines.append("\n")
    for name in ("twin", "activation_of", "activation_module"):
        lines.append(_def(name, getattr(nn, name)))
    lines.append("def __getattr__(name: str) -> Any: ...  # torch.nn's other names\n")
    return "".join(lines)


def stubs() -> dict[str, str]:
    return {"functional": functional_stub(), "nn": nn_stub()}


def same(a: str, b: str) -> bool:
    """Whether two stubs declare the same names with the same signatures (layout and comments aside)."""
    return ast.dump(ast.parse(a)) == ast.dump(ast.parse(b))


if __name__ == "__main__":
    assert functional  # imported for its registrations
    for key, text in stubs().items():
        PATHS[key].write_text(text)
    subprocess.run([sys.executable, "-m", "ruff", "format", *map(str, PATHS.values())], check=True)
