"""``run(config)``: a whole training run, from the data to the run folder's files.

A run is these steps, in this order, each a function below:

1. **setup**: the processes (torchrun), the device, the CPU threads;
2. **resume** (``--resume``): the checkpoint, loaded and checked once, decides the configuration;
3. **load the data** (when resuming: the same data as the checkpoint's, by fingerprint);
4. **build the model** and its trainer (and the torch.nn twin's, ``--compare-native``);
5. **check the gradients** (``--check-grads``), and that the backward graph is all manualgrad's;
6. **restore** the checkpoint's state, or start at epoch 1;
7. **open the run folder** (rank 0): create, lock, clean up; write ``config.json``;
8. **for each epoch**: train, check the weights are finite, evaluate, save ``checkpoint.pt`` and
   ``metrics.json``; stop early on Ctrl-C (after writing a checkpoint);
9. **finish**: ``metrics.json``, ``curves.png``, the last lines of the log.

A failure before step 7 leaves no trace on disk.

What the run has done so far is one :class:`Progress`, passed from step to step.
"""

from __future__ import annotations

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
from .checks import check_all
from .config import Config, check, resume_config
from .engine import EpochResult, Position, StopRequest, Trainer, TrainingError
from .errors import ConfigError, RunError, first_line
from .folder import RunFolder
from .threads import Threads


@dataclass
class Progress:
    """What the run has done: the finished epochs and their records, and where an interrupted epoch stopped."""

    epoch: int = 0  # finished epochs
    position: Position | None = None  # where the next epoch starts, when not at its beginning
    history: list = field(default_factory=list)  # one record per finished epoch (metrics.json's "epochs")
    native_history: list = field(default_factory=list)  # the torch.nn twin's (--compare-native)
    interrupted: bool = False


def run(cfg: Config, on_step=None, given: Collection[str] | None = None) -> dict:
    """Train as ``cfg`` says and return the metrics (what ``metrics.json`` holds; on ranks other than 0
    the test metrics are missing). ``on_step(epoch, step, trainer)``, if given, is called after every
    step (tests use it). ``given``: with ``cfg.resume``, the names of the options the user set (see
    :func:`train.config.resume_config`); None: all of them."""
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
        if not _out_of_memory(e):
            raise
        raise TrainingError(f"not enough memory for this run ({_allocation(e)}); try a smaller --hidden") from None
    finally:
        torch.set_num_threads(threads_before)
        distributed.teardown(world, together)


def _run(cfg: Config, world: distributed.World, on_step, given) -> dict:
    if cfg.resume and cfg.compare_native:  # the command line's and Python's one check, before any file is read
        raise ConfigError("--compare-native cannot be combined with --resume")
    resumed = checkpoint.load(cfg.resume) if cfg.resume else None
    if resumed is not None:
        cfg = resume_config(cfg, Config.from_dict(resumed["config"]), given)
    check(cfg)
    threads = Threads(cfg.threads, world.local_size, world.device)
    mnist = load_data(cfg, world)
    if resumed is not None:
        check_same_data(resumed, mnist, cfg.resume)
    trainer, native = build(cfg, world, threads, mnist)
    if cfg.check_grads:
        distributed.on_main(world, check_gradients, trainer.net, mnist, cfg, world)
    check_coverage(trainer.net, mnist, cfg, world)
    progress = restore(trainer, resumed, cfg, world) if resumed is not None else Progress()
    with open_run_folder(cfg, world) as folder:  # nothing is written before this point
        cfg = dataclasses.replace(cfg, out=folder.path)
        distributed.on_main(world, folder.write_config, cfg.to_dict())
        log(world, f"run folder: {folder.path}")
        if progress.epoch == cfg.epochs:
            log(world, "the checkpoint had finished all its epochs; nothing to do")
        try:
            progress = train_epochs(cfg, world, trainer, native, progress, folder, mnist, on_step)
        except RunError:
            distributed.on_main(world, draw_curves, folder, metrics_of(cfg, world, trainer, native, progress))
            raise
        return finish(cfg, world, trainer, native, progress, folder)


# ---- the steps before training


