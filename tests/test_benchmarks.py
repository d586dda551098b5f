"""The benchmark code runs (tiny sizes, once); the saved-memory property holds for every activation kind."""

from __future__ import annotations

import json
import math

import pytest
import torch

import manualgrad.nn as mnn
from benchmarks import suites
from benchmarks.__main__ import main
from manualgrad.registry import ops


def test_benchmark_suite_runs_and_writes_results(tmp_path, monkeypatch):
    """Run from a checkout's root, a quick run writes runs/benchmarks/cpu-quick.*, never benchmarks/results/."""
    monkeypatch.chdir(tmp_path)
    report = main(["--quick", "--threads", "1"])
    assert not (tmp_path / "benchmarks").exists(), "a quick run wrote where the published results are"
    quick = tmp_path / "runs" / "benchmarks" / "cpu-quick"
    written = json.loads(quick.with_suffix(".json").read_text())
    assert written["quick"] and written["runs"][0]["threads"] == 1
    step = written["runs"][0]["mlp_steps"][0]
    assert {"native_us", "layers_ratio", "mlp_ratio", "mlp.loss_ratio", "gemm_us"} <= set(step)
    assert all(math.isfinite(v) and v > 0 for k, v in step.items() if k.endswith(("_us", "_ratio")))
    functions = {row["function"] for row in report["runs"][0]["functions"]}
    assert functions == {op.name for op in ops()}  # every registered operation, from the registry
    activations = {op.name for op in ops("activation")}
    for row in report["runs"][0]["functions"]:  # an activation's one-pass limit: bytes moved / measured bandwidth
        has_limit = "one_pass_us" in row
        assert has_limit == (row["function"] in activations), row
        if has_limit:
            assert row["one_pass_us"] > 0 and row["ours_over_one_pass"] == row["ours_us"] / row["one_pass_us"]
    compiled = activations | {"layer_norm"}  # manualgrad.fused_backward's Functions (GroupNorm's stays plain)
    for row in report["runs"][0]["functions"]:
        assert ("fused_us" in row) == (row["function"] in compiled), row
        if "fused_us" in row:
            assert row["fused_us"] > 0 and math.isclose(row["fused_ratio"], row["fused_us"] / row["native_us"])
    dp_rows = written["dp"]  # a whole DP-SGD step beside the plain step (and Opacus's modes, when installed)
    assert {row["model"] for row in dp_rows} == {"SampleConvNet", "MLP 8-6-10", "text 4x5 tokens"}
    assert {"plain (torch.nn)", "manualgrad DP"} <= {row["variant"] for row in dp_rows}
    assert all(math.isfinite(row["us"]) and row["us"] > 0 for row in dp_rows)
    (gap,) = written["step_gap"]  # where a per-layer step's extra time goes
    assert gap["functions"] == 4 and gap["ours_us"] - gap["native_us"] == pytest.approx(gap["gap_us"])
    assert all(math.isfinite(gap[k]) for k in ("Linear_us", "ReLU_us", "CrossEntropyLoss_us", "floor_us"))
    assert gap["minimal_us"] > 0 and gap["minimal_ratio"] == pytest.approx(gap["minimal_us"] / gap["native_us"])
    assert gap["fused_ratio"] > 0 and gap["minimal_fused_ratio"] > 0
    profile = written["step_profile"]  # a step's time inside and outside PyTorch's ops
    assert [(row["step"], row["variant"]) for row in profile] == [
        ("MLP 6-5-3", "torch.nn"),
        ("MLP 6-5-3", "per-layer"),
        ("MLP 6-5-3", "fused MLP+loss"),
        ("cross_entropy 4x10", "torch.nn"),
        ("cross_entropy 4x10", "ours"),
        ("nll_loss 4x10", "torch.nn"),
        ("nll_loss 4x10", "ours"),
    ]
    for row in profile:
        assert row["ops"] > 0 and 0 < row["ops_us"] and row["ops_us"] + row["rest_us"] == pytest.approx(row["wall_us"])
    assert "| in aten ops µs | outside them µs |" in quick.with_suffix(".md").read_text()
    assert "| MLP |" in quick.with_suffix(".md").read_text()
    assert "| Function floor µs |" in quick.with_suffix(".md").read_text()
    assert "| one-pass limit µs | ours / limit | fused µs | fused / native |" in quick.with_suffix(".md").read_text()


@pytest.mark.parametrize("out", ["benchmarks/results/cpu", "benchmarks/results/mine"])
def test_a_quick_run_refuses_to_replace_the_published_results(tmp_path, monkeypatch, capsys, out):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:
        main(["--quick", "--out", out])
    assert exit.value.code == 2 and "--quick never writes into benchmarks/results/" in capsys.readouterr().err
    assert not (tmp_path / "benchmarks").exists()


def test_saved_memory_never_exceeds_native():
    for row in suites.saved_memory("cpu", quick=False):
        assert row["ours_bytes"] <= row["native_bytes"], row
    by_kind = {row["kind"]: row for row in suites.saved_memory("cpu", quick=True)}
    # LeakyReLU is differentiated from its output: it keeps nothing beyond the next layer's input
    assert by_kind["leaky_relu"]["ratio"] < 1


def test_saved_bytes_counts_distinct_storages():
    from benchmarks.memory import saved_bytes

    w = torch.randn(4, 4, requires_grad=True)
    x = torch.randn(3, 4)
    # x @ w saves x (only w needs a gradient); relu saves its output: 3 x 4 float32 = 48 bytes each
    assert saved_bytes(lambda: torch.relu(x @ w), [w, x]) == 48
    assert saved_bytes(lambda: torch.relu(x @ w), []) == 48 + 48
    assert (
        saved_bytes(lambda: torch.relu(x @ w) * torch.relu(x @ w), []) == 3 * 48
    )  # x once; mul saves the two relu outputs again: no extra storage


def test_the_formula_only_functions_give_our_gradients():
    """step_gap's formula-only step computes what ours does: same loss, same gradients."""
    sizes, x, y = (6, 5, 4, 3), torch.randn(8, 6), torch.tensor([0, 1, 2, 0, 1, 2, 2, 1])
    grads = []
    for nn in (suites._Minimal, mnn):
        torch.manual_seed(0)
        model = suites._per_layer_mlp(sizes, nn.Linear, nn.ReLU, "cpu")
        loss = nn.CrossEntropyLoss()(model(x), y)
        loss.backward()
        grads.append([loss.detach()] + [p.grad for p in model.parameters()])
    assert len(grads[0]) == 7
    for minimal, ours in zip(*grads):
        torch.testing.assert_close(minimal, ours)


def test_the_formula_only_fused_function_gives_our_gradients():
    """step_gap's formula-only fused MLP with its loss computes what MLP.loss does."""
    torch.manual_seed(0)
    mlp, x, y = mnn.MLP([6, 5, 4, 3]), torch.randn(8, 6), torch.tensor([0, 1, 2, 0, 1, 2, 2, 1])
    params = list(mlp.parameters())
    loss = mlp.loss(x, y)
    ours = torch.autograd.grad(loss, params)
    minimal_loss = suites._MinimalMLPLoss.apply(x, y, *params)[0]
    minimal = torch.autograd.grad(minimal_loss, params)
    torch.testing.assert_close(minimal_loss, loss)
    assert len(minimal) == 6
    for a, b in zip(minimal, ours):
        torch.testing.assert_close(a, b)
