"""pytest plugin: tests marked ``@pytest.mark.lab(*devices)`` run inside a lab guest.

On the host, every lab test is replaced by a proxy. Tests that ask for the same guest (same
devices, memory, CPUs, IOMMU) form a group; the first proxy of a group to run boots one guest
and runs the whole group there with pytest, which reports each test's outcome to a JSON file
on the results share. Each proxy then passes, fails (with the guest's traceback) or skips
as its test did in the guest. One boot serves many tests.

In the guest (``UDRV_LAB=1``) the marked tests simply run.

If the lab is not set up, lab tests skip with a message that says to run `udrv lab setup`;
under ``CI=true`` they fail instead: CI must run them.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from udrv.errors import LabError, LabSetupError

IN_GUEST = os.environ.get("UDRV_LAB") == "1"
REPORT_ENV = "UDRV_LAB_PYTEST_REPORT"
GROUP_TIMEOUT = 1200.0


@dataclass(frozen=True)
class GuestKey:
    devices: tuple[str, ...]
    memory: int
    cpus: int
    iommu: bool

    def describe(self) -> str:
        return (
            f"devices={','.join(self.devices) or 'none'} memory={self.memory}M cpus={self.cpus}"
            + ("" if self.iommu else " no-iommu")
        )


def guest_key(item: pytest.Item) -> GuestKey | None:
    mark = item.get_closest_marker("lab")
    if mark is None:
        return None
    return GuestKey(
        devices=tuple(mark.args),
        memory=int(mark.kwargs.get("memory", 1024)),
        cpus=int(mark.kwargs.get("cpus", 1)),
        iommu=bool(mark.kwargs.get("iommu", True)),
    )


@dataclass
class Group:
    key: GuestKey
    nodeids: list[str] = field(default_factory=list)
    outcomes: dict[str, dict[str, Any]] | None = None
    error: str | None = None
    setup_missing: str | None = None


class LabProxy(pytest.Item):
    """Stands on the host for a test that runs in the guest."""

    def __init__(self, *, group: Group, original: pytest.Item, **kw: Any) -> None:
        super().__init__(**kw)
        self.group = group
        self.original_nodeid = original.nodeid
        self.own_markers = list(original.iter_markers())
        self.keywords.update(original.keywords)

    def runtest(self) -> None:
        run_group(self.group, self.config)
        g = self.group
        if g.setup_missing:
            if os.environ.get("CI") == "true":
                pytest.fail(f"lab test did not run under CI=true: {g.setup_missing}", pytrace=False)
            pytest.skip(
                f"lab not available ({g.setup_missing}); run `udrv lab setup` to enable lab tests"
            )
        if g.error:
            pytest.fail(f"lab guest ({g.key.describe()}) failed: {g.error}", pytrace=False)
        assert g.outcomes is not None
        res = g.outcomes.get(self.original_nodeid)
        if res is None:
            pytest.fail(
                "the guest's pytest did not report this test (collection error in the guest?)",
                pytrace=False,
            )
        if res["outcome"] == "skipped":
            pytest.skip(f"in the lab: {res['message']}")
        if res["outcome"] == "failed":
            pytest.fail(f"in the lab ({g.key.describe()}):\n{res['message']}", pytrace=False)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"[lab] {self.name}"


def run_group(group: Group, config: pytest.Config) -> None:
    if group.outcomes is not None or group.error or group.setup_missing:
        return
    from udrv.lab.machine import Lab

    tr = config.pluginmanager.get_plugin("terminalreporter")
    with tempfile.TemporaryDirectory(prefix="udrv-lab-pytest-") as results:
        report = Path(results) / "report.json"
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--no-header",
            "-o",
            "console_output_style=classic",
            *group.nodeids,
        ]
        start = time.monotonic()
        try:
            lab = Lab(
                group.key.devices,
                memory=group.key.memory,
                cpus=group.key.cpus,
                iommu=group.key.iommu,
                results=results,
            )
            with lab:
                if tr:
                    tr.write_line(
                        f"\n[lab] guest up ({group.key.describe()}), "
                        f"running {len(group.nodeids)} tests"
                    )
                res = lab.run(
                    cmd, timeout=GROUP_TIMEOUT, env={REPORT_ENV: str(report)}, cwd=config.rootpath
                )
        except LabSetupError as exc:
            group.setup_missing = str(exc)
            return
        except LabError as exc:
            group.error = str(exc)
            return
        if tr:
            tr.write_line(f"[lab] {len(group.nodeids)} tests in {time.monotonic() - start:.1f} s")
        try:
            group.outcomes = json.loads(report.read_text())
        except (OSError, ValueError):
            group.error = (
                f"no report from the guest's pytest (exit {res.returncode}):\n"
                f"{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
            )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "lab(*devices, memory=1024, cpus=1, iommu=True): run in a lab guest"
    )
    if IN_GUEST and os.environ.get(REPORT_ENV):
        config.pluginmanager.register(
            GuestReporter(Path(os.environ[REPORT_ENV])), "udrv-lab-reporter"
        )


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    if IN_GUEST:
        return
    groups: dict[GuestKey, Group] = {}
    for i, item in enumerate(items):
        key = guest_key(item)
        if key is None:
            continue
        group = groups.setdefault(key, Group(key))
        group.nodeids.append(item.nodeid)
        assert item.parent is not None
        items[i] = LabProxy.from_parent(item.parent, name=item.name, group=group, original=item)


class GuestReporter:
    """In the guest: write each test's outcome where the host will read it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.outcomes: dict[str, dict[str, Any]] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        prev = self.outcomes.get(report.nodeid)
        if report.when == "call" or report.failed or report.skipped:
            if prev and prev["outcome"] == "failed":
                return  # keep the first failure (a teardown error after a failed call)
            message = ""
            if report.failed:
                message = f"[{report.when}] {report.longreprtext}"
            elif report.skipped:
                lr = report.longrepr
                message = lr[2] if isinstance(lr, tuple) else str(lr)
            self.outcomes[report.nodeid] = {
                "outcome": report.outcome,
                "message": message,
                "duration": report.duration,
            }

    def pytest_sessionfinish(self) -> None:
        self.path.write_text(json.dumps(self.outcomes, indent=1))


