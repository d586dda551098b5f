"""Tests of the training program's data: the IDX reader, its messages, the data's fingerprint, and
the batch augmentations."""

from __future__ import annotations

import os

import pytest
import torch
from train_helpers import make_mnist, run_cli, run_main, tiny_argv, tiny_images, write_idx

from train import augment, data


def test_reads_gzipped_files_and_plain_folder(tmp_path):
    folder = make_mnist(tmp_path / "gz", n_train=20, n_test=10, gz=True)
    mnist = data.load(str(folder), torch.device("cpu"), download=False)
    assert mnist.train_x.shape == (20, 784) and mnist.test_y.shape == (10,)
    images, labels = tiny_images(20, 0)
    assert torch.equal(mnist.train_y, labels)
    assert torch.allclose(mnist.train_x, data.normalise(images))
    # the four files directly in --data-dir work too
    flat = make_mnist(tmp_path / "flat", n_train=20, n_test=10) / "MNIST" / "raw"
    assert data.locate(str(flat), download=False) == str(flat)


def test_fingerprint_is_of_the_contents(tmp_path):
    plain = data.load(str(make_mnist(tmp_path / "a", n_train=20, n_test=10)), torch.device("cpu"), download=False)
    gz = data.load(str(make_mnist(tmp_path / "b", n_train=20, n_test=10, gz=True)), torch.device("cpu"), False)
    other = data.load(str(make_mnist(tmp_path / "c", n_train=20, n_test=10, seed=5)), torch.device("cpu"), False)
    assert plain.fingerprint == gz.fingerprint  # the same data, wherever and however it is stored
    assert plain.fingerprint != other.fingerprint and len(plain.fingerprint) == 64


@pytest.mark.parametrize("split", ["train", "t10k"])
def test_files_with_no_items_give_a_short_message(tmp_path, split, capsys):
    folder = make_mnist(tmp_path / "mnist")
    raw = folder / "MNIST" / "raw"
    write_idx(raw / f"{split}-images-idx3-ubyte", torch.zeros(0, 28, 28))
    write_idx(raw / f"{split}-labels-idx1-ubyte", torch.zeros(0))
    status, _, err = run_main(tiny_argv(folder, tmp_path / "run"), capsys)
    assert status == 1 and "Traceback" not in err
    assert f"{split}-images-idx3-ubyte holds no images" in err


@pytest.mark.parametrize("damage", ["bad-magic", "truncated"])
def test_corrupt_file_gives_a_short_message(tmp_path, damage, capsys):
    folder = make_mnist(tmp_path / "mnist")
    victim = folder / "MNIST" / "raw" / "train-images-idx3-ubyte"
    content = victim.read_bytes()
    victim.write_bytes(b"\x00\x00\x09\x99" + content[4:] if damage == "bad-magic" else content[:-100])
    status, _, err = run_main(["--data-dir", str(folder), "--epochs", "1", "--out", str(tmp_path / "run")], capsys)
    assert status == 1
    assert "Traceback" not in err
    assert str(folder / "MNIST" / "raw") in err and "train-images-idx3-ubyte" in err
    assert ("magic number" if damage == "bad-magic" else "truncated") in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_corrupt_file_from_the_command_line(tmp_path):
    folder = make_mnist(tmp_path / "mnist")
    victim = folder / "MNIST" / "raw" / "train-images-idx3-ubyte"
    victim.write_bytes(victim.read_bytes()[:-100])
    result = run_cli("--data-dir", str(folder), "--epochs", "1", "--out", str(tmp_path / "run"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "truncated" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_files_without_download(tmp_path, capsys):
    status, _, err = run_main(
        ["--data-dir", str(tmp_path / "empty"), "--no-download", "--out", str(tmp_path / "run")], capsys
    )
    assert status == 1
    assert "Traceback" not in err
    assert str(tmp_path / "empty") in err and "IDX files" in err
    assert not (tmp_path / "run").exists(), "the run folder is made only once the data is there"


def test_failed_download_gives_a_short_message(tmp_path, monkeypatch):
    def offline(folder):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(data, "fetch", offline)
    with pytest.raises(data.DataError) as e:
        data.locate(str(tmp_path / "nowhere"), download=True)
    message = str(e.value)
    assert "download failed" in message and str(tmp_path / "nowhere") in message and "--data-dir" in message


def test_the_missing_mnist_error_is_one_line(tmp_path, capsys):
    """As the README promises: one line, naming the folder, the files and where to get them."""
    status, _, err = run_main(tiny_argv(tmp_path / "empty", tmp_path / "run"), capsys)
    assert status == 1 and len(err.strip().splitlines()) == 1, err
    assert "train-images-idx3-ubyte" in err and "--data-dir" in err and "https://" in err


def test_an_offline_failure_leaves_no_empty_data_folder(tmp_path, monkeypatch):
    """A download that fails (no network) removes the folders it made for the files, if still empty."""
    import torchvision.datasets.utils

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    (tmp_path / "data").mkdir()  # the user's folder stays; what the download made goes
    with pytest.raises(data.DataError, match="download failed"):
        data.locate(str(tmp_path / "data"), download=True)
    assert list((tmp_path / "data").iterdir()) == []
    with pytest.raises(data.DataError, match="download failed"):
        data.locate(str(tmp_path / "new" / "data"), download=True)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("mount", ["read-only", "writable"])
def test_an_unwritable_run_folder_says_why(tmp_path, capsys, monkeypatch, mount):
    """A read-only file system is reported as such, not as "permission denied"."""
    real_statvfs = os.statvfs

    class ReadOnly:
        def __init__(self, real):
            self.real = real

        def __getattr__(self, name):
            return getattr(self.real, name)

        f_flag = os.ST_RDONLY

    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False)
    if mount == "read-only":
        monkeypatch.setattr(os, "statvfs", lambda path: ReadOnly(real_statvfs(path)))
    folder = make_mnist(tmp_path / "mnist")
    status, _, err = run_main(tiny_argv(folder, tmp_path / "run"), capsys)
    expected = "it is on a read-only file system" if mount == "read-only" else "permission denied"
    assert status == 1 and err.strip() == f"error: cannot write to the run folder {tmp_path / 'run'}: {expected}"


def test_shift_moves_whole_pixels_and_elastic_keeps_the_background():
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(8, 28, 28)
    images[:, 10:18, 12:16] = 1.0
    x = (images.view(8, -1) - data.MEAN) / data.STD
    (theta,) = augment.draw("shift", 8, g)
    shifted = augment.apply(x, (theta,))
    for i in range(8):
        dx, dy = (theta[i, :, 2] * 28 / 2).round().long().tolist()
        expected = torch.roll(images[i], shifts=(-dy, -dx), dims=(0, 1))  # grid offsets sample from +d
        assert torch.allclose(shifted[i].view(28, 28) * data.STD + data.MEAN, expected, atol=1e-5)
    elastic = augment.apply(x, augment.draw("elastic", 8, g))
    assert elastic.shape == x.shape
    corner = elastic.view(8, 28, 28)[:, 0, 0]
    assert torch.allclose(corner, torch.full_like(corner, augment.BACKGROUND), atol=1e-4)
    assert not torch.allclose(elastic, x)
