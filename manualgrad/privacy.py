r"""DP-SGD with Opacus's interface, the clipping inside the one backward pass.

An Opacus user changes one import line::

    from manualgrad.privacy import PrivacyEngine          # was: from opacus import PrivacyEngine

    privacy_engine = PrivacyEngine()                       # accountant: dp-accounting's PLD ("prv"), or "rdp"
    model, optimizer, train_loader = privacy_engine.make_private(
        module=model, optimizer=optimizer, data_loader=train_loader, noise_multiplier=1.0, max_grad_norm=1.0
    )
    for x, y in train_loader:                              # Poisson-sampled batches (an empty one is a valid step)
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()                                    # .grad = Σ_n min(1, C/(‖g_n‖ + 1e-6)) g_n, one pass
        optimizer.step()                                   # + σC z, / expected batch size, then the step
    privacy_engine.get_epsilon(delta=1e-5)

One step of DP-SGD (Abadi et al. 2016), as the returned objects take it:

1. **sample**: every example joins the batch independently with probability :math:`q = 1/\text{len(data\_loader)}`
   (:class:`DPDataLoader`), so the batch size varies, and may be 0;
2. **clip**: the model's forward runs inside a per-sample recorder (:func:`manualgrad.per_sample`), so
   ``loss.backward()`` adds :math:`\sum_n c_n g_n`, :math:`c_n = \min(1, C / (\|g_n\| + 10^{-6}))`, to ``.grad``,
   each :math:`g_n` the gradient of example n's own loss term over all trainable parameters;
3. **noise**: :meth:`DPOptimizer.step` adds :math:`\sigma C z`, :math:`z \sim N(0, I)`, once per logical step,
   and divides by the *expected* batch size :math:`qN` (``loss_reduction="mean"``; not the drawn size, which
   depends on the data);
4. **account**: the optimizer's own step, and the accountant composes one Poisson-sampled Gaussian step.

The accountant is Google's ``dp-accounting`` (the optional extra ``manualgrad[dp]``): privacy loss distributions
(``"prv"`` or ``"pld"``, the default, Opacus's ``"prv"`` stands for a tight numerical accountant) or Rényi DP
(``"rdp"``); add-or-remove one example.

Several processes (torchrun), as with Opacus: wrap the model in :class:`DPDDP` (rank 0's parameters on every
process), then ``make_private`` returns a :class:`DistributedDPOptimizer` and a data loader whose Poisson sample
of the whole data set is shared out between the processes (:class:`DistributedPoissonSampler`). Each process clips
its share in its own backward pass; at the end of a logical batch rank 0 alone adds σC z, ``.grad`` is summed over
the processes and divided by the whole logical batch's expected size: the step one process would take on the union
of the batches, so q, the expected batch size and ε are the single process's.

What the guarantee covers, and what it does not: see the README's "Differential privacy" section. In short:
(ε, δ) holds for the trained parameters (and anything computed from them alone) with respect to adding or
removing one example of ``data_loader.dataset``, provided every step ran through these objects, the
hyper-parameters were not chosen by looking at private data, and the random numbers are unpredictable to the
adversary. ``torch.Generator`` (Mersenne Twister) is not a cryptographic generator and floating-point noise is
not exactly Gaussian; ``secure_mode=True`` (Opacus's answer to both) is refused rather than half-kept.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import warnings
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from .convert import ConversionWarning, convert
from .errors import InputError
from .per_sample import PerSample, refuse_sample_mixing

__all__ = [
    "DPDDP",
    "Accountant",
    "BatchMemoryManager",
    "DPDataLoader",
    "DPOptimizer",
    "DifferentiallyPrivateDistributedDataParallel",
    "DistributedDPOptimizer",
    "DistributedPoissonSampler",
    "PoissonSampler",
    "PrivacyEngine",
    "PrivacyWarning",
    "get_noise_multiplier",
    "poisson_sample",
]

INSTALL = "pip install 'manualgrad[dp]'"
#: below this noise multiplier a privacy loss distribution is too wide to hold in memory (ε in the tens and
#: beyond): ε and σ are then Rényi DP's, also an upper bound
PLD_MIN_NOISE = 0.3
PLD_DISCRETIZATION = 1e-3  #: dp-accounting's value_discretization_interval (pessimistic: ε stays an upper bound)
CALIBRATION_TOLERANCE = 1e-3  #: relative, in σ
LARGE_EPSILON = 10.0  #: beyond this, a warning says what such an ε means


class PrivacyWarning(UserWarning):
    """A setting under which the (ε, δ) guarantee is weak or void."""


def _dp_accounting():
    try:
        import dp_accounting
    except ImportError:
        raise InputError(
            f"manualgrad.privacy needs Google's dp-accounting library for its accountant: {INSTALL}"
        ) from None
    return dp_accounting


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


_MECHANISMS = {"prv": "pld", "pld": "pld", "rdp": "rdp"}


def _mechanism(name: str) -> str:
    if name not in _MECHANISMS:
        raise InputError(f"PrivacyEngine: accountant must be one of {', '.join(map(repr, _MECHANISMS))}, got {name!r}")
    return _MECHANISMS[name]


def _epsilon(history: list[tuple[float, float, int]], delta: float, mechanism: str) -> float:
    """ε after ``history`` [(σ, q, steps)] at ``delta``, by dp-accounting's ``mechanism`` ("pld" or "rdp")."""
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, steps in history if steps):
        return math.inf
    dpa = _dp_accounting()
    if mechanism == "pld" and min(sigma for sigma, _, _ in history) < PLD_MIN_NOISE:
        mechanism = "rdp"  # see PLD_MIN_NOISE
    accountant = (
        dpa.pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
        if mechanism == "pld"
        else dpa.rdp.RdpAccountant()
    )
    for sigma, rate, steps in history:
        accountant.compose(dpa.PoissonSampledDpEvent(rate, dpa.GaussianDpEvent(sigma)), steps)
    with _quiet_absl():
        return float(accountant.get_epsilon(delta))


