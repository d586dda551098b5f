"""Command-line options, presets and the run's configuration.

Every option has a default and a help string (``python -m train --help``).
A preset is a set of defaults: ``--preset best`` swaps in other defaults, and
any option given explicitly on the command line still wins over the preset.
Invalid values are argparse usage errors (exit status 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass

import torch

from manualgrad.nn import ACTIVATIONS


@dataclass
class Config:
    """Everything a run depends on; ``config.json`` in the run folder is this, as a dict."""

    preset: str = "default"
    data_dir: str = "data/"
    download: bool = True
    epochs: int = 15
    batch_size: int = 128
    hidden: tuple = (512, 256)
    activation: str = "relu"
    dropout: float = 0.1
    label_smoothing: float = 0.1
    optimizer: str = "adamw"
    lr: float = 2e-3
    momentum: float = 0.9
    weight_decay: float = 0.05
    schedule: str = "onecycle"
    augment: str = "none"
    impl: str = "fused"
    seed: int = 0
    device: str = "auto"
    threads: int | None = None  # None: all cores, shared among the processes of this machine
    out: str | None = None  # None: runs/<timestamp>
    resume: str | None = None
    compare_native: bool = False
    check_grads: bool = False
    progress: bool = True

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "hidden" in d:
            d["hidden"] = tuple(d["hidden"])
        return cls(**d)


# A preset only lists what differs from the Config defaults above (which are the `default` preset).
PRESETS: dict[str, dict] = {
    "default": {},
    # ~99.4% in ~6-10 min on 2 CPU cores: a wider MLP that sees a new elastic distortion of every image
    # in every epoch (Simard et al. 2003), so it trains longer without overfitting.
    "best": dict(
        epochs=50,
        hidden=(1024, 1024),
        dropout=0.2,
        lr=1e-3,
        augment="elastic",
    ),
}

# Options that decide what is learned: a resumed run takes them from its checkpoint and refuses changes.
TRAINING_OPTIONS = (
    "epochs",
    "batch_size",
    "hidden",
    "activation",
    "dropout",
    "label_smoothing",
    "optimizer",
    "lr",
    "momentum",
    "weight_decay",
    "schedule",
    "augment",
    "impl",
    "seed",
)


# ---- argparse types: each raises ArgumentTypeError, which argparse turns into a usage error (exit 2)


def _number(kind, text):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None


def positive_int(text: str) -> int:
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _number(float, text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = _number(float, text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def probability(text: str) -> float:
    """A probability in [0, 1): dropout, label smoothing, momentum."""
    value = _number(float, text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def hidden_sizes(text: str) -> tuple:
    """``"512,256"`` -> ``(512, 256)``; ``""`` or ``"none"`` -> no hidden layer (a linear classifier)."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated widths such as 512,256, got {text!r}") from None
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"widths must be positive, got {text!r}")
    return sizes


# ---- the parser


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: ...)" to each help, except for flags and options without a fixed default."""

    def _get_help_string(self, action):
        default = action.default
        if default is None or default is argparse.SUPPRESS or action.nargs == 0 or "%(default)" in action.help:
            return action.help
        if isinstance(default, tuple):
            default = ",".join(str(v) for v in default)
        return f"{action.help} (default: {default})"


