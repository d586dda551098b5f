"""The benchmark suites: every Function alone, whole MLP training steps, and saved memory.

Each suite returns rows of plain dicts (JSON-ready). Times are medians of
interleaved runs (``timing.interleaved``); ``ratio`` is ours / native, so
below 1 is better.
"""

from __future__ import annotations

import torch

import manualgrad
import manualgrad.functional as MF
import manualgrad.nn as mnn
from manualgrad import testing
from manualgrad.registry import OPS, ops

from .memory import peak_cuda_bytes, saved_bytes
from .timing import interleaved


def _fwd_bwd(fn, inputs, grad_output):
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def run():
        return torch.autograd.grad(fn(*inputs), leaves, grad_output)

    return run


def _torch_activation(name: str) -> type[torch.nn.Module]:
    return OPS[name].module


def functions(device: str, quick: bool = False, rounds: int = 30) -> list[dict]:
    """Forward + backward of every registered operation alone, on its benchmark examples, against torch's."""
    rows = []
    for op in ops():
        examples = testing.examples(op, torch.float32, device, bench=not quick)
        for example in examples[:1] if quick else examples:
            inputs = [
                a.detach().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a
                for a in example.args
            ]
            out = op.reference(*inputs, **example.kwargs)
            grad_output = torch.randn_like(out)
            contenders = {
                "ours": _fwd_bwd(lambda *a, op=op, kw=example.kwargs: op.functional(*a, **kw), inputs, grad_output),
                "native": _fwd_bwd(lambda *a, op=op, kw=example.kwargs: op.reference(*a, **kw), inputs, grad_output),
            }
            if op.kind == "activation":  # a copy of the input's size, timed alongside: the measured bandwidth
                source, target = inputs[0].detach().clone(), torch.empty_like(inputs[0])
                contenders["copy"] = lambda s=source, t=target: t.copy_(s)
            if op.kind == "activation" or getattr(op.function, "compiles_well", False):  # manualgrad.fused_backward
                contenders["fused"] = _fused(contenders["ours"])
            t = interleaved(contenders, device=device, rounds=2 if quick else rounds)
            row = {
                "function": op.name,
                "shape": example.id,
                "ours_us": t["ours"] * 1e6,
                "native_us": t["native"] * 1e6,
                "ratio": t["ours"] / t["native"],
            }
            if "copy" in t:
                row["one_pass_us"] = ONE_PASS_COPIES * t["copy"] * 1e6
                row["ours_over_one_pass"] = row["ours_us"] / row["one_pass_us"]
            if "fused" in t:
                row["fused_us"] = t["fused"] * 1e6
                row["fused_ratio"] = t["fused"] / t["native"]
            rows.append(row)
    return rows


def _fused(run):
    """``run`` under ``manualgrad.fused_backward()``, compiled before the timing starts."""

    def fused():
        with manualgrad.fused_backward():
            return run()

    fused()
    return fused


#: An elementwise activation's forward + backward at the physical limit moves 5 arrays of the input's size (forward:
#: read Z, write Y; backward: read G_Y and the saved Y or Z, write G_Z), 2.5 times what a copy moves (read, write):
#: the limit is bytes moved / measured bandwidth = 2.5 copies of the input, timed in the same interleaved run.
ONE_PASS_COPIES = 2.5


def _mlp_variants(sizes, batch, device, dtype, activation="relu"):
    """The four ways to run one training step of the same MLP, from the same weights."""
    torch.manual_seed(0)
    fused = mnn.MLP(sizes, activation=activation).to(device)
    per_layer = fused.per_layer()
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(_torch_activation(activation)())
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


class _Negate(manualgrad.functions.ManualFunction):
    """-x, forward and backward one torch kernel each: what an autograd Function written in Python costs beyond
    the kernels it runs (:func:`step_gap`)."""

    @staticmethod
    def forward(x):
        return torch.neg(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad_output):
        return -grad_output


class _MinimalLinear(manualgrad.functions.ManualFunction):
    """Linear's formula alone (:func:`step_gap`): no checks, no per-sample recording, autocast or jvp."""

    @staticmethod
    def forward(x, weight, bias):
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return grad.mm(weight) if ctx.needs_input_grad[0] else None, grad.t().mm(x), grad.sum(0)