class Accountant:
    """Opacus's accountant interface over dp-accounting: ``history`` [(noise_multiplier, sample_rate, steps)],
    :meth:`step` once per logical step, :meth:`get_epsilon`. Its whole state is the history (``state_dict``)."""

    def __init__(self, mechanism: str = "prv"):
        self.name = mechanism
        self._mechanism = _mechanism(mechanism)
        self.history: list[tuple[float, float, int]] = []
        self._cache: dict = {}

    def mechanism(self) -> str:
        return self.name

    def step(self, *, noise_multiplier: float, sample_rate: float) -> None:
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            sigma, rate, steps = self.history[-1]
            self.history[-1] = (sigma, rate, steps + 1)
        else:
            self.history.append((noise_multiplier, sample_rate, 1))

    def __len__(self) -> int:
        return len(self.history)

    def get_epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta`` (``math.inf`` after a step without noise)."""
        _check_delta(delta)
        key = (tuple(self.history), delta)
        if key not in self._cache:
            self._cache[key] = _epsilon(self.history, delta, self._mechanism)
        return self._cache[key]

    def get_privacy_spent(self, *, delta: float) -> tuple[float, float | None]:
        """Opacus's RDP-accountant form: (ε, the best Rényi order), the order None for "prv"/"pld"."""
        epsilon = self.get_epsilon(delta)
        if self._mechanism != "rdp" or not self.history or not math.isfinite(epsilon):
            return epsilon, None
        dpa = _dp_accounting()
        accountant = dpa.rdp.RdpAccountant()
        for sigma, rate, steps in self.history:
            accountant.compose(dpa.PoissonSampledDpEvent(rate, dpa.GaussianDpEvent(sigma)), steps)
        with _quiet_absl():
            return epsilon, float(accountant.get_epsilon_and_optimal_order(delta)[1])

    def state_dict(self) -> dict:
        return {"mechanism": self.name, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.__init__(state["mechanism"])
        self.history = [(float(s), float(q), int(k)) for s, q, k in state["history"]]


def get_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    epochs: float | None = None,
    steps: int | None = None,
    accountant: str = "prv",
) -> float:
    """The smallest σ (to a relative :data:`CALIBRATION_TOLERANCE`, rounded up) for which ``steps`` (or
    ``epochs / sample_rate``) Poisson-sampled Gaussian steps at ``sample_rate`` are (ε, δ)-DP.

    Bounded: Rényi DP first (fast; an upper bound, so its σ is private under PLD too), then PLD within
    ``[σ_rdp / 2, σ_rdp]`` where σ_rdp >= :data:`PLD_MIN_NOISE`. A very large ε warns what it means."""
    _check_positive("target_epsilon", target_epsilon)
    _check_delta(target_delta)
    if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
        raise InputError(f"privacy: sample_rate must be in (0, 1], got {sample_rate!r}")
    if steps is None:
        if epochs is None:
            raise InputError("privacy: get_noise_multiplier needs epochs or steps")
        steps = int(epochs / sample_rate)
    if steps < 1:
        raise InputError(f"privacy: the run must take at least one step, got {steps} (epochs={epochs!r})")
    mechanism = _mechanism(accountant)
    if target_epsilon > LARGE_EPSILON:
        warnings.warn(
            f"target_epsilon={target_epsilon:g}: an adversary's odds on any one example may change by a factor up to "
            f"e^ε = {_power_of_e(target_epsilon)} (δ={target_delta:g} aside); beyond ε ≈ {LARGE_EPSILON:g} that is no "
            "meaningful privacy guarantee",
            PrivacyWarning,
            stacklevel=2,
        )
    dpa = _dp_accounting()

    def run_of(sigma: float):
        return dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(sample_rate, dpa.GaussianDpEvent(sigma)), steps)

    def calibrate(new, interval, tol):
        with _quiet_absl():
            return float(
                dpa.calibrate_dp_mechanism(
                    new, run_of, target_epsilon, target_delta, bracket_interval=interval, tol=tol
                )
            )

    try:
        sigma = calibrate(dpa.rdp.RdpAccountant, dpa.LowerEndpointAndGuess(0.0, 1.0), CALIBRATION_TOLERANCE * 1e-2)
        if mechanism == "pld" and sigma >= PLD_MIN_NOISE:
            history = [(0.5 * sigma, sample_rate, steps)]
            if _epsilon(history, target_delta, "pld") <= target_epsilon:
                sigma = 0.5 * sigma
            else:
                interval = dpa.ExplicitBracketInterval(0.5 * sigma, sigma)

                def pld():
                    return dpa.pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)

                sigma = calibrate(pld, interval, CALIBRATION_TOLERANCE * sigma)
    except (ValueError, ArithmeticError, RuntimeError) as e:  # no noise brackets the target
        raise InputError(
            f"privacy: no noise multiplier makes {steps} steps at sampling rate {sample_rate:.4g} "
            f"({target_epsilon:g}, {target_delta:g})-DP ({type(e).__name__}: {e})"
        ) from None
    for _ in range(100):  # the search's tolerance may land just below the smallest private σ
        if _epsilon([(sigma, sample_rate, steps)], target_delta, mechanism) <= target_epsilon:
            return sigma
        sigma *= 1 + CALIBRATION_TOLERANCE
    raise InputError(f"privacy: the accountant does not reach epsilon {target_epsilon:g} near sigma {sigma:.6g}")


