"""``run(config)``: a whole training run, from the data to the run folder's files.

Read top to bottom: set up (threads, device, processes), load the data, build
the model, optionally check its gradients, restore a checkpoint, then for each
epoch train, evaluate, and write ``checkpoint.pt``, ``metrics.json`` and
``curves.png``. With ``--compare-native`` a torch.nn twin trains alongside,
epoch for epoch, and the two are printed side by side at the end.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time

import torch
from tqdm import tqdm

from . import checkpoint, data, distributed, plots
from .checks import check_grads
from .config import TRAINING_OPTIONS, Config
from .engine import Position, StopRequest, Trainer, TrainingError
from .model import Net, build_mlp, torch_twin


def log(world: distributed.World, *args) -> None:
    if world.main:
        tqdm.write(" ".join(str(a) for a in args), file=sys.stdout)


def on_main(world: distributed.World, fn):
    """Run ``fn`` on rank 0 only and give every process its result, or raise its error everywhere
    (so that a missing file stops all processes with the same message instead of leaving some waiting)."""
    result, error = None, None
    if world.main:
        try:
            result = fn()
        except (data.DataError, checkpoint.CheckpointError, TrainingError) as e:
            error = e
    result, error = distributed.broadcast_object((result, error), world)
    if error is not None:
        raise error
    return result


def run(cfg: Config, on_step=None) -> dict:
    """Train as ``cfg`` says and return the metrics (what ``metrics.json`` holds; on ranks other
    than 0 only the config). ``on_step(epoch, step, trainer)``, if given, is called after every step
    (``step`` counts from 1) and may inspect or change the trainer: tests use it."""
    world = distributed.setup(cfg.device)
    together = False  # whether every process got here alike, so that they can leave together
    threads = torch.get_num_threads()  # restored on the way out, for callers in the same process
    try:
        metrics = _run(cfg, world, on_step)
        together = True
        return metrics
    except (data.DataError, checkpoint.CheckpointError, TrainingError):
        together = True  # these are raised in every process at the same point
        raise
    finally:
        torch.set_num_threads(threads)
        distributed.teardown(world, together)


def _run(cfg: Config, world: distributed.World, on_step) -> dict:
    device = world.device
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // world.local_size)
    torch.set_num_threads(threads)

    # ---- the checkpoint to continue from
    resumed = None
    if cfg.resume:
        resumed = checkpoint.load(cfg.resume)
        saved = Config.from_dict(resumed["config"])
        changed = [k for k in TRAINING_OPTIONS if getattr(saved, k) != getattr(cfg, k)]
        if changed:
            raise TrainingError(f"--resume: the checkpoint was trained with other {', '.join(changed)}")
        if cfg.out is None:
            cfg = dataclasses.replace(cfg, out=os.path.dirname(os.path.abspath(checkpoint.checkpoint_path(cfg.resume))))

    # ---- data: rank 0 finds or downloads the files, then every process loads them onto its device
    folder = on_main(world, lambda: data.locate(cfg.data_dir, cfg.download))
    mnist = data.load(folder, device, download=False)
    log(world, f"data: {len(mnist.train_y):,} training and {len(mnist.test_y):,} test images from {mnist.folder}")

    cfg = dataclasses.replace(cfg, out=on_main(world, lambda: _run_folder(cfg)))  # created once the data is there
    out = cfg.out

    # ---- model: seeded initial weights, equal in every process
    torch.manual_seed(cfg.seed)
    mlp = build_mlp(cfg.hidden, cfg.activation, cfg.dropout, device)
    distributed.broadcast_parameters(mlp, world)
    net = Net(mlp, cfg.impl, cfg.label_smoothing)
    sizes = "-".join(str(s) for s in mlp.sizes)
    log(
        world,
        f"model: MLP {sizes}, {cfg.activation}, dropout {cfg.dropout}, impl {cfg.impl}, "
        f"{sum(p.numel() for p in mlp.parameters()):,} parameters; device {device}, {_plural(threads, 'thread')}, "
        f"{_plural(world.size, 'process', 'processes')}",
    )

    log(
        world,
        f"training: {_plural(cfg.epochs, 'epoch')}, batch {cfg.batch_size}, {cfg.optimizer} lr {cfg.lr:g} "
        f"weight decay {cfg.weight_decay:g}, schedule {cfg.schedule}, label smoothing {cfg.label_smoothing:g}, "
        f"augment {cfg.augment}, seed {cfg.seed}",
    )

    if cfg.check_grads:  # on rank 0; a mismatch stops every process

        def check():
            batch = data.epoch_order(len(mnist.train_y), torch.Generator().manual_seed(cfg.seed))[: cfg.batch_size]
            x, y = mnist.train_x[batch.to(device)], mnist.train_y[batch.to(device)]
            for impl in dict.fromkeys((cfg.impl, "fused", "layers")):
                result = check_grads(mlp, impl, cfg.label_smoothing, x, y)
                log(world, result)
                if not result.ok:
                    raise TrainingError(
                        f"--check-grads: the {impl} gradients differ from torch autograd's "
                        f"by {result.worst_relative:.2e} (relative) in {result.worst_parameter}"
                    )

        on_main(world, check)

    trainer = Trainer(net, cfg, mnist, world)
    native = None
    if cfg.compare_native:  # same initial weights, seed, batches and augmentations; torch autograd's backward
        native = Trainer(Net(torch_twin(mlp), "native", cfg.label_smoothing), cfg, mnist, world)

    history, native_history, start_epoch, position = [], [], 1, None
    if resumed is not None:
        trainer.load_state_dict(resumed)
        trainer.generator.set_state(resumed["rng"]["data"])
        per_rank = resumed["rng"]["torch"]
        if len(per_rank) != world.size:
            log(
                world,
                f"warning: the checkpoint was written by {len(per_rank)} processes, this run has "
                f"{world.size}: dropout masks will differ from an uninterrupted run",
            )
        trainer.torch_rng = per_rank[world.rank % len(per_rank)]
        history = resumed["history"]
        start_epoch = resumed["epoch"] + 1
        if resumed["position"] is not None:
            position = Position(**resumed["position"])
        where = f"epoch {start_epoch}, step {position.step + 1}" if position else f"epoch {start_epoch}"
        log(world, f"resumed from {checkpoint.checkpoint_path(cfg.resume)}: continuing at {where}")

    if world.main:
        checkpoint.write_json(cfg.to_dict(), os.path.join(out, "config.json"))
    log(world, f"run folder: {out}")

    def save(epoch_done: int, at: Position | None, rngs: list) -> None:
        state = trainer.state_dict()
        state.update(
            config=cfg.to_dict(),
            epoch=epoch_done,
            position=at.to_dict() if at else None,
            rng={"data": trainer.generator.get_state(), "torch": rngs},
            history=history,
            world_size=world.size,
        )
        checkpoint.save(state, os.path.join(out, checkpoint.FILENAME))

    def write_metrics(completed: bool) -> dict:
        metrics = {
            "test_accuracy": history[-1].get("test_accuracy") if history else None,  # rank 0 alone evaluates
            "train_seconds": sum(r["seconds"] for r in history),
            "completed": completed,
            "epochs": history,
            "config": cfg.to_dict(),
            "environment": {
                "device": str(device),
                "threads": threads,
                "processes": world.size,
                "torch": torch.__version__,
            },
        }
        if native is not None:
            metrics["native"] = {
                "test_accuracy": native_history[-1].get("test_accuracy") if native_history else None,
                "epochs": native_history,
            }
        if world.main:
            checkpoint.write_json(metrics, os.path.join(out, "metrics.json"))
            if history:
                title = f"MLP {sizes} ({cfg.activation}, {cfg.impl}), {cfg.optimizer} lr {cfg.lr:g}, seed {cfg.seed}"
                title += f", {cfg.augment} augmentation" if cfg.augment != "none" else ""
                plots.plot_curves(
                    history, os.path.join(out, "curves.png"), title, native_history or None, cfg.label_smoothing
                )
        return metrics

    # ---- the epochs
    with StopRequest(world) as stop:
        for epoch in range(start_epoch, cfg.epochs + 1):
            try:
                result = trainer.train_epoch(epoch, stop, resume=position, on_step=on_step)
            except TrainingError as e:  # a non-finite loss: the checkpoint on disk stays the last good one
                path = os.path.join(out, checkpoint.FILENAME)
                last = f"the last good checkpoint is {path}" if os.path.exists(path) else "no checkpoint was written"
                raise TrainingError(f"{e}; {last}. A lower --lr may help.") from None
            position = None
            rngs = distributed.gather_objects(trainer.torch_rng, world)
            if result.interrupted is not None:
                if world.main:
                    save(epoch - 1, result.interrupted, rngs)
                log(
                    world,
                    f"interrupted at epoch {epoch}, step {result.interrupted.step}: checkpoint written; "
                    f"continue with: python -m train --resume {out}",
                )
                metrics = write_metrics(completed=False)
                metrics["interrupted"] = True
                return metrics

            record = {"epoch": epoch, "train_loss": result.train_loss, "seconds": result.seconds}
            if world.main:
                record["test_loss"], record["test_accuracy"] = trainer.evaluate()
            history.append(record)
            if native is not None:  # the torch.nn twin's epoch, right after ours (it never sees Ctrl-C)
                n = native.train_epoch(epoch, StopRequest(world))
                r = {"epoch": epoch, "train_loss": n.train_loss, "seconds": n.seconds}
                if world.main:
                    r["test_loss"], r["test_accuracy"] = native.evaluate()
                native_history.append(r)
            if world.main:
                log(world, _summary(record, cfg.epochs) + (f"  | torch.nn: {_summary(r, 0)}" if native else ""))
                save(epoch, None, rngs)
            metrics = write_metrics(completed=epoch == cfg.epochs)
            if (result.stop_requested or (stop.requested and not world.distributed)) and epoch < cfg.epochs:
                log(
                    world,
                    f"interrupted after epoch {epoch}: checkpoint written; continue with: "
                    f"python -m train --resume {out}",
                )
                metrics["interrupted"] = True
                return metrics

    if start_epoch > cfg.epochs:
        log(world, "the checkpoint had finished all its epochs; nothing to do")
        metrics = write_metrics(completed=True)
    if world.main and history:
        log(
            world,
            f"final test accuracy {100 * metrics['test_accuracy']:.2f}% after {_plural(len(history), 'epoch')}, "
            f"{metrics['train_seconds']:.1f} s of training; files in {out}",
        )
        if native is not None:
            metrics["native"]["time_ratio"] = _print_comparison(world, cfg, history, native_history)
            checkpoint.write_json(metrics, os.path.join(out, "metrics.json"))
    return metrics


def _run_folder(cfg: Config) -> str:
    """The run folder, created; a new run refuses a folder that holds another run's checkpoint."""
    out = cfg.out
    if out is None:
        base = out = os.path.join("runs", time.strftime("%Y-%m-%d_%H-%M-%S"))
        suffix = 1
        while os.path.exists(out):
            out, suffix = f"{base}-{suffix}", suffix + 1
    elif not cfg.resume and os.path.exists(os.path.join(out, checkpoint.FILENAME)):
        raise TrainingError(f"{out} already holds a run; continue it with --resume {out}, or choose another --out")
    os.makedirs(out, exist_ok=True)
    return out


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _summary(r: dict, epochs: int) -> str:
    head = f"epoch {r['epoch']:>3}/{epochs}  " if epochs else ""
    return (
        f"{head}train loss {r['train_loss']:.4f}  test loss {r['test_loss']:.4f}  "
        f"test acc {100 * r['test_accuracy']:.2f}%  {r['seconds']:.1f} s"
    )


