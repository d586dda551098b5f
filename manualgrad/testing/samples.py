r"""The table of examples: the calls every check, test and benchmark makes, per registered operation.

The registry (:mod:`manualgrad.registry`) is the plain table of operations;
this is the other half, as OpInfo's samples live in ``torch.testing``: for
each operation's name, the calls :func:`manualgrad.testing.check`, the test
suite and ``python -m benchmarks`` make, where its derivative has kinks, and
whether it draws random numbers.

**Declaring an operation's samples** (one entry per operation). Write a function ``(dtype, device, bench=False) ->
list[Example]`` and decorate it with :func:`samples` and the operation's
name; an ``Example`` is ``(id, args, kwargs)``, a call
``functional(*args, **kwargs)`` (small tensors, a few dozen numbers: the
finite-difference checks cost two evaluations per number; ``bench=True``:
the sizes ``python -m benchmarks`` times)::

    @samples("layer_norm")
    def _layer_norm(dtype, device, bench=False):
        x = torch.randn((256, 1024) if bench else (3, 5), device=device).to(dtype)
        weight = torch.randn(5, device=device).to(dtype)
        return [Example("last dim", (x, (5,)), {}), Example("affine", (x, (5,), weight), {})]

An activation needs no function: it gets ``randn(6, 7) * 3`` (``(256,
4096)`` for benchmarks) once per variant; declare only what is special,
``samples("relu", kinks=(0.0,))`` or ``samples("gelu", variants=({},
{"approximate": "tanh"}))``. ``random=True`` marks an operation that draws
random numbers (dropout): the checks reseed before every call, making it one
fixed function. ``kinks``: where the derivative jumps, a tuple or a function
of the variant's keyword arguments; the checks keep finite differences off
them and look at both sides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..functions.losses import class_dim
from ..registry import OPS, Op

__all__ = ["SAMPLES", "Example", "Samples", "examples", "is_random", "kinks", "samples"]


class Example(NamedTuple):
    """One call of an operation, ``functional(*args, **kwargs)``; ``id`` names it in reports."""

    id: str
    args: tuple
    kwargs: dict


@dataclass
class Samples:
    """What the table knows of one operation: see the module docstring."""

    #: ``(dtype, device, bench=False) -> list[Example]``; None: an activation's default
    examples: Callable[..., list[Example]] | None = None
    kinks: tuple[float, ...] | Callable[..., tuple[float, ...]] = ()
    variants: tuple[dict, ...] = ({},)  #: an activation's keyword arguments to try (the first is the default)
    random: bool = False


#: The table, by operation name.
SAMPLES: dict[str, Samples] = {}


def samples(name: str, *, kinks=(), variants: tuple[dict, ...] = ({},), random: bool = False):
    """Declare ``name``'s samples; returns a decorator for its examples function (optional for an activation)."""
    entry = SAMPLES.setdefault(name, Samples())
    entry.kinks, entry.variants, entry.random = kinks, variants, random

    def decorate(fn: Callable[..., list[Example]]) -> Callable[..., list[Example]]:
        entry.examples = fn
        return fn

    return decorate


def _op(op: Op | str) -> Op:
    return OPS[op] if isinstance(op, str) else op


def examples(op: Op | str, dtype=torch.float64, device="cpu", bench: bool = False) -> list[Example]:
    """The calls of ``op`` in ``dtype`` on ``device``: the table's, or an activation's default; [] if none."""
    op = _op(op)
    entry = SAMPLES.get(op.name, Samples())
    if entry.examples is not None:
        return entry.examples(dtype, device, bench)
    if op.kind != "activation":
        return []
    shape = (256, 4096) if bench else (6, 7)
    z = torch.randn(shape, device=device).mul_(3).to(dtype)
    return [Example(_variant_id(kw), (z,), dict(kw)) for kw in entry.variants]


def kinks(op: Op | str, kwargs: dict | None = None) -> tuple[float, ...]:
    """Where ``op``'s derivative jumps, for the keyword arguments ``kwargs``."""
    found = SAMPLES.get(_op(op).name, Samples()).kinks
    return tuple(found(**(kwargs or {}))) if callable(found) else tuple(found)


def is_random(op: Op | str) -> bool:
    """Whether ``op`` draws random numbers (the checks reseed before every call)."""
    return SAMPLES.get(_op(op).name, Samples()).random


# ---- the activations ----------------------------------------------------------------------------

