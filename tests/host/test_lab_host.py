"""The lab seen from the host: booting, exit codes, timeouts, results, the CLI."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_lab
from udrv.errors import LabError, LabTimeout


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    require_lab()
    from udrv.lab import Lab

    with Lab(["edu", "nvme:size=16M"], results=tmp_path_factory.mktemp("results")) as lab:
        yield lab


def test_exit_codes_and_output_come_back(lab) -> None:  # type: ignore[no-untyped-def]
    r = lab.run(["sh", "-c", "echo out; echo err >&2; exit 7"], timeout=30)
    assert (r.returncode, r.stdout, r.stderr) == (7, "out\n", "err\n")
    assert lab.run(["true"]).returncode == 0


def test_command_runs_in_the_same_directory_with_udrv_env(lab) -> None:  # type: ignore[no-untyped-def]
    r = lab.run(["sh", "-c", 'pwd; echo "$UDRV_LAB_DEVICES"; id -u'], timeout=30, cwd="/usr/share")
    assert r.stdout.split() == ["/usr/share", "edu=0000:00:04.0,nvme=0000:00:05.0", "0"]
    r = lab.run([sys.executable, "-c", "import udrv, sys; print(udrv.__file__)"], timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(Path(__import__("udrv").__file__))


def test_nvme_scratch_image_has_the_requested_size(lab) -> None:  # type: ignore[no-untyped-def]
    cfg = lab.run(["cat", "/sys/bus/pci/devices/0000:00:05.0/class"], timeout=30).stdout.strip()
    assert cfg == "0x010802"  # mass storage / NVM / NVMe


def test_results_written_in_the_guest_are_on_the_host(lab) -> None:  # type: ignore[no-untyped-def]
    lab.run(["sh", "-c", 'echo hello > "$UDRV_LAB_RESULTS/out.txt"'], timeout=30, check=True)
    assert (lab.results / "out.txt").read_text() == "hello\n"


def test_timeout_kills_the_command_and_the_guest_lives_on(lab) -> None:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    r = lab.run(["sleep", "600"], timeout=2)
    assert r.timed_out and r.returncode == 124
    assert time.monotonic() - start < 30
    with pytest.raises(LabTimeout, match="timed out"):
        r.check()
    assert lab.run(["echo", "alive"], timeout=30).stdout == "alive\n"


def test_streaming_delivers_output_as_it_comes(lab) -> None:  # type: ignore[no-untyped-def]
    seen: list[tuple[float, bytes]] = []
    lab.run(
        ["sh", "-c", "echo first; sleep 2; echo second"],
        timeout=30,
        stream=lambda name, data: seen.append((time.monotonic(), data)),
    )
    text = b"".join(d for _, d in seen)
    assert text == b"first\nsecond\n"
    first_at = next(t for t, d in seen if b"first" in d)
    second_at = next(t for t, d in seen if b"second" in d)
    assert second_at - first_at > 1.0  # "first" arrived before the command ended


def test_check_raises_with_output(lab) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LabError, match="exited 3"):
        lab.run(["sh", "-c", "echo boom; exit 3"], timeout=30, check=True)


def test_functions_of_one_slot_share_an_iommu_group(tmp_path: Path) -> None:
    require_lab()
    from udrv.lab import Lab

    script = (
        'echo "$UDRV_LAB_DEVICES"; for f in 0 1; do d=/sys/bus/pci/devices/0000:00:05.$f; '
        "cat $d/device; basename $(readlink $d/iommu_group); done"
    )
    with Lab(["e1000:slot=5", "e1000:slot=5,fn=1"], results=tmp_path) as lab:
        r = lab.run(["sh", "-c", script], timeout=60, check=True)
    env, dev0, group0, dev1, group1 = r.stdout.split()
    assert env == "e1000=0000:00:05.0,e1000.1=0000:00:05.1"
    assert dev0 == dev1 == "0x100e"  # 82540EM, both functions enumerated
    assert group0 == group1  # no ACS between functions: VFIO must take them together


def test_a_kernel_warning_during_a_command_comes_back_with_it(lab) -> None:  # type: ignore[no-untyped-def]
    # Through the kernel's own log at KERN_WARNING, as a driver's WARN_ON prints it.
    warn = (
        "for line in '------------[ cut here ]------------' "
        "'WARNING: CPU: 0 PID: 1 at drivers/udrv/test.c:7 udrv_test+0x1/0x2' 'Call Trace:' "
        "' udrv_test+0x1/0x2' '---[ end trace 0000000000000000 ]---'; "
        'do printf "<4>%s\\n" "$line" > /dev/kmsg; done; exit 3'
    )
    r = lab.run(["sh", "-c", warn], timeout=30)
    assert r.returncode == 3
    assert r.kernel_report is not None
    lines = r.kernel_report.splitlines()
    assert re.fullmatch(r"--- kernel report from console.log line \d+ ---", lines[0])
    assert lines[1].endswith("------------[ cut here ]------------")
    assert lines[2].endswith("WARNING: CPU: 0 PID: 1 at drivers/udrv/test.c:7 udrv_test+0x1/0x2")
    assert lines[-1].endswith("---[ end trace 0000000000000000 ]---")
    with pytest.raises(
        LabError, match=r"(?s)exited 3 in the lab.*WARNING: CPU: 0 PID: 1 at drivers"
    ):
        r.check()
    # The next command sees only what the kernel printed while it ran.
    assert lab.run(["true"], timeout=30).kernel_report is None


def _udrv(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "udrv", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_cli_propagates_exit_codes_and_prints_devices(tmp_path: Path) -> None:
    require_lab()
    r = _udrv(
        "lab",
        "run",
        "--results",
        str(tmp_path),
        "--device",
        "edu",
        "--",
        "sh",
        "-c",
        "cat /sys/bus/pci/devices/*/device; exit 3",
    )
    assert r.returncode == 3, r.stderr
    assert "0x11e8" in r.stdout.split()
    assert "guest up in" in r.stderr


def test_cli_timeout_kills_and_reports(tmp_path: Path) -> None:
    require_lab()
    start = time.monotonic()
    r = _udrv("lab", "run", "--results", str(tmp_path), "--timeout", "3", "--", "sleep", "600")
    assert r.returncode == 124
    assert "timed out after 3 s and was killed" in r.stderr
    assert time.monotonic() - start < 60
    # No QEMU is left behind.
    ps = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True, check=False)
    assert ps.stdout.strip() == ""


def test_cli_false_exits_1(tmp_path: Path) -> None:
    require_lab()
    assert _udrv("lab", "run", "--results", str(tmp_path), "--", "false").returncode == 1


def test_cli_errors_are_one_line_not_tracebacks() -> None:
    r = _udrv("lab", "run", "--device", "edu:size", "--", "true")
    assert r.returncode == 1
    assert r.stderr.startswith("udrv: error: bad option 'size'")
    assert "Traceback" not in r.stderr


def test_cli_refuses_an_unknown_model_before_booting() -> None:
    require_lab()
    start = time.monotonic()
    r = _udrv("lab", "run", "--device", "edu", "--device", "e1000x", "--", "true")
    assert r.returncode == 1
    assert r.stderr.startswith("udrv: error: QEMU has no device model 'e1000x': did you mean e1000")
    assert "booting" not in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - start < 20  # no guest was booted for it


def test_a_guest_panic_is_printed_from_its_first_line_and_the_session_kept(
    tmp_path: Path,
) -> None:
    require_lab()
    r = _udrv(
        "lab", "run", "--results", str(tmp_path), "--", "sh", "-c", "echo c >/proc/sysrq-trigger"
    )
    kept = re.search(r"session files kept in (\S+) ", r.stderr)
    try:
        assert r.returncode == 1
        assert "\nudrv: error: the lab guest died while running `sh -c" in r.stderr
        # The report from its first line, then the frames that name the culprit.
        head = re.search(r"kernel report from console.log line \d+ ---\n(.*)\n", r.stderr)
        assert head and head.group(1).endswith("Kernel panic - not syncing: sysrq triggered crash")
        assert r.stderr.index("Call Trace:") < r.stderr.index("sysrq_handle_crash+")
        assert kept, r.stderr
        session = Path(kept.group(1))
        assert "sysrq triggered crash" in (session / "console.log").read_text()
    finally:
        if kept:
            shutil.rmtree(kept.group(1), ignore_errors=True)
