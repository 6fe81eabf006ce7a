"""udrv.testing: the pytest11 plugin works in a third-party project (docs/examples/mydriver)
with no configuration, and its fixtures give model-backed devices."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from udrv.drivers.edu import Edu
from udrv.models.edu import EduModel
from udrv.testing import ModelDevice

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "mydriver"


def test_third_party_project_uses_the_plugin(tmp_path: Path) -> None:
    project = tmp_path / "mydriver"
    shutil.copytree(EXAMPLE, project)
    # Its own directory, its own pyproject: nothing of this repository's pytest settings.
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=project, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 passed" in r.stdout


def test_fixture_in_process(udrv_model) -> None:  # type: ignore[no-untyped-def]
    dev = udrv_model(EduModel())
    assert isinstance(dev, ModelDevice) and isinstance(dev.model, EduModel)
    with Edu(dev, interrupts="msi") as e:
        assert e.factorial(5) == 120


def test_fixture_in_a_process(udrv_model) -> None:  # type: ignore[no-untyped-def]
    dev = udrv_model("edu", process=True)
    assert dev.model is None  # it lives in `udrv emulate edu`
    assert dev.bar(0).read32(0) == 0x010000ED
