"""Tests of ``--model cnn``: the classic MNIST CNN of manualgrad modules, and everything the MLP has
(resume, --compare-native, --check-grads, augmentations, presets, checkpoints) working for it too.

Tiny IDX files written by the tests; the CNN's fully connected layer is narrowed to 16 to keep it fast.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from train_helpers import (
    clipped_sum_one_by_one,
    interrupt_at,
    load_params,
    run,
    run_main,
    tiny_argv,
    tiny_config,
    without_timing,
)

import manualgrad
import manualgrad.functional as MF
import manualgrad.nn as mnn
from train import checkpoint, model
from train.config import MODEL_DEFAULTS, PRESETS, defaults, parse_args
from train.engine import TrainingError
from train.errors import ConfigError


def cnn_config(tiny, out, **changes):
    return tiny_config(tiny, out, **{"model": "cnn", "impl": "layers", "hidden": (16,), "dropout": 0.0, **changes})


def test_the_classic_cnn_of_manualgrad_modules_only():
    torch.manual_seed(0)
    cnn = model.build_cnn((128,), "relu", 0.5, "cpu")
    kinds = [type(m) for m in cnn]
    assert kinds == [
        mnn.Conv2d,
        mnn.ReLU,
        mnn.Conv2d,
        mnn.ReLU,
        mnn.MaxPool2d,
        mnn.Dropout,
        mnn.Flatten,
        mnn.Linear,
        mnn.ReLU,
        mnn.Dropout,
        mnn.Linear,
    ]
    assert [cnn[5].p, cnn[9].p] == [0.25, 0.5]  # pytorch/examples' dropouts
    shapes = {k: tuple(v.shape) for k, v in cnn.state_dict().items()}
    assert shapes == {
        "0.weight": (32, 1, 3, 3),
        "0.bias": (32,),
        "2.weight": (64, 32, 3, 3),
        "2.bias": (64,),
        "7.weight": (128, 9216),
        "7.bias": (128,),
        "10.weight": (10, 128),
        "10.bias": (10,),
    }
    net = model.Net(cnn, "layers", 0.1, image_shape=(1, 28, 28))
    x, y = torch.randn(4, 784), torch.tensor([0, 1, 2, 3])
    assert net.logits(x).shape == (4, 10)
    coverage = manualgrad.manual_coverage(net.loss(x, y))
    assert coverage.complete, coverage
    twin = net.twin()  # plain torch.nn modules, the same weights and outputs
    assert all(type(m).__module__.startswith("torch.nn") for m in twin.module.modules())
    cnn.eval(), twin.module.eval()
    assert torch.allclose(net.logits(x), twin.logits(x), atol=1e-5)


def test_the_small_cnn_of_dp_sgd():
    torch.manual_seed(0)
    cnn = model.build_small_cnn((32,), "tanh", 0.0, "cpu")
    kinds = [type(m) for m in cnn]
    conv = [mnn.Conv2d, mnn.Tanh, mnn.MaxPool2d]
    assert kinds == [*conv, *conv, mnn.Flatten, mnn.Linear, mnn.Tanh, mnn.Linear]
    assert (cnn[0].kernel_size, cnn[0].stride, cnn[0].padding, cnn[2].stride) == ((8, 8), (2, 2), (3, 3), 1)
    assert (cnn[3].kernel_size, cnn[3].stride, cnn[3].padding) == ((4, 4), (2, 2), (0, 0))
    assert [tuple(p.shape) for p in cnn.parameters()] == [(16, 1, 8, 8), (16,), (32, 16, 4, 4), (32,)] + [
        (32, 512),
        (32,),
        (10, 32),
        (10,),
    ]
    assert sum(p.numel() for p in cnn.parameters()) == 26_010  # Papernot et al. 2021's count
    net = model.Net(cnn, "layers", image_shape=(1, 28, 28))
    x, y = torch.randn(5, 784), torch.tensor([0, 1, 2, 3, 4])
    assert net.logits(x).shape == (5, 10)
    assert manualgrad.manual_coverage(net.loss(x, y)).complete
    twin = net.twin()
    assert torch.allclose(net.logits(x), twin.logits(x), atol=1e-5)


def test_the_small_cnn_clips_each_image_under_per_sample():
    """DP-SGD's step on the small CNN: the one backward pass under per_sample gives Σ_n min(1, C/‖g_n‖) g_n,
    against each image's gradient taken alone by torch autograd (the torch.nn twin), in float64."""
    torch.manual_seed(1)
    cnn = model.build_small_cnn((32,), "tanh", 0.0, "cpu").double()
    twin = model.torch_twin(cnn)
    x, y, clip = torch.randn(6, 1, 28, 28, dtype=torch.float64), torch.arange(6) % 10, 0.05
    expected = clipped_sum_one_by_one(twin, x, y, clip)
    with manualgrad.per_sample(cnn, clip=clip, loss_reduction="mean"):
        MF.cross_entropy(cnn(x), y).backward()
    for p, e in zip(cnn.parameters(), expected):
        torch.testing.assert_close(p.grad, e)