def _print_comparison(world, cfg: Config, ours: list[dict], theirs: list[dict]) -> dict:
    """The two runs side by side; returns the epoch-time ratios (manualgrad / torch.nn)."""
    ratios = [a["seconds"] / b["seconds"] for a, b in zip(ours, theirs)]
    mean_ours = statistics.fmean(r["seconds"] for r in ours)
    mean_theirs = statistics.fmean(r["seconds"] for r in theirs)
    rows = [
        ("test accuracy", f"{100 * ours[-1]['test_accuracy']:.2f}%", f"{100 * theirs[-1]['test_accuracy']:.2f}%"),
        ("test loss", f"{ours[-1]['test_loss']:.4f}", f"{theirs[-1]['test_loss']:.4f}"),
        ("train loss", f"{ours[-1]['train_loss']:.4f}", f"{theirs[-1]['train_loss']:.4f}"),
        ("seconds / epoch (mean)", f"{mean_ours:.2f}", f"{mean_theirs:.2f}"),
        (
            "seconds / epoch (median)",
            f"{statistics.median(r['seconds'] for r in ours):.2f}",
            f"{statistics.median(r['seconds'] for r in theirs):.2f}",
        ),
        (
            "seconds / epoch (fastest)",
            f"{min(r['seconds'] for r in ours):.2f}",
            f"{min(r['seconds'] for r in theirs):.2f}",
        ),
    ]
    left = f"manualgrad ({cfg.impl})"
    log(world, f"\n{'':26}{left:>20}{'torch.nn':>14}")
    for name, a, b in rows:
        log(world, f"{name:26}{a:>20}{b:>14}")
    fastest = min(r["seconds"] for r in ours) / min(r["seconds"] for r in theirs)
    ratio = {
        "mean": mean_ours / mean_theirs,
        "median_per_epoch": statistics.median(ratios),
        "fastest": fastest,
        "per_epoch": ratios,
    }
    log(
        world,
        f"epoch-time ratio manualgrad / torch.nn: {ratio['mean']:.3f} (mean), "
        f"{ratio['median_per_epoch']:.3f} (median of per-epoch ratios), {fastest:.3f} (fastest epochs); "
        "the two alternate epoch by epoch in this process",
    )
    return ratio
