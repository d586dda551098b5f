"""The options: each one a :class:`Config` field (:func:`option`), from which the parser, ``--help`` and the option
lists are generated. A preset is a set of defaults; options given explicitly win over it."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Collection
from dataclasses import dataclass

import torch

from manualgrad.nn import ACTIVATIONS

from .errors import ConfigError, short

MODELS = ("mlp", "cnn", "small-cnn", "scatter-cnn")
MAX_SEED = 2**64 - 1  # torch's seeds are unsigned 64-bit integers
MAX_WIDTH = 2**31 - 1
MAX_THREADS = 4 * (os.cpu_count() or 1)  # more only slows down; far more crashes OpenMP


# ---- argparse types: an ArgumentTypeError is a usage error (exit 2)
def number_in(kind, ok, what: str):
    """An argparse type: ``text`` as a ``kind`` (int or float) for which ``ok`` holds, else "must be ``what``"."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {value if kind is int else text}")
        return value

    return parse


positive_int = number_in(int, lambda v: v >= 1, "a positive integer")
seed = number_in(int, lambda v: 0 <= v <= MAX_SEED, "an integer from 0 to 2**64-1")
positive_float = number_in(float, lambda v: 0 < v < math.inf, "a positive number")
nonnegative_float = number_in(float, lambda v: 0 <= v < math.inf, "a number >= 0")
open_probability = number_in(float, lambda v: 0 < v < 1, "in (0, 1)")  # δ
probability = number_in(float, lambda v: 0 <= v < 1, "in [0, 1)")  # dropout, label smoothing, momentum
_CAP = f"{MAX_THREADS} (4x this machine's {os.cpu_count()} cores)"
_thread_count = number_in(int, lambda v: 1 <= v <= MAX_THREADS, f"auto or from 1 to {_CAP}")  # --threads: see threads


def threads(text: str) -> int | None:
    return None if text.strip().lower() == "auto" else _thread_count(text)


def hidden_sizes(text: str) -> tuple:
    """``"512,256"`` -> ``(512, 256)``; ``""`` or ``"none"`` -> no hidden layer (a linear classifier)."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated widths such as 512,256, got {text!r}") from None
    if not all(1 <= s <= MAX_WIDTH for s in sizes):
        raise argparse.ArgumentTypeError(f"widths must be from 1 to {MAX_WIDTH}, got {text!r}")
    return sizes


def channel_pair(text: str) -> tuple:
    """``"16,32"`` -> ``(16, 32)``: the output channels of a CNN's two convolutions."""
    sizes = hidden_sizes(text)
    if len(sizes) != 2:
        raise argparse.ArgumentTypeError(f"expected two channel counts such as 16,32, got {text!r}")
    return sizes


def activation_name(text: str) -> str:
    """A registered activation's name; ``file.py:name`` or ``module:name`` imports that first (it registers one)."""
    if ":" in text:
        from manualgrad.check import load

        try:
            found = load(text)
        except (ImportError, OSError, AttributeError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        names = [name for name, module in ACTIVATIONS.items() if getattr(module, "_op", None) is not None]
        text = next((n for n in names if ACTIVATIONS[n]._op.functional is found), text.rsplit(":", 1)[1])
    if text not in ACTIVATIONS:
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(ACTIVATIONS)})")
    return text


