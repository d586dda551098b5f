"""The manualgrad showcase: an MLP made only of manualgrad modules learns MNIST.

Command line: ``python -m train`` (or ``manualgrad-train``); several processes:
``torchrun --nproc_per_node=2 -m train``. From Python::

    from train import Config, run
    metrics = run(Config(epochs=1, data_dir="../shared/mnist"))
    print(metrics["test_accuracy"])

Files, one concern each: ``config.py`` (options, presets), ``data.py`` (IDX
files -> tensors), ``augment.py`` (batch distortions), ``model.py`` (the MLP
and its torch.nn twin), ``engine.py`` (the training loop), ``checks.py``
(``--check-grads``), ``checkpoint.py`` (atomic files), ``plots.py``
(``curves.png``), ``distributed.py`` (torchrun), ``runner.py`` (a whole run),
``__main__.py`` (the command line).
"""

from .config import PRESETS, Config
from .runner import run

__all__ = ["PRESETS", "Config", "run"]
