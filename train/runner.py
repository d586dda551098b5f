"""``run(config)``: a whole training run, from the data to the run folder's files, in the order of :func:`_run`:
set up, resume, load the data, build, check, restore, open the run folder (nothing is written before), train the
epochs (saving after each), finish. One step is :meth:`train.engine.Trainer.train_step`."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import statistics
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import manualgrad

from . import checkpoint, data, distributed, model, scatter
from .config import Config, check, resume_config
from .engine import Position, StopRequest, Trainer, TrainingError
from .errors import ConfigError, RunError, first_line
from .files import RunFolder, write_atomically, write_json
from .threads import Threads

TOLERANCE = 1e-4  # --check-grads, float32: the two backward passes sum in different orders


@dataclass
class Progress:
    """What the run has done: the finished epochs and their records, and where an interrupted epoch stopped."""

    epoch: int = 0  # finished epochs
    position: Position | None = None  # where the next epoch starts, when not at its beginning
    history: list = field(default_factory=list)  # one record per finished epoch (metrics.json's "epochs")
    native_history: list = field(default_factory=list)  # the torch.nn twin's (--compare-native)
    interrupted: bool = False


def run(cfg: Config, on_step=None, given: Collection[str] | None = None) -> dict:
    """Train as ``cfg`` says and return the metrics (``metrics.json``; other ranks than 0 lack the test metrics).
    ``on_step(epoch, step, trainer)`` is called after every step (tests use it). ``given``: with ``cfg.resume``,
    the options the user set (:func:`train.config.resume_config`; None: all)."""
    world = distributed.setup(cfg.device)
    together = False  # whether every process got here alike, so that they can leave together
    threads_before = torch.get_num_threads()  # restored on the way out, for callers in the same process
    try:
        metrics = _run(cfg, world, on_step, given)
        together = True
        return metrics
    except RunError:
        together = True  # these are raised in every process at the same point
        raise
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        text = str(e)
        if not (isinstance(e, torch.OutOfMemoryError) or "DefaultCPUAllocator" in text or "not enough memory" in text):
            raise
        found = re.search(r"tried to allocate (\d+) bytes", text)
        size = f"it tried to allocate {int(found[1]) / 1e9:,.1f} GB" if found else first_line(e)
        raise TrainingError(f"not enough memory for this run ({size}); try a smaller --hidden") from None
    finally:
        torch.set_num_threads(threads_before)
        distributed.teardown(world, together)


def _run(cfg: Config, world: distributed.World, on_step, given) -> dict:
    if cfg.resume and cfg.compare_native:  # the command line's and Python's one check, before any file is read
        raise ConfigError("--compare-native cannot be combined with --resume")
    resuming = checkpoint.checkpoint_path(cfg.resume) if cfg.resume else None  # its folder: the default --out
    resumed = checkpoint.load(cfg.resume) if cfg.resume else None
    if resumed is not None:
        cfg = resume_config(cfg, Config.from_dict(resumed["config"]), given)
    check(cfg)
    threads = Threads(cfg.threads, world.local_size, world.device)
    data_folder = distributed.on_main(world, data.locate, cfg.data_dir, cfg.download, share=True)  # rank 0 downloads
    mnist = data.load(data_folder, world.device, download=False)  # every process reads the files onto its device
    log(world, f"data: {len(mnist.train_y):,} training and {len(mnist.test_y):,} test images from {mnist.folder}")
    if resumed is not None and resumed["data"]["fingerprint"] != mnist.fingerprint:  # its order indexes its data
        other = f"it was trained on other data than the files in {mnist.folder} (their fingerprints differ)"
        raise checkpoint.CheckpointError(f"cannot resume from {resuming}: {other}; resume with the same MNIST files")
    if cfg.model == "scatter-cnn":  # fixed features in place of the pixels, computed once
        start = time.perf_counter()
        mnist = scatter.transform(mnist)
        shape = "x".join(map(str, scatter.SHAPE))
        log(world, f"features: the images' scattering transform, {shape} each, in {time.perf_counter() - start:.0f} s")
    trainer, native = build(cfg, world, threads, mnist)
    progress = restore(trainer, resumed, resuming, world) if resumed is not None else Progress()
    out = cfg.out if cfg.out is not None or resuming is None else os.path.dirname(os.path.abspath(resuming))
    opened = distributed.on_main(world, RunFolder.open, out, resuming)  # rank 0 creates and locks the run folder;
    path = distributed.broadcast_object(opened.path if opened else None, world)  # the others only write via on_main
    with contextlib.closing(opened or RunFolder(path, None)) as folder:  # nothing is written before this point
        cfg = dataclasses.replace(cfg, out=folder.path)
        distributed.on_main(world, write_json, folder.file("config.json"), cfg.to_dict())
        log(world, f"run folder: {folder.path}")
        if progress.epoch == cfg.epochs:
            log(world, "the checkpoint had finished all its epochs; nothing to do")
        try:
            train_epochs(cfg, world, trainer, native, progress, folder, mnist, on_step)
        except RunError:
            distributed.on_main(world, draw_curves, folder, metrics_of(cfg, world, trainer, native, progress))
            raise
        return finish(cfg, world, trainer, native, progress, folder)


# ---- the steps before training
def build(cfg: Config, world: distributed.World, threads: Threads, mnist: data.MNIST):
    """The run's trainer (seeded initial weights), and with --compare-native the torch.nn twin's (same weights), its
    model checked: --check-grads first, then its loss's whole backward graph (first rows) must be manualgrad's."""
    torch.manual_seed(cfg.seed)
    net = model.build(cfg, world.device)
    distributed.broadcast_parameters(net.module, world)
    trainer = Trainer(net, cfg, mnist, world, threads)
    native = Trainer(net.twin(), cfg, mnist, world, threads) if cfg.compare_native else None
    processes = _plural(world.size, "process", "processes")
    log(world, f"model: {net.describe()}; device {world.device}, {threads.describe()}, {processes}")
    batch = f"Poisson-sampled batches of {cfg.batch_size} expected" if cfg.dp else f"batch {cfg.batch_size}"
    optimizer = f"{cfg.optimizer} lr {cfg.lr:g} weight decay {cfg.weight_decay:g}, schedule {cfg.schedule}"
    regularise = f"label smoothing {cfg.label_smoothing:g}, augment {cfg.augment}, seed {cfg.seed}"
    log(world, f"training: {_plural(cfg.epochs, 'epoch')}, {batch}, {optimizer}, {regularise}")
    if trainer.privacy is not None:
        rng = "the OS's entropy (--secure-rng)" if cfg.secure_rng else "--seed (reproducible: see --secure-rng)"
        log(world, f"privacy: {trainer.privacy.describe()}; batches and noise seeded from {rng}")
    x, y = mnist.train_x[: cfg.batch_size], mnist.train_y[: cfg.batch_size]  # both checks' batch: the first rows
    if cfg.check_grads:
        distributed.on_main(world, check_gradients, net, x, y, world)
    with torch.random.fork_rng(devices=[world.device] if world.device.type == "cuda" else []):
        net.module.train()
        coverage = manualgrad.manual_coverage(net.loss(x, y))
    if not coverage.complete:
        raise TrainingError(f"the model's backward is not all manualgrad's Functions: {coverage}")
    return trainer, native


def check_gradients(net: model.Net, x: torch.Tensor, y: torch.Tensor, world: distributed.World) -> None:
    """--check-grads (rank 0): our gradients on one batch against torch autograd's, for every impl."""
    for impl in dict.fromkeys((net.impl, *net.impls)):  # the run's way first
        worst, name, loss_difference, coverage = model.compare_gradients(net.with_impl(impl), x, y)
        verdict = "OK" if worst <= TOLERANCE else f"MISMATCH (tolerance {TOLERANCE:g})"
        found = f"largest relative difference to torch autograd {worst:.2e} (in {name})"
        log(world, f"check-grads [{impl}]: {found}, loss difference {loss_difference:.1e}: {verdict}")
        log(world, f"  backward graph: {coverage}")
        if not worst <= TOLERANCE:  # NaN too
            differ = f"the {impl} gradients differ from torch autograd's by {worst:.2e} (relative) in {name}"
            raise TrainingError(f"--check-grads: {differ}")


