"""``curves.png``: loss and test accuracy against epoch (matplotlib, Agg). A run draws it when it ends or is
interrupted; ``python -m train.plot RUN_FOLDER`` draws it again from the folder's ``metrics.json``."""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys

from .errors import RunError
from .files import write_atomically


def title(metrics: dict) -> str:
    """E.g. "MLP 784-512-256-10, relu, dropout 0.1, impl fused; adamw lr 0.002, seed 0"."""
    config = metrics.get("config", {})
    training = f"{config.get('optimizer')} lr {config.get('lr')}, seed {config.get('seed')}"
    text = f"{metrics.get('model', 'model')}; {training}"
    augment = config.get("augment", "none")
    text += f", {augment} augmentation" if augment != "none" else ""
    if private := metrics.get("privacy"):
        noise = f"clip {private['clip']:g}, noise multiplier {private['noise_multiplier']:.3f}"
        spent = f"({private['spent_epsilon']:.2f}, {private['delta']:g})-DP"
        text += f"\nDP-SGD: batch {config.get('batch_size')} expected, {noise}, {spent}"
    return text


def curves_png(metrics: dict) -> bytes:
    """The PNG of ``metrics``: train and test loss, test accuracy (the torch.nn run's dashed; --dp: epsilon spent)."""
    from matplotlib.figure import Figure  # not pyplot: no global figures, and the caller's backend stays as it is

    config = metrics.get("config", {})
    smoothing = config.get("label_smoothing") or 0.0
    train_name = f"train, smoothed {smoothing:g}" if smoothing else "train"
    epochs = metrics.get("epochs", [])
    native = (metrics.get("native") or {}).get("epochs")
    fig = Figure(figsize=(10, 4), constrained_layout=True)
    ax_loss, ax_acc = fig.subplots(1, 2)
    runs = [("manualgrad", epochs, "-")] + ([("torch.nn", native, "--")] if native else [])
    curves = [(ax_loss, "train_loss", 1, "tab:blue", train_name), (ax_loss, "test_loss", 1, "tab:orange", "test")]
    curves.append((ax_acc, "test_accuracy", 100, "tab:green", "test"))  # in percent
    for label, records, style in runs:
        x = [r["epoch"] for r in records]
        for ax, key, scale, color, name in curves:
            y = [math.nan if r[key] is None else scale * r[key] for r in records]  # null (not finite): a gap
            ax.plot(x, y, style, color=color, marker="o", ms=3, label=f"{name} ({label})")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="test accuracy")
    if accuracies := [100 * r["test_accuracy"] for r in epochs if r.get("test_accuracy") is not None]:
        best, last = max(accuracies), epochs[-1]
        if last.get("test_accuracy") is not None:
            point = (last["epoch"], 100 * last["test_accuracy"])
            ax_acc.annotate(f"{point[1]:.2f}%", point, textcoords="offset points", xytext=(-10, -14), ha="right")
        low = min(accuracies[len(accuracies) // 4 :])  # skip the steep start
        ax_acc.set_ylim(max(low - 0.2, best - 3), min(100.0, best + 0.3))
    if spent := [(r["epoch"], r["epsilon"]) for r in epochs if r.get("epsilon") is not None]:
        ax_eps = ax_acc.twinx()
        ax_eps.plot(*zip(*spent), ":", color="tab:gray", marker=".", ms=3, label="epsilon spent")
        ax_eps.set(ylabel="epsilon spent", ylim=(0, 1.05 * max(e for _, e in spent)))
        ax_eps.legend(loc="upper left")  # both curves rise from the lower left: that corner is free
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right" if ax is ax_loss else "lower right")  # the accuracy rises to the upper right
        ax.xaxis.get_major_locator().set_params(integer=True)
    if config:
        fig.suptitle(title(metrics), fontsize=10)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    return png.getvalue()


def main(argv=None) -> int:
    """``python -m train.plot RUN_FOLDER``: (re)draw ``RUN_FOLDER/curves.png`` from its ``metrics.json``."""
    parser = argparse.ArgumentParser(prog="python -m train.plot", description=main.__doc__)
    parser.add_argument("run_folder", help="a run folder of python -m train (it holds metrics.json)")
    parser.add_argument("--output", help="where to write the PNG (default: RUN_FOLDER/curves.png)")
    args = parser.parse_args(argv)
    source = os.path.join(args.run_folder, "metrics.json")
    try:  # each failure: one line
        try:
            with open(source) as f:
                metrics = json.load(f)
        except FileNotFoundError:
            raise RunError(f"no metrics.json in {args.run_folder} (is it a run folder of python -m train?)") from None
        except (OSError, ValueError) as e:
            raise RunError(f"cannot read {source}: {e}") from None
        if not isinstance(metrics, dict) or not metrics.get("epochs"):
            raise RunError(f"{source} has no finished epoch to plot")
        try:
            png = curves_png(metrics)
        except (KeyError, TypeError, AttributeError) as e:
            raise RunError(f"{source} is not a metrics.json of python -m train ({type(e).__name__}: {e})") from None
        target = args.output or os.path.join(args.run_folder, "curves.png")
        write_atomically(target, png)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