def _power_of_e(x: float) -> str:
    return f"{math.exp(x):.3g}" if x < 700 else f"10^{x / math.log(10):.3g}"


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise InputError(f"privacy: {name} must be a positive finite number, got {value!r}")


def _check_delta(delta) -> None:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise InputError(f"privacy: delta must be in (0, 1), got {delta!r}")


# -- sampling ------------------------------------------------------------------------------------------------------


class PoissonSampler(Sampler[list[int]]):
    """``steps`` batches; each holds every index of ``range(num_samples)`` independently with probability
    ``sample_rate`` (Opacus's ``UniformWithReplacementSampler``). A batch may be empty."""

    def __init__(self, *, num_samples: int, sample_rate: float, steps: int, generator: torch.Generator | None = None):
        self.num_samples, self.sample_rate, self.steps, self.generator = num_samples, sample_rate, steps, generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield poisson_sample(self.num_samples, self.sample_rate, self.generator).tolist()


def poisson_sample(num_samples: int, sample_rate: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The indices of one Poisson-sampled batch: each of ``range(num_samples)`` independently with probability
    ``sample_rate`` (one uniform draw each, from ``generator``)."""
    return (torch.rand(num_samples, generator=generator) < sample_rate).nonzero().flatten()


class DistributedPoissonSampler(Sampler[list[int]]):
    """This process's share of ``steps`` Poisson samples of the whole data set ``range(total_size)`` (Opacus's
    ``DistributedUniformWithReplacementSampler``): every process draws the same mask over all the indices, each with
    probability ``sample_rate``, and keeps its own, ``rank, rank + world_size, ...`` (``num_samples`` of them).

    The union over the processes is thus one Poisson sample at rate q of the whole data set, the accountant's
    assumption, whatever the processes' own random states: the mask comes from a generator seeded alike on every
    process (rank 0 draws the seed from ``generator``, or torch's global one, and broadcasts it here). Opacus draws
    each process's share from that process's generator, and the same seed on every process (as a script seeding
    alike would have it) then includes example i of one share exactly when example i of every other. A batch may
    be empty and is yielded: every process takes ``steps`` steps, so their all-reduces stay matched."""

    def __init__(self, *, total_size: int, sample_rate: float, steps: int, generator: torch.Generator | None = None):
        for name, value, low in (("total_size", total_size, 1), ("steps", steps, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"DistributedPoissonSampler: {name} must be an int >= {low}, got {value!r}")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or not 0 < sample_rate <= 1:
            raise InputError(f"DistributedPoissonSampler: sample_rate must be in (0, 1], got {sample_rate!r}")
        self.rank, self.world_size = _process_group("DistributedPoissonSampler")
        self.total_size, self.sample_rate, self.steps = total_size, sample_rate, steps
        self.num_samples = len(range(self.rank, total_size, self.world_size))  # this process's share
        device = generator.device if generator is not None else torch.device("cpu")
        seed = torch.randint(2**62, (1,), generator=generator, device=device).to(_collective_device())
        torch.distributed.broadcast(seed, src=0)
        self.generator = torch.Generator().manual_seed(int(seed.item()))  # the same on every process

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            batch = poisson_sample(self.total_size, self.sample_rate, self.generator)
            yield batch[batch % self.world_size == self.rank].tolist()


def _process_group(what: str) -> tuple[int, int]:
    """(rank, world size) of torch.distributed's default process group, which ``what`` needs."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise InputError(
            f"privacy: {what} needs torch.distributed's default process group, and none is initialised: call "
            "torch.distributed.init_process_group() first (in each process torchrun starts)"
        )
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _collective_device() -> torch.device:
    """Where a tensor sent by a collective must live: NCCL sends CUDA tensors only."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _empty_like(batch):
    """The structure of a collated batch, each tensor cut to 0 rows (what an empty Poisson batch collates to)."""
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, (list, tuple)):
        return type(batch)(_empty_like(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _empty_like(v) for k, v in batch.items()}
    return batch


class _CollateWithEmpty:
    """``collate_fn``, and for an empty batch the dataset's first example's structure with 0 rows."""

    def __init__(self, collate_fn, dataset):
        self.collate_fn, self.dataset, self.empty = collate_fn, dataset, None

    def __call__(self, batch):
        if len(batch):
            return self.collate_fn(batch)
        if self.empty is None:
            self.empty = _empty_like(self.collate_fn([self.dataset[0]]))
        return self.empty


_LOADER_OPTIONS = (
    "num_workers",
    "pin_memory",
    "timeout",
    "worker_init_fn",
    "multiprocessing_context",
    "prefetch_factor",
    "persistent_workers",
)


def _loader_options(data_loader: DataLoader) -> dict:
    return {k: getattr(data_loader, k) for k in _LOADER_OPTIONS if hasattr(data_loader, k)}


class DPDataLoader(DataLoader):
    """A :class:`~torch.utils.data.DataLoader` of Poisson-sampled batches (:class:`PoissonSampler`):
    ``len(data_loader)`` steps an epoch, each example in a batch with probability ``sample_rate``.
    ``distributed=True``: this process's share of each Poisson sample of the whole data set
    (:class:`DistributedPoissonSampler`; ``sample_rate`` stays the whole data set's)."""

    def __init__(
        self,
        dataset,
        *,
        sample_rate: float,
        steps: int,
        collate_fn=None,
        generator=None,
        distributed: bool = False,
        **options,
    ):
        if distributed:
            sampler = DistributedPoissonSampler(
                total_size=len(dataset), sample_rate=sample_rate, steps=steps, generator=generator
            )
        else:
            sampler = PoissonSampler(
                num_samples=len(dataset), sample_rate=sample_rate, steps=steps, generator=generator
            )
        collate = _CollateWithEmpty(collate_fn or torch.utils.data.default_collate, dataset)
        super().__init__(dataset, batch_sampler=sampler, collate_fn=collate, generator=generator, **options)
        self.sample_rate, self.distributed = sample_rate, distributed

    @classmethod
    def from_data_loader(cls, data_loader: DataLoader, *, generator=None, distributed: bool = False) -> DPDataLoader:
        steps = len(data_loader)
        return cls(
            data_loader.dataset,
            sample_rate=1 / steps,
            steps=steps,
            collate_fn=data_loader.collate_fn,
            generator=generator if generator is not None else data_loader.generator,
            distributed=distributed,
            **_loader_options(data_loader),
        )


# -- the optimizer -------------------------------------------------------------------------------------------------


class DPOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer``: :meth:`step` adds the noise σC z to the clipped sums in ``.grad`` (once per logical
    step), divides by the expected batch size (``loss_reduction="mean"``), steps, and tells the accountant.

    Under a :class:`BatchMemoryManager`, a physical batch that does not end its logical batch neither steps nor
    clears ``.grad``: the clipped sums of the physical batches add up. The wrapped optimizer's ``param_groups``,
    ``state`` and ``defaults`` are this one's (learning-rate schedulers work)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        loss_reduction: str = "mean",
        generator: torch.Generator | None = None,
    ):
        self.original_optimizer = optimizer
        self.noise_multiplier, self.max_grad_norm = noise_multiplier, max_grad_norm
        self.expected_batch_size, self.loss_reduction, self.generator = expected_batch_size, loss_reduction, generator
        self.step_hook = None
        self.recorder = None  # the model's per-sample recorder (make_private): one backward pass per step
        self._skips: collections.deque[bool] = collections.deque()  # one per physical batch drawn, in order
        self._is_last_step_skipped = False

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.original_optimizer.param_groups = value

    @property
    def state(self):
        return self.original_optimizer.state

    @state.setter
    def state(self, value):
        self.original_optimizer.state = value

    @property
    def defaults(self):
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.original_optimizer.defaults = value

    def attach_step_hook(self, fn) -> None:
        self.step_hook = fn

    def signal_skip_step(self, do_skip: bool = True) -> None:
        """Whether the step of the physical batch just drawn only accumulates (it is not the last of its logical
        batch). A queue, as Opacus's: a data loader with workers draws batches ahead of the steps."""
        self._skips.append(do_skip)

    def add_noise(self) -> None:
        """``p.grad += σ C z``, ``z ~ N(0, I)`` from ``generator`` (drawn on the generator's device)."""
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)  # an empty batch, or no backward: a zero clipped sum
            if std > 0:
                device = self.generator.device if self.generator is not None else p.device
                z = torch.randn(p.shape, generator=self.generator, device=device, dtype=p.grad.dtype)
                p.grad.add_(z.to(p.device), alpha=std)

    def scale_grad(self) -> None:
        if self.loss_reduction == "mean":
            for p in self.params:
                p.grad.div_(self.expected_batch_size)

    def _one_backward_per_step(self) -> None:
        """Two backward passes before a step add two clipped sums: an example drawn in both batches (or the same
        batch twice) would move ``.grad`` by 2C, beyond what the noise covers."""
        if self.recorder is None:
            return
        passes, self.recorder.passes = self.recorder.passes, 0
        if passes > 1:
            raise InputError(
                f"DPOptimizer: {passes} backward passes before optimizer.step(): their clipped sums add up, and one "
                "noise draw does not cover that; take one backward pass per step (larger logical batches: "
                "BatchMemoryManager)"
            )

    def pre_step(self) -> bool:
        """Noise and scaling at the end of a logical batch; False (nothing to do yet) before it."""
        self._one_backward_per_step()
        if self._skips and self._skips.popleft():
            self._is_last_step_skipped = True
            return False
        self._is_last_step_skipped = False
        self.add_noise()
        self.scale_grad()
        if self.step_hook is not None:
            self.step_hook(self)
        return True

    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        if self.pre_step():
            return self.original_optimizer.step()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not self._is_last_step_skipped:  # inside a logical batch the clipped sums keep adding up
            self.original_optimizer.zero_grad(set_to_none)
            if self.recorder is not None:
                self.recorder.passes = 0

    def state_dict(self):
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"DPOptimizer(σ={self.noise_multiplier:g}, C={self.max_grad_norm:g}, {self.original_optimizer!r})"


