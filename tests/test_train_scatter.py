"""``--model scatter-cnn``: ScatterNet features (train/scatter.py, kymatio) and Tramer & Boneh's CNN on them,
which the DP presets train."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
from train_helpers import clipped_sum_one_by_one, run, tiny_config

import manualgrad
import manualgrad.functional as MF
import manualgrad.nn as mnn
from train import checkpoint, data, model, scatter
from train.config import check, parse_args
from train.errors import ConfigError

pytest.importorskip("kymatio", reason="kymatio is in the train extra (pip install -e '.[train]')")


def images(n: int, seed: int = 0) -> torch.Tensor:
    """Normalised pixel rows (n, 784) of random digit-like images."""
    g = torch.Generator().manual_seed(seed)
    return data.normalise(torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8))


def test_features_are_the_scattering_of_each_image_alone():
    """81 channels of 7x7 per image, the same whether an image is transformed alone or among others (so the
    features of one training example depend on that example only, as DP needs) and in chunks of any size."""
    x = images(7)
    transform = scatter.scattering("cpu")
    all_at_once = scatter.features(x, transform)
    assert all_at_once.shape == (7, 81 * 7 * 7) and all_at_once.dtype == torch.float32
    assert torch.isfinite(all_at_once).all()
    alone = torch.cat([scatter.features(x[i : i + 1], transform) for i in range(7)])
    torch.testing.assert_close(all_at_once, alone)
    torch.testing.assert_close(scatter.features(x, transform, chunk=3), all_at_once)
    # channel 0 is the image's local average (a low-pass filter): of a constant image, a constant
    flat = scatter.features(torch.full((1, 784), 0.5), transform).reshape(81, 7, 7)
    assert torch.allclose(flat[0], flat[0, 3, 3].expand(7, 7), rtol=1e-3) and flat[1:].abs().max() < 1e-3
    assert scatter.features(x[:0], transform).shape == (0, 81 * 7 * 7)


def test_the_scatter_cnn():
    torch.manual_seed(0)
    cnn = model.build_scatter_cnn((32,), "tanh", 0.0, "cpu")
    kinds = [type(m) for m in cnn]
    assert kinds == [
        mnn.GroupNorm,
        mnn.Conv2d,
        mnn.Tanh,
        mnn.Conv2d,
        mnn.Tanh,
        mnn.Flatten,
        mnn.Linear,
        mnn.Tanh,
        mnn.Linear,
    ]
    assert (cnn[0].num_groups, cnn[0].num_channels, cnn[0].affine) == (27, 81, False)
    assert [tuple(p.shape) for p in cnn.parameters()] == [
        (16, 81, 3, 3),
        (16,),
        (32, 16, 3, 3),
        (32,),
        (32, 512),
        (32,),
        (10, 32),
        (10,),
    ]
    net = model.Net(cnn, "layers", image_shape=scatter.SHAPE)
    x, y = torch.randn(5, 81 * 49), torch.tensor([0, 1, 2, 3, 4])
    assert net.logits(x).shape == (5, 10)
    assert manualgrad.manual_coverage(net.loss(x, y)).complete
    torch.testing.assert_close(net.logits(x), net.twin().logits(x))


def test_the_scatter_cnn_clips_each_example_under_per_sample():
    """The GroupNorm (no parameters) normalises each example by itself: per_sample's clipped sum equals each
    example's gradient taken alone by torch autograd, clipped and summed, in float64."""
    torch.manual_seed(1)
    cnn = model.build_scatter_cnn((32,), "tanh", 0.0, "cpu").double()
    twin = model.torch_twin(cnn)
    x, y, clip = torch.randn(6, *scatter.SHAPE, dtype=torch.float64), torch.arange(6) % 10, 0.05
    expected = clipped_sum_one_by_one(twin, x, y, clip)
    with manualgrad.per_sample(cnn, clip=clip, loss_reduction="mean"):
        MF.cross_entropy(cnn(x), y).backward()
    for p, e in zip(cnn.parameters(), expected):
        torch.testing.assert_close(p.grad, e)


def test_scatter_cnn_options(capsys):
    cfg, given = parse_args(["--model", "scatter-cnn"])
    assert given == {"model"} and (cfg.channels, cfg.hidden, cfg.activation, cfg.impl) == (
        (16, 32),
        (32,),
        "tanh",
        "layers",
    )
    assert cfg.augment == "none"
    shapes = [
        tuple(p.shape)
        for p in model.build(parse_args(["--model", "scatter-cnn", "--channels", "8,4"])[0], "cpu").module.parameters()
    ]
    assert shapes[:4] == [(8, 81, 3, 3), (8,), (4, 8, 3, 3), (4,)] and shapes[4] == (32, 4 * 16)
    with pytest.raises(SystemExit) as exit:  # a usage error
        parse_args(["--model", "scatter-cnn", "--augment", "shift"])
    assert exit.value.code == 2
    assert "--model scatter-cnn: --augment none (it trains on fixed features), not shift" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--model scatter-cnn: --augment none .*, not elastic"):
        check(dataclasses.replace(cfg, augment="elastic"))


def test_without_kymatio_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "kymatio.scattering2d.frontend.torch_frontend", None)  # import fails
    with pytest.raises(ConfigError, match=r"--model scatter-cnn needs kymatio .*pip install -e '\.\[train\]'"):
        scatter.scattering("cpu")


def test_the_scatter_cnn_trains_with_dp(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    options = dict(dp=True, epsilon=2.0, accountant="rdp", clip=0.1, optimizer="sgd", lr=0.5, momentum=0.9)
    shape = dict(model="scatter-cnn", channels=(16, 32), impl="layers", hidden=(32,), activation="tanh")
    metrics = run(tiny_config(tiny, out, **shape, **options))
    log = capsys.readouterr().out
    assert "features: the images' scattering transform, 81x7x7 each" in log
    assert "model: ScatterNet + CNN groupnorm-conv16-conv32-32-10, tanh" in log
    assert metrics["config"]["model"] == "scatter-cnn" and 0 < metrics["privacy"]["spent_epsilon"] <= 2.0
    assert 0 <= metrics["epochs"][-1]["test_accuracy"] <= 1
    assert checkpoint.load(str(out))["model"]["1.weight"].shape == (16, 81, 3, 3)


def test_dp_presets_train_the_scatter_cnn():
    for name, epsilon, batch, epochs in (("dp3", 3.0, 1024, 40), ("dp2", 2.0, 1024, 40), ("dp1", 1.0, 4096, 30)):
        cfg, _ = parse_args(["--preset", name])
        assert cfg.dp and cfg.epsilon == epsilon and cfg.delta == 1e-5 and cfg.model == "scatter-cnn"
        assert (cfg.channels, cfg.hidden, cfg.activation, cfg.augment) == ((32, 64), (32,), "tanh", "none")
        assert (cfg.batch_size, cfg.epochs, cfg.optimizer, cfg.momentum, cfg.clip) == (batch, epochs, "sgd", 0.9, 0.1)
        assert cfg.lr == batch / 1024 and cfg.schedule == "none" and cfg.weight_decay == 0.0
