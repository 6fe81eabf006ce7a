"""The wheel holds what programs need, and the metadata builds without deprecation warnings.

Builds an sdist and, from it, a wheel (``python -m build --no-isolation``: the dev extra
installs ``build`` and the setuptools the backend needs, so no network is used), from a copy of
the project so the worktree gets no build/ or egg-info. A wheel built from the sdist proves
both carry the data files.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(wheel, sdist, the build's output) built from a copy of the project."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "udrv", src / "udrv", ignore=shutil.ignore_patterns("__pycache__"))
    out = src / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = out.glob("udrv-*.whl")
    (sdist,) = out.glob("udrv-*.tar.gz")
    return wheel, sdist, proc.stdout + proc.stderr


def package_files() -> set[str]:
    """Every file under udrv/ that a program may open: modules and data alike."""
    return {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "udrv").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def test_wheel_holds_every_file_of_the_package(built: tuple[Path, Path, str]) -> None:
    wheel, _, _ = built
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(package_files() - names)
    assert missing == [], (
        f"not in {wheel.name}: {missing}; add them to [tool.setuptools.package-data]"
    )
    # The ones the issue named, spelled out so a rename shows up here too.
    for data in ("udrv/drivers/edu/edu_uapi.h", "udrv/lab/init.sh", "udrv/lab/agent.sh",
                 "udrv/py.typed"):  # fmt: skip
        assert data in names
    assert not [n for n in names if n.startswith(("tests/", "bench/", "docs/"))]


def test_wheel_metadata_uses_the_spdx_license_and_the_entry_point(
    built: tuple[Path, Path, str],
) -> None:
    wheel, _, _ = built
    with zipfile.ZipFile(wheel) as z:
        info = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = z.read(info).decode()
        entry = z.read(info.replace("METADATA", "entry_points.txt")).decode()
        licenses = [n for n in z.namelist() if ".dist-info/licenses/" in n]
    # Core metadata 2.4 (PEP 639): License-Expression, License-File; no legacy License field.
    assert "License-Expression: MIT" in meta.splitlines()
    assert "License-File: LICENSE" in meta.splitlines()
    assert not [line for line in meta.splitlines() if line.startswith("License: ")]
    assert [n.rsplit("/", 1)[1] for n in licenses] == ["LICENSE"]
    assert "udrv = udrv.cli.main:main" in entry


def test_sdist_carries_the_data_files(built: tuple[Path, Path, str]) -> None:
    _, sdist, _ = built
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {"LICENSE", "pyproject.toml", "udrv/drivers/edu/edu_uapi.h", "udrv/lab/init.sh"} <= names


def test_build_prints_no_deprecation_warning(built: tuple[Path, Path, str]) -> None:
    _, _, output = built
    assert "Successfully built" in output
    assert [line for line in output.splitlines() if "eprecat" in line] == []
