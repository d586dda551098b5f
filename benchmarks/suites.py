"""The benchmark suites: every Function alone, whole MLP training steps, and saved memory.

Each suite returns rows of plain dicts (JSON-ready). Times are medians of
interleaved runs (``timing.interleaved``); ``ratio`` is ours / native, so
below 1 is better.
"""

from __future__ import annotations

import torch

import manualgrad.functional as MF
import manualgrad.nn as mnn

from .memory import peak_cuda_bytes, saved_bytes
from .timing import interleaved

ACTIVATION_CASES = {  # name -> (ours, torch's, kwargs)
    "relu": (MF.relu, torch.nn.functional.relu, {}),
    "leaky_relu": (MF.leaky_relu, torch.nn.functional.leaky_relu, {}),
    "sigmoid": (MF.sigmoid, torch.sigmoid, {}),
    "tanh": (MF.tanh, torch.tanh, {}),
    "gelu": (MF.gelu, torch.nn.functional.gelu, {}),
    "gelu_tanh": (MF.gelu, torch.nn.functional.gelu, {"approximate": "tanh"}),
    "silu": (MF.silu, torch.nn.functional.silu, {}),
    "elu": (MF.elu, torch.nn.functional.elu, {}),
    "softplus": (MF.softplus, torch.nn.functional.softplus, {}),
}

TORCH_MODULES = {
    "relu": torch.nn.ReLU,
    "leaky_relu": torch.nn.LeakyReLU,
    "sigmoid": torch.nn.Sigmoid,
    "tanh": torch.nn.Tanh,
    "gelu": torch.nn.GELU,
    "silu": torch.nn.SiLU,
    "elu": torch.nn.ELU,
    "softplus": torch.nn.Softplus,
}


def _fwd_bwd(fn, inputs, grad_output):
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def run():
        return torch.autograd.grad(fn(*inputs), leaves, grad_output)

    return run


def functions(device: str, quick: bool = False, rounds: int = 30) -> list[dict]:
    """Forward + backward of each Function alone against its torch counterpart."""
    rows = []
    linear_shapes = [(64, 64, 64), (128, 784, 512), (256, 1024, 1024)]
    if device.startswith("cuda"):
        linear_shapes += [(4096, 4096, 4096)]
    elements = (256, 4096) if not device.startswith("cuda") else (4096, 8192)
    if quick:
        linear_shapes, elements, rounds = [(4, 3, 2)], (4, 8), 2

    def add(name, shape, ours, theirs, inputs, grad_output):
        t = interleaved(
            {"ours": _fwd_bwd(ours, inputs, grad_output), "native": _fwd_bwd(theirs, inputs, grad_output)},
            device=device,
            rounds=rounds,
        )
        rows.append(
            {
                "function": name,
                "shape": shape,
                "ours_us": t["ours"] * 1e6,
                "native_us": t["native"] * 1e6,
                "ratio": t["ours"] / t["native"],
            }
        )

    for n, q, p in linear_shapes:
        x = torch.randn(n, q, device=device, requires_grad=True)
        w = torch.randn(p, q, device=device, requires_grad=True)
        b = torch.randn(p, device=device, requires_grad=True)
        add(
            "linear",
            f"{n}x{q} -> {p}",
            MF.linear,
            torch.nn.functional.linear,
            (x, w, b),
            torch.randn(n, p, device=device),
        )
    z = torch.randn(*elements, device=device, requires_grad=True)
    g = torch.randn(*elements, device=device)
    for name, (ours, theirs, kwargs) in ACTIVATION_CASES.items():
        add(
            name,
            "x".join(map(str, elements)),
            lambda t, f=ours, k=kwargs: f(t, **k),
            lambda t, f=theirs, k=kwargs: f(t, **k),
            (z,),
            g,
        )
    rows_ce = [(elements[0], 10), (elements[0], 1000)] if not quick else [(4, 3)]
    for n, c in rows_ce:
        logits = torch.randn(n, c, device=device, requires_grad=True)
        target = torch.randint(0, c, (n,), device=device)
        one = torch.tensor(1.0, device=device)
        add(
            "cross_entropy",
            f"{n}x{c}",
            lambda t: MF.cross_entropy(t, target),
            lambda t: torch.nn.functional.cross_entropy(t, target),
            (logits,),
            one,
        )
    y = torch.randn(*elements, device=device)
    add(
        "mse_loss",
        "x".join(map(str, elements)),
        lambda t: MF.mse_loss(t, y),
        lambda t: torch.nn.functional.mse_loss(t, y),
        (z,),
        torch.tensor(1.0, device=device),
    )
    return rows


def _mlp_variants(sizes, batch, device, dtype, activation="relu"):
    """The four ways to run one training step of the same MLP, from the same weights."""
    torch.manual_seed(0)
    fused = mnn.MLP(sizes, activation=activation).to(device)
    per_layer = fused.per_layer()
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(TORCH_MODULES[activation]())
    native = torch.nn.Sequential(*layers).to(device)
    native.load_state_dict(fused.state_dict())
    x = torch.randn(batch, sizes[0], device=device)
    y = torch.randint(0, sizes[-1], (batch,), device=device)

    def step(model, loss_fn):
        def run():
            model.zero_grad(set_to_none=True)
            with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
                loss = loss_fn(model, x, y)
            loss.backward()

        return run

    variants = {
        "native": step(native, lambda m, x, y: torch.nn.functional.cross_entropy(m(x), y)),
        "layers": step(per_layer, lambda m, x, y: MF.cross_entropy(m(x), y)),
        "mlp": step(fused, lambda m, x, y: MF.cross_entropy(m(x), y)),
        "mlp.loss": step(fused, lambda m, x, y: m.loss(x, y)),
    }
    return variants, native, x