class DistributedDPOptimizer(DPOptimizer):
    """:class:`DPOptimizer` for one process of several (torchrun), each holding its share of every logical batch
    (Opacus's name). At the end of a logical batch rank 0 alone adds σC z, ``.grad`` is summed over the processes
    (an all-reduce), and each divides by ``expected_batch_size``, the whole logical batch's: every process then
    holds what one process would on the union of the shares, with one process's noise, so the accountant's step
    is unchanged. The steps inside a logical batch (:class:`BatchMemoryManager`) send nothing, so the processes
    may split their shares into different numbers of physical batches."""

    def __init__(self, optimizer: torch.optim.Optimizer, **options):
        rank, world_size = _process_group("DistributedDPOptimizer")
        super().__init__(optimizer, **options)
        self.rank, self.world_size = rank, world_size

    def add_noise(self) -> None:
        """The noisy clipped sum of the whole logical batch: rank 0's noise, then the sum over the processes."""
        if self.rank == 0:
            super().add_noise()
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)  # this process's share was empty, or had no backward
            elif not p.grad.is_contiguous():
                p.grad = p.grad.contiguous()  # all_reduce works in place on dense memory
            torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)

    def __repr__(self) -> str:
        return f"Distributed{super().__repr__()}"


# -- the model -----------------------------------------------------------------------------------------------------