def path(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


# What each model changes in the Config defaults (the MLP's) when chosen; a preset's values and explicit options win.
SMALL_CNN = dict(channels=(16, 32), hidden=(32,), activation="tanh", dropout=0.0, impl="layers", label_smoothing=0.0)
MODEL_DEFAULTS: dict[str, dict] = {
    "mlp": {},
    # pytorch/examples' CNN (9216-128-10, dropouts 0.25 and 0.5), with AdamW and onecycle: an epoch costs ~20x the MLP's
    "cnn": dict(epochs=6, hidden=(128,), dropout=0.5, impl="layers", augment="shift"),
    # Papernot et al. 2021's tanh CNN (26,010 parameters) and Tramer & Boneh 2021's CNN on ScatterNet features
    "small-cnn": SMALL_CNN,
    "scatter-cnn": SMALL_CNN,
}

# DP-SGD's MLP: tanh (Papernot et al. 2021), large batches, Adam; from a small search at epsilon 2 (93.5-94.5%).
DP_MLP = dict(dp=True, hidden=(512,), activation="tanh", dropout=0.0, label_smoothing=0.0, weight_decay=0.0)
DP_MLP.update(batch_size=4000, epochs=60, clip=1.0, optimizer="adam", lr=5e-3, schedule="cosine")

# DP-SGD's small CNN as Tramer & Boneh 2021 trained it: SGD, momentum 0.9, constant lr (0.5 per 512 of the expected
# batch), clip 0.1; epochs: what fits in ~15 min on 2 CPU cores. The README says which runs chose these values.
DP_CNN = dict(model="small-cnn", channels=(32, 64), dp=True, optimizer="sgd", momentum=0.9, weight_decay=0.0)
DP_CNN.update(schedule="none", clip=0.1)

# DP-SGD on ScatterNet features (train/scatter.py) as Tramer & Boneh 2021 trained their CNN on them: the same SGD
# recipe, at their larger width (32,64: 98.69% against 98.58% for 16,32 at epsilon 3, one run each; see the README).
DP_SCATTER = dict(DP_CNN, model="scatter-cnn", channels=(32, 64), batch_size=1024, lr=1.0, epochs=40)

# A preset only lists what differs from the defaults of its model (the `default` preset is the MLP's).
PRESETS: dict[str, dict] = {
    "default": {},
    # the CNN, longer, on elastically distorted images (a new distortion of every image in every epoch)
    "best": dict(model="cnn", epochs=20, augment="elastic"),
    # ~99.4% in ~6-10 min on 2 CPU cores: a wider MLP on elastic distortions (Simard et al. 2003), longer
    "best-mlp": dict(epochs=50, hidden=(1024, 1024), dropout=0.2, lr=1e-3, augment="elastic"),
    "dp3": dict(DP_SCATTER, epsilon=3.0),
    "dp2": dict(DP_SCATTER, epsilon=2.0),
    "dp1": dict(DP_SCATTER, epsilon=1.0, batch_size=4096, lr=4.0, epochs=30),
    "dp3-cnn": dict(DP_CNN, epsilon=3.0, batch_size=1024, lr=1.0, epochs=40),
    "dp2-cnn": dict(DP_CNN, epsilon=2.0, batch_size=1024, lr=1.0, epochs=40),
    "dp1-cnn": dict(DP_CNN, epsilon=1.0, batch_size=4096, lr=4.0, epochs=30),
    "dp2-mlp": dict(DP_MLP, epsilon=2.0),
}


# ---- the options
def option(default, where: str, help: str, kind=None, shown: str | None = None, **argparse_kw):
    """A :class:`Config` field declaring an option. ``where``: its group in ``--help``, its role (``training``: a
    resumed run takes it from its checkpoint; ``run``: from the command line) and ``newer`` for a training option a
    checkpoint of format 2 may lack (then it has its default). ``kind``: the argparse ``type`` or the ``choices`` (a
    bool default: a switch). ``shown``: the default in ``--help`` ("": not at all; None: the value, not None)."""
    group, role, newer = [*where.split(", "), None, None][:3]
    flag = "--no-{}" if default is True else "--{}"  # a switch without a value (--dp; --no-download: default True)
    if isinstance(default, bool):
        argparse_kw["action"], shown = "store_false" if default else "store_true", ""
    elif callable(kind):
        argparse_kw["type"] = kind
    elif kind is not None:
        argparse_kw["choices"] = kind
    shown = "" if default is None and shown is None else shown
    meta = dict(help=help, group=group, role=role, newer=bool(newer), shown=shown, flag=flag, argparse=argparse_kw)
    return dataclasses.field(default=default, metadata=meta)


@dataclass
class Config:
    """Everything a run depends on; ``config.json`` in the run folder is this, as a dict."""

    preset: str = option(
        "default",
        "run",
        "named set of defaults, explicit options override it (--preset NAME --help shows them): best, best-mlp: the "
        "CNN or 784-1024-1024-10 on elastic distortions; dp3, dp2, dp1: DP-SGD at epsilon 3, 2, 1 (delta 1e-5), a CNN "
        "on ScatterNet features; dp3-cnn, dp2-cnn, dp1-cnn: the small tanh CNN; dp2-mlp: a tanh MLP 784-512-10",
        tuple(sorted(PRESETS)),
    )
    model: str = option(
        "mlp",
        "model, training, newer",
        "mlp: 784 -> hidden... -> 10; cnn: pytorch/examples' MNIST CNN; small-cnn: DP-SGD's small CNN (Papernot et al. "
        "2021); scatter-cnn: one on ScatterNet features (Tramer & Boneh 2021; needs kymatio); see --model NAME --help",
        MODELS,
    )
    data_dir: str = option("data/", "run", "MNIST IDX files: <dir>/MNIST/raw/ or <dir> (downloaded when missing)", path)
    download: bool = option(True, "run, run", "never download; fail if the files are missing")
    epochs: int = option(15, "optimisation, training", "passes over the training set", positive_int)
    batch_size: int = option(128, "optimisation, training", "global batch size (split across processes)", positive_int)
    hidden: tuple = option((512, 256), "model, training", "hidden layer widths, e.g. 512,256", hidden_sizes)
    channels: tuple = option((32, 64), "model, training, newer", "CNN convolution channels, e.g. 32,64", channel_pair)
    activation: str = option(
        "relu",
        "model, training",
        "activation after every hidden layer; yours: my_ops.py:squareplus or my_module:squareplus (imported first)",
        activation_name,
        metavar=lambda: "{" + ",".join(ACTIVATIONS) + "}",  # the registry as it is when the parser is built
    )
    dropout: float = option(0.1, "model, training", "dropout probability after every hidden activation", probability)
    label_smoothing: float = option(0.1, "optimisation, training", "label smoothing of the training loss", probability)
    optimizer: str = option("adamw", "optimisation, training", "sgd: with Nesterov momentum", ("sgd", "adam", "adamw"))
    lr: float = option(2e-3, "optimisation, training", "learning rate (the peak one for onecycle)", positive_float)
    momentum: float = option(0.9, "optimisation, training", "momentum for sgd", probability)
    weight_decay: float = option(0.05, "optimisation, training", "weight decay", nonnegative_float)
    schedule: str = option("onecycle", "optimisation, training", "per-step lr schedule", ("onecycle", "cosine", "none"))
    augment: str = option(
        "none",
        "optimisation, training",
        "distort training batches: shift (up to 2 px), affine (rotate, scale, shear, shift), elastic (affine, warped)",
        ("none", "shift", "affine", "elastic"),
    )
    impl: str = option(
        "fused", "model, training", "fused: MLP and loss in one Function; layers: one per layer", ("fused", "layers")
    )
    seed: int = option(0, "run, training", "seeds weights, batch order, dropout, augmentation (0 to 2**64-1)", seed)
    dp: bool = option(
        False,
        "dp, training, newer",
        "train with DP-SGD: Poisson-sampled batches (rate batch-size/N), each image's gradient clipped to --clip, "
        "Gaussian noise calibrated so that the whole run is (--epsilon, --delta)-DP; needs pip install -e '.[dp]'",
    )
    epsilon: float | None = option(
        None, "dp, training, newer", "the whole run's privacy budget", positive_float, shown="none; required with --dp"
    )
    delta: float = option(1e-5, "dp, training, newer", "the delta of (epsilon, delta)-DP", open_probability)
    clip: float = option(1.0, "dp, training, newer", "per-sample gradient norm bound C", positive_float)
    accountant: str = option(
        "pld", "dp, training, newer", "pld: privacy loss distributions, tight; rdp: Renyi DP, looser", ("pld", "rdp")
    )
    secure_rng: bool = option(
        False,
        "dp, training, newer",
        "seed the batches and the noise from the OS's entropy, not --seed (whoever knows the seed can recompute "
        "them: the guarantee does not hold against them); the run cannot be repeated, resuming stays exact",
    )
    device: str = option("auto", "run, run", "auto: cuda when available, else cpu", ("auto", "cpu", "cuda"))
    threads: int | None = option(
        None,
        "run, run",
        f"CPU threads per process, 1 to {MAX_THREADS}, or auto: every epoch (and on a slowdown) time 1 thread against "
        "all cores and train with the faster (the count changes the last bits: fix it to reproduce a run bit for bit)",
        threads,
        shown="auto",
    )
    out: str | None = option(
        None,
        "run",
        "run folder (default: runs/<timestamp>; resuming: the checkpoint's); refused if in use or another run's",
        path,
    )
    resume: str | None = option(
        None, "run, run", "resume a checkpoint.pt (or its run folder) with its options, same data", path, metavar="PATH"
    )
    compare_native: bool = option(
        False, "checks, run", "also train a torch.nn twin (same weights and batches); print both and the time ratio"
    )
    check_grads: bool = option(False, "checks, run", "compare our gradients with autograd's on one batch first")
    progress: bool = option(True, "run, run", "no progress bars (shown on a terminal only)")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "hidden": list(self.hidden), "channels": list(self.channels)}

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        """The inverse of :meth:`to_dict`; every training option but the newer ones must be there."""
        if missing := [k for k in TRAINING_OPTIONS if k not in d and k not in NEWER_OPTIONS]:
            raise ValueError(f"no {', '.join(missing)}")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if k in ("hidden", "channels") else v for k, v in d.items() if k in known})