def test_dp_presets_train_the_small_cnn():
    for name, epsilon in (("dp3-cnn", 3.0), ("dp2-cnn", 2.0), ("dp1-cnn", 1.0)):
        cfg, _ = parse_args(["--preset", name])
        assert cfg.dp and cfg.epsilon == epsilon and cfg.delta == 1e-5 and cfg.model == "small-cnn"
        assert (cfg.activation, cfg.hidden, cfg.dropout, cfg.impl) == ("tanh", (32,), 0.0, "layers")
        assert cfg.optimizer == "sgd" and cfg.clip == 0.1 and cfg.lr == 0.5 * cfg.batch_size / 512
        assert cfg.channels == (32, 64)  # twice Papernot's: measured better under the same noise (README)
    mlp, _ = parse_args(["--preset", "dp2-mlp"])
    assert mlp.dp and mlp.epsilon == 2.0 and mlp.model == "mlp" and mlp.activation == "tanh"


def test_channels_option(capsys):
    assert parse_args(["--model", "small-cnn"])[0].channels == (16, 32)
    assert parse_args(["--model", "cnn"])[0].channels == (32, 64)
    cfg, given = parse_args(["--model", "small-cnn", "--channels", "8,4"])
    assert cfg.channels == (8, 4) and given == {"model", "channels"}
    shapes = [tuple(p.shape) for p in model.build(cfg, "cpu").module.parameters()]
    assert shapes[:4] == [(8, 1, 8, 8), (8,), (4, 8, 4, 4), (4,)] and shapes[4] == (32, 4 * 4 * 4)
    cnn = model.build(dataclasses.replace(parse_args(["--model", "cnn"])[0], channels=(3, 5)), "cpu")
    assert [tuple(p.shape) for p in cnn.module.parameters()][:3] == [(3, 1, 3, 3), (3,), (5, 3, 3, 3)]
    for bad in ("8", "8,4,2", "0,4", "a,b"):
        with pytest.raises(SystemExit):
            parse_args(["--channels", bad])
        assert "--channels" in capsys.readouterr().err