class _MinimalReLU(manualgrad.functions.ManualFunction):
    """ReLU's formula alone, G_Y ⊙ 1[Y ≠ 0] as ours computes it (:func:`step_gap`)."""

    @staticmethod
    def forward(z):
        return torch.relu(z)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return torch.ne(y, 0, out=torch.empty_like(y)).mul_(grad)


class _MinimalCrossEntropy(manualgrad.functions.ManualFunction):
    """Mean cross-entropy's formula alone, (softmax(Z) − onehot(t)) g / N (:func:`step_gap`)."""

    @staticmethod
    def forward(logits, target):
        return torch.nn.functional.cross_entropy(logits, target)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        logits, target = ctx.saved_tensors
        p = torch.softmax(logits, 1)
        p.scatter_add_(1, target.unsqueeze(1), p.new_full((), -1.0).expand(len(target), 1))
        return p.mul_(grad / len(target)), None


class _MinimalMLPLoss(manualgrad.functions.ManualFunction):
    """``apply(x, t, W1, b1, ..., WL, bL)``: the fused ReLU MLP with its mean cross-entropy as its formulas alone
    (:func:`step_gap`): G_Z = (softmax(Z) − onehot(t)) / N formed in the forward, then per layer G_W = G^T A,
    G_b = Σ_rows G, G ← (G W) ⊙ 1[A ≠ 0]."""

    @staticmethod
    def forward(x, target, *params):
        a, kept = x, [x.view_as(x)]
        for weight, bias in zip(params[:-2:2], params[1:-2:2]):
            a = torch.relu(torch.nn.functional.linear(a, weight, bias))
            kept.append(a)
        logp = torch.log_softmax(torch.nn.functional.linear(a, params[-2], params[-1]), 1)
        grad = logp.exp().scatter_add_(1, target.unsqueeze(1), logp.new_full((), -1.0).expand(len(target), 1))
        return torch.nn.functional.nll_loss(logp, target), grad.div_(len(target)), *kept

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, *saved = output
        ctx.mark_non_differentiable(*saved)
        ctx.save_for_backward(*saved, *inputs[2::2])

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grad, *rest = ctx.saved_tensors
        kept, weights = rest[: len(rest) // 2], rest[len(rest) // 2 :]
        grad, grads = grad * grad_loss, []
        for layer in range(len(weights) - 1, -1, -1):
            a = kept[layer]
            grads = [grad.t().mm(a), grad.sum(0), *grads]
            if layer:
                grad = grad.mm(weights[layer]).mul_(torch.ne(a, 0, out=torch.empty_like(a)))
        return None, None, *grads


class _Minimal:
    """The modules of :func:`step_gap`'s step of formula-only Functions; the loss keeps our class-index check."""

    class Linear(torch.nn.Linear):
        def forward(self, x):
            return _MinimalLinear.apply(x, self.weight, self.bias)

    class ReLU(torch.nn.Module):
        def forward(self, z):
            return _MinimalReLU.apply(z)

    class CrossEntropyLoss(torch.nn.Module):
        def forward(self, logits, target):
            manualgrad._checks.class_indices("cross_entropy", logits, target, logits.shape[1])
            return _MinimalCrossEntropy.apply(logits, target)


def _per_layer_mlp(sizes, linear, activation, device):
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers += [linear(a, b)] + ([activation()] if i < len(sizes) - 2 else [])
    return torch.nn.Sequential(*layers).to(device)


def step_gap(device: str, quick: bool = False, rounds: int = 30) -> list[dict]:
    """Where a per-layer MLP step's extra time goes: the step with each kind of our modules swapped for torch.nn's
    (its share of the gap: ours minus that step), and the Function floor: a Function whose forward and backward are
    one torch kernel each (``-x``) against ``torch.neg`` under autograd, on the hidden layers' size, times the
    step's Functions (each layer, each activation, the loss); and the step with Functions that are their formula
    alone (``_Minimal``: no options, checks but the loss's class indices, per-sample, autocast or jvp), per layer
    and as the fused MLP with its loss (``MLP.loss`` beside it). CPU, float32."""
    if device != "cpu":
        return []
    cases = [((6, 5, 3), 4)] if quick else [((784, 512, 256, 10), 128), ((64, 64, 64, 10), 64)]
    return [_step_gap(sizes, batch, device, 2 if quick else rounds) for sizes, batch in cases]


def _step_gap(sizes, batch, device, rounds) -> dict:
    torch.manual_seed(0)
    x, y = torch.randn(batch, sizes[0]), torch.randint(0, sizes[-1], (batch,))
    kinds = ("Linear", "ReLU", "CrossEntropyLoss")
    modules = {"native": (torch.nn,) * 3, "ours": (mnn,) * 3}
    modules |= {f"torch.nn {k}": tuple(torch.nn if i == j else mnn for j in range(3)) for i, k in enumerate(kinds)}
    modules["minimal"] = (_Minimal,) * 3

    def step(lin, act, loss):
        model, criterion = _per_layer_mlp(sizes, lin.Linear, act.ReLU, device), loss.CrossEntropyLoss()

        def run():
            model.zero_grad(set_to_none=True)
            criterion(model(x), y).backward()

        return run

    steps = {name: step(*nns) for name, nns in modules.items()}
    fused = mnn.MLP(sizes)
    params = list(fused.parameters())

    def fused_step(minimal: bool):
        def run():
            fused.zero_grad(set_to_none=True)
            if minimal:  # with the class-index check ours makes
                manualgrad._checks.class_indices("MLP.loss", x, y, sizes[-1])
            (_MinimalMLPLoss.apply(x, y, *params)[0] if minimal else fused.loss(x, y)).backward()

        return run

    steps |= {"fused": fused_step(False), "minimal fused": fused_step(True)}
    hidden, grad = torch.randn(batch, sizes[1], requires_grad=True), torch.randn(batch, sizes[1])
    steps["torch.neg"] = lambda: torch.neg(hidden).backward(grad)
    steps["Function -x"] = lambda: _Negate.apply(hidden).backward(grad)
    t = interleaved(steps, device=device, rounds=rounds)
    functions = 2 * (len(sizes) - 1)  # the Linear layers, the activations between them, the loss
    row = {"sizes": "-".join(map(str, sizes)), "batch": batch, "native_us": t["native"] * 1e6}
    row |= {"ours_us": t["ours"] * 1e6, "gap_us": (t["ours"] - t["native"]) * 1e6, "functions": functions}
    row |= {f"{kind}_us": (t["ours"] - t[f"torch.nn {kind}"]) * 1e6 for kind in kinds}
    row["floor_us"] = functions * (t["Function -x"] - t["torch.neg"]) * 1e6
    row |= {"minimal_us": t["minimal"] * 1e6, "minimal_ratio": t["minimal"] / t["native"]}
    row |= {"fused_ratio": t["fused"] / t["native"], "minimal_fused_ratio": t["minimal fused"] / t["native"]}
    return row


def step_profile(device: str, quick: bool = False, rounds: int = 30) -> list[dict]:
    """Where a step's time goes: its wall time (interleaved), and under ``torch.profiler`` the time inside
    PyTorch's operators (the self time of every ``aten::`` op: the kernels and their dispatch) against the rest
    (wall time less that: Python, autograd's engine, the Functions' machinery). Per MLP: torch.nn, ours per layer
    and the fused MLP+loss; and cross_entropy / nll_loss on 256 x 10 logits. CPU, float32."""
    if device != "cpu":
        return []
    cases = [((6, 5, 3), 4)] if quick else [((784, 512, 256, 10), 128), ((64, 64, 64, 10), 64)]
    rounds, rows = 2 if quick else rounds, []
    for sizes, batch in cases:
        variants, _, _ = _mlp_variants(sizes, batch, device, None)
        steps = {
            "torch.nn": variants["native"],
            "per-layer": variants["layers"],
            "fused MLP+loss": variants["mlp.loss"],
        }
        rows += _profiled("MLP " + "-".join(map(str, sizes)), batch, steps, rounds)
    torch.manual_seed(0)
    n = 4 if quick else 256
    logits, target = torch.randn(n, 10, requires_grad=True), torch.randint(0, 10, (n,))

    def loss_step(loss):
        def run():
            logits.grad = None
            loss(logits, target).backward()

        return run

    for name in ("cross_entropy", "nll_loss"):
        steps = {"torch.nn": loss_step(getattr(torch.nn.functional, name)), "ours": loss_step(getattr(MF, name))}
        rows += _profiled(f"{name} {n}x10", n, steps, rounds)
    return rows


def _profiled(step: str, batch: int, steps: dict, rounds: int, calls: int = 20, repeats: int = 3) -> list[dict]:
    """Rows for :func:`step_profile`: the first of ``steps`` is the native one."""
    wall = interleaved(steps, rounds=rounds)
    inside = {name: [] for name in steps}
    for _ in range(repeats):  # alternating, the median of each step's repeats
        for name, run in steps.items():
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
                for _ in range(calls):
                    run()
            aten = [e for e in p.key_averages() if e.key.startswith("aten::")]
            inside[name].append((sum(e.self_cpu_time_total for e in aten) / calls, sum(e.count for e in aten) / calls))
    native = next(iter(steps))
    rows = []
    for name in steps:
        ops_us, count = sorted(inside[name])[repeats // 2]  # µs per step, aten calls per step
        row = {"step": step, "batch": batch, "variant": name, "wall_us": wall[name] * 1e6, "ops_us": ops_us}
        row["ops"] = round(count)
        row |= {"rest_us": wall[name] * 1e6 - ops_us, "ratio": wall[name] / wall[native]}
        rows.append(row)
    return rows


def mnist_cnn(nn) -> torch.nn.Sequential:
    """The classic MNIST CNN (PyTorch's examples/mnist), built from ``nn``: ``torch.nn`` or ``manualgrad.nn``."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout(0.25),
        nn.Flatten(),
        nn.Linear(9216, 128),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(128, 10),
        nn.LogSoftmax(dim=1),
    )


def cnn_steps(device: str, quick: bool = False, rounds: int = 15) -> list[dict]:
    """A training step (forward, nll_loss, backward; gradients set to None first) of the MNIST CNN, batch 64."""
    batch = 2 if quick else 64
    torch.manual_seed(0)
    ours = mnist_cnn(mnn).to(device)
    native = mnist_cnn(torch.nn).to(device)
    native.load_state_dict(ours.state_dict())
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step(model, nll):
        def run():
            model.zero_grad(set_to_none=True)
            nll(model(x), y).backward()

        return run

    t = interleaved(
        {"native": step(native, torch.nn.functional.nll_loss), "ours": step(ours, MF.nll_loss)},
        device=device,
        rounds=2 if quick else rounds,
    )
    return [
        {
            "model": "MNIST CNN",
            "batch": batch,
            "native_us": t["native"] * 1e6,
            "ours_us": t["ours"] * 1e6,
            "ratio": t["ours"] / t["native"],
        }
    ]


def saved_memory(device: str, quick: bool = False) -> list[dict]:
    """Bytes saved for backward by Linear -> activation -> Linear, ours against torch.nn, per activation kind;
    plus the whole MLP per layer and fused."""
    n, width = (256, 512) if not quick else (4, 6)
    rows = []
    for op in ops("activation"):
        name = op.name
        x = torch.randn(n, width, device=device)
        counts = {}
        for label, (lin, act) in {
            "ours": (mnn.Linear, mnn.ACTIVATIONS[name]),
            "native": (torch.nn.Linear, op.module),
        }.items():
            torch.manual_seed(0)
            model = torch.nn.Sequential(lin(width, width), act(), lin(width, 10)).to(device)
            counts[label] = saved_bytes(lambda m=model, x=x: m(x), list(model.parameters()) + [x])
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
            "native_bytes": saved_bytes(lambda m=native, x=x: m(x), list(native.parameters()) + [x]),
            "layers_bytes": saved_bytes(lambda m=fused, x=x: m.per_layer()(x), base),
            "ours_bytes": saved_bytes(lambda m=fused, x=x: m(x), base),
        }
        row["ratio"] = row["ours_bytes"] / row["native_bytes"]
        row["layers_ratio"] = row["layers_bytes"] / row["native_bytes"]
        if device.startswith("cuda"):
            y = torch.randint(0, sizes[-1], (x.shape[0],), device=device)
            row["native_peak_bytes"] = peak_cuda_bytes(
                lambda m=native, x=x, y=y: torch.nn.functional.cross_entropy(m(x), y).backward()
            )
            row["ours_peak_bytes"] = peak_cuda_bytes(lambda m=fused, x=x, y=y: m.loss(x, y).backward())
        rows.append(row)
    return rows
