"""MNIST as four tensors on the training device (a batch is ``x[indices]``: no DataLoader, which on 2 cores costs ~6x
the MLP). A missing, truncated or foreign IDX file is a one-line :class:`DataError` (torchvision only downloads)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import math
import os
import socket
import struct
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import RunError, first_line

# The four files torchvision's MNIST keeps in <root>/MNIST/raw/.
FILES = dict(train_images="train-images-idx3-ubyte", train_labels="train-labels-idx1-ubyte")
FILES.update(test_images="t10k-images-idx3-ubyte", test_labels="t10k-labels-idx1-ubyte")
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049  # IDX: 0x0000 08 (ubyte) 03/01 (dimensions)
SIDE = 28
MEAN, STD = 0.1307, 0.3081  # of the training pixels scaled to [0, 1]; pytorch/examples uses the same


class DataError(RunError):
    """The MNIST files are missing or unusable; the message is meant for the user, as is."""


@dataclass
class MNIST:
    """Normalised images ``(N, 784)`` float32 and labels ``(N,)`` int64, on one device."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    folder: str  # where the files were read from
    fingerprint: str  # sha256 of the four files' contents (uncompressed): the same data wherever it lives


def normalise(images_uint8: Tensor) -> Tensor:
    return (images_uint8.reshape(len(images_uint8), -1).float() / 255 - MEAN) / STD


def load(data_dir: str, device: torch.device, download: bool = True) -> MNIST:
    """Find (or download) the four IDX files under ``data_dir``, check them and move them to ``device``."""
    folder = locate(data_dir, download)
    digest = hashlib.sha256()
    arrays = {key: read_idx(folder, name, digest) for key, name in FILES.items()}  # images (N, h, w), labels (N,)
    tensors = []
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        image_file, label_file = FILES[f"{split}_images"], FILES[f"{split}_labels"]
        if images.shape[1:] != (SIDE, SIDE):
            raise _error(folder, f"{image_file} holds images of shape {tuple(images.shape[1:])}, expected 28x28")
        if len(images) == 0:
            raise _error(folder, f"{image_file} holds no images")
        if len(labels) != len(images):
            raise _error(folder, f"{label_file} has {len(labels)} labels for {len(images)} images")
        if int(labels.max()) > 9:
            raise _error(folder, f"{label_file} has a label {int(labels.max())}, expected 0-9")
        tensors += [normalise(images).to(device), labels.long().to(device)]
    return MNIST(*tensors, folder=folder, fingerprint=digest.hexdigest())


def _present(folder: str) -> list[str]:
    return [n for n in FILES.values() if any(os.path.isfile(os.path.join(folder, n + gz)) for gz in ("", ".gz"))]


def locate(data_dir: str, download: bool = True) -> str:
    """The folder holding the four files: ``<data_dir>/MNIST/raw`` (downloaded there if need be) or ``data_dir``."""
    raw = os.path.join(data_dir, "MNIST", "raw")
    for folder in (raw, data_dir):
        if len(_present(folder)) == len(FILES):
            return folder
    if not download:
        missing = [n for n in FILES.values() if n not in _present(raw)]
        what = "the files are missing" if len(missing) == len(FILES) else f"missing {', '.join(missing)}"
        raise _error(raw, f"{what} (and downloading is off)")
    try:
        fetch(raw)
    except Exception as e:  # no network, a proxy, a bad mirror: all end the same way for the user
        raise _error(raw, f"the files are missing and the download failed ({first_line(e)})") from None
    return raw


def fetch(folder: str) -> None:
    """Download the missing files into ``folder`` from torchvision's MNIST mirrors (checked by md5)."""
    from torchvision.datasets import MNIST as TorchvisionMNIST
    from torchvision.datasets.utils import download_and_extract_archive

    folder = existed = os.path.abspath(folder)
    while not os.path.exists(existed):  # the folders below it are made here: removed again if the download fails
        existed = os.path.dirname(existed)
    os.makedirs(folder, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        for archive, md5 in TorchvisionMNIST.resources:
            if archive.removesuffix(".gz") in _present(folder):
                continue
            errors = []
            for mirror in TorchvisionMNIST.mirrors:
                try:
                    download_and_extract_archive(mirror + archive, download_root=folder, filename=archive, md5=md5)
                    break
                except Exception as e:
                    errors.append(f"{mirror}: {e}")
            else:
                raise RuntimeError("; ".join(errors))
    except BaseException:
        with contextlib.suppress(OSError):  # an offline failure leaves no empty data/MNIST/raw/ behind
            while folder != existed:
                os.rmdir(folder)  # only if empty: a partial download stays
                folder = os.path.dirname(folder)
        raise
    finally:
        socket.setdefaulttimeout(previous)


def read_idx(folder: str, name: str, digest) -> Tensor:
    """One IDX file (``name`` or ``name.gz``) as a uint8 tensor, checked; its bytes are fed to ``digest``."""
    path = os.path.join(folder, name)
    try:
        with open(path, "rb") if os.path.isfile(path) else gzip.open(path + ".gz", "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise _error(folder, f"cannot read {name}: {e}") from None
    magic = LABEL_MAGIC if "labels" in name else IMAGE_MAGIC
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise _error(folder, f"{name} is truncated ({len(data)} bytes)")
    if (found := struct.unpack(">I", data[:4])[0]) != magic:
        raise _error(folder, f"{name} has magic number {found}, expected {magic}: not an MNIST IDX file")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    size = math.prod(shape)
    if len(data) != header + size:
        what = "truncated" if len(data) < header + size else "longer than its header says"
        raise _error(folder, f"{name} is {what}: {len(data)} bytes, its header announces {header + size}")
    digest.update(data)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)[header:].reshape(shape)


def _error(folder: str, problem: str) -> DataError:
    files = f"the four IDX files ({', '.join(FILES.values())}; plain or .gz)"
    where = "e.g. from https://ossci-datasets.s3.amazonaws.com/mnist/, or point --data-dir at a folder that has them"
    return DataError(f"MNIST data in {folder} is unusable: {problem}; put {files} there, {where}")
