"""What each speed trick buys on a whole training step: the step timed with the trick on and off, interleaved.

The project's rule: a speed trick stays only where it buys at least 3% of a
whole training step, and then in one contained helper, tested against the
plain formula. Each trick here is switched off by swapping that one helper
for the plain code it stands for; ``gain`` is (time off) / (time on) - 1.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import statistics
import time

import torch

import manualgrad.functional as MF
import manualgrad.nn as mnn
from manualgrad import _checks
from manualgrad.functions import ManualFunction, activations, base, conv, losses, pooling, softmax

from .suites import mnist_cnn


@contextlib.contextmanager
def _swapped(owner, name: str, value):
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


@contextlib.contextmanager
def _plain_signatures():
    """Function.apply binding every call with inspect's general Signature.bind."""
    functions = [f for f in _subclasses(ManualFunction) if "forward" in f.__dict__]
    saved = [f.forward.__signature__ for f in functions]
    for f in functions:
        f.forward.__signature__ = inspect.Signature(list(f.forward.__signature__.parameters.values()))
    try:
        yield
    finally:
        for f, signature in zip(functions, saved):
            f.forward.__signature__ = signature


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


@contextlib.contextmanager
def _plain_exp():
    """e^x through torch.exp, in every module that calls base.exp."""
    with contextlib.ExitStack() as stack:
        for module in (activations, softmax):
            stack.enter_context(_swapped(module, "exp", lambda x, scale=1.0, reuse=False: torch.exp(x * scale)))
        yield


#: trick -> (where it lives, a context manager that switches it off)
TRICKS = {
    "indicator (activations)": lambda: _swapped(activations, "indicator", lambda c, s, v: c(s, v).to(s.dtype)),
    "one-step binding (base._Signature)": _plain_signatures,
    "linear's one-expression check": lambda: _swapped(_checks, "_linear_fits", lambda *a: False),
    "losses in place (losses.base._in_place)": lambda: _swapped(losses.base, "_in_place", lambda g: False),
    "save_for_forward only under forward AD": lambda: _swapped(base._compat, "forward_ad_enabled", lambda: True),
    # off: the patches for every G_W; and the next one off: a convolution over the batch where offsets would run
    "G_W beyond short patches by offsets or a convolution (conv.SWAP_AT)": lambda: _swapped(conv, "SWAP_AT", math.inf),
    "G_W by kernel offsets (conv.OFFSETS_AT)": lambda: _swapped(conv, "OFFSETS_AT", math.inf),
    "G_Y ⊙ h' into h' (activations.times)": lambda: _swapped(activations, "times", lambda g, h, fresh=False: g * h),
    "e^x through exp2 (base.exp)": _plain_exp,
    "max pool in channels-last (pooling._torch_max_pool2d)": lambda: _swapped(
        pooling,
        "_torch_max_pool2d",
        lambda x, k, s, p, d, c: torch.nn.functional.max_pool2d(x, k, s, p, d, ceil_mode=c, return_indices=True),
    ),
}


def _steps(quick: bool):
    """The whole steps each trick is judged on: name -> step function."""
    torch.manual_seed(0)
    sizes, batch = ((6, 5, 3), 4) if quick else ((784, 512, 256, 10), 128)
    x, y = torch.randn(batch, sizes[0]), torch.randint(0, sizes[-1], (batch,))
    steps = {}
    for activation in ("relu", "leaky_relu", "elu", "gelu"):
        fused = mnn.MLP(sizes, activation=activation)
        layers = fused.per_layer()

        def fused_step(m=fused):
            m.zero_grad(set_to_none=True)
            m.loss(x, y).backward()

        def layers_step(m=layers):
            m.zero_grad(set_to_none=True)
            MF.cross_entropy(m(x), y).backward()

        steps[f"MLP {activation}, fused"] = fused_step
        steps[f"MLP {activation}, per layer"] = layers_step
    small = mnn.MLP((64, 64, 64, 10)).per_layer()
    xs, ys = torch.randn(64, 64), torch.randint(0, 10, (64,))

    def small_step():
        small.zero_grad(set_to_none=True)
        MF.cross_entropy(small(xs), ys).backward()

    steps["MLP 64-64-64-10, per layer"] = small_step
    cnn = mnist_cnn(mnn)
    xc, yc = torch.randn(2 if quick else 64, 1, 28, 28), torch.randint(0, 10, (2 if quick else 64,))

    def cnn_step():
        cnn.zero_grad(set_to_none=True)
        MF.nll_loss(cnn(xc), yc).backward()

    steps["MNIST CNN"] = cnn_step
    # an autoencoder (pytorch/examples' VAE without its sampling): the loss's arrays are the images' size
    wide, code = (6, 3) if quick else (784, 400)
    autoencoder = mnn.Sequential(mnn.Linear(wide, code), mnn.ReLU(), mnn.Linear(code, wide))
    xa = torch.rand(batch, wide)

    def autoencoder_step():
        autoencoder.zero_grad(set_to_none=True)
        MF.binary_cross_entropy_with_logits(autoencoder(xa), xa, reduction="sum").backward()

    steps[f"autoencoder {wide}-{code}-{wide}, BCE with logits"] = autoencoder_step
    return steps


def _alternating(step, trick: str, rounds: int, calls: int) -> tuple[float, float]:
    """Median seconds per step with the trick on and off, the two timed in alternation (the switch itself
    outside the timed calls)."""
    samples = {"on": [], "off": []}
    for r in range(rounds):
        for state in ("on", "off") if r % 2 else ("off", "on"):
            with contextlib.nullcontext() if state == "on" else TRICKS[trick]():
                step()  # one untimed call after the switch
                start = time.perf_counter()
                for _ in range(calls):
                    step()
                samples[state].append((time.perf_counter() - start) / calls)
    return statistics.median(samples["on"]), statistics.median(samples["off"])


def trick_gains(device: str = "cpu", quick: bool = False, rounds: int = 15) -> list[dict]:
    """For every trick and every step: µs with the trick on and off, and the gain. (CPU only.)"""
    if device != "cpu":
        return []
    rows = []
    for name, step in _steps(quick).items():
        step()
        start = time.perf_counter()
        step()
        calls = max(1, min(200, int(0.02 / max(time.perf_counter() - start, 1e-6))))
        for trick in TRICKS:
            on, off = _alternating(step, trick, 2 if quick else rounds, calls)
            rows.append({"trick": trick, "step": name, "on_us": on * 1e6, "off_us": off * 1e6, "gain": off / on - 1})
    return rows
