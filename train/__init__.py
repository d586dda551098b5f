"""The manualgrad showcase: an MLP or a CNN of manualgrad modules learns MNIST, optionally with DP-SGD (``--dp``).

``python -m train`` (several processes: ``torchrun --nproc_per_node=2 -m train``; the plot of a run folder again:
``python -m train.plot RUN_FOLDER``), or ``run(Config(epochs=1, data_dir="data/"))["test_accuracy"]``.
Read ``runner.py`` (the run, step by step) first, then ``engine.py`` (``Trainer.train_step`` and the epoch).
"""

from .config import PRESETS, Config
from .runner import run

__all__ = ["PRESETS", "Config", "run"]