def restore(trainer: Trainer, resumed: dict, path: str, world: distributed.World) -> Progress:
    if not checkpoint.restore(trainer, resumed, path):
        written = f"the checkpoint was written by {len(resumed['rng']['torch'])} processes, this run has {world.size}"
        log(world, f"warning: {written}: dropout masks will differ from an uninterrupted run")
    position = Position(**resumed["position"]) if resumed["position"] is not None else None
    progress = Progress(resumed["epoch"], position, resumed["history"], resumed.get("native_history", []))
    if progress.native_history:
        record = f"the checkpoint's --compare-native record (torch.nn epochs 1-{len(progress.native_history)})"
        log(world, f"{record} is kept in metrics.json; a resumed run does not train the torch.nn twin further")
    where = f"epoch {progress.epoch + 1}" + (f", step {position.step + 1}" if position else "")
    log(world, f"resumed from {path}: continuing at {where}")
    return progress


# ---- the epochs
def train_epochs(cfg, world, trainer: Trainer, native, progress: Progress, folder, mnist, on_step) -> None:
    """Train the remaining epochs, saving after each; on Ctrl-C, save where it stopped and return."""
    with StopRequest(world) as stop:
        for epoch in range(progress.epoch + 1, cfg.epochs + 1):
            try:
                at, stopping = trainer.train_epoch(epoch, stop, resume=progress.position, on_step=on_step)
                if (broken := trainer.non_finite()) is not None:
                    raise TrainingError(f"the weights became non-finite ({broken}) in epoch {epoch}; not saved")
            except TrainingError as e:  # a non-finite loss or weights: the checkpoint on disk stays the last good one
                last = folder.file(checkpoint.FILENAME)
                kept = f"the last good checkpoint is {last}" if os.path.exists(last) else "no checkpoint was written"
                raise TrainingError(f"{e}; {kept}. A lower --lr may help.") from None
            if at.step < trainer.steps_per_epoch:  # stopped mid-epoch: saved where it stopped
                progress.position, progress.interrupted, where = at, True, f"at epoch {epoch}, step {at.step}"
            else:
                progress.epoch, progress.position, where = epoch, None, f"after epoch {epoch}"
                progress.history.append(record(trainer, epoch, at))
                if native is not None:  # the torch.nn twin's epoch, right after ours (it never sees Ctrl-C)
                    theirs, _ = native.train_epoch(epoch, StopRequest(world))
                    progress.native_history.append(record(native, epoch, theirs))
                if world.main:  # the others have no test metrics
                    versus = f"  | torch.nn: {_summary(progress.native_history[-1], 0)}" if native is not None else ""
                    log(world, _summary(progress.history[-1], cfg.epochs) + versus)
                progress.interrupted = (stopping or (stop.requested and not world.distributed)) and epoch < cfg.epochs
            save(cfg, world, trainer, native, progress, folder, mnist)
            if progress.interrupted:
                log(world, f"interrupted {where}: checkpoint written")
                return


