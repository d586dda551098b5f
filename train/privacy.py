r"""``--dp``: DP-SGD (Abadi et al. 2016) with Poisson sampling, and its privacy accounting.

A step of DP-SGD, as :meth:`train.engine.Trainer.step` takes it:

1. **sample**: every training image joins the step's batch independently with probability
   :math:`q = B / N` (``--batch-size`` B, N training images), so the batch size varies (and may be 0);
   an epoch is :math:`\mathrm{round}(1/q)` steps (:func:`poisson_batch`);
2. **clip**: :func:`manualgrad.per_sample` with ``clip=C`` turns the one backward pass of the mean loss
   into :math:`\sum_n \min(1, C / \|g_n\|)\, g_n` in ``.grad`` (each :math:`g_n` the gradient of image
   n's own loss term), so no image moves the sum by more than C;
3. **noise**: :meth:`Privacy.add_noise` adds :math:`\sigma C z`, :math:`z \sim N(0, I)`, to each
   parameter's summed gradient and divides by the *expected* batch size :math:`qN = B` (not the drawn
   one, which depends on the data);
4. the optimizer's step, on that gradient.

The noise multiplier :math:`\sigma` is the smallest for which the planned run (``--epochs`` epochs of
Poisson-sampled Gaussian steps at rate q) is :math:`(\varepsilon, \delta)`-DP, found by Google's
``dp-accounting`` (privacy loss distributions by default, ``--accountant rdp`` for Rényi DP; add-or-remove
one image). What the run has spent after ``k`` steps, :meth:`Privacy.epsilon`, is the same accountant
composed ``k`` times: the accountant's whole state is the number of steps taken, which the checkpoint
holds, so a resumed run accounts exactly as an uninterrupted one.

Randomness: the batches and the noise come from two ``torch.Generator`` streams (Mersenne Twister) that
the checkpoint saves, so that resuming is bit for bit. By default they are seeded from ``--seed``: the
run is reproducible, and anyone who knows the seed can recompute the batches and the noise, against
whom the guarantee does not hold. ``--secure-rng`` seeds both from the operating system's entropy
instead (the run cannot be repeated; the checkpoint, which holds the streams' states, must then stay as
private as the data). Mersenne Twister is not a cryptographic generator either way.

Hyperparameters chosen by looking at the test accuracy of private runs are outside the guarantee.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import ConfigError

INSTALL = "pip install -e '.[dp]'"
CALIBRATION_TOLERANCE = 1e-4  # relative, in sigma
_SPENT: dict = {}  # (steps, sigma, q, delta, accountant) -> epsilon: the accountant's answers, computed once


def _dp_accounting():
    try:
        import dp_accounting
    except ImportError:
        raise ConfigError(f"--dp needs Google's dp-accounting library for its privacy accountant: {INSTALL}") from None
    return dp_accounting


def steps_per_epoch(n: int, batch_size: int) -> int:
    """round(1/q) steps of expected size ``batch_size`` make an epoch of ``n`` images (at least 1)."""
    return max(1, round(n / batch_size))


def poisson_batch(n: int, rate: float, generator: torch.Generator) -> Tensor:
    """The rows of one Poisson-sampled batch: each of ``range(n)`` independently with probability ``rate``."""
    return (torch.rand(n, generator=generator) < rate).nonzero().flatten()


def secure_seed() -> int:
    """A seed from the operating system's entropy (``--secure-rng``)."""
    return secrets.randbits(64)