class _Recording:
    """Forward hooks on the private module: each forward with grad enabled runs inside its per-sample recorder."""

    def __init__(self, module: torch.nn.Module, recorder: PerSample):
        self.recorder, self.depth = recorder, 0
        self.handles = [
            module.register_forward_pre_hook(self.enter),
            module.register_forward_hook(self.leave, always_call=True),
        ]

    def enter(self, module, args) -> None:
        if self.depth == 0:
            refuse_sample_mixing(self.recorder._mixing)
            self.recorder.enter()
        self.depth += 1

    def leave(self, module, args, output) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.recorder.leave()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.recorder.close()


class DifferentiallyPrivateDistributedDataParallel(torch.nn.Module):
    """Opacus's wrapper for several processes (alias :data:`DPDDP`): at construction every process gets rank 0's
    parameters and buffers (a broadcast); afterwards it just calls ``module``. Unlike torch's
    ``DistributedDataParallel`` it adds no gradient hooks: the clipping happens inside the backward pass, and
    :class:`DistributedDPOptimizer` (what ``make_private`` returns for it) sums the clipped sums at the step."""

    def __init__(self, module: torch.nn.Module):
        if not isinstance(module, torch.nn.Module):
            raise InputError(f"DPDDP: module must be a torch.nn.Module, got {type(module).__name__}")
        _process_group("DPDDP")
        super().__init__()
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                torch.distributed.broadcast(t.data, src=0)
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