def record(trainer: Trainer, epoch: int, end: Position) -> dict:
    """The epoch's line of metrics.json; rank 0 alone evaluates on the test set."""
    r = {"epoch": epoch, "train_loss": end.loss_sum / max(end.rows, 1), "seconds": end.seconds}
    if trainer.world.main:
        r["test_loss"], r["test_accuracy"] = trainer.evaluate()
    if trainer.privacy is not None:  # what the run has spent so far (at its delta)
        r["epsilon"], r["steps"] = trainer.privacy.epsilon(trainer.private_steps), trainer.private_steps
    r["threads"] = trainer.threads.most_used()
    return r


def save(cfg, world, trainer: Trainer, native, progress: Progress, folder: RunFolder, mnist: data.MNIST) -> None:
    """checkpoint.pt, then metrics.json (rank 0 writes; every process takes part in gathering the state)."""
    state = trainer.state_dict()
    facts = {"fingerprint": mnist.fingerprint, "train": len(mnist.train_y), "test": len(mnist.test_y)}
    position = dict(vars(progress.position)) if progress.position else None
    state.update(config=cfg.to_dict(), data=facts, epoch=progress.epoch, position=position)
    state.update(history=progress.history, world_size=world.size)
    if progress.native_history:  # --compare-native: the torch.nn twin's epochs, kept on resume
        state["native_history"] = progress.native_history
    metrics = metrics_of(cfg, world, trainer, native, progress)
    distributed.on_main(world, checkpoint.save, state, folder.file(checkpoint.FILENAME))
    distributed.on_main(world, write_json, folder.file("metrics.json"), metrics)


# ---- the end
def finish(cfg, world, trainer: Trainer, native, progress: Progress, folder: RunFolder) -> dict:
    """metrics.json and curves.png in their final form, and the last lines of the log."""
    metrics = metrics_of(cfg, world, trainer, native, progress)
    if progress.interrupted:
        log(world, f"continue with: python -m train --resume {folder.path}")
    elif world.main and progress.history:
        epochs = _plural(len(progress.history), "epoch")
        private = f", ({metrics['privacy']['spent_epsilon']:.3f}, {cfg.delta:g})-DP" if trainer.privacy else ""
        accuracy = f"final test accuracy {100 * metrics['test_accuracy']:.2f}% after {epochs}{private}"
        log(world, f"{accuracy}, {metrics['train_seconds']:.1f} s of training; files in {folder.path}")
        if progress.native_history:
            metrics["native"]["time_ratio"] = _print_comparison(world, cfg, progress.history, progress.native_history)
    distributed.on_main(world, write_json, folder.file("metrics.json"), metrics)
    distributed.on_main(world, draw_curves, folder, metrics)
    return metrics


