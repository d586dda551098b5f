"""The training loop: one epoch of steps, and the evaluation on the test set.

A step: take the next slice of the epoch's random order (this process's share
of it under torchrun), distort the images (``--augment``), compute the loss,
``backward()`` (for ``--impl fused`` one autograd node: the whole MLP and its
loss), average the gradients over the processes, check the loss is finite,
``optimizer.step()``, ``scheduler.step()``.

A :class:`Trainer` owns its model, optimizer, scheduler and random streams
(the data generator, and a saved torch RNG state for dropout that it swaps in
while it trains), so that two trainers (``--compare-native``) can alternate
epochs in one process and each still sees exactly what it would see alone.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

import manualgrad.functional as MF

from . import augment, data, distributed
from .config import Config
from .model import Net


class TrainingError(Exception):
    """Training cannot go on; the message is meant for the user, as is."""


@dataclass
class Position:
    """Where an interrupted epoch stopped: its batch order, the next step, the loss summed so far."""

    step: int
    order: Tensor
    loss_sum: float = 0.0
    rows: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(step=self.step, order=self.order, loss_sum=self.loss_sum, rows=self.rows, seconds=self.seconds)


@dataclass
class EpochResult:
    train_loss: float
    seconds: float
    interrupted: Position | None = None  # set when a stop was requested before the epoch's end
    stop_requested: bool = False  # a stop was requested (agreed by all processes) during the last step


class StopRequest:
    """Turns Ctrl-C (SIGINT) and SIGTERM into a flag the loop checks between steps, so that the
    checkpoint written on the way out is a consistent state. A second Ctrl-C in a single process aborts
    at once (the last epoch's checkpoint stays). Under torchrun repeated signals are expected (the
    terminal and the launcher both send one) and only set the flag."""

    def __init__(self, world: distributed.World):
        self.requested = False
        self.world = world
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and not self.world.distributed:
            raise KeyboardInterrupt
        if not self.requested and self.world.main:
            tqdm.write("stopping after this step to write a checkpoint (Ctrl-C again to abort at once)")
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def make_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(cfg: Config, optimizer, steps_per_epoch: int):
    """Stepped after every batch."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return None


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Trainer:
    """Trains one :class:`~train.model.Net` on ``mnist`` with the options of ``cfg``."""

    def __init__(self, net: Net, cfg: Config, mnist: data.MNIST, world: distributed.World):
        self.net, self.cfg, self.data, self.world = net, cfg, mnist, world
        self.params = list(net.parameters())
        self.steps_per_epoch = data.num_batches(len(mnist.train_y), cfg.batch_size)
        self.optimizer = make_optimizer(cfg, self.params)
        self.scheduler = make_scheduler(cfg, self.optimizer, self.steps_per_epoch)
        # Batch order and augmentation: the same stream in every process. Dropout: torch's RNG,
        # a different stream per process (seed + rank), kept here between epochs.
        self.generator = torch.Generator().manual_seed(cfg.seed)
        with torch.random.fork_rng(devices=[world.device] if world.device.type == "cuda" else []):
            torch.manual_seed(cfg.seed + world.rank)
            self.torch_rng = rng_state(world.device)

    # ---- state, for checkpoints

    def state_dict(self) -> dict:
        return {
            "model": self.net.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.net.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler:
            self.scheduler.load_state_dict(state["scheduler"])

    # ---- training

    def train_epoch(self, epoch: int, stop: StopRequest, resume: Position | None = None, on_step=None) -> EpochResult:
        """Run the steps of ``epoch`` (1-based), from ``resume``'s step when given."""
        cfg, world, device = self.cfg, self.world, self.world.device
        x_all, y_all = self.data.train_x, self.data.train_y
        n, batch_size = len(y_all), cfg.batch_size
        if resume is None:
            resume = Position(step=0, order=data.epoch_order(n, self.generator))
        order = resume.order.to(device)
        loss_sum, rows_seen, seconds = resume.loss_sum, resume.rows, resume.seconds

        self.net.module.train()
        set_rng_state(self.torch_rng, device)
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=resume.step,
            desc=f"epoch {epoch}/{cfg.epochs}",
            unit="batch",
            leave=False,
            dynamic_ncols=True,
            disable=None if world.main and cfg.progress else True,
        )  # None: off unless a terminal
        start, stopping = time.perf_counter(), False
        try:
            for step in range(resume.step, self.steps_per_epoch):
                batch = order[step * batch_size : (step + 1) * batch_size]  # the global batch
                mine = distributed.share(batch, world)
                x, y = x_all[mine], y_all[mine]
                if cfg.augment != "none":
                    params = augment.draw(cfg.augment, len(batch), self.generator)
                    x = augment.apply(x, tuple(distributed.share(p, world) for p in params))

                self.optimizer.zero_grad(set_to_none=True)
                if len(mine):
                    loss = self.net.loss(x, y)
                    loss.backward()
                else:  # more processes than rows in a last, small batch
                    loss = torch.zeros((), device=device)
                    for p in self.params:
                        p.grad = torch.zeros_like(p)
                loss_value, stopping = distributed.reduce_step(
                    self.params, loss, len(mine) / len(batch), stop.requested, world
                )
                if not math.isfinite(loss_value):
                    raise TrainingError(
                        f"the training loss became {loss_value} at epoch {epoch}, step {step + 1}; "
                        "stopped without taking that step"
                    )
                self.optimizer.step()
                if self.scheduler:
                    self.scheduler.step()

                loss_sum += loss_value * len(batch)
                rows_seen += len(batch)
                bar.update()
                if step % 20 == 0 or step == self.steps_per_epoch - 1:
                    elapsed = seconds + time.perf_counter() - start
                    bar.set_postfix(
                        {"loss": f"{loss_sum / rows_seen:.4f}", "samples/s": f"{rows_seen / max(elapsed, 1e-9):,.0f}"},
                        refresh=False,
                    )
                if on_step is not None:
                    on_step(epoch, step + 1, self)
                if stopping and step + 1 < self.steps_per_epoch:
                    seconds += time.perf_counter() - start
                    here = Position(step + 1, resume.order, loss_sum, rows_seen, seconds)
                    return EpochResult(loss_sum / rows_seen, seconds, interrupted=here, stop_requested=True)
        finally:
            bar.close()
            self.torch_rng = rng_state(device)
        seconds += time.perf_counter() - start
        return EpochResult(loss_sum / max(rows_seen, 1), seconds, stop_requested=stopping)

    # ---- evaluation

    @torch.no_grad()
    def evaluate(self, chunk: int = 2000) -> tuple[float, float]:
        """Mean cross-entropy (no label smoothing) and accuracy on the test set."""
        self.net.module.eval()
        x_all, y_all = self.data.test_x, self.data.test_y
        loss_sum = torch.zeros((), device=x_all.device)
        correct = torch.zeros((), device=x_all.device, dtype=torch.long)
        for x, y in zip(x_all.split(chunk), y_all.split(chunk)):
            logits = self.net.logits(x)
            loss_sum += MF.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
        n = max(len(y_all), 1)
        return loss_sum.item() / n, correct.item() / n