def test_the_small_cnn_trains_with_dp(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    options = dict(dp=True, epsilon=2.0, accountant="rdp", clip=0.1, optimizer="sgd", lr=0.5, momentum=0.9)
    small = dict(model="small-cnn", channels=(16, 32), impl="layers", hidden=(32,), activation="tanh")
    metrics = run(tiny_config(tiny, out, **small, **options))
    assert "model: small CNN conv16-pool-conv32-pool-32-10, tanh" in capsys.readouterr().out
    assert metrics["config"]["model"] == "small-cnn" and 0 < metrics["privacy"]["spent_epsilon"] <= 2.0
    assert checkpoint.load(str(out))["model"]["0.weight"].shape == (16, 1, 8, 8)


def test_cnn_defaults_and_presets():
    cfg, given = parse_args(["--model", "cnn"])
    assert given == {"model"} and cfg.model == "cnn"
    for key, value in MODEL_DEFAULTS["cnn"].items():
        assert getattr(cfg, key) == value
    mlp, _ = parse_args([])
    assert mlp.model == "mlp" and mlp.hidden == (512, 256) and mlp.impl == "fused"  # the MLP stays the default
    best, _ = parse_args(["--preset", "best"])
    assert best.model == PRESETS["best"]["model"] and best.impl == "layers"
    assert best.epochs == PRESETS["best"]["epochs"] and best.augment == PRESETS["best"]["augment"]
    old, _ = parse_args(["--preset", "best-mlp"])
    assert (old.model, old.hidden, old.epochs, old.augment) == ("mlp", (1024, 1024), 50, "elastic")
    explicit, _ = parse_args(["--model", "cnn", "--epochs", "2", "--hidden", "64,32"])
    assert (explicit.epochs, explicit.hidden) == (2, (64, 32))
    assert defaults(model="cnn") == dataclasses.replace(cfg, preset="default")


def test_the_cnn_has_no_fused_implementation(tiny, tmp_path, capsys):
    status, _, err = run_main(tiny_argv(tiny, tmp_path / "run", "--model", "cnn", "--impl", "fused"), capsys)
    assert status == 2 and "--model cnn has one Function per layer only" in err
    with pytest.raises(ConfigError, match="--impl layers"):
        run(tiny_config(tiny, tmp_path / "run", model="cnn"))  # from Python: impl still the MLP's "fused"
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cnn_learns_and_writes_its_files(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    metrics = run(cnn_config(tiny, out, epochs=6))  # (augmentations: the resume test below)
    printed = capsys.readouterr().out
    assert "model: CNN conv32-conv64-pool-16-10" in printed
    losses = [r["train_loss"] for r in metrics["epochs"]]
    assert losses[-1] < 0.5 * losses[0] and metrics["test_accuracy"] >= 0.8
    assert metrics["model"].startswith("CNN") and metrics["config"]["model"] == "cnn"
    state = checkpoint.load(str(out))
    assert state["model"]["0.weight"].shape == (32, 1, 3, 3) and state["config"]["model"] == "cnn"
    assert (out / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_a_foreign_backward_node_fails_the_run_clearly(tiny, tmp_path, monkeypatch):
    original = model.build_cnn

    def with_torch_flatten(*args):  # torch.nn.Flatten's backward is torch's (a view's), not ours
        return torch.nn.Sequential(*(torch.nn.Flatten() if isinstance(m, mnn.Flatten) else m for m in original(*args)))

    monkeypatch.setattr(model, "build_cnn", with_torch_flatten)
    with pytest.raises(TrainingError, match=r"not all manualgrad's Functions: .*foreign: (?!none)"):
        run(cnn_config(tiny, tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # checked before training: nothing written


@pytest.mark.slow
@pytest.mark.parametrize("where", [(1, 2), (2, 1)], ids=["mid-epoch-1", "mid-epoch-2"])
def test_cnn_resume_gives_identical_results(tiny, tmp_path, where):
    cfg = cnn_config(tiny, tmp_path / "whole", epochs=2, dropout=0.4, augment="elastic")
    whole = run(cfg)
    part = dataclasses.replace(cfg, out=str(tmp_path / "part"))
    assert run(part, on_step=interrupt_at(*where))["interrupted"]
    resumed = run(dataclasses.replace(part, resume=part.out))
    assert without_timing(resumed["epochs"]) == without_timing(whole["epochs"])
    ours, reference = load_params(Path(part.out)), load_params(Path(cfg.out))
    assert all(torch.equal(ours[k], reference[k]) for k in reference)


def test_cnn_compare_native_and_check_grads(tiny, tmp_path, capsys):
    cfg = cnn_config(tiny, tmp_path / "run", epochs=2, dropout=0.5, compare_native=True, check_grads=True)
    metrics = run(cfg)
    printed = capsys.readouterr().out
    assert "check-grads [layers]" in printed and "check-grads [fused]" not in printed and "MISMATCH" not in printed
    assert "Conv2dFunctionBackward x2" in printed and "every backward node is manualgrad's" in printed
    assert "epoch-time ratio" in printed and metrics["native"]["time_ratio"]["mean"] > 0
    for ours, theirs in zip(metrics["epochs"], metrics["native"]["epochs"]):  # same weights, batches, masks
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)
        assert ours["test_loss"] == pytest.approx(theirs["test_loss"], rel=1e-4)


def test_resuming_with_another_model_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    run(tiny_config(tiny, out, epochs=2), on_step=interrupt_at(1, 2))
    before = (out / "checkpoint.pt").read_bytes()
    status, _, err = run_main(["--resume", str(out), "--model", "cnn", "--no-progress"], capsys)
    assert status == 2 and "--model differ from its checkpoint" in err
    with pytest.raises(ConfigError, match="--model"):
        run(cnn_config(tiny, tmp_path / "other", resume=str(out)))
    assert (out / "checkpoint.pt").read_bytes() == before  # the interrupted MLP run is left as it was


def test_a_checkpoint_from_before_the_model_option_resumes_as_the_mlp(tiny, tmp_path):
    """Checkpoints written before --model and --dp existed lack them: they are MLP runs without DP."""
    cfg = tiny_config(tiny, tmp_path / "whole", epochs=2)
    whole = run(cfg)
    part = dataclasses.replace(cfg, out=str(tmp_path / "part"))
    run(part, on_step=interrupt_at(1, 2))
    state = checkpoint.load(part.out)
    for key in ("model", "dp", "epsilon", "delta", "clip", "accountant", "secure_rng"):
        del state["config"][key]
    checkpoint.save(state, str(Path(part.out) / "checkpoint.pt"))
    resumed = run(dataclasses.replace(part, resume=part.out))
    assert resumed["config"]["model"] == "mlp" and not resumed["config"]["dp"]
    assert without_timing(resumed["epochs"]) == without_timing(whole["epochs"])


def test_check_grads_reports_a_nan_difference_as_the_worst(monkeypatch):
    """--check-grads' comparison: one parameter whose gradient differs by NaN fails the check, whatever the
    others (NaN > x is false, so a plain maximum would skip it and pass)."""
    torch.manual_seed(0)
    net = model.Net(model.build_small_cnn((8,), "tanh", 0.0, "cpu", channels=(4, 4)), "layers", image_shape=(1, 28, 28))
    x, y = torch.randn(3, 784), torch.tensor([0, 1, 2])
    worst, _, _, _ = model.compare_gradients(net, x, y)
    assert 0 <= worst < 1e-4  # our gradients are torch's
    grad = torch.autograd.grad

    def nan_in_the_last(loss, params):  # the twin's (torch's) last gradient poisoned with a NaN
        grads = list(grad(loss, params))
        if loss.grad_fn is not None and "CrossEntropyFunction" not in type(loss.grad_fn).__name__:
            grads[-1] = grads[-1].clone().fill_(float("nan"))
        return tuple(grads)

    monkeypatch.setattr(torch.autograd, "grad", nan_in_the_last)
    worst, name, _, _ = model.compare_gradients(net, x, y)
    assert math.isnan(worst) and name == "9.bias"  # the last Linear's bias
