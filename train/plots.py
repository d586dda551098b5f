"""``curves.png``: loss and test accuracy against epoch (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
import tempfile


def plot_curves(
    epochs: list[dict], path: str, title: str = "", native: list[dict] | None = None, label_smoothing: float = 0.0
) -> None:
    """Two panels: train and test loss (log scale), and test accuracy in percent.

    ``epochs`` are the per-epoch records of metrics.json; ``native``, when given, the torch.nn run's.
    The train loss is the training objective (label-smoothed when ``label_smoothing`` > 0, which keeps
    it well above the test loss); the test loss is the plain cross-entropy.
    """
    train_name = f"train, smoothed {label_smoothing:g}" if label_smoothing else "train"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    runs = [("manualgrad", epochs, "-")] + ([("torch.nn", native, "--")] if native else [])
    for label, records, style in runs:
        x = [r["epoch"] for r in records]
        ax_loss.plot(
            x,
            [r["train_loss"] for r in records],
            style,
            color="tab:blue",
            marker="o",
            ms=3,
            label=f"{train_name} ({label})",
        )
        ax_loss.plot(
            x, [r["test_loss"] for r in records], style, color="tab:orange", marker="o", ms=3, label=f"test ({label})"
        )
        ax_acc.plot(
            x,
            [100 * r["test_accuracy"] for r in records],
            style,
            color="tab:green",
            marker="o",
            ms=3,
            label=f"test ({label})",
        )
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="test accuracy")
    if epochs:
        best = max(epochs, key=lambda r: r["test_accuracy"])
        last = epochs[-1]
        ax_acc.annotate(
            f"{100 * last['test_accuracy']:.2f}%",
            (last["epoch"], 100 * last["test_accuracy"]),
            textcoords="offset points",
            xytext=(-10, -14),
            ha="right",
        )
        low = min(100 * r["test_accuracy"] for r in epochs[len(epochs) // 4 :])  # skip the steep start
        ax_acc.set_ylim(max(low - 0.2, 100 * best["test_accuracy"] - 3), min(100.0, 100 * best["test_accuracy"] + 0.3))
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title, fontsize=10)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="curves.", suffix=".png")
    os.close(fd)
    os.chmod(tmp, 0o644)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
