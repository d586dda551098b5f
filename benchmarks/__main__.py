"""``python -m benchmarks``: manualgrad against torch.nn in the same process, interleaved.

Prints tables of ratios (ours / native; below 1 is better) and writes
``benchmarks/results/<device>.json`` and ``.md`` (the README's tables), or
where ``--out`` says. A ``--quick`` run writes ``runs/benchmarks/<device>-quick``
instead, and refuses to write into ``benchmarks/results/``: its toy sizes never
replace the published results.

    python -m benchmarks                  # CPU: 1 thread and all cores (a few minutes)
    python -m benchmarks --device cuda    # CUDA, float32 and bf16 autocast
    python -m benchmarks --quick          # tiny sizes: checks the code runs (the test suite does this)
    python -m benchmarks --out mine/cpu   # writes mine/cpu.json and mine/cpu.md

A DP-SGD step (:mod:`benchmarks.dp`: manualgrad.privacy beside a plain step and Opacus's two modes) runs on the
CPU with the per-sample suite's thread count.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

import torch

from train.files import write_atomically  # the repository's one atomic writer

from . import dp, per_sample, suites, tricks

RESULTS = Path("benchmarks") / "results"  # under the current directory: run from the repository's root
QUICK = Path("runs") / "benchmarks"  # --quick's results: never the published ones


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table of ``rows``: columns are (header, key, format)."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [format(row[key], fmt) if key in row else "" for _, key, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


MLP_COLUMNS = [
    ("MLP", "sizes", "s"),
    ("batch", "batch", "d"),
    ("dtype", "dtype", "s"),
    ("native µs", "native_us", ".0f"),
    ("per-layer / native", "layers_ratio", ".3f"),
    ("fused MLP / native", "mlp_ratio", ".3f"),
    ("fused MLP+loss / native", "mlp.loss_ratio", ".3f"),
    ("native / GEMMs", "native_over_gemm", ".2f"),
    ("per-layer / GEMMs", "layers_over_gemm", ".2f"),
    ("fused+loss / GEMMs", "mlp.loss_over_gemm", ".2f"),
]
FUNCTION_COLUMNS = [
    ("Function", "function", "s"),
    ("shape", "shape", "s"),
    ("native µs", "native_us", ".1f"),
    ("ours µs", "ours_us", ".1f"),
    ("ours / native", "ratio", ".3f"),
    ("one-pass limit µs", "one_pass_us", ".1f"),
    ("ours / limit", "ours_over_one_pass", ".2f"),
    ("fused µs", "fused_us", ".1f"),
    ("fused / native", "fused_ratio", ".3f"),
]
CNN_COLUMNS = [
    ("model", "model", "s"),
    ("batch", "batch", "d"),
    ("native µs", "native_us", ".0f"),
    ("ours µs", "ours_us", ".0f"),
    ("ours / native", "ratio", ".3f"),
]
GAP_COLUMNS = [
    ("MLP", "sizes", "s"),
    ("batch", "batch", "d"),
    ("native µs", "native_us", ".0f"),
    ("ours µs", "ours_us", ".0f"),
    ("gap µs", "gap_us", ".0f"),
    ("Linear layers µs", "Linear_us", ".0f"),
    ("ReLUs µs", "ReLU_us", ".0f"),
    ("loss µs", "CrossEntropyLoss_us", ".0f"),
    ("Functions", "functions", "d"),
    ("Function floor µs", "floor_us", ".0f"),
    ("formula-only Functions µs", "minimal_us", ".0f"),
    ("formula-only / native", "minimal_ratio", ".3f"),
    ("fused MLP+loss / native", "fused_ratio", ".3f"),
    ("formula-only fused / native", "minimal_fused_ratio", ".3f"),
]
PROFILE_COLUMNS = [
    ("step", "step", "s"),
    ("batch", "batch", "d"),
    ("variant", "variant", "s"),
    ("µs", "wall_us", ".0f"),
    ("/ torch.nn", "ratio", ".2f"),
    ("aten calls", "ops", "d"),
    ("in aten ops µs", "ops_us", ".0f"),
    ("outside them µs", "rest_us", ".0f"),
]
TRICK_COLUMNS = [
    ("trick", "trick", "s"),
    ("step", "step", "s"),
    ("on µs", "on_us", ".0f"),
    ("off µs", "off_us", ".0f"),
    ("gain", "gain", "+.1%"),
]
PER_SAMPLE_COLUMNS = [
    ("MLP", "sizes", "s"),
    ("batch", "batch", "d"),
    ("variant", "variant", "s"),
    ("µs", "us", ".0f"),
    ("ratio", "ratio", ".2f"),
    ("to", "versus", "s"),
]
DP_COLUMNS = [
    ("model", "model", "s"),
    ("batch", "batch", "d"),
    ("step", "variant", "s"),
    ("µs", "us", ".0f"),
    ("/ plain step", "ratio", ".2f"),
    ("/ manualgrad DP", "ours_speedup", ".2f"),
]
MEMORY_COLUMNS = [
    ("kind", "kind", "s"),
    ("native bytes", "native_bytes", ",d"),
    ("ours bytes", "ours_bytes", ",d"),
    ("ours / native", "ratio", ".3f"),
    ("per-layer / native", "layers_ratio", ".3f"),
]


def run(device: str, threads: list[int], quick: bool, rounds: int) -> dict:
    report = {
        "machine": machine(device),
        "device": device,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "quick": quick,
        "runs": [],
    }
    thread_counts = threads if device == "cpu" else [torch.get_num_threads()]
    for n in thread_counts:
        torch.set_num_threads(n)
        dtypes = [None] if device == "cpu" else [None, torch.bfloat16]
        run_report = {"threads": n, "mlp_steps": [], "functions": None}
        for dtype in dtypes:
            print(f"[{device}, {n} thread(s), {dtype or 'float32'}] MLP training steps ...", flush=True)
            run_report["mlp_steps"] += suites.mlp_steps(device, quick, rounds, dtype)
        print(f"[{device}, {n} thread(s)] CNN training step ...", flush=True)
        run_report["cnn_steps"] = suites.cnn_steps(device, quick)
        print(f"[{device}, {n} thread(s)] Functions alone ...", flush=True)
        run_report["functions"] = suites.functions(device, quick, rounds)
        report["runs"].append(run_report)
    print(f"[{device}] saved memory ...", flush=True)
    report["memory"] = suites.saved_memory(device, quick)
    torch.set_num_threads(min(thread_counts))
    print(f"[{device}, {min(thread_counts)} thread(s)] per-sample norms, clipping, gradients ...", flush=True)
    report["per_sample"] = per_sample.per_sample_steps(device, quick)
    report["per_sample_threads"] = min(thread_counts)
    if device == "cpu":
        print(
            f"[{device}, {min(thread_counts)} thread(s)] DP-SGD steps: manualgrad.privacy, plain, Opacus ...",
            flush=True,
        )
        report["dp"] = dp.dp_steps(device, quick)
    print(f"[{device}, {min(thread_counts)} thread(s)] where a per-layer step's extra time goes ...", flush=True)
    report["step_gap"] = suites.step_gap(device, quick)
    print(f"[{device}, {min(thread_counts)} thread(s)] a step's time inside and outside PyTorch's ops ...", flush=True)
    report["step_profile"] = suites.step_profile(device, quick)
    print(f"[{device}, {min(thread_counts)} thread(s)] what each speed trick buys ...", flush=True)
    report["tricks"] = tricks.trick_gains(device, quick)
    return report


def markdown(report: dict) -> str:
    parts = [
        f"Machine: {report['machine']}; torch {report['torch']}; {report['date']}. "
        "Ratios are ours / native (below 1 is better); medians of interleaved runs."
    ]
    for r in report["runs"]:
        parts.append(f"\n**Training step (forward, loss, backward), {r['threads']} thread(s)**\n")
        parts.append(table(r["mlp_steps"], MLP_COLUMNS))
        parts.append(f"\n**CNN training step (forward, nll_loss, backward), {r['threads']} thread(s)**\n")
        parts.append(table(r["cnn_steps"], CNN_COLUMNS))
        parts.append(f"\n**Each Function alone (forward + backward), {r['threads']} thread(s)**\n")
        parts.append(table(r["functions"], FUNCTION_COLUMNS))
    parts.append("\n**Bytes saved for backward** (distinct storages; parameters and input excluded)\n")
    parts.append(table(report["memory"], MEMORY_COLUMNS))
    if report.get("per_sample"):
        parts.append(
            f"\n**Per-sample norms, DP-SGD clipping, per-sample gradients, {report['per_sample_threads']} thread(s)** "
            "(a whole step each; ratio to the plain manualgrad step of the same kind)\n"
        )
        parts.append(table(report["per_sample"], PER_SAMPLE_COLUMNS))
    if report.get("dp"):
        parts.append(
            f"\n**A whole DP-SGD step (forward, clip, noise, SGD step), {report['per_sample_threads']} thread(s)** "
            "(σ = 1, C = 1; ratio to the plain torch.nn step, and each step's time over manualgrad's DP step)\n"
        )
        parts.append(table(report["dp"], DP_COLUMNS))
    if report.get("step_gap"):
        parts.append(
            f"\n**Where a per-layer step's extra time goes, {report['per_sample_threads']} thread(s)** (each kind of "
            "our modules swapped for torch.nn's: its share of the gap; the Function floor: what the step's autograd "
            "Functions cost beyond their kernels, measured on a Function of one kernel each way; formula-only "
            "Functions: the step with Functions that are their backward formula alone, without our options, checks "
            "but the loss's class indices, per-sample recording, autocast and jvp, per layer and fused)\n"
        )
        parts.append(table(report["step_gap"], GAP_COLUMNS))
    if report.get("step_profile"):
        parts.append(
            f"\n**A step inside and outside PyTorch's ops, {report['per_sample_threads']} thread(s)** (torch.profiler: "
            "the self time of every aten op per step, the kernels and their dispatch; outside them: the rest of the "
            "wall time, Python, autograd's engine and the Functions' machinery)\n"
        )
        parts.append(table(report["step_profile"], PROFILE_COLUMNS))
    if report.get("tricks"):
        parts.append(
            f"\n**What each speed trick buys, {report['per_sample_threads']} thread(s)** "
            "(a whole step with the trick on and off; gain = off / on - 1)\n"
        )
        parts.append(table(report["tricks"], TRICK_COLUMNS))
    return "\n".join(parts) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument(
        "--threads", default=f"1,{os.cpu_count()}", help="comma-separated CPU thread counts (default: 1 and all cores)"
    )
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds per case (default: 30)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds: checks that the code runs")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write OUT.json and OUT.md (default: benchmarks/results/<device>, the published results; "
        "with --quick: runs/benchmarks/<device>-quick)",
    )
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    device = args.device.split(":")[0]
    out = args.out or (QUICK / f"{device}-quick" if args.quick else RESULTS / device)
    if args.quick and out.absolute().parent == RESULTS.absolute():
        parser.error(f"--quick never writes into {RESULTS}/ (the published results); choose another --out")
    threads = sorted({int(t) for t in args.threads.split(",")})
    report = run(args.device, threads, args.quick, args.rounds)
    text = markdown(report)
    print("\n" + text)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(str(out.with_suffix(".json")), json.dumps(report, indent=1))
    write_atomically(str(out.with_suffix(".md")), text)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return report


if __name__ == "__main__":
    main()
