"""The wheel ships the library only: train/ and benchmarks/ are folders of the repository, run from a checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_holds_manualgrad_only(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("manualgrad-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "manualgrad/testing/__init__.py" in names and "manualgrad/testing/samples.py" in names  # public
    assert "manualgrad/check.py" in names  # python -m manualgrad.check
    assert "manualgrad/functions/losses/base.py" in names  # a subpackage
    assert {"manualgrad/py.typed", "manualgrad/functional.pyi", "manualgrad/nn/__init__.pyi"} <= set(names)  # typed
    top = {name.split("/")[0] for name in names}
    assert top == {"manualgrad", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