DPDDP = DifferentiallyPrivateDistributedDataParallel


def _unwrap(module: torch.nn.Module) -> tuple[torch.nn.Module, bool]:
    """The model to make private, and whether it runs in several processes (wrapped in a :class:`DPDDP`)."""
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.parallel.DistributedDataParallel):
            raise InputError(
                f"privacy: {name or 'module'} is a torch.nn.parallel.DistributedDataParallel, whose hooks all-reduce "
                "the gradients autograd accumulates; the clipped sums are added to .grad at the end of the backward "
                "pass, past those hooks, so DDP never reduces them (.grad comes out zero, or with "
                "find_unused_parameters=True each process's own sum); wrap the model in "
                "manualgrad.privacy.DPDDP instead (Opacus's DifferentiallyPrivateDistributedDataParallel)"
            )
        if isinstance(m, DPDDP) and m is not module:
            raise InputError(
                f"privacy: {name} is a DPDDP inside the model; wrap the whole model (DPDDP(model)) so that the "
                "optimizer sums the clipped gradients of every process"
            )
    if isinstance(module, DPDDP):
        _process_group("make_private with a DPDDP module")
        return module.module, True
    return module, False


# -- the engine ----------------------------------------------------------------------------------------------------


class PrivacyEngine:
    """Opacus's entry point: :meth:`make_private` (or :meth:`make_private_with_epsilon`) turns a model, an
    optimizer and a data loader into DP-SGD's; :meth:`get_epsilon` is what the steps taken have spent.

    Args:
        accountant: ``"prv"`` or ``"pld"`` (dp-accounting's privacy loss distributions, tight; the default)
            or ``"rdp"`` (Rényi DP).
        secure_mode: must be False: manualgrad has no cryptographically secure generator (see the module docs).
    """

    def __init__(self, *, accountant: str = "prv", secure_mode: bool = False):
        if secure_mode:
            raise InputError(
                "PrivacyEngine: secure_mode=True needs a cryptographically secure generator and noise hardened "
                "against floating-point attacks, which manualgrad does not provide (Opacus uses torchcsprng); "
                "use secure_mode=False"
            )
        self.accountant = Accountant(accountant)
        self.secure_mode = False
        self._recordings: list[_Recording] = []

    def make_private(
        self,
        *,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: float,
        loss_reduction: str = "mean",
        poisson_sampling: bool = True,
        noise_generator: torch.Generator | None = None,
        criterion=None,
        batch_first: bool = True,
        clipping: str = "flat",
        grad_sample_mode: str = "hooks",
        **_ignored,
    ):
        """Returns ``(module, optimizer, data_loader)`` (with ``grad_sample_mode="ghost"``, Opacus's
        ``(module, optimizer, criterion, data_loader)``, the criterion unchanged: one backward pass either way).

        ``module`` is converted in place (:func:`manualgrad.convert`: the same object and Parameters, so the
        optimizer stays valid) and returned; its forward then records the per-sample norms. ``optimizer`` is
        wrapped in a :class:`DPOptimizer`; ``data_loader`` becomes a :class:`DPDataLoader` of Poisson-sampled
        batches at rate ``1 / len(data_loader)`` (``poisson_sampling=False`` keeps it, and the accounting's
        assumption no longer holds). ``max_grad_norm`` is C; ``noise_multiplier`` σ (0: clipping only, ε infinite).

        A :class:`DPDDP` ``module`` (several processes): its ``module`` is converted, the optimizer is a
        :class:`DistributedDPOptimizer`, and the data loader this process's share of each Poisson sample
        (:class:`DistributedPoissonSampler`); the rate, the expected batch size and ε are the whole data set's.
        Call it in every process, in the same order. torch's ``DistributedDataParallel`` is refused: its hooks
        reduce autograd's gradients, and never see the clipped sums.
        """
        _check_positive("max_grad_norm", max_grad_norm)
        if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, (int, float)):
            raise InputError(f"privacy: noise_multiplier must be a number >= 0, got {noise_multiplier!r}")
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise InputError(f"privacy: noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
        if loss_reduction not in ("mean", "sum"):
            raise InputError(f"privacy: loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if not batch_first:
            raise InputError("privacy: batch_first=False is not supported: dim 0 of every input must be the samples")
        if clipping != "flat":
            raise InputError(f"privacy: clipping={clipping!r} is not supported (flat clipping only)")
        steps = _steps_of(data_loader)
        model, distributed = _unwrap(module)
        parameters = set(module.parameters())
        if any(p not in parameters for group in optimizer.param_groups for p in group["params"]):
            raise InputError("privacy: the optimizer holds parameters that are not the module's")
        if noise_multiplier == 0:
            warnings.warn(
                "noise_multiplier=0: the gradients are clipped but not noised, so there is no privacy (ε is infinite)",
                PrivacyWarning,
                stacklevel=2,
            )
        with warnings.catch_warnings():  # torch backward for parameterless functional calls does not affect DP
            warnings.simplefilter("ignore", ConversionWarning)
            convert(model)
        recorder = PerSample(model, clip=max_grad_norm, loss_reduction=loss_reduction)  # refuses what has no rule
        refuse_sample_mixing(recorder._mixing)
        recorder.open()
        self._recordings.append(_Recording(model, recorder))
        sample_rate = 1 / steps
        if poisson_sampling:
            data_loader = DPDataLoader.from_data_loader(data_loader, distributed=distributed)
        expected_batch_size = int(len(data_loader.dataset) * sample_rate)  # of all the processes together
        optimizer = (DistributedDPOptimizer if distributed else DPOptimizer)(
            optimizer,
            noise_multiplier=float(noise_multiplier),
            max_grad_norm=float(max_grad_norm),
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            generator=noise_generator,
        )

        def account(opt: DPOptimizer) -> None:
            self.accountant.step(noise_multiplier=opt.noise_multiplier, sample_rate=sample_rate)

        optimizer.attach_step_hook(account)
        optimizer.recorder = recorder
        if "ghost" in grad_sample_mode:
            return module, optimizer, criterion, data_loader
        return module, optimizer, data_loader

    def make_private_with_epsilon(
        self,
        *,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: int,
        max_grad_norm: float,
        **kwargs,
    ):
        """:meth:`make_private` with the smallest noise multiplier for which ``epochs`` epochs are
        (``target_epsilon``, ``target_delta``)-DP under this engine's accountant (:func:`get_noise_multiplier`)."""
        steps = _steps_of(data_loader)
        if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not epochs > 0:
            raise InputError(f"privacy: epochs must be a positive number, got {epochs!r}")
        if len(self.accountant):
            warnings.warn(
                "make_private_with_epsilon: this engine has spent privacy already; the noise is calibrated for the "
                "new run alone, so the total ε will be larger",
                PrivacyWarning,
                stacklevel=2,
            )
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=1 / steps,
            epochs=epochs,
            accountant=self.accountant.mechanism(),
        )
        return self.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=sigma,
            max_grad_norm=max_grad_norm,
            **kwargs,
        )

    def get_epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta`` (``math.inf`` after any step without noise)."""
        return self.accountant.get_epsilon(delta)

    def detach(self) -> None:
        """Stop recording: the models' forward passes are plain again (the optimizers and loaders stay wrapped)."""
        for recording in self._recordings:
            recording.remove()
        self._recordings.clear()


