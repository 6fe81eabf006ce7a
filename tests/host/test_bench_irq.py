"""bench/irq's host side: interleaving, the C reference's pipe protocol, the summary and its
goals, the plot, and where `udrv lab setup` unpacks the kernel headers (no QEMU needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from bench.irq.__main__ import plot, summarize
from bench.irq.guest import C_LABEL, KERNEL, PY_LABELS, Counted, CReference, interleave
from udrv.errors import LabError, LabSetupError
from udrv.lab import install

BLOCKING, THREAD = PY_LABELS["blocking"], PY_LABELS["thread"]


def test_interleave_runs_variants_round_by_round_and_drops_the_warm_up() -> None:
    calls: list[tuple[str, int]] = []

    def variant(name: str, ns: int):  # type: ignore[no-untyped-def]
        def run(n: int) -> list[int]:
            calls.append((name, n))
            return [ns] * n

        return run

    out = interleave({"A": variant("A", 1), "B": variant("B", 2)}, rounds=40, block=1)
    assert out == {"A": [1] * 40, "B": [2] * 40}
    # 20 warm-up turns each (the minimum), then 40 measured: A B A B ..., one kept round a
    # turn after one dropped (the round that follows the switch from the other variant).
    assert calls == [("A", 2), ("B", 2)] * 60

    calls.clear()
    interleave({"A": variant("A", 1), "B": variant("B", 2)}, rounds=25, block=10)
    measured = calls[-6:]
    assert measured == [("A", 11), ("B", 11), ("A", 11), ("B", 11), ("A", 6), ("B", 6)]


def test_interleave_drops_the_first_round_of_every_turn() -> None:
    def first_is_cold(n: int) -> list[int]:
        return [999] + [1] * (n - 1)

    assert interleave({"A": first_is_cold}, rounds=30, block=3) == {"A": [1] * 30}


def test_interleave_refuses_a_short_block() -> None:
    with pytest.raises(LabError, match="short: asked for 2 samples, got 0"):
        interleave({"short": lambda n: []}, rounds=5, block=1)


def test_counted_variant_counts_how_often_its_rounds_slept() -> None:
    import time

    def sleeps(n: int) -> list[int]:
        for _ in range(n):
            time.sleep(0.002)  # each sleep is one voluntary context switch at least
        return [1] * n

    run = Counted(sleeps)
    assert run(5) == [1] * 5 and run(5) == [1] * 5
    assert run.rounds == 10
    assert run.per_round() >= 1.0
    assert Counted(lambda n: [0] * n).per_round() == 0.0  # no rounds yet: no division by 0


def _fake_c_ref(tmp_path: Path, body: str) -> Path:
    exe = tmp_path / "fake_ref"
    exe.write_text(f"#!{sys.executable}\nimport sys\n{body}\n")
    exe.chmod(0o755)
    return exe


def test_c_reference_serves_blocks_over_its_pipe(tmp_path: Path) -> None:
    # The protocol of vfio_msi_ref.c: a line "N" in, a line "SLEEPS s1 .. sN" out, until EOF.
    exe = _fake_c_ref(
        tmp_path,
        "assert sys.argv[1] == '0000:00:05.0'\n"
        "for i, line in enumerate(sys.stdin):\n"
        "    n = int(line)\n"
        "    print(n - 1, *(1000 * (i + 1) + k for k in range(n)), flush=True)",
    )
    ref = CReference(exe, "0000:00:05.0")
    try:
        assert ref(3) == [1000, 1001, 1002]
        assert ref(1) == [2000]
        assert (ref.rounds, ref.sleeps, ref.per_round()) == (4, 2, 0.5)
    finally:
        ref.close()
    assert ref.proc.returncode == 0  # it saw the end of input and ended


def test_c_reference_that_dies_is_an_error_naming_it(tmp_path: Path) -> None:
    exe = _fake_c_ref(tmp_path, "sys.stderr.write('VFIO_GROUP_SET_CONTAINER: busy\\n'); exit(1)")
    ref = CReference(exe, "0000:00:05.0")
    with pytest.raises(LabError, match=r"vfio_msi_ref 0000:00:05.0: asked for 4 samples, got 0 "
                                       r"\(exit 1\): VFIO_GROUP_SET_CONTAINER: busy"):  # fmt: skip
        ref(4)
    ref.close()


def _reps(blocking_p50_us: list[float]) -> list[dict[str, list[int]]]:
    """Three reps: C at 10 us flat, blocking at the given value, thread at 3x blocking."""
    reps = []
    for b in blocking_p50_us:
        reps.append(
            {
                KERNEL: [2000] * 100,
                C_LABEL: [10_000] * 100,
                BLOCKING: [int(b * 1000)] * 100,
                THREAD: [int(3 * b * 1000)] * 100,
            }
        )
    return reps


def test_summary_ratios_spread_and_goals_over_every_repetition() -> None:
    s = summarize(_reps([14.0, 12.0, 16.0]))
    assert len(s["repetitions"]) == 3
    p50 = s["variants"][BLOCKING]["p50"]
    assert p50["reps"] == pytest.approx([14.0, 12.0, 16.0])
    assert (p50["median"], p50["min"], p50["max"]) == pytest.approx((14.0, 12.0, 16.0))
    assert s["variants"][KERNEL]["p50_vs_c"]["median"] == pytest.approx(0.2)
    assert "p50_vs_c" not in s["variants"][C_LABEL]
    goals = {g["goal"]: g for g in s["goals"]}
    p50_goal = goals["Python blocking wait p50 <= 1.5x C"]
    assert p50_goal["ratios"] == pytest.approx([1.4, 1.2, 1.6])
    # 1.6x in the third repetition: met in 2 of 3 is not met.
    assert (p50_goal["met_in"], p50_goal["met"]) == (2, False)
    assert goals["Python blocking wait p99 <= 2x C"]["met"] is True
    thread = goals["handler thread p50 <= 2x the blocking wait"]
    assert thread["ratios"] == pytest.approx([3.0, 3.0, 3.0]) and thread["met"] is False


def test_summary_without_the_kernel_still_judges_the_goals() -> None:
    reps = _reps([12.0, 12.0, 12.0])
    for r in reps:
        del r[KERNEL]
    s = summarize(reps)
    assert KERNEL not in s["variants"]
    assert [g["met"] for g in s["goals"]] == [True, True, False]


def test_plot_writes_a_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    reps = [{label: rng.integers(1000, 90_000, 200).tolist() for label in (KERNEL, C_LABEL)}]
    plot(reps, tmp_path / "irq.png")
    assert (tmp_path / "irq.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_headers_packages_follow_the_kernel_release() -> None:
    assert install.headers_packages("6.12.117+deb12-amd64") == [
        "linux-headers-6.12.117+deb12-amd64",
        "linux-headers-6.12.117+deb12-common",
        "linux-kbuild-6.12.117+deb12",
    ]
    with pytest.raises(LabSetupError, match="no flavour"):
        install.headers_packages("6")


def test_install_headers_points_the_makefile_at_the_unpacked_common_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # apt-get download and dpkg-deb -x, faked with the layout of the real packages: the
    # flavour Makefile includes the -common one by an absolute /usr/src path.
    release = "6.12.117+deb12-amd64"
    monkeypatch.setenv("UDRV_LAB_DIR", str(tmp_path))
    ran: list[list[str]] = []

    def fake_run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
        ran.append(cmd)
        if cmd[:2] == ["apt-get", "download"]:
            assert cwd is not None
            for pkg in cmd[2:]:
                (cwd / f"{pkg}_1_amd64.deb").write_bytes(b"")
        elif cmd[0] == "dpkg-deb" and "linux-headers-6.12.117+deb12-amd64" in cmd[2]:
            src = Path(cmd[3]) / "usr" / "src" / f"linux-headers-{release}"
            src.mkdir(parents=True)
            (src / "Makefile").write_text(
                "include /usr/src/linux-headers-6.12.117+deb12-common/Makefile\n"
            )
            (src / "Module.symvers").write_text("")
        return ""

    monkeypatch.setattr(install, "_run", fake_run)
    build = install.install_headers(release, lambda _: None)
    assert build == tmp_path / "headers" / release / "usr/src" / f"linux-headers-{release}"
    assert (build / "Makefile").read_text() == (
        f"include {tmp_path}/headers/{release}/usr/src/linux-headers-6.12.117+deb12-common/"
        "Makefile\n"
    )
    assert ran[0][:2] == ["apt-get", "download"] and len(ran) == 4  # download, 3 x unpack
    ran.clear()
    assert install.install_headers(release, lambda _: None) == build  # cached: nothing runs
    assert ran == []