samples("relu", kinks=(0.0,))
samples(
    "leaky_relu",
    kinks=(0.0,),
    variants=({}, {"negative_slope": 0.2}, {"negative_slope": -0.3}, {"negative_slope": 1.5}),
)
samples("gelu", variants=({}, {"approximate": "tanh"}))
samples("elu", kinks=(0.0,), variants=({}, {"alpha": 2.0}, {"alpha": -0.5}))
samples(
    "softplus",
    kinks=lambda beta=1.0, threshold=20.0: (threshold / beta,),
    variants=({}, {"beta": 2.0, "threshold": 3.0}),
)

# ---- everything else ----------------------------------------------------------------------------


@samples("flatten")
def _flatten_examples(dtype, device, bench=False):
    if bench:  # the MNIST network's flatten: (64, 64, 12, 12) -> (64, 9216)
        return [
            Example(
                "64x64x12x12,start_dim=1", (torch.randn(64, 64, 12, 12, device=device).to(dtype),), {"start_dim": 1}
            )
        ]
    x = torch.randn(2, 3, 2, 2, device=device).to(dtype)
    return [
        Example("default", (x,), {}),
        Example("start_dim=1", (x,), {"start_dim": 1}),
        Example("start_dim=1,end_dim=2", (x,), {"start_dim": 1, "end_dim": 2}),
        Example("start_dim=end_dim", (x,), {"start_dim": -2, "end_dim": -2}),
        Example("0d", (torch.randn((), device=device).to(dtype),), {"start_dim": 0}),
    ]


@samples("unflatten")
def _unflatten_examples(dtype, device, bench=False):
    if bench:
        return [
            Example(
                "64x9216->64x64x12x12",
                (torch.randn(64, 9216, device=device).to(dtype),),
                {"dim": 1, "sizes": (64, 12, 12)},
            )
        ]
    x = torch.randn(4, 6, device=device).to(dtype)
    return [
        Example("dim=1,(2,3)", (x,), {"dim": 1, "sizes": (2, 3)}),
        Example("dim=-2,(2,-1)", (x,), {"dim": -2, "sizes": (2, -1)}),
        Example("dim=0,[1,4,1]", (x,), {"dim": 0, "sizes": [1, 4, 1]}),
    ]


@samples("max_pool2d")
def _max_pool_examples(dtype, device, bench=False):
    def make(*shape):
        return torch.randn(shape, device=device).to(dtype)

    if bench:  # the MNIST network's pooling
        return [Example("64x64x24x24,k2", (make(64, 64, 24, 24),), {"kernel_size": 2})]
    x = make(1, 2, 4, 5)  # tiny: the gradient checks cost a few evaluations per element
    return [
        Example("k2", (x,), {"kernel_size": 2}),
        Example("k3,stride1,overlapping", (x,), {"kernel_size": 3, "stride": 1}),
        Example("tuples,padding", (x,), {"kernel_size": (3, 2), "stride": (2, 1), "padding": (1, 0)}),
        Example("dilation", (x,), {"kernel_size": 2, "dilation": 2}),
        Example("ceil_mode", (x,), {"kernel_size": 2, "ceil_mode": True}),
        Example(
            "unbatched,ceil_mode,padding",
            (make(1, 5, 5),),
            {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True},
        ),
    ]


@samples("avg_pool2d")
def _avg_pool_examples(dtype, device, bench=False):
    def make(*shape):
        return torch.randn(shape, device=device).to(dtype)

    if bench:
        return [Example("64x64x24x24,k2", (make(64, 64, 24, 24),), {"kernel_size": 2})]
    x = make(1, 2, 4, 5)
    return [
        Example("k2", (x,), {"kernel_size": 2}),
        Example("k3,stride1,padding", (x,), {"kernel_size": 3, "stride": 1, "padding": 1}),
        Example("ceil_mode,padding", (x,), {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True}),
        Example(
            "tuples,ceil_mode,exclude_pad",
            (x,),
            {"kernel_size": (3, 2), "stride": (2, 1), "padding": 1, "ceil_mode": True, "count_include_pad": False},
        ),
        Example("divisor_override", (x,), {"kernel_size": 2, "stride": 1, "divisor_override": 3}),
        Example("unbatched", (make(1, 4, 5),), {"kernel_size": 2, "stride": (1, 2)}),
    ]


