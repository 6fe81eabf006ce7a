"""Shared test helpers. Lab tiers are handled by the udrv.lab.pytest_plugin (see pyproject)."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

from udrv.errors import LabSetupError


def require_lab() -> None:
    """For lab-tier tests that run on the host and boot guests themselves (tests/lab/test_lab_machine.py,
    tests/docs): skip (or fail under CI) without the lab."""
    from udrv.lab.paths import installed

    try:
        installed()
    except LabSetupError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the lab is required under CI=true: {exc}", pytrace=False)
        pytest.skip(f"lab not available ({exc}); run `udrv lab setup` to enable lab tests")


# Hypothesis' per-example deadline measures the machine, not the code: on a loaded 2-core
# CI machine a correct example can take longer than 200 ms. Examples stay bounded by count.
settings.register_profile("udrv", deadline=None)
settings.load_profile("udrv")