def load_data(cfg: Config, world: distributed.World) -> data.MNIST:
    """Rank 0 finds (or downloads) the files, then every process reads them onto its device."""
    folder = distributed.on_main(world, data.locate, cfg.data_dir, cfg.download, share=True)
    mnist = data.load(folder, world.device, download=False)
    log(world, f"data: {len(mnist.train_y):,} training and {len(mnist.test_y):,} test images from {mnist.folder}")
    if cfg.model == "scatter-cnn":
        start = time.perf_counter()
        mnist = scatter.transform(mnist)
        log(
            world,
            f"features: the images' scattering transform, {'x'.join(map(str, scatter.SHAPE))} each, "
            f"in {time.perf_counter() - start:.0f} s",
        )
    return mnist


def check_same_data(resumed: dict, mnist: data.MNIST, path: str) -> None:
    """A checkpoint continues only on the data it was trained on (wherever the files now are): its
    batch order indexes that training set, and its metrics so far were measured on that test set."""
    if resumed["data"]["fingerprint"] != mnist.fingerprint:
        raise checkpoint.CheckpointError(
            f"cannot resume from {checkpoint.checkpoint_path(path)}: it was trained on other data than the "
            f"files in {mnist.folder} (their fingerprints differ); resume with the same MNIST files"
        )


def open_run_folder(cfg: Config, world: distributed.World) -> RunFolder:
    """Rank 0 opens (creates, locks) the run folder; the other processes learn its path."""
    resuming = checkpoint.checkpoint_path(cfg.resume) if cfg.resume else None
    out = cfg.out if cfg.out is not None or resuming is None else _folder_of(resuming)
    folder = distributed.on_main(world, RunFolder.open, out, resuming)
    path = distributed.broadcast_object(folder.path if folder else None, world)
    return folder or RunFolder(path, lock=None)  # other ranks never write: everything goes through on_main


def build(cfg: Config, world: distributed.World, threads: Threads, mnist: data.MNIST):
    """The trainer of the run's model (seeded initial weights, equal in every process), and with
    --compare-native the torch.nn twin's (same weights, seed, batches and augmentations)."""
    torch.manual_seed(cfg.seed)
    net = model.build(cfg, world.device)
    distributed.broadcast_parameters(net.module, world)
    trainer = Trainer(net, cfg, mnist, world, threads)
    native = Trainer(net.twin(), cfg, mnist, world, threads) if cfg.compare_native else None
    processes = _plural(world.size, "process", "processes")
    log(world, f"model: {net.describe()}; device {world.device}, {threads.describe()}, {processes}")
    batch = f"Poisson-sampled batches of {cfg.batch_size} expected" if cfg.dp else f"batch {cfg.batch_size}"
    log(
        world,
        f"training: {_plural(cfg.epochs, 'epoch')}, {batch}, {cfg.optimizer} lr {cfg.lr:g} "
        f"weight decay {cfg.weight_decay:g}, schedule {cfg.schedule}, label smoothing {cfg.label_smoothing:g}, "
        f"augment {cfg.augment}, seed {cfg.seed}",
    )
    if trainer.privacy is not None:
        rng = "the OS's entropy (--secure-rng)" if cfg.secure_rng else "--seed (reproducible: see --secure-rng)"
        log(world, f"privacy: {trainer.privacy.describe()}; batches and noise seeded from {rng}")
    return trainer, native


def check_coverage(net: model.Net, mnist: data.MNIST, cfg: Config, world: distributed.World) -> None:
    """The whole backward graph of the model's loss (in training mode, on the first rows) is manualgrad's, else
    :class:`TrainingError`. Its random draws (dropout) are thrown away."""
    x, y = mnist.train_x[: cfg.batch_size], mnist.train_y[: cfg.batch_size]
    with torch.random.fork_rng(devices=[world.device] if world.device.type == "cuda" else []):
        net.module.train()
        coverage = manualgrad.manual_coverage(net.loss(x, y))
    if not coverage.complete:
        raise TrainingError(f"the model's backward is not all manualgrad's Functions: {coverage}")