OPTIONS = dataclasses.fields(Config)
# Options that decide what is learned: a resumed run takes them from its checkpoint and refuses changes.
TRAINING_OPTIONS = tuple(f.name for f in OPTIONS if f.metadata["role"] == "training")
# Training options added after checkpoint format 2: a checkpoint may lack them, and then has their default.
NEWER_OPTIONS = frozenset(f.name for f in OPTIONS if f.metadata["newer"])
# Options that say only where and how a run runs: a resumed run takes them from the command line.
RUN_OPTIONS = tuple(f.name for f in OPTIONS if f.metadata["role"] == "run")
PRIVACY_OPTIONS = frozenset(f.name for f in OPTIONS if f.metadata["group"] == "dp") - {"dp"}
GROUPS = {"dp": "differential privacy (DP-SGD)"}  # a group's title in --help, where it is not its name


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(defaults: Config | None = None) -> argparse.ArgumentParser:
    """The parser, with ``defaults`` (None: only the options given are parsed, no ``--help``)."""
    script = os.path.basename(sys.argv[0])
    p = argparse.ArgumentParser(
        prog="python -m train" if script in ("__main__.py", "-m", "-c", "") else script,
        description="Train an MLP or a CNN built only from manualgrad modules (hand-written backward passes) on "
        "MNIST, optionally with differential privacy (DP-SGD).",
        epilog="Several processes: torchrun --nproc_per_node=2 -m train [options] (same results as one process).",
        add_help=defaults is not None,
    )
    groups = {g: p.add_argument_group(GROUPS.get(g, g)) for g in dict.fromkeys(f.metadata["group"] for f in OPTIONS)}
    for f in OPTIONS:
        meta, kw = f.metadata, dict(f.metadata["argparse"])
        if callable(kw.get("metavar")):
            kw["metavar"] = kw["metavar"]()
        help, value = meta["help"], argparse.SUPPRESS
        if defaults is not None:
            value, shown = getattr(defaults, f.name), meta["shown"]
            if shown is None:  # the value as written on the command line
                shown = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            help += f" (default: {shown})" if shown else ""
        name = meta["flag"].format(f.name.replace("_", "-"))
        groups[meta["group"]].add_argument(name, dest=f.name, default=value, help=help, **kw)
    return p


