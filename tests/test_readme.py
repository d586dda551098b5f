"""The README is the user's door: its examples run as written, and its API table lists every operation."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from manualgrad.registry import ops

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.S)


def test_the_quickstart_example_runs():
    namespace: dict = {}
    exec(python_blocks()[0], namespace)
    assert namespace["loss"].grad_fn is not None
    assert all(p.grad is not None for p in namespace["model"].parameters())


def test_the_convert_example_runs():
    block = next(b for b in python_blocks() if "manualgrad.convert(model)" in b)
    exec(block, {})


def test_the_per_sample_example_runs():
    import manualgrad.functional as F
    import manualgrad.nn as nn

    block = next(b for b in python_blocks() if "manualgrad.per_sample(" in b)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    namespace = {
        "manualgrad": __import__("manualgrad"),
        "F": F,
        "model": model,
        "x": torch.randn(4, 6),
        "y": torch.randint(0, 3, (4,)),
    }
    exec(block, namespace)
    assert namespace["samples"].norms.shape == (4,)


def test_the_api_table_lists_every_operation():
    table = README[README.index("## API") : README.index("| helper |")]
    for op in ops():
        assert f"`{op.name}`" in table, op.name
        if op.module is not None:
            assert f"`{op.module.__name__}`" in table, op.module.__name__


def test_the_mish_example_is_the_code():
    """The README shows Mish's declaration as it is in activations.py."""
    block = next(b for b in python_blocks() if "class MishFunction" in b)
    source = (Path(__file__).resolve().parents[1] / "manualgrad" / "functions" / "activations.py").read_text()
    assert block.strip() in source


def test_the_squareplus_walkthrough_runs_and_its_printed_report_is_what_check_prints(capsys):
    """Adding an operation: SquarePlus with its imports and its check of b, then the same op with the ½ lost;
    every line of the README's printed report (times aside) is a line of the report check() prints."""
    from manualgrad.registry import OPS

    blocks = python_blocks()
    correct = next(b for b in blocks if "class SquarePlusFunction" in b)
    wrong = next(b for b in blocks if "class WrongSquarePlus" in b)
    namespace: dict = {}
    try:
        exec(correct, namespace)
        assert "squareplus: b must be positive, got 0.0" in capsys.readouterr().out
        exec(wrong, namespace)
    finally:
        OPS.pop("squareplus", None)
    report = namespace["report"]
    assert not report.ok and report.mistakes == ["factor"]
    shown = README[README.index("check(WrongSquarePlus): 6 FAILED") :].split("```")[0].strip().splitlines()
    printed = [line.rstrip() for line in str(report).splitlines()]
    assert re.sub(r"\(.* s\)", "", shown[0]) == re.sub(r"\(.* s\)", "", printed[0])
    for line in shown[1:]:
        assert line.rstrip() in printed, line


def test_the_privacy_example_runs_as_written():
    block = next(b for b in python_blocks() if "from manualgrad.privacy import PrivacyEngine" in b)
    namespace: dict = {}
    exec(block, namespace)
    assert 0 < namespace["privacy_engine"].get_epsilon(1e-5) <= 2.0
