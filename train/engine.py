"""The training loop: :meth:`Trainer.train_step`, the epoch that calls it, the evaluation. A :class:`Trainer` owns its
random streams, so that two (``--compare-native``) can alternate epochs and each sees what it would alone."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import secrets
import signal
import threading
import time
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

import manualgrad
import manualgrad.functional as MF
from manualgrad import privacy

from . import augment, data, distributed
from .config import Config
from .errors import ConfigError, RunError
from .model import Net
from .threads import Threads

NOISE_SEED_OFFSET = 0x9E3779B97F4A7C15  # --dp's noise stream is seeded with --seed + this (mod 2**64)
PROGRESS_BAR = dict(unit="batch", leave=False, dynamic_ncols=True)  # disable=None: shown on a terminal only


class TrainingError(RunError):
    """Training cannot go on; the message is meant for the user, as is."""


@dataclass
class Position:
    """Where an interrupted epoch stopped: its batch order, the next step, the loss summed so far."""

    step: int
    order: Tensor
    loss_sum: float = 0.0
    rows: int = 0
    seconds: float = 0.0


class StopRequest:
    """Ctrl-C (SIGINT) and SIGTERM become a flag checked between steps. A second Ctrl-C in one process aborts at once;
    under torchrun (the terminal and the launcher both send one) repeated signals only set the flag."""

    def __init__(self, world: distributed.World):
        self.requested, self.world, self._previous = False, world, {}

    def _handle(self, signum, frame):
        if self.requested and not self.world.distributed:
            raise KeyboardInterrupt
        if not self.requested and self.world.main:
            tqdm.write("stopping after this step to write a checkpoint (Ctrl-C again to abort at once)")
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def make_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    options = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, momentum=cfg.momentum, nesterov=cfg.momentum > 0, **options)
    return (torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW)(params, **options)


def make_scheduler(cfg: Config, optimizer, steps_per_epoch: int):  # stepped after every batch
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total) if cfg.schedule == "cosine" else None


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def steps_per_epoch(n: int, batch_size: int, dp: bool) -> int:
    """The batches of ``n`` images; --dp: round(1/q) steps of expected size ``batch_size`` (at least 1)."""
    return max(1, round(n / batch_size)) if dp else (n + batch_size - 1) // batch_size


@dataclass
class PrivatePlan:
    """A --dp run's plan: σ is the smallest noise multiplier for which the planned steps are ``cfg``'s (ε, δ)-DP."""

    cfg: Config
    sample_rate: float  # q = B / N
    noise_multiplier: float  # σ: the noise's std is σ C
    steps: int  # planned steps: epochs x steps per epoch
    notes: tuple[str, ...] = ()  # what the calibration warned (a very large epsilon)

    def __post_init__(self):
        self.spent = privacy.Accountant(self.cfg.accountant)  # its answers (epsilon after some steps) kept

    @classmethod
    def plan(cls, cfg: Config, n: int, steps_per_epoch: int) -> PrivatePlan:
        """Calibrate σ for ``cfg.epochs * steps_per_epoch`` steps at rate ``cfg.batch_size / n``."""
        if cfg.batch_size > n:
            raise ConfigError(f"--dp: --batch-size {cfg.batch_size} is larger than the {n} training images")
        rate, steps = cfg.batch_size / n, cfg.epochs * steps_per_epoch
        target = {"target_epsilon": cfg.epsilon, "target_delta": cfg.delta}
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", privacy.PrivacyWarning)
                sigma = privacy.get_noise_multiplier(**target, sample_rate=rate, steps=steps, accountant=cfg.accountant)
        except manualgrad.InputError as e:
            raise ConfigError(f"--dp: {e}") from None
        notes = tuple(str(w.message) for w in caught if issubclass(w.category, privacy.PrivacyWarning))
        return cls(cfg, rate, sigma, steps, notes)

    def epsilon(self, steps: int) -> float:
        """ε spent after ``steps`` steps (at this plan's δ)."""
        self.spent.history = [(self.noise_multiplier, self.sample_rate, steps)] if steps else []
        return self.spent.get_epsilon(self.cfg.delta)

    def optimizer(self, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> privacy.DPOptimizer:
        """``optimizer`` wrapped: its step adds σ C z (z drawn from ``generator``) and divides by B first."""
        sizes = dict(max_grad_norm=self.cfg.clip, expected_batch_size=float(self.cfg.batch_size))
        return privacy.DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier, generator=generator, **sizes)

    def describe(self) -> str:
        cfg, sigma = self.cfg, self.noise_multiplier
        plan = f"({cfg.epsilon:g}, {cfg.delta:g})-DP over {self.steps} steps, sampling rate {self.sample_rate:.4g}"
        notes = "".join(f"; {note}" for note in self.notes)
        return f"DP-SGD: {plan}, clip {cfg.clip:g}, noise multiplier {sigma:.4f} ({cfg.accountant} accountant){notes}"

    def to_dict(self) -> dict:
        fitted = dict(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, planned_steps=self.steps)
        return {k: getattr(self.cfg, k) for k in ("epsilon", "delta", "clip", "accountant")} | fitted


class Trainer:
    def __init__(self, net: Net, cfg: Config, mnist: data.MNIST, world: distributed.World, threads: Threads):
        self.net, self.cfg, self.data, self.world, self.threads = net, cfg, mnist, world, threads
        self.params = list(net.module.parameters())
        n, dp = len(mnist.train_y), cfg.dp and net.impl != "native"
        self.steps_per_epoch = steps_per_epoch(n, cfg.batch_size, dp)
        self.privacy = PrivatePlan.plan(cfg, n, self.steps_per_epoch) if dp else None
        self.private_steps = 0  # --dp: the accountant's whole state
        self.last_batch: Tensor | None = None  # the last step's rows, all processes together (tests read it)
        self.optimizer = make_optimizer(cfg, self.params)
        self.scheduler = make_scheduler(cfg, self.optimizer, self.steps_per_epoch)
        # Batch order (Poisson sampling) and augmentation: one stream, the same in every process; --dp's noise:
        # another (with --secure-rng both from rank 0's OS entropy). Dropout: torch's RNG, seed + rank.
        data_seed, noise_seed = cfg.seed, (cfg.seed + NOISE_SEED_OFFSET) % 2**64
        if dp and cfg.secure_rng:
            data_seed, noise_seed = distributed.broadcast_object((secrets.randbits(64), secrets.randbits(64)), world)
        self.generator = torch.Generator().manual_seed(data_seed)
        self.noise_generator = torch.Generator().manual_seed(noise_seed) if dp else None
        self.dp_optimizer = self.privacy.optimizer(self.optimizer, self.noise_generator) if dp else None
        with torch.random.fork_rng(devices=[world.device] if world.device.type == "cuda" else []):
            torch.manual_seed((cfg.seed + world.rank) % 2**64)
            self.torch_rng = rng_state(world.device)

    def state_dict(self) -> dict:
        """Model, optimizer, scheduler and random streams. Collective: every process adds its dropout stream."""
        rng = {"data": self.generator.get_state(), "torch": distributed.gather_objects(self.torch_rng, self.world)}
        state = {"model": self.net.module.state_dict(), "optimizer": self.optimizer.state_dict(), "rng": rng}
        state["scheduler"] = self.scheduler.state_dict() if self.scheduler else None
        if self.privacy is not None:
            rng["noise"] = self.noise_generator.get_state()
            state["privacy"] = {"steps": self.private_steps, "noise_multiplier": self.privacy.noise_multiplier}
        return state

    def load_state_dict(self, state: dict) -> bool:
        """Restore :meth:`state_dict`'s output; False when another number of processes wrote it (dropout differs)."""
        self.net.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler:
            self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["rng"]["data"])
        if self.privacy is not None:  # the noise so far was drawn at the checkpoint's sigma: go on with it
            self.noise_generator.set_state(state["rng"]["noise"])
            self.private_steps = int(state["privacy"]["steps"])
            self.privacy.noise_multiplier = float(state["privacy"]["noise_multiplier"])
            self.dp_optimizer.noise_multiplier = self.privacy.noise_multiplier
        per_rank = state["rng"]["torch"]
        self.torch_rng = per_rank[self.world.rank % len(per_rank)]
        return len(per_rank) == self.world.size

    def non_finite(self) -> str | None:
        """The name of a model or optimizer tensor holding NaN or infinity, or None when all are finite."""
        named = list(self.net.module.state_dict().items())
        for i, state in enumerate(self.optimizer.state.values()):
            named += [(f"optimizer state {i} {k}", v) for k, v in state.items()]
        bad = (name for name, t in named if isinstance(t, Tensor) and t.is_floating_point() and not t.isfinite().all())
        return next(bad, None)

    # ---- training
    def train_step(self, x: Tensor, y: Tensor, share: float, stop: bool) -> tuple[float, bool]:
        """One step on this process's rows, ``share`` of the global batch: forward, loss, backward, gradients added
        over the processes, (--dp: noise,) optimizer and scheduler steps. Returns the global batch's mean loss (not
        finite: no step was taken) and whether any process asked to stop."""
        self.optimizer.zero_grad(set_to_none=True)
        if len(y):
            with self.clipped():  # --dp: .grad becomes the clipped sum of the per-sample gradients
                loss = self.net.loss(x, y)  # forward and loss: for --impl fused one autograd node
                loss.backward()
        else:  # no rows here: a small last batch split over more processes, or an empty Poisson sample (--dp)
            loss = torch.zeros((), device=self.world.device)
        for p in self.params:  # a process without rows adds zeros
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        weight = 1.0 if self.privacy is not None else share
        loss_value, stopping = distributed.reduce_step(self.params, loss, share, weight, stop, self.world)
        if math.isfinite(loss_value):
            (self.dp_optimizer or self.optimizer).step()  # --dp: noise σ C z added once, to the global sum, then / B
            self.private_steps += self.dp_optimizer is not None
            if self.scheduler:
                self.scheduler.step()
        return loss_value, stopping

    def train_epoch(self, epoch: int, stop: StopRequest, resume: Position | None = None, on_step=None):
        """The steps of ``epoch`` (1-based), from ``resume``'s when given; ``on_step(epoch, step, trainer)`` after each.
        Returns where it stopped (step ``steps_per_epoch``: at the end; before: on a stop request) and whether any
        process asked to stop. The thread timing and the progress bar sit beside the step."""
        n = len(self.data.train_y)  # a new epoch: a fresh order of the rows, batch i is order[iB:(i+1)B] (--dp: none)
        at = dataclasses.replace(resume) if resume else Position(0, torch.zeros(0, dtype=torch.long))
        if not resume and not self.privacy:
            at.order = torch.randperm(n, generator=self.generator)
        order, seconds_before = at.order.to(self.world.device), at.seconds
        self.net.module.train()
        set_rng_state(self.torch_rng, self.world.device)
        desc, hide = f"epoch {epoch}/{self.cfg.epochs}", None if self.world.main and self.cfg.progress else True
        bar = tqdm(total=self.steps_per_epoch, initial=at.step, desc=desc, disable=hide, **PROGRESS_BAR)
        start, stopping = time.perf_counter(), False
        self.threads.steps.clear()  # time the thread counts on a batch of the first rows, drawn from no random stream
        self.threads.choose(functools.partial(self.trial_step, torch.arange(min(self.cfg.batch_size, n))))
        try:
            for step in range(at.step, self.steps_per_epoch):
                step_start = time.perf_counter()
                rows, x, y = self.batch(order, step)
                self.last_batch = rows
                share = len(y) / len(rows) if len(rows) else 0.0  # an empty Poisson sample (--dp): 0
                loss, stopping = self.train_step(x, y, share, stop.requested)
                if not math.isfinite(loss):
                    problem = f"the training loss became {loss} at epoch {epoch}, step {step + 1}"
                    raise TrainingError(f"{problem}; stopped without taking that step")
                at.loss_sum, at.rows, at.step = at.loss_sum + loss * len(rows), at.rows + len(rows), step + 1
                if self.threads.step_took(time.perf_counter() - step_start):  # slowed down: time the counts again
                    self.threads.choose(functools.partial(self.trial_step, rows))
                bar.update()
                if step % 20 == 0 or step == self.steps_per_epoch - 1:
                    speed = at.rows / max(seconds_before + time.perf_counter() - start, 1e-9)
                    postfix = {"loss": f"{at.loss_sum / max(at.rows, 1):.4f}", "samples/s": f"{speed:,.0f}"}
                    bar.set_postfix(postfix, refresh=False)
                if on_step is not None:
                    on_step(epoch, step + 1, self)
                if stopping:
                    break
        finally:
            bar.close()
            self.torch_rng = rng_state(self.world.device)
            at.seconds = seconds_before + time.perf_counter() - start
        return at, stopping

    def clipped(self):
        """--dp: ``backward()`` leaves in ``.grad`` the clipped sum Σ_n min(1, C/‖g_n‖) g_n of the per-sample gradients
        of the mean loss (:func:`manualgrad.per_sample`); else nothing."""
        if self.privacy is None:
            return contextlib.nullcontext()
        return manualgrad.per_sample(self.net.module, clip=self.cfg.clip, loss_reduction="mean")

    def trial_step(self, rows: Tensor) -> None:
        """Forward and backward on this process's share of ``rows``, thrown away, random streams untouched."""
        mine = distributed.share(rows, self.world)
        if len(mine):
            with torch.random.fork_rng(devices=[]), self.clipped():
                self.net.loss(self.data.train_x[mine], self.data.train_y[mine]).backward()
        self.optimizer.zero_grad(set_to_none=True)

    def batch(self, order: Tensor, step: int) -> tuple[Tensor, Tensor, Tensor]:
        """Step ``step``'s rows (--dp: Poisson-sampled now), and this process's share of them, distorted (--augment)."""
        if self.privacy is not None:
            rows = privacy.poisson_sample(len(self.data.train_y), self.privacy.sample_rate, self.generator)
        else:
            rows = order[step * self.cfg.batch_size : (step + 1) * self.cfg.batch_size]
        mine = distributed.share(rows, self.world)
        x, y = self.data.train_x[mine], self.data.train_y[mine]
        if self.cfg.augment != "none" and len(rows):
            params = augment.draw(self.cfg.augment, len(rows), self.generator)
            x = augment.apply(x, tuple(distributed.share(p, self.world) for p in params))
        return rows, x, y

    @torch.no_grad()
    def evaluate(self, chunk: int = 2000) -> tuple[float, float]:
        """Mean cross-entropy (no label smoothing) and accuracy on the test set."""
        self.net.module.eval()
        loss_sum, correct = 0.0, 0
        for x, y in zip(self.data.test_x.split(chunk), self.data.test_y.split(chunk)):
            logits = self.net.logits(x)
            loss_sum += MF.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
        n = max(len(self.data.test_y), 1)
        return float(loss_sum) / n, int(correct) / n