def parse_args(argv=None) -> tuple[Config, frozenset]:
    """The Config of ``argv`` and the names of the options given explicitly; bad options exit with status 2."""
    given, _ = build_parser(None).parse_known_args(argv)  # only the options given; bad values exit here
    parser = build_parser(defaults(getattr(given, "preset", Config.preset), getattr(given, "model", None)))
    cfg = Config(**vars(parser.parse_args(argv)))  # --help, unknown options
    names = frozenset(vars(given))
    if cfg.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    privacy = sorted(names & PRIVACY_OPTIONS)
    if privacy and not cfg.dp and not cfg.resume:
        parser.error(f"{', '.join(map(flag, privacy))}: only with --dp")
    try:
        if not cfg.resume:  # a resumed run's options are the checkpoint's: run() checks them
            check(cfg)
    except ConfigError as e:
        parser.error(str(e))
    return cfg, names


def defaults(preset: str = "default", model: str | None = None) -> Config:
    """The defaults of ``preset`` for ``model`` (None: the preset's): Config's, then the model's, then the preset's.
    ``run(dataclasses.replace(defaults(model="cnn"), data_dir=...))`` is ``python -m train --model cnn``."""
    model = model or PRESETS[preset].get("model", Config.model)
    changes = {**MODEL_DEFAULTS[model], **PRESETS[preset], "preset": preset, "model": model}
    return dataclasses.replace(Config(), **changes)