def check_gradients(net: model.Net, mnist: data.MNIST, cfg: Config, world: distributed.World) -> None:
    """--check-grads (rank 0): our gradients on the first batch against torch autograd's, for every impl."""
    batch = data.epoch_order(len(mnist.train_y), torch.Generator().manual_seed(cfg.seed))[: cfg.batch_size]
    batch = batch.to(world.device)
    for result in check_all(net, mnist.train_x[batch], mnist.train_y[batch]):
        log(world, result)
        if not result.ok:
            raise TrainingError(
                f"--check-grads: the {result.impl} gradients differ from torch autograd's "
                f"by {result.worst_relative:.2e} (relative) in {result.worst_parameter}"
            )


def restore(trainer: Trainer, resumed: dict, cfg: Config, world: distributed.World) -> Progress:
    """The trainer's state and the run's progress from the checkpoint."""
    path = checkpoint.checkpoint_path(cfg.resume)
    reason = checkpoint.misfit(trainer, resumed)
    options = [set(group) for group in trainer.optimizer.param_groups]
    if reason is None:
        try:
            same_world = trainer.load_state_dict(resumed)
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            reason = first_line(e)
    if reason is None:  # what an older torch's groups lacked, load_state_dict filled in: all of it?
        lacking = sorted({k for group, keys in zip(trainer.optimizer.param_groups, options) for k in keys - set(group)})
        reason = f"optimizer param_groups lack {', '.join(lacking)}" if lacking else None
    if reason is not None:
        raise checkpoint.CheckpointError(f"cannot resume from {path}: its state does not fit ({reason})") from None
    if not same_world:
        log(
            world,
            f"warning: the checkpoint was written by {len(resumed['rng']['torch'])} processes, this run has "
            f"{world.size}: dropout masks will differ from an uninterrupted run",
        )
    position = Position(**resumed["position"]) if resumed["position"] is not None else None
    native_history = resumed.get("native_history", [])
    progress = Progress(resumed["epoch"], position, resumed["history"], native_history)
    if native_history:
        log(
            world,
            f"the checkpoint's --compare-native record (torch.nn epochs 1-{len(native_history)}) is kept in "
            "metrics.json; a resumed run does not train the torch.nn twin further",
        )
    where = f"epoch {progress.epoch + 1}" + (f", step {position.step + 1}" if position else "")
    log(world, f"resumed from {path}: continuing at {where}")
    return progress


# ---- the epochs


def train_epochs(
    cfg: Config,
    world: distributed.World,
    trainer: Trainer,
    native: Trainer | None,
    progress: Progress,
    folder: RunFolder,
    mnist: data.MNIST,
    on_step,
) -> Progress:
    """Train the remaining epochs, saving after each; on Ctrl-C, save where it stopped and return."""
    with StopRequest(world) as stop:
        for epoch in range(progress.epoch + 1, cfg.epochs + 1):
            try:
                result = trainer.train_epoch(epoch, stop, resume=progress.position, on_step=on_step)
            except TrainingError as e:  # a non-finite loss: the checkpoint on disk stays the last good one
                raise _diverged(str(e), folder) from None
            broken = trainer.non_finite()
            if broken is not None:
                raise _diverged(f"the weights became non-finite ({broken}) in epoch {epoch}; not saved", folder)
            if result.interrupted is not None:
                progress.position, progress.interrupted = result.interrupted, True
                save(cfg, world, trainer, native, progress, folder, mnist)
                log(world, f"interrupted at epoch {epoch}, step {result.interrupted.step}: checkpoint written")
                return progress

            progress.epoch, progress.position = epoch, None
            progress.history.append(record(trainer, epoch, result))
            if native is not None:  # the torch.nn twin's epoch, right after ours (it never sees Ctrl-C)
                progress.native_history.append(record(native, epoch, native.train_epoch(epoch, StopRequest(world))))
            if world.main:  # the others have no test metrics
                versus = f"  | torch.nn: {_summary(progress.native_history[-1], 0)}" if native is not None else ""
                log(world, _summary(progress.history[-1], cfg.epochs) + versus)
            if (result.stop_requested or (stop.requested and not world.distributed)) and epoch < cfg.epochs:
                progress.interrupted = True
            save(cfg, world, trainer, native, progress, folder, mnist)
            if progress.interrupted:
                log(world, f"interrupted after epoch {epoch}: checkpoint written")
                return progress
    return progress