@samples("adaptive_avg_pool2d")
def _adaptive_examples(dtype, device, bench=False):
    def make(*shape):
        return torch.randn(shape, device=device).to(dtype)

    if bench:  # a classifier head's global average
        return [Example("64x512x7x7->1", (make(64, 512, 7, 7),), {"output_size": 1})]
    x = make(1, 2, 4, 5)
    return [
        Example("(2,3)", (x,), {"output_size": (2, 3)}),
        Example("3,overlapping", (x,), {"output_size": 3}),
        Example("(None,7),larger", (x,), {"output_size": (None, 7)}),
        Example("unbatched,1", (make(2, 3, 4),), {"output_size": 1}),
    ]


@samples("conv2d")
def _conv2d(dtype, device, bench=False):
    def make(*shape):
        return torch.randn(shape, device=device).to(dtype)

    if bench:  # the MNIST network's two convolutions
        return [
            Example("64x1x28x28->32,k3", (make(64, 1, 28, 28), make(32, 1, 3, 3), make(32)), {}),
            Example("64x32x26x26->64,k3", (make(64, 32, 26, 26), make(64, 32, 3, 3), make(64)), {}),
        ]
    x = make(1, 2, 4, 5)  # tiny: the gradient checks cost a few evaluations per element
    return [
        Example("2x2x4x4->2,k2", (make(2, 2, 4, 4), make(2, 2, 2, 2), make(2)), {}),
        Example("stride,padding,nobias", (x, make(2, 2, 3, 3)), {"stride": 2, "padding": 1}),
        Example("tuples", (x, make(2, 2, 2, 3), make(2)), {"stride": (2, 1), "padding": (1, 2), "dilation": (1, 2)}),
        Example("dilation,groups", (make(1, 2, 5, 5), make(4, 1, 2, 2), make(4)), {"dilation": 2, "groups": 2}),
        # patches of 2·4·4 = SWAP_AT numbers: G_W as a convolution over the batch
        Example("same,even-kernel", (x, make(2, 2, 4, 4), make(2)), {"padding": "same", "dilation": (2, 1)}),
        Example("unbatched", (make(2, 4, 5), make(2, 2, 3, 3), make(2)), {"padding": 1}),
        Example(
            "stride>kernel,valid", (make(1, 2, 5, 5), make(2, 2, 2, 2), make(2)), {"stride": 3, "padding": "valid"}
        ),
    ]


@samples("linear")
def _linear(dtype, device, bench=False):
    sizes = [(64, 64, 64), (128, 784, 512), (256, 1024, 1024)] if bench else [(4, 5, 3)]

    def make(*shape):
        return torch.randn(shape, device=device).to(dtype)

    out = []
    for n, q, p in sizes:
        out.append(Example(f"{n}x{q}->{p}", (make(n, q), make(p, q), make(p)), {}))
    if not bench:
        out += [
            Example("1d", (make(5), make(3, 5), make(3)), {}),
            Example("3d,nobias", (make(2, 3, 5), make(4, 5)), {}),
            Example("empty", (make(0, 5), make(3, 5), make(3)), {}),
        ]
    return out


@samples("softmax")
@samples("log_softmax")
def _softmax(dtype, device, bench=False):
    x = torch.randn((256, 1000) if bench else (4, 5), device=device).to(dtype)
    out = [Example("dim=1", (x,), {"dim": 1})]
    if not bench:
        out += [
            Example("dim=0", (x,), {"dim": 0}),
            Example("3d,dim=-1", (torch.randn(2, 3, 4, device=device).to(dtype),), {"dim": -1}),
            Example("0d", (torch.randn((), device=device).to(dtype),), {"dim": 0}),
        ]
    return out


@samples("dropout", random=True)
def _dropout(dtype, device, bench=False):
    x = torch.randn((256, 4096) if bench else (6, 5), device=device).to(dtype)
    return [Example("p=0.3", (x,), {"p": 0.3}), Example("p=1", (x,), {"p": 1.0})]


@samples("dropout2d", random=True)
def _dropout2d(dtype, device, bench=False):
    x = torch.randn((64, 32, 24, 24) if bench else (3, 4, 2, 2), device=device).to(dtype)
    return [Example("p=0.3", (x,), {"p": 0.3})]