def check_values(cfg: Config, skip: Collection[str] = ()) -> None:
    """Every option's value (but ``skip``'s) checked as the command line would take it, else a :class:`ConfigError`."""
    for action in build_parser(Config())._actions:
        flag, value = action.option_strings[-1], getattr(cfg, action.dest, None)
        if not hasattr(cfg, action.dest) or action.dest in skip or (value is None and action.default is None):
            continue  # not an option (--help), skipped, or not given (--epsilon without --dp, --out, --resume)
        invalid = ConfigError(f"{flag}: {short(value)} is not a valid value")
        if action.nargs == 0:  # a switch (--dp, --no-download, ...)
            if not isinstance(value, bool):
                raise ConfigError(f"{flag}: expected true or false, got {short(value)}")
        elif action.choices is not None:
            if value not in action.choices:
                raise ConfigError(f"{flag}: {short(value)} is not one of {', '.join(action.choices)}")
        elif isinstance(value, bool) or not isinstance(value, (int, float, str, tuple)):
            raise invalid
        else:  # written as on the command line, parsed by its type: it must come back
            text = (",".join(map(str, value)) or "none") if isinstance(value, tuple) else str(value)
            if action.type is activation_name and ":" in text:  # a stored run never imports a file
                raise ConfigError(f"{flag}: {short(value)} is not a registered activation's name")
            try:
                parsed = action.type(text)
            except argparse.ArgumentTypeError as e:
                raise (ConfigError(f"{flag} {text}: {e}") if len(text) <= 40 else invalid) from None
            if parsed != value:
                raise invalid


def check(cfg: Config) -> None:
    """Options that contradict each other: a :class:`ConfigError` (a usage error on the command line)."""
    if cfg.model not in MODELS:
        raise ConfigError(f"--model {cfg.model}: not one of {', '.join(MODELS)}")
    if cfg.model != "mlp" and cfg.impl != "layers":
        raise ConfigError(f"--model {cfg.model} has one Function per layer only: --impl layers, not {cfg.impl}")
    if cfg.model == "scatter-cnn" and cfg.augment != "none":
        raise ConfigError(f"--model scatter-cnn: --augment none (it trains on fixed features), not {cfg.augment}")
    if cfg.dp:
        if cfg.epsilon is None:
            raise ConfigError("--dp needs --epsilon, the privacy budget of the whole run (e.g. --epsilon 2)")
        if not (cfg.epsilon > 0 and cfg.clip > 0 and 0 < cfg.delta < 1):
            got = f"{cfg.epsilon}, {cfg.delta}, {cfg.clip}"
            raise ConfigError(f"--dp needs epsilon > 0, 0 < delta < 1 and clip > 0, got {got}")
        if cfg.compare_native:
            raise ConfigError("--compare-native cannot be combined with --dp (the torch.nn twin has no DP-SGD)")


def resume_config(requested: Config, saved: Config, given: Collection[str] | None = None) -> Config:
    """The checkpoint's configuration ``saved``, the run options from ``requested``; ``given``: None for all."""
    given = given if given is not None else [f.name for f in OPTIONS]
    changed = [k for k in ("preset", *TRAINING_OPTIONS) if k in given and getattr(requested, k) != getattr(saved, k)]
    if changed:
        flags = ", ".join(map(flag, changed))
        raise ConfigError(f"--resume continues a run as it was; {flags} differ from its checkpoint (start a new run)")
    keep = {k: getattr(requested, k) for k in RUN_OPTIONS}
    keep["out"] = requested.out if "out" in given else None  # None: the checkpoint's folder
    keep["data_dir"] = requested.data_dir if "data_dir" in given else saved.data_dir
    return dataclasses.replace(saved, **keep)