def record(trainer: Trainer, epoch: int, result: EpochResult) -> dict:
    """The epoch's line of metrics.json; rank 0 alone evaluates on the test set."""
    r = {"epoch": epoch, "train_loss": result.train_loss, "seconds": result.seconds}
    if trainer.world.main:
        r["test_loss"], r["test_accuracy"] = trainer.evaluate()
    if trainer.privacy is not None:  # what the run has spent so far (at its delta)
        r["epsilon"], r["steps"] = trainer.privacy.epsilon(trainer.private_steps), trainer.private_steps
    r["threads"] = trainer.threads.most_used()
    return r


def save(cfg, world, trainer: Trainer, native, progress: Progress, folder: RunFolder, mnist: data.MNIST) -> None:
    """checkpoint.pt, then metrics.json (rank 0 writes; every process takes part in gathering the state)."""
    state = trainer.state_dict()
    state.update(
        config=cfg.to_dict(),
        data={"fingerprint": mnist.fingerprint, "train": len(mnist.train_y), "test": len(mnist.test_y)},
        epoch=progress.epoch,
        position=progress.position.to_dict() if progress.position else None,
        history=progress.history,
        world_size=world.size,
    )
    if progress.native_history:  # --compare-native: the torch.nn twin's epochs, kept on resume
        state["native_history"] = progress.native_history
    metrics = metrics_of(cfg, world, trainer, native, progress)
    distributed.on_main(world, folder.save_checkpoint, state)
    distributed.on_main(world, folder.write_metrics, metrics)


# ---- the end


def finish(cfg, world, trainer: Trainer, native, progress: Progress, folder: RunFolder) -> dict:
    """metrics.json and curves.png in their final form, and the last lines of the log."""
    metrics = metrics_of(cfg, world, trainer, native, progress)
    if progress.interrupted:
        log(world, f"continue with: python -m train --resume {folder.path}")
    elif world.main and progress.history:
        epochs = _plural(len(progress.history), "epoch")
        private = ""
        if trainer.privacy is not None:
            private = f", ({metrics['privacy']['spent_epsilon']:.3f}, {cfg.delta:g})-DP"
        log(
            world,
            f"final test accuracy {100 * metrics['test_accuracy']:.2f}% after {epochs}{private}, "
            f"{metrics['train_seconds']:.1f} s of training; files in {folder.path}",
        )
        if progress.native_history:
            metrics["native"]["time_ratio"] = _print_comparison(world, cfg, progress.history, progress.native_history)
    distributed.on_main(world, folder.write_metrics, metrics)
    distributed.on_main(world, draw_curves, folder, metrics)
    return metrics


def metrics_of(cfg: Config, world: distributed.World, trainer: Trainer, native, progress: Progress) -> dict:
    """What metrics.json holds."""
    history = progress.history
    metrics = {
        "test_accuracy": history[-1].get("test_accuracy") if history else None,  # rank 0 alone evaluates
        "train_seconds": sum(r["seconds"] for r in history),
        "completed": progress.epoch == cfg.epochs,
        "interrupted": progress.interrupted,
        "model": trainer.net.describe(),
        "epochs": history,
        "config": cfg.to_dict(),
        "environment": {
            "device": str(world.device),
            "threads": "auto" if trainer.threads.auto else trainer.threads.current,
            "processes": world.size,
            "torch": torch.__version__,
        },
    }
    if trainer.privacy is not None:
        spent = trainer.privacy.epsilon(trainer.private_steps)  # an interrupted epoch's steps count too
        metrics["privacy"] = {**trainer.privacy.to_dict(), "spent_epsilon": spent, "steps": trainer.private_steps}
    if native is not None or progress.native_history:  # a resumed run keeps the twin's epochs so far
        native_history = progress.native_history
        metrics["native"] = {
            "test_accuracy": native_history[-1].get("test_accuracy") if native_history else None,
            "epochs": native_history,
        }
    return metrics