@samples("cross_entropy")
def _cross_entropy_examples(dtype, device, bench=False):
    def make(*shape):
        return torch.randn(shape, device=device).mul_(3).to(dtype)

    if bench:
        return [Example(f"256x{c}", (make(256, c), torch.randint(0, c, (256,), device=device)), {}) for c in (10, 1000)]
    target = torch.randint(0, 5, (6,), device=device)
    target[1] = -100  # an ignored row
    weight = (torch.rand(5, device=device) + 0.5).to(dtype)
    probs = torch.softmax(torch.randn(6, 5, device=device), 1).to(dtype)
    spatial = torch.randint(0, 5, (3, 2, 2), device=device)
    return [Example(f"{r}", (make(6, 5), target), {"reduction": r}) for r in ("mean", "sum", "none")] + [
        Example("smoothing", (make(6, 5), target), {"label_smoothing": 0.2}),
        Example(
            "weight,smoothing,sum", (make(6, 5), target), {"weight": weight, "label_smoothing": 0.1, "reduction": "sum"}
        ),
        Example("weight", (make(6, 5), target), {"weight": weight}),
        Example("ignore_index=3", (make(6, 5), target.clamp(min=0)), {"ignore_index": 3}),
        Example("no ignored row", (make(6, 5), target.clamp(min=0)), {}),
        Example(
            "no ignored row,smoothing,none",
            (make(6, 5), target.clamp(min=0)),
            {"label_smoothing": 0.1, "reduction": "none"},
        ),
        Example("1d", (make(5), target[0]), {}),
        Example("spatial", (make(3, 5, 2, 2), spatial), {"label_smoothing": 0.1}),
        Example("probabilities", (make(6, 5), probs), {"weight": weight, "label_smoothing": 0.1}),
        Example("probabilities,none", (make(6, 5), probs), {"reduction": "none"}),
    ]


@samples("nll_loss")
def _nll_examples(dtype, device, bench=False):
    examples = _cross_entropy_examples(dtype, device, bench)
    log_probs = [
        Example(e.id, (torch.log_softmax(e.args[0].float(), class_dim(e.args[0])).to(dtype), e.args[1]), e.kwargs)
        for e in examples
        if not e.args[1].is_floating_point() and "label_smoothing" not in e.kwargs
    ]
    return log_probs


def _pointwise_examples(*variants: dict):
    """Every reduction, then each of ``variants`` (keyword arguments; a tensor weight is written ``weight=True``).
    Broadcasting (with its warning) is tested in ``tests/test_losses.py``."""

    def examples(dtype, device, bench=False):
        def make(*shape):
            return torch.randn(shape, device=device).mul_(2).to(dtype)

        if bench:
            return [Example("256x4096", (make(256, 4096), make(256, 4096)), {})]
        calls = [Example(r, (make(4, 3), make(4, 3)), {"reduction": r}) for r in ("mean", "sum", "none")]
        for variant in variants:
            kwargs = dict(variant)
            if kwargs.get("weight"):
                kwargs["weight"] = (torch.rand(4, 3, device=device) + 0.1).to(dtype)
            calls.append(Example(_variant_id(variant), (make(4, 3), make(4, 3)), kwargs))
        return calls

    return examples


def _variant_id(kwargs: dict) -> str:
    return ",".join(k if v is True else f"{k}={v}" for k, v in kwargs.items()) or "default"


_WEIGHTED = ({"weight": True}, {"weight": True, "reduction": "none"})


@samples("binary_cross_entropy")
def _bce_examples(dtype, device, bench=False):
    def probabilities(*shape):  # away from 0 and 1, where finite differences would step outside [0, 1]
        return (torch.rand(shape, device=device) * 0.9 + 0.05).to(dtype)

    if bench:
        return [Example("256x4096", (probabilities(256, 4096), probabilities(256, 4096)), {})]
    weight = (torch.rand(4, 3, device=device) + 0.5).to(dtype)
    return [
        Example(r, (probabilities(4, 3), probabilities(4, 3)), {"reduction": r}) for r in ("mean", "sum", "none")
    ] + [
        Example("weight", (probabilities(4, 3), probabilities(4, 3)), {"weight": weight}),
        Example(
            "class weight,sum", (probabilities(4, 3), probabilities(4, 3)), {"weight": weight[0], "reduction": "sum"}
        ),
        Example("1d", (probabilities(5), probabilities(5)), {}),
    ]


