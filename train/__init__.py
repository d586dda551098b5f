"""The manualgrad showcase: an MLP or a CNN of manualgrad modules learns MNIST, optionally with DP-SGD (``--dp``):
``python -m train``, or ``run(Config(epochs=1, data_dir="data/"))["test_accuracy"]``. Read ``runner.py`` (the run,
step by step) first, then ``engine.py`` (``Trainer.train_step`` and the epoch)."""

from .config import PRESETS, Config
from .runner import run

__all__ = ["PRESETS", "Config", "run"]