def draw_curves(folder: RunFolder, metrics: dict) -> None:
    """curves.png; a failure to draw it is a warning, not a failed run (python -m train.plot redraws it)."""
    if not metrics["epochs"]:
        return
    try:
        folder.draw_curves(metrics)
    except Exception as e:
        log_line(f"warning: curves.png not drawn ({type(e).__name__}: {e}); draw it with python -m train.plot")


# ---- helpers


def log(world: distributed.World, *args) -> None:
    if world.main:
        log_line(" ".join(str(a) for a in args))


def log_line(text: str) -> None:
    tqdm.write(text, file=sys.stdout)


def _diverged(problem: str, folder: RunFolder) -> TrainingError:
    last = folder.file(checkpoint.FILENAME)
    kept = f"the last good checkpoint is {last}" if os.path.exists(last) else "no checkpoint was written"
    return TrainingError(f"{problem}; {kept}. A lower --lr may help.")


def _folder_of(checkpoint_file: str) -> str:
    return os.path.dirname(os.path.abspath(checkpoint_file))


def _out_of_memory(e: RuntimeError) -> bool:
    text = str(e)
    return isinstance(e, torch.OutOfMemoryError) or "DefaultCPUAllocator" in text or "not enough memory" in text


def _allocation(e: RuntimeError) -> str:
    """E.g. "it tried to allocate 12544.0 GB", from torch's message."""
    found = re.search(r"tried to allocate (\d+) bytes", str(e))
    if found:
        return f"it tried to allocate {int(found[1]) / 1e9:,.1f} GB"
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _summary(r: dict, epochs: int) -> str:
    head = f"epoch {r['epoch']:>3}/{epochs}  " if epochs else ""
    spent = f"  epsilon {r['epsilon']:.3f}" if "epsilon" in r else ""
    return (
        f"{head}train loss {r['train_loss']:.4f}  test loss {r['test_loss']:.4f}  "
        f"test acc {100 * r['test_accuracy']:.2f}%{spent}  {r['seconds']:.1f} s"
    )


def _print_comparison(world, cfg: Config, ours: list[dict], theirs: list[dict]) -> dict:
    """The two runs side by side, over the epochs both trained (a resumed run trains ours only); returns the
    epoch-time ratios (manualgrad / torch.nn)."""
    if len(theirs) < len(ours):
        log(world, f"\n(torch.nn trained epochs 1-{len(theirs)} only, before the run was resumed: compared there)")
        ours = ours[: len(theirs)]
    times = [[r["seconds"] for r in run] for run in (ours, theirs)]
    last = (("test accuracy", "{:.2%}", "test_accuracy"), ("test loss", "{:.4f}", "test_loss"))
    last += (("train loss", "{:.4f}", "train_loss"),)
    rows = [(name, spec.format(ours[-1][k]), spec.format(theirs[-1][k])) for name, spec, k in last]
    for name, summary in (("mean", statistics.fmean), ("median", statistics.median), ("fastest", min)):
        rows.append((f"seconds / epoch ({name})", *(f"{summary(t):.2f}" for t in times)))
    log(world, f"\n{'':26}{f'manualgrad ({cfg.impl})':>20}{'torch.nn':>14}")
    for name, a, b in rows:
        log(world, f"{name:26}{a:>20}{b:>14}")
    ratio = {
        "mean": statistics.fmean(times[0]) / statistics.fmean(times[1]),
        "median_per_epoch": statistics.median(a / b for a, b in zip(*times)),
        "fastest": min(times[0]) / min(times[1]),
        "per_epoch": [a / b for a, b in zip(*times)],
    }
    log(
        world,
        f"epoch-time ratio manualgrad / torch.nn: {ratio['mean']:.3f} (mean), "
        f"{ratio['median_per_epoch']:.3f} (median of per-epoch ratios), {ratio['fastest']:.3f} (fastest epochs); "
        "the two alternate epoch by epoch in this process",
    )
    return ratio