def metrics_of(cfg: Config, world: distributed.World, trainer: Trainer, native, progress: Progress) -> dict:
    history, threads = progress.history, "auto" if trainer.threads.auto else trainer.threads.current
    environment = {"device": str(world.device), "threads": threads, "processes": world.size, "torch": torch.__version__}
    metrics = {
        "test_accuracy": history[-1].get("test_accuracy") if history else None,  # rank 0 alone evaluates
        "train_seconds": sum(r["seconds"] for r in history),
        "completed": progress.epoch == cfg.epochs,
        "interrupted": progress.interrupted,
        "model": trainer.net.describe(),
        "epochs": history,
        "config": cfg.to_dict(),
        "environment": environment,
    }
    if trainer.privacy is not None:
        spent = trainer.privacy.epsilon(trainer.private_steps)  # an interrupted epoch's steps count too
        metrics["privacy"] = {**trainer.privacy.to_dict(), "spent_epsilon": spent, "steps": trainer.private_steps}
    if native is not None or progress.native_history:  # a resumed run keeps the twin's epochs so far
        theirs = progress.native_history
        metrics["native"] = {"test_accuracy": theirs[-1].get("test_accuracy") if theirs else None, "epochs": theirs}
    return metrics


def draw_curves(folder: RunFolder, metrics: dict) -> None:
    """curves.png; a failure to draw it is a warning, not a failed run (python -m train.plot redraws it)."""
    from . import plot  # here, not at import: `python -m train.plot` must find train.plot not yet imported

    if not metrics["epochs"]:
        return
    try:
        write_atomically(folder.file("curves.png"), plot.curves_png(metrics))
    except Exception as e:
        log(None, f"warning: curves.png not drawn ({type(e).__name__}: {e}); draw it with python -m train.plot")


# ---- helpers
def log(world: distributed.World | None, *args) -> None:
    """A line on rank 0's standard output (None: this process's), beside the progress bar."""
    if world is None or world.main:
        tqdm.write(" ".join(str(a) for a in args), file=sys.stdout)


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _summary(r: dict, epochs: int) -> str:
    head = f"epoch {r['epoch']:>3}/{epochs}  " if epochs else ""
    spent = f"  epsilon {r['epsilon']:.3f}" if "epsilon" in r else ""
    losses = f"train loss {r['train_loss']:.4f}  test loss {r['test_loss']:.4f}"
    return f"{head}{losses}  test acc {100 * r['test_accuracy']:.2f}%{spent}  {r['seconds']:.1f} s"


def _print_comparison(world, cfg: Config, ours: list[dict], theirs: list[dict]) -> dict:
    """Both runs side by side, over the epochs both trained; returns the epoch-time ratios ours / torch.nn."""
    if len(theirs) < len(ours):
        log(world, f"\n(torch.nn trained epochs 1-{len(theirs)} only, before the run was resumed: compared there)")
        ours = ours[: len(theirs)]
    log(world, f"\n{'':26}{f'manualgrad ({cfg.impl})':>20}{'torch.nn':>14}")
    last = [("test accuracy", "{:.2%}", "test_accuracy"), ("test loss", "{:.4f}", "test_loss")]
    for name, spec, k in last + [("train loss", "{:.4f}", "train_loss")]:
        log(world, f"{name:26}{spec.format(ours[-1][k]):>20}{spec.format(theirs[-1][k]):>14}")
    a, b = [[r["seconds"] for r in run] for run in (ours, theirs)]
    for name, summary in (("mean", statistics.fmean), ("median", statistics.median), ("fastest", min)):
        log(world, f"{f'seconds / epoch ({name})':26}{summary(a):>20.2f}{summary(b):>14.2f}")
    per_epoch = [x / y for x, y in zip(a, b)]
    ratio = {"mean": statistics.fmean(a) / statistics.fmean(b), "median_per_epoch": statistics.median(per_epoch)}
    ratio.update(fastest=min(a) / min(b), per_epoch=per_epoch)
    means = f"{ratio['mean']:.3f} (mean), {ratio['median_per_epoch']:.3f} (median of per-epoch ratios)"
    fastest = f"{ratio['fastest']:.3f} (fastest epochs); the two alternate epoch by epoch in this process"
    log(world, f"epoch-time ratio manualgrad / torch.nn: {means}, {fastest}")
    return ratio