def build_parser() -> argparse.ArgumentParser:
    d = Config()
    script = os.path.basename(sys.argv[0])
    p = argparse.ArgumentParser(
        prog="python -m train" if script in ("__main__.py", "-m", "-c", "") else script,  # or manualgrad-train
        description="Train an MLP built only from manualgrad modules (hand-written backward passes) on MNIST.",
        epilog="Several processes: torchrun --nproc_per_node=2 -m train [options] (same results as one process).",
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("run")
    g.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=d.preset,
        help="named set of defaults; explicit options override it. default: 784-512-256-10, "
        "15 epochs, ~98.8%% in ~25-40 s on 2 CPU cores; best: 784-1024-1024-10 on elastically distorted "
        "images, 50 epochs, ~99.4%% in ~6-10 min",
    )
    g.add_argument(
        "--data-dir",
        default=d.data_dir,
        help="folder with the MNIST IDX files (torchvision layout <dir>/MNIST/raw/, or the four files "
        "directly in <dir>); downloaded there when missing",
    )
    g.add_argument(
        "--no-download", dest="download", action="store_false", help="never download; fail if the files are missing"
    )
    g.add_argument(
        "--out",
        default=d.out,
        help="run folder for metrics, checkpoint and plots "
        "(default: runs/<timestamp>; when resuming: the checkpoint's folder)",
    )
    g.add_argument(
        "--resume", default=d.resume, metavar="PATH", help="continue from a checkpoint.pt (or a run folder holding one)"
    )
    g.add_argument(
        "--seed",
        type=nonnegative_int,
        default=d.seed,
        help="seed for initial weights, batch order, dropout and augmentation",
    )
    g.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default=d.device, help="auto: cuda when available, else cpu"
    )
    g.add_argument(
        "--threads",
        type=positive_int,
        default=d.threads,
        help="CPU threads per process (default: all cores, divided among this machine's processes)",
    )
    g.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bars, only one line per epoch (bars are shown only on a terminal anyway)",
    )

    g = p.add_argument_group("model")
    g.add_argument(
        "--hidden", type=hidden_sizes, default=d.hidden, help="hidden layer widths, comma-separated (e.g. 512,256)"
    )
    g.add_argument(
        "--activation", choices=tuple(ACTIVATIONS), default=d.activation, help="activation after every hidden layer"
    )
    g.add_argument(
        "--dropout", type=probability, default=d.dropout, help="dropout probability after every hidden activation"
    )
    g.add_argument(
        "--impl",
        choices=("fused", "layers"),
        default=d.impl,
        help="fused: the whole MLP and its loss as one manualgrad Function (MLP.loss); "
        "layers: one manualgrad Function per layer (MLP.per_layer() + manualgrad CrossEntropyLoss)",
    )

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=d.epochs, help="passes over the training set")
    g.add_argument(
        "--batch-size",
        type=positive_int,
        default=d.batch_size,
        help="global batch size (split across processes under torchrun)",
    )
    g.add_argument(
        "--optimizer",
        choices=("sgd", "adam", "adamw"),
        default=d.optimizer,
        help="sgd: with (Nesterov) momentum; adam; adamw: decoupled weight decay",
    )
    g.add_argument("--lr", type=positive_float, default=d.lr, help="learning rate (the peak one for onecycle)")
    g.add_argument("--momentum", type=probability, default=d.momentum, help="momentum for sgd")
    g.add_argument("--weight-decay", type=nonnegative_float, default=d.weight_decay, help="weight decay")
    g.add_argument(
        "--schedule",
        choices=("onecycle", "cosine", "none"),
        default=d.schedule,
        help="learning-rate schedule, stepped every batch: onecycle (warm-up then anneal), "
        "cosine (anneal to 0), none (constant)",
    )
    g.add_argument(
        "--label-smoothing", type=probability, default=d.label_smoothing, help="label smoothing of the training loss"
    )
    g.add_argument(
        "--augment",
        choices=("none", "shift", "affine", "elastic"),
        default=d.augment,
        help="batch-level augmentation of training images: shift (up to 2 px), affine (rotate, "
        "scale, shear, shift), elastic (affine + elastic distortion)",
    )

    g = p.add_argument_group("checks")
    g.add_argument(
        "--compare-native",
        action="store_true",
        help="also train the same MLP written in plain torch.nn (same initial weights, seed and batches, "
        "epochs interleaved in this process) and print both side by side with the epoch-time ratio",
    )
    g.add_argument(
        "--check-grads",
        action="store_true",
        help="before training, compare our gradients on one batch with torch autograd's "
        "(a torch.nn twin with the same weights) and print the largest relative difference",
    )
    return p


def parse_args(argv=None) -> Config:
    """Parse ``argv`` into a Config: preset defaults first, explicit options over them; with
    ``--resume``, the checkpoint's configuration. Invalid options exit with status 2."""
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    parser.set_defaults(**PRESETS[known.preset])
    args = parser.parse_args(argv)
    explicit = _explicit(parser, argv)
    cfg = Config(**vars(args))
    if cfg.compare_native and cfg.resume:
        parser.error("--compare-native cannot be combined with --resume")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    if cfg.resume:
        cfg = _resumed(parser, cfg, explicit)
    return cfg


def _resumed(parser: argparse.ArgumentParser, cli: Config, explicit: set) -> Config:
    """A resumed run trains as its checkpoint says; the command line may change only where and how
    it runs (--out, --data-dir, --device, --threads, progress bars, --check-grads)."""
    from . import checkpoint

    try:
        saved = Config.from_dict(checkpoint.load(cli.resume)["config"])
    except checkpoint.CheckpointError as e:
        parser.error(str(e))
    changed = [k for k in TRAINING_OPTIONS + ("preset",) if k in explicit and getattr(cli, k) != getattr(saved, k)]
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in changed)
        parser.error(
            f"--resume continues a run as it was configured; {flags} differ from its checkpoint "
            "(start a new run to change them)"
        )
    keep = {k: getattr(cli, k) for k in ("resume", "device", "threads", "progress", "check_grads", "download")}
    keep["out"] = cli.out if "out" in explicit else None  # None: the checkpoint's folder
    if "data_dir" in explicit:
        keep["data_dir"] = cli.data_dir
    return dataclasses.replace(saved, **keep)


def _explicit(parser: argparse.ArgumentParser, argv) -> set:
    """Which options ``argv`` sets: parse again with every default suppressed."""
    saved = {a.dest: a.default for a in parser._actions}
    try:
        for a in parser._actions:
            a.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for a in parser._actions:
            a.default = saved[a.dest]