SYS_PCI = Path("/sys/bus/pci/devices")


def bind(address: str, driver: str | None) -> None:
    """In the guest: bind ``address`` to ``driver`` (None: to no driver) through
    ``driver_override`` and ``drivers_probe``, as `udrv bind` does without its safety checks
    (a lab guest's devices are the test's own)."""
    dev = SYS_PCI / address
    if (dev / "driver").exists():
        if os.path.basename(os.readlink(dev / "driver")) == driver:
            return
        (dev / "driver" / "unbind").write_text(address)
    (dev / "driver_override").write_text(driver or "\n")
    if driver:
        Path("/sys/bus/pci/drivers_probe").write_text(address)
        bound_to = os.path.basename(os.readlink(dev / "driver"))
        if bound_to != driver:
            raise LabError(f"{address} is bound to {bound_to}, not {driver}, after drivers_probe")


@pytest.fixture
def bound(lab_devices: dict[str, str]) -> Iterator[Callable[[str, str | None], str]]:
    """In the guest: ``bound("edu", "vfio-pci")`` binds the lab's edu device to vfio-pci and
    returns its address; the device is unbound again after the test."""
    done: list[str] = []

    def _bind(name: str, driver: str | None) -> str:
        try:
            address = lab_devices[name]
        except KeyError:
            raise LabError(
                f"no {name!r} device in this lab guest (it has {', '.join(lab_devices) or 'none'});"
                f" add it to the test's mark: @pytest.mark.lab({name!r}, ...)"
            ) from None
        bind(address, driver)
        done.append(address)
        return address

    yield _bind
    for address in done:
        bind(address, None)


@pytest.fixture
def lab_devices() -> Iterator[dict[str, str]]:
    """In the guest: device name -> PCI address, from ``UDRV_LAB_DEVICES``."""
    raw = os.environ.get("UDRV_LAB_DEVICES", "")
    yield dict(item.split("=", 1) for item in raw.split(",") if item)
