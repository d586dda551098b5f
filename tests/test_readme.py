"""The README is the user's door: every code block runs as written, and its API table lists every operation.

Every ```python block is run as it stands, after the blocks before it in its own README section (as a reader
runs them) and with nothing set up by the test: what a section's blocks need, they import or define themselves.
A block that shows the library's own code (an excerpt, e.g. how an operation is declared) must be that code
verbatim instead. In the ```bash blocks, every ``python -m train``
command line is parsed by the training program's own parser (its options exist and are valid).
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest
import torch

from manualgrad.registry import ops

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SOURCES = {path: path.read_text() for path in (ROOT / "manualgrad").rglob("*.py")}


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def _excerpt_of(block: str) -> Path | None:
    """The library file that holds ``block`` verbatim, if any."""
    return next((path for path, text in SOURCES.items() if block.strip() in text), None)


def test_the_readme_has_python_blocks():
    assert len(blocks("python")) >= 3


def _section_of(block: str) -> str:
    """The README section (its last heading) a block stands in: a section's blocks continue one another."""
    return re.findall(r"^#+ .*$", README[: README.index(block)], re.M)[-1]


@pytest.mark.parametrize("number", range(len(blocks("python"))))
def test_a_python_block_runs_as_written(number):
    """A block runs after the blocks before it in its own section (as a reader runs them), and nothing else."""
    from manualgrad.registry import OPS

    block = blocks("python")[number]
    if _excerpt_of(block) is not None:
        return  # the library's own code, shown as it is (verbatim: checked by _excerpt_of)
    section = _section_of(block)
    before = [b for b in blocks("python")[:number] if _section_of(b) == section and _excerpt_of(b) is None]
    registered = dict(OPS)
    namespace = {"__name__": "__readme__"}
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            for i, code in enumerate([*before, block]):
                exec(compile(code, f"README.md python block {number + 1} ({i + 1} of its section)", "exec"), namespace)
    finally:  # an operation a block registers (SquarePlus) is gone again
        OPS.clear()
        OPS.update(registered)


def _train_command_lines() -> list[list[str]]:
    """The arguments of every ``python -m train`` / ``torchrun ... -m train`` line of the bash blocks."""
    found = []
    for block in blocks("bash"):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if "-m" in words and words[words.index("-m") + 1 : words.index("-m") + 2] == ["train"]:
                found.append(words[words.index("-m") + 2 :])
    return found


@pytest.mark.parametrize("argv", _train_command_lines(), ids=" ".join)
def test_a_train_command_line_parses(argv):
    from train.config import parse_args

    parse_args([word.replace("<timestamp>", "2026-01-01_00-00-00") for word in argv])


def test_the_per_sample_example_clips_and_reports_norms():
    """The per_sample block, as written, gives what its comments say."""
    block = next(b for b in blocks("python") if "manualgrad.per_sample(" in b)
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(block, namespace)
    assert printed.getvalue().splitlines() == ["torch.Size([32])", "torch.Size([32])"]
    assert all(p.grad is not None for p in namespace["model"].parameters())


def test_the_quickstart_example_runs():
    import manualgrad

    namespace: dict = {}
    exec(blocks("python")[0], namespace)
    assert namespace["loss"].grad_fn is not None
    assert all(p.grad is not None for p in namespace["model"].parameters())
    again = namespace["F"].nll_loss(namespace["model"](torch.randn(2, 1, 28, 28)), torch.tensor([3, 7]))
    coverage = manualgrad.manual_coverage(again)  # what the block's own assert says, asserted here
    assert coverage.complete and coverage.manual["Conv2dFunctionBackward"] == 2, coverage


def test_the_proving_a_step_example_finds_every_node_ours():
    """The block's own ``assert coverage.complete``, asserted here, and the step it then takes."""
    block = next(b for b in blocks("python") if "manualgrad.convert(model), manualgrad.convert(loss_fn)" in b)
    namespace: dict = {}
    exec(block, namespace)
    coverage = namespace["coverage"]
    assert coverage.complete and not coverage.foreign, coverage
    assert coverage.manual["LinearFunctionBackward"] == 2 and coverage.manual["CrossEntropyFunctionBackward"] == 1
    assert all(p.grad is not None for p in namespace["model"].parameters())


def test_the_api_table_lists_every_operation():
    table = README[README.index("## API") : README.index("| helper |")]
    for op in ops():
        assert f"`{op.name}`" in table, op.name
        if op.module is not None:
            assert f"`{op.module.__name__}`" in table, op.module.__name__


def test_the_mish_example_is_the_code():
    """The README shows Mish's declaration as it is in activations.py."""
    block = next(b for b in blocks("python") if "class MishFunction" in b)
    assert _excerpt_of(block) == ROOT / "manualgrad" / "functions" / "activations.py"


def test_the_squareplus_walkthrough_runs_and_its_printed_report_is_what_check_prints(capsys):
    """Adding an operation: SquarePlus with its imports and its check of b, then the same op with the ½ lost;
    every line of the README's printed report (times aside) is a line of the report check() prints."""
    from manualgrad.registry import OPS

    python = blocks("python")
    correct = next(b for b in python if "class SquarePlusFunction" in b)
    wrong = next(b for b in python if "class WrongSquarePlus" in b)
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
    block = next(b for b in blocks("python") if "from manualgrad.privacy import PrivacyEngine" in b)
    namespace: dict = {}
    exec(block, namespace)
    assert 0 < namespace["privacy_engine"].get_epsilon(1e-5) <= 2.0