def _gemm_floor(sizes, batch, device, dtype, rounds):
    """The step's matrix products alone: per layer the forward product, G_W, and G_X (not for the input)."""
    dtype = dtype or torch.float32
    mats = []
    for a, b in zip(sizes, sizes[1:]):
        mats.append(
            (
                torch.randn(batch, a, device=device, dtype=dtype),
                torch.randn(b, a, device=device, dtype=dtype),
                torch.randn(batch, b, device=device, dtype=dtype),
            )
        )

    def run():
        for i, (x, w, g) in enumerate(mats):
            x.mm(w.t())
            g.t().mm(x)
            if i:
                g.mm(w)

    return interleaved({"gemm": run}, device=device, rounds=rounds)["gemm"]


MLP_CASES_CPU = [
    ((784, 512, 256, 10), 128),
    ((784, 1024, 1024, 10), 256),
    ((64, 64, 64, 10), 64),
    ((2048, 2048, 2048, 10), 512),
]
MLP_CASES_CUDA = [
    ((784, 512, 256, 10), 4096),
    ((784, 1024, 1024, 10), 4096),
    ((64, 64, 64, 10), 4096),
    ((4096, 4096, 4096, 10), 4096),
]


def mlp_steps(device: str, quick: bool = False, rounds: int = 30, dtype=None) -> list[dict]:
    """A full training step (forward, loss, backward; gradients set to None first) of each MLP."""
    cases = MLP_CASES_CUDA if device.startswith("cuda") else MLP_CASES_CPU
    if quick:
        cases, rounds = [((6, 5, 3), 4)], 2
    rows = []
    for sizes, batch in cases:
        variants, _, _ = _mlp_variants(sizes, batch, device, dtype)
        case_rounds = rounds if sizes[1] < 2048 else max(3, rounds // 5)
        t = interleaved(variants, device=device, rounds=case_rounds)
        floor = _gemm_floor(sizes, batch, device, dtype, case_rounds)
        row = {
            "sizes": "-".join(map(str, sizes)),
            "batch": batch,
            "dtype": str(dtype or "float32").replace("torch.", ""),
            "gemm_us": floor * 1e6,
        }
        for name, seconds in t.items():
            row[f"{name}_us"] = seconds * 1e6
            row[f"{name}_over_gemm"] = seconds / floor
            if name != "native":
                row[f"{name}_ratio"] = seconds / t["native"]
        rows.append(row)
    return rows


def saved_memory(device: str, quick: bool = False) -> list[dict]:
    """Bytes saved for backward by Linear -> activation -> Linear, ours against torch.nn, per activation kind;
    plus the whole MLP per layer and fused."""
    n, width = (256, 512) if not quick else (4, 6)
    rows = []
    for name in TORCH_MODULES:
        x = torch.randn(n, width, device=device)
        counts = {}
        for label, (lin, act) in {
            "ours": (mnn.Linear, mnn.ACTIVATIONS[name]),
            "native": (torch.nn.Linear, TORCH_MODULES[name]),
        }.items():
            torch.manual_seed(0)
            model = torch.nn.Sequential(lin(width, width), act(), lin(width, 10)).to(device)
            counts[label] = saved_bytes(lambda: model(x), list(model.parameters()) + [x])
        rows.append(
            {
                "kind": name,
                "ours_bytes": counts["ours"],
                "native_bytes": counts["native"],
                "ratio": counts["ours"] / counts["native"],
            }
        )
    sizes = (784, 512, 256, 10) if not quick else (6, 5, 3)
    for dropout in (0.0, 0.2):
        torch.manual_seed(0)
        fused = mnn.MLP(sizes, dropout=dropout).to(device)
        layers = []
        for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
            layers.append(torch.nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers += [torch.nn.ReLU()] + ([torch.nn.Dropout(dropout)] if dropout else [])
        native = torch.nn.Sequential(*layers).to(device)
        x = torch.randn(128 if not quick else 4, sizes[0], device=device)
        base = list(fused.parameters()) + [x]
        row = {
            "kind": f"mlp {'-'.join(map(str, sizes))} dropout {dropout}",
            "native_bytes": saved_bytes(lambda: native(x), list(native.parameters()) + [x]),
            "layers_bytes": saved_bytes(lambda: fused.per_layer()(x), base),
            "ours_bytes": saved_bytes(lambda: fused(x), base),
        }
        row["ratio"] = row["ours_bytes"] / row["native_bytes"]
        row["layers_ratio"] = row["layers_bytes"] / row["native_bytes"]
        if device.startswith("cuda"):
            y = torch.randint(0, sizes[-1], (x.shape[0],), device=device)
            row["native_peak_bytes"] = peak_cuda_bytes(
                lambda: torch.nn.functional.cross_entropy(native(x), y).backward()
            )
            row["ours_peak_bytes"] = peak_cuda_bytes(lambda: fused.loss(x, y).backward())
        rows.append(row)
    return rows
