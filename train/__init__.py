"""The manualgrad showcase: an MLP or a CNN made only of manualgrad modules learns MNIST, optionally
with differential privacy (DP-SGD, ``--dp``).

Command line: ``python -m train``; several processes:
``torchrun --nproc_per_node=2 -m train``; the plot of a run folder again:
``python -m train.plot RUN_FOLDER``. From Python::

    from train import Config, run
    metrics = run(Config(epochs=1, data_dir="data/"))
    print(metrics["test_accuracy"])

``runner.py`` is the run, step by step; read it first, then ``engine.py``'s ``Trainer.train_step``. The other files, one
concern each: ``config.py`` (options, each declared once; presets; what a resumed run keeps),
``data.py`` (IDX files -> tensors), ``augment.py`` (batch distortions),
``model.py`` (the MLP, the CNN and their torch.nn twins), ``engine.py`` (an
epoch of steps, evaluation, and --dp's plan on :mod:`manualgrad.privacy`),
``threads.py`` (the CPU thread count), ``checks.py`` (``--check-grads``),
``checkpoint.py`` (checkpoint files), ``folder.py`` (the run folder and its lock),
``files.py`` (atomic writes), ``plot.py`` (``curves.png``), ``distributed.py`` (torchrun), ``errors.py`` (errors that
are one-line messages), ``__main__.py`` (the command line).
"""

from .config import PRESETS, Config
from .runner import run

__all__ = ["PRESETS", "Config", "run"]