def _steps_of(data_loader: DataLoader) -> int:
    """``len(data_loader)``, which needs a dataset with a length (a map-style dataset)."""
    try:
        len(data_loader.dataset)
        steps = len(data_loader)
    except (TypeError, AttributeError):
        raise InputError(
            "privacy: the data loader's dataset has no length; Poisson sampling and the accountant need the number "
            "of examples (use a map-style dataset)"
        ) from None
    if steps < 1:
        raise InputError("privacy: the data loader is empty")
    return steps


# -- logical batches larger than memory ----------------------------------------------------------------------------


class _SplittingSampler(Sampler[list[int]]):
    """Each logical batch of ``sampler`` as chunks of at most ``max_batch_size``, telling ``optimizer`` which chunk
    ends its logical batch."""

    def __init__(self, sampler, max_batch_size: int, optimizer: DPOptimizer):
        self.sampler, self.max_batch_size, self.optimizer = sampler, max_batch_size, optimizer

    def __iter__(self):
        for batch in self.sampler:
            chunks = [batch[i : i + self.max_batch_size] for i in range(0, len(batch), self.max_batch_size)] or [[]]
            for i, chunk in enumerate(chunks):
                self.optimizer.signal_skip_step(do_skip=i < len(chunks) - 1)
                yield chunk

    def __len__(self) -> int:
        rate = getattr(self.sampler, "sample_rate", None)
        if rate is None:
            return len(self.sampler)
        expected = rate * self.sampler.num_samples
        return len(self.sampler) * max(1, math.ceil(expected / self.max_batch_size))