@samples("binary_cross_entropy_with_logits")
def _bce_logits_examples(dtype, device, bench=False):
    def make(*shape):
        return torch.randn(shape, device=device).mul_(3).to(dtype)

    def targets(*shape):
        return torch.rand(shape, device=device).to(dtype)

    if bench:
        return [Example("256x4096", (make(256, 4096), targets(256, 4096)), {})]
    weight = (torch.rand(4, 3, device=device) + 0.5).to(dtype)
    pos_weight = (torch.rand(3, device=device) * 3 + 0.2).to(dtype)
    return [Example(r, (make(4, 3), targets(4, 3)), {"reduction": r}) for r in ("mean", "sum", "none")] + [
        Example("pos_weight", (make(4, 3), targets(4, 3)), {"pos_weight": pos_weight}),
        Example(
            "weight,pos_weight,none",
            (make(4, 3), targets(4, 3)),
            {"weight": weight[0], "pos_weight": pos_weight, "reduction": "none"},
        ),
        Example(
            "pos_weight,spatial,sum",
            (make(2, 3, 2, 2), targets(2, 3, 2, 2)),
            {"pos_weight": pos_weight[:, None, None], "reduction": "sum"},
        ),
        Example("hard targets", (make(4, 3), targets(4, 3).round()), {"pos_weight": pos_weight}),
    ]


samples("mse_loss")(_pointwise_examples(*_WEIGHTED))
samples("l1_loss")(_pointwise_examples(*_WEIGHTED))
samples("smooth_l1_loss")(
    _pointwise_examples({"beta": 0.5}, {"beta": 0.0, "reduction": "sum"}, {"beta": 3.0, "reduction": "none"})
)
samples("huber_loss")(
    _pointwise_examples(*_WEIGHTED, {"delta": 0.5}, {"delta": 3.0, "weight": True, "reduction": "sum"})
)


@samples("conv1d")
def _conv1d(dtype, device, bench=False):
    def make(*shape):
        return torch.randn(shape, device=device).to(dtype)

    if bench:
        return [Example("64x16x128->32,k5", (make(64, 16, 128), make(32, 16, 5), make(32)), {})]
    return [
        Example("2x2x6->3,k3", (make(2, 2, 6), make(3, 2, 3), make(3)), {}),
        Example(
            "stride,padding,dilation,nobias", (make(2, 2, 7), make(3, 2, 2)), {"stride": 2, "padding": 1, "dilation": 2}
        ),
        Example("same,groups", (make(1, 2, 5), make(4, 1, 2), make(4)), {"padding": "same", "groups": 2}),
        Example("unbatched", (make(2, 6), make(3, 2, 3), make(3)), {"padding": (1,)}),
    ]


@samples("embedding")
def _embedding(dtype, device, bench=False):
    def make(*shape):
        return torch.randn(shape, device=device).to(dtype)

    if bench:
        return [
            Example("64x128 of 10000x256", (torch.randint(0, 10000, (64, 128), device=device), make(10000, 256)), {})
        ]
    index = torch.tensor([[0, 2, 2], [4, 1, 0]], device=device)
    return [
        Example("2d", (index, make(5, 3)), {}),
        Example("1d", (torch.tensor([1, 3, 3], device=device), make(4, 2)), {}),
        Example("empty", (torch.zeros(0, 3, dtype=torch.long, device=device), make(5, 3)), {}),
    ]


@samples("layer_norm")
def _layer_norm(dtype, device, bench=False):
    def make(*shape):
        return torch.randn(shape, device=device).to(dtype)

    if bench:
        return [Example("64x128x256", (make(64, 128, 256), (256,), make(256), make(256)), {})]
    return [
        Example("2d", (make(4, 5), (5,), make(5), make(5)), {}),
        Example("3d,two dims", (make(2, 3, 5), (3, 5), make(3, 5), make(3, 5)), {"eps": 1e-3}),
        Example("no affine", (make(3, 5), (5,)), {}),
        Example("1d", (make(5), (5,), make(5), make(5)), {}),
        Example("empty", (make(0, 5), (5,), make(5), make(5)), {}),
    ]


@samples("group_norm")
def _group_norm(dtype, device, bench=False):
    def make(*shape):
        return torch.randn(shape, device=device).to(dtype)

    if bench:
        return [Example("64x32x16x16,g8", (make(64, 32, 16, 16), 8, make(32), make(32)), {})]
    return [
        Example("4d,g2", (make(3, 4, 3, 2), 2, make(4), make(4)), {}),
        Example("3d,g1", (make(2, 4, 5), 1, make(4), make(4)), {"eps": 1e-3}),
        Example("3d,g2,no affine", (make(4, 4, 3), 2), {}),
    ]