@dataclass
class Privacy:
    """The DP-SGD plan of a run: sampling rate, noise multiplier, clip, target (ε, δ), and its accountant."""

    sample_rate: float  # q = B / N
    noise_multiplier: float  # σ: the noise's std is σ C
    clip: float  # C
    expected_batch: float  # q N = B: what the noisy sum is divided by
    steps: int  # planned steps: epochs x steps per epoch
    target_epsilon: float
    delta: float
    accountant: str  # "pld" or "rdp"

    @classmethod
    def plan(cls, cfg, n: int, steps_per_epoch: int) -> Privacy:
        """Calibrate σ so that ``cfg.epochs * steps_per_epoch`` steps at rate ``cfg.batch_size / n`` are
        (``cfg.epsilon``, ``cfg.delta``)-DP. :class:`ConfigError` when that cannot be planned."""
        if cfg.batch_size > n:
            raise ConfigError(f"--dp: --batch-size {cfg.batch_size} is larger than the {n} training images")
        rate, steps = cfg.batch_size / n, cfg.epochs * steps_per_epoch
        plan = cls(rate, math.nan, cfg.clip, float(cfg.batch_size), steps, cfg.epsilon, cfg.delta, cfg.accountant)
        try:
            # RDP first: fast, and an upper bound on epsilon, so its sigma is private under PLD too and brackets
            # PLD's from above (PLD's own search is slow where sigma is small: wide privacy loss distributions)
            upper = _calibrate(rate, steps, cfg.epsilon, cfg.delta, "rdp", None)
            plan.noise_multiplier = upper
            if cfg.accountant == "pld" and plan.epsilon(steps) > 0:
                plan.noise_multiplier = _calibrate(rate, steps, cfg.epsilon, cfg.delta, "pld", (0.5 * upper, upper))
        except Exception as e:  # no noise is small enough, or large enough (NoBracketIntervalFoundError)
            raise ConfigError(
                f"--dp: no noise multiplier makes {steps} steps at sampling rate {rate:.4g} "
                f"({cfg.epsilon:g}, {cfg.delta:g})-DP ({type(e).__name__}: {e})"
            ) from None
        for _ in range(1000):  # the search's tolerance may land just below the smallest private sigma
            if plan.epsilon(steps) <= cfg.epsilon:
                return plan
            plan.noise_multiplier *= 1 + CALIBRATION_TOLERANCE
        raise ConfigError(f"--dp: the accountant does not reach epsilon {cfg.epsilon:g} near sigma {upper:.6g}")

    def epsilon(self, steps: int) -> float:
        """ε spent after ``steps`` steps (at this plan's δ): the accountant composed ``steps`` times."""
        if steps == 0:
            return 0.0
        key = (steps, self.noise_multiplier, self.sample_rate, self.delta, self.accountant)
        if key not in _SPENT:
            dpa = _dp_accounting()
            accountant = _accountant_factory(self.accountant)()
            step = dpa.PoissonSampledDpEvent(self.sample_rate, dpa.GaussianDpEvent(self.noise_multiplier))
            accountant.compose(step, steps)
            with _quiet_absl():
                _SPENT[key] = float(accountant.get_epsilon(self.delta))
        return _SPENT[key]

    def add_noise(self, params: list, generator: torch.Generator) -> None:
        """``p.grad <- (p.grad + σ C z) / (q N)`` for every parameter, ``z ~ N(0, I)`` drawn from ``generator``
        (on the CPU, in parameter order: the same numbers on any device and in every process)."""
        std = self.noise_multiplier * self.clip
        for p in params:
            z = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            p.grad.add_(z.to(p.device, p.grad.dtype), alpha=std).div_(self.expected_batch)

    def describe(self) -> str:
        return (
            f"DP-SGD: ({self.target_epsilon:g}, {self.delta:g})-DP over {self.steps} steps, sampling rate "
            f"{self.sample_rate:.4g}, clip {self.clip:g}, noise multiplier {self.noise_multiplier:.4f} "
            f"({self.accountant} accountant)"
        )

    def to_dict(self) -> dict:
        return {
            "epsilon": self.target_epsilon,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "clip": self.clip,
            "planned_steps": self.steps,
            "accountant": self.accountant,
        }


def _calibrate(rate: float, steps: int, epsilon: float, delta: float, accountant: str, bracket) -> float:
    """The smallest σ (within the relative :data:`CALIBRATION_TOLERANCE`) for which ``steps`` Poisson-sampled
    Gaussian steps at ``rate`` are (ε, δ)-DP under ``accountant``; ``bracket`` (low, high) or None."""
    dpa = _dp_accounting()

    def run_of(sigma: float):
        return dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(rate, dpa.GaussianDpEvent(sigma)), steps)

    new = _accountant_factory(accountant)
    if bracket is None:
        interval = dpa.LowerEndpointAndGuess(0.0, 1.0)
    else:
        low, high = bracket
        accountant_low = new()
        if accountant_low.compose(run_of(low)).get_epsilon(delta) <= epsilon:  # already private at low
            return low
        interval = dpa.ExplicitBracketInterval(low, high)
    tol = CALIBRATION_TOLERANCE * (bracket[1] if bracket else 1.0)
    with _quiet_absl():
        return float(dpa.calibrate_dp_mechanism(new, run_of, epsilon, delta, bracket_interval=interval, tol=tol))


@contextlib.contextmanager
def _quiet_absl():
    """dp-accounting's RDP logs a warning for every order whose series does not converge (it skips them)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _accountant_factory(name: str):
    dpa = _dp_accounting()
    if name == "rdp":
        return dpa.rdp.RdpAccountant
    return dpa.pld.PLDAccountant