class BatchMemoryManager:
    """Opacus's context manager: ``with BatchMemoryManager(data_loader=, max_physical_batch_size=, optimizer=) as
    loader`` yields each Poisson-sampled logical batch as physical chunks of at most ``max_physical_batch_size``;
    the clipped sums of its chunks add up in ``.grad``, and the noise is drawn once, at its last chunk's
    ``optimizer.step()`` (the others only accumulate; ``zero_grad`` then keeps ``.grad``)."""

    def __init__(self, *, data_loader: DataLoader, max_physical_batch_size: int, optimizer: DPOptimizer):
        if isinstance(max_physical_batch_size, bool) or not isinstance(max_physical_batch_size, int):
            raise InputError(
                f"BatchMemoryManager: max_physical_batch_size must be an int, got {max_physical_batch_size!r}"
            )
        if max_physical_batch_size < 1:
            raise InputError(f"BatchMemoryManager: max_physical_batch_size must be >= 1, got {max_physical_batch_size}")
        if not isinstance(optimizer, DPOptimizer):
            raise InputError("BatchMemoryManager: optimizer must be the DPOptimizer that make_private returned")
        self.data_loader, self.max_physical_batch_size, self.optimizer = data_loader, max_physical_batch_size, optimizer

    def __enter__(self) -> DataLoader:
        loader = self.data_loader
        sampler = loader.batch_sampler
        if sampler is None:
            raise InputError("BatchMemoryManager: the data loader has no batch sampler (batch_size=None)")
        collate = loader.collate_fn
        if not isinstance(collate, _CollateWithEmpty):
            collate = _CollateWithEmpty(collate, loader.dataset)
        return DataLoader(
            loader.dataset,
            batch_sampler=_SplittingSampler(sampler, self.max_physical_batch_size, self.optimizer),
            collate_fn=collate,
            generator=loader.generator,
            **_loader_options(loader),
        )

    def __exit__(self, *exc) -> None:
        self.optimizer._skips.clear()  # batches drawn ahead and never stepped on
