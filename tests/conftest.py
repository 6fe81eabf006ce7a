"""Shared test helpers. Lab tiers are handled by the udrv.lab.pytest_plugin (see pyproject)."""

from __future__ import annotations

import os

import pytest

from udrv.errors import LabSetupError


def require_lab() -> None:
    """For host tests that boot guests themselves: skip (or fail under CI) without the lab."""
    from udrv.lab.paths import installed

    try:
        installed()
    except LabSetupError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the lab is required under CI=true: {exc}", pytrace=False)
        pytest.skip(f"lab not available ({exc}); run `udrv lab setup` to enable lab tests")
