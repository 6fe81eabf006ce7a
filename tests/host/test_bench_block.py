"""bench/block's host side: the interleaved schedule, the guest following it, and the summary
(ratios per repetition, spread, goals met in every repetition) from made-up figures."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

import udrv.lab
from bench.block import __main__ as block_main
from bench.block import guest
from bench.block.plan import (
    BREAKDOWN,
    CATEGORIES,
    GOALS,
    PATHS,
    PROFILE_PATH,
    QD1,
    QUEUES_JOB,
    SCALING,
    Step,
    estimate_seconds,
    schedule,
    sessions,
    settings,
)
from bench.block.summary import spread, summarise

ALL = frozenset(CATEGORIES)
READ32 = "4k randread QD32"


def _collapse(seq: list[str]) -> list[str]:
    return [x for i, x in enumerate(seq) if i == 0 or seq[i - 1] != x]


@pytest.mark.parametrize(
    "only", [ALL, frozenset({"nvme"}), frozenset({"ram"}), frozenset({"queues"})]
)
def test_schedule_alternates_reference_and_candidate_in_every_rep(only: frozenset[str]) -> None:
    steps = schedule(only, 3)
    fio = [s for s in steps if s.kind == "fio"]
    goals = [g for g in GOALS if Step(0, g.path, g.job) in fio]
    assert goals  # every word selects some goal
    for g in goals:
        # Projected on the two paths, the sessions go A B A B A B: never two of one in a row.
        order = _collapse([s.path for s in fio if s.path in (g.path, g.reference)])
        assert order == [g.reference, g.path] * 3, g
        for rep in range(3):  # and the goal's job is measured on both sides in every rep
            assert Step(rep, g.reference, g.job) in steps, (g, rep)
            assert Step(rep, g.path, g.job) in steps, (g, rep)
    for one, two in SCALING:
        if any(s.path == two and s.job == QUEUES_JOB for s in fio):
            assert all(Step(rep, p, QUEUES_JOB) in steps for rep in range(3) for p in (one, two))


def test_schedule_repeats_goal_jobs_and_runs_the_rest_once() -> None:
    steps = schedule(ALL, 3)
    # A path is opened once per repetition (one bind or server for all its jobs).
    keys = [(rep, path) for rep, path, _ in sessions(steps)]
    assert len(keys) == len(set(keys))
    goal_jobs = {(g.path, g.job) for g in GOALS} | {(g.reference, g.job) for g in GOALS}
    goal_jobs |= {(p, QUEUES_JOB) for pair in SCALING for p in pair}
    later = {(s.path, s.job) for s in steps if s.rep > 0 and s.kind == "fio"}
    assert later == goal_jobs  # repetitions 2 and 3: exactly what a goal or the scaling compares
    first = {(s.path, s.job) for s in steps if s.rep == 0 and s.kind == "fio"}
    informational = ("kernel nvme", "4k randwrite QD1")
    assert informational in first and informational not in later
    assert ("udrv nvme / ublk 2q", QD1) in first  # QD1 with udrv's recommended configuration
    assert ("udrv ram / ublk 2q", QD1) in first
    breakdowns = [(s.rep, s.path) for s in steps if s.kind == "breakdown"]
    assert sorted(breakdowns) == sorted((0, p) for p in BREAKDOWN)
    assert steps[-1] == Step(2, PROFILE_PATH, READ32, "profile")
    assert sum(s.kind == "profile" for s in steps) == 1


def test_schedule_follows_udrv_bench_only() -> None:
    ram = schedule(frozenset({"ram"}), 2)
    assert {s.path for s in ram} == {"kernel null_blk", "udrv ram / ublk", "udrv ram / ublk 2q"}
    assert all(s.job != QUEUES_JOB for s in ram)
    nbdkit = schedule(frozenset({"nbdkit"}), 2)
    assert "nbdkit memory (C) / nbd-client" in {s.path for s in nbdkit}
    assert not any(s.path.startswith(("kernel nvme", "udrv nvme")) for s in nbdkit)
    assert not any(s.kind in ("breakdown", "profile") for s in nbdkit)
    queues = schedule(frozenset({"queues"}), 1)
    # The two-queue QD1 goal brings its reference's QD1 job, which "queues" alone does not.
    assert Step(0, "kernel nvme", QD1) in queues and Step(0, "udrv nvme / ublk 2q", QD1) in queues


def test_settings_read_the_environment_and_name_bad_values() -> None:
    s = settings({})
    assert (s.only, s.reps, s.runtime) == (ALL, 3, 4.0)
    s = settings(
        {"UDRV_BENCH_ONLY": "ram,queues", "UDRV_BENCH_REPS": "2", "UDRV_BENCH_RUNTIME": "2"}
    )
    assert (s.only, s.reps, s.runtime) == (frozenset({"ram", "queues"}), 2, 2.0)
    with pytest.raises(ValueError, match=r"UDRV_BENCH_ONLY='ram,nmve': unknown nmve; use .*nvme"):
        settings({"UDRV_BENCH_ONLY": "ram,nmve"})
    with pytest.raises(ValueError, match=r"UDRV_BENCH_REPS=0 .* at least 1 repetition"):
        settings({"UDRV_BENCH_REPS": "0"})
    with pytest.raises(ValueError, match="UDRV_BENCH_REPS must be an integer"):
        settings({"UDRV_BENCH_REPS": "three"})


def test_estimate_counts_every_fio_run_and_keeps_a_full_run_in_25_minutes() -> None:
    steps = schedule(ALL, 3)
    runs = sum(2 if s.kind == "breakdown" and not s.path.startswith("kernel") else 1 for s in steps)
    assert estimate_seconds(steps, 6) - estimate_seconds(steps, 4) == pytest.approx(2 * runs)
    assert estimate_seconds(steps, 4) <= 25 * 60


def _figures(iops: float) -> dict[str, float]:
    return {"iops": iops, "mbps": iops * 4096 / 1e6, "mean_us": 1e6 / iops, "p99_us": 2e6 / iops,
            "cpu_us_per_io": 100.0}  # fmt: skip


def _reps(udrv_read: list[float], udrv_write: list[float]) -> list[dict[str, Any]]:
    """Kernel nvme at 1000 IOPS in every rep; udrv at the given IOPS, rep by rep."""
    return [
        {
            "kernel nvme": {READ32: _figures(1000), "4k randwrite QD32": _figures(1000)},
            "udrv nvme / ublk": {READ32: _figures(r), "4k randwrite QD32": _figures(w)},
        }
        for r, w in zip(udrv_read, udrv_write, strict=True)
    ]


def _steps(reps: int, jobs: tuple[str, ...] = (READ32, "4k randwrite QD32")) -> list[Step]:
    return [Step(rep, path, job) for rep in range(reps) for path in ("kernel nvme", "udrv nvme / ublk")
            for job in jobs]  # fmt: skip


def _goal(summary: dict[str, Any], path: str, job: str) -> dict[str, Any]:
    return next(g for g in summary["goals"] if (g["path"], g["job"]) == (path, job))


def test_summary_ratio_per_rep_spread_and_goal_met_only_in_all_reps() -> None:
    s = summarise(_reps([600, 400, 550], [700, 900, 800]), _steps(3))
    row = s["paths"]["udrv nvme / ublk"][READ32]
    assert row["rep_numbers"] == [1, 2, 3] and row["vs"] == "kernel nvme"
    assert row["iops"] == {"reps": [600, 400, 550], "median": 550, "min": 400, "max": 600}
    assert row["ratio"]["reps"] == pytest.approx([0.6, 0.4, 0.55])
    assert (row["ratio"]["median"], row["ratio"]["min"], row["ratio"]["max"]) == pytest.approx(
        (0.55, 0.4, 0.6)
    )
    assert row["p99_us"]["max"] == pytest.approx(2e6 / 400)
    assert "ratio" not in s["paths"]["kernel nvme"][READ32]  # the reference itself
    read = _goal(s, "udrv nvme / ublk", READ32)
    # 0.4x in the second repetition: met in 2 of 3 is not met.
    assert read["ratios"] == pytest.approx([0.6, 0.4, 0.55])
    assert (read["met_in"], read["n"], read["met"], read["missing_reps"]) == (2, 3, False, [])
    write = _goal(s, "udrv nvme / ublk", "4k randwrite QD32")
    assert (write["met_in"], write["met"]) == (3, True)
    # Goals whose paths this run did not plan are left out, not reported as failures.
    assert {(g["path"], g["job"]) for g in s["goals"]} == {
        ("udrv nvme / ublk", READ32), ("udrv nvme / ublk", "4k randwrite QD32")}  # fmt: skip
    assert s["missing"] == [] and s["n_reps"] == 3


def test_summary_reports_a_missing_rep_or_path_and_does_not_count_it_as_met() -> None:
    reps = _reps([600, 600, 600], [700, 700, 700])
    del reps[1]["udrv nvme / ublk"]  # the server failed in rep 2
    reps = reps[:2]  # and the run ended before rep 3
    s = summarise(reps, _steps(3))
    read = _goal(s, "udrv nvme / ublk", READ32)
    assert read["ratios"] == pytest.approx([0.6, None, None])
    assert (read["met_in"], read["met"], read["missing_reps"]) == (1, False, [2, 3])
    assert "rep 2: udrv nvme / ublk, 4k randread QD32" in s["missing"]
    assert "rep 3: kernel nvme, 4k randread QD32" in s["missing"]
    assert len(s["missing"]) == 2 + 4  # rep 2: udrv's two jobs; rep 3: all four
    iops = s["paths"]["udrv nvme / ublk"][READ32]["iops"]
    assert iops == {"reps": [600, None, None], "median": 600, "min": 600, "max": 600}
    assert spread([None, None]) == {"reps": [None, None], "median": None, "min": None, "max": None}


def test_summary_of_a_job_run_once_and_the_queue_scaling() -> None:
    one, two = SCALING[0]
    steps = [
        Step(0, "kernel nvme", "128k seqread QD8"),
        Step(0, "udrv nvme / ublk", "128k seqread QD8"),
    ]
    steps += [Step(r, p, QUEUES_JOB) for r in range(2) for p in ("kernel nvme", one, two)]
    reps = [
        {"kernel nvme": {"128k seqread QD8": _figures(200), QUEUES_JOB: _figures(2000)},
         one: {"128k seqread QD8": _figures(50), QUEUES_JOB: _figures(500)},
         two: {QUEUES_JOB: _figures(1250)}},
        {"kernel nvme": {QUEUES_JOB: _figures(2000)}, one: {QUEUES_JOB: _figures(400)},
         two: {QUEUES_JOB: _figures(1200)}},
    ]  # fmt: skip
    s = summarise(reps, steps)
    seq = s["paths"][one]["128k seqread QD8"]
    assert seq["rep_numbers"] == [1] and seq["ratio"]["reps"] == pytest.approx([0.25])
    sc = s["scaling"][one]
    assert (sc["one"], sc["two"]) == ([500, 400], [1250, 1200])
    assert sc["scaling"]["reps"] == pytest.approx([2.5, 3.0])
    assert sc["scaling"]["median"] == pytest.approx(2.75)
    q = _goal(s, two, QUEUES_JOB)
    assert q["ratios"] == pytest.approx([0.625, 0.6]) and q["met"] is False
    assert s["missing"] == []


def test_report_prints_each_reps_ratio_and_met_in_k_of_n() -> None:
    s = summarise(_reps([600, 400, 550], [700, 900, 800]), _steps(3))
    console = Console(record=True, width=250)
    block_main.report(s, console)
    text = console.export_text()
    assert "0.60, 0.40, 0.55" in text
    assert "not met (met in 2 of 3)" in text
    assert "0.55 (0.40-0.60)" in text  # the ratio's median (min-max)
    assert "550 (400-600)" in text  # IOPS median (min-max)


def test_guest_opens_every_path_with_its_own_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, ...]] = []

    def sh(cmd: str, timeout: float = 0) -> str:
        calls.append(("sh", cmd))
        return ""

    monkeypatch.setattr(guest, "sh", sh)
    monkeypatch.setattr(guest, "bind", lambda addr, drv: calls.append(("bind", addr, drv)))
    monkeypatch.setattr(guest.os, "listdir", lambda path: ["nvme0"])
    monkeypatch.setattr(guest.os.path, "exists", lambda path: True)

    class Proc:
        pid = 42

    def serve(args: list[str], profile: Path | None = None) -> tuple[Proc, str]:
        calls.append(("serve", *args, f"profile={profile.name if profile else None}"))
        return Proc(), "/dev/ublkb0"

    monkeypatch.setattr(guest, "serve", serve)
    monkeypatch.setattr(guest, "stop", lambda proc: calls.append(("stop",)))

    def nbdkit(args: list[str], sock: Path, dev: str) -> Proc:
        calls.append(("nbdkit", *args))
        return Proc()

    monkeypatch.setattr(guest, "nbdkit", nbdkit)
    monkeypatch.setattr(guest, "nbdkit_stop", lambda proc, dev: calls.append(("nbdkit_stop",)))
    paths = guest.Paths("0000:00:04.0", Path("/results"))
    opened = {}
    for path in [*PATHS, PROFILE_PATH]:
        calls.clear()
        with paths.open(path) as (dev, pid):
            pass
        opened[path] = (dev, pid, list(calls))
    q = ("--depth", "32", "--queues")
    assert opened["kernel nvme"][:2] == ("/dev/nvme0n1", None)
    assert ("bind", "0000:00:04.0", "nvme") in opened["kernel nvme"][2]
    two = opened["udrv nvme / ublk 2q"][2]
    assert two[0] == ("bind", "0000:00:04.0", "vfio-pci")  # back from the kernel's nvme
    assert two[1] == (
        "serve",
        "nvme",
        "serve",
        "0000:00:04.0",
        "--frontend",
        "ublk",
        *q,
        "2",
        "profile=None",
    )
    assert opened["udrv nvme / nbd"][2][1][4:10] == ("--frontend", "nbd", *q, "1")
    assert opened["udrv ram / ublk 2q"][2][0][:3] == ("serve", "ramdisk", "serve")
    assert opened["udrv ram / ublk 2q"][2][0][-2:] == ("2", "profile=None")
    assert opened["udrv plugin / nbd"][2][0][5:7] == ("--frontend", "nbd")
    assert opened[PROFILE_PATH][2][1][-3:] == ("--queues", "1", "profile=block-profile.json")
    assert opened["nbdkit python / nbd-client"][:2] == ("/dev/nbd7", 42)
    assert opened["nbdkit python / nbd-client"][2][0][:2] == ("nbdkit", "python")
    assert opened["nbdkit memory (C) / nbd-client"][2][0] == ("nbdkit", "memory", "64M")
    assert opened["kernel null_blk"][0] == "/dev/nullb0"
    for path, (_, pid, made) in opened.items():  # what was started was stopped
        if pid:
            assert made[-1] in (("stop",), ("nbdkit_stop",)), path


def test_guest_runs_the_schedule_in_order_and_keeps_every_rep(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("UDRV_LAB_RESULTS", str(tmp_path))
    monkeypatch.setenv("UDRV_LAB_DEVICES", "nvme=0000:00:04.0")
    monkeypatch.setenv("UDRV_BENCH_ONLY", "ram")
    monkeypatch.setenv("UDRV_BENCH_REPS", "2")
    monkeypatch.setenv("UDRV_BENCH_RUNTIME", "2")
    ran: list[tuple[str, str, str]] = []
    current: list[str] = []

    @contextmanager
    def open_path(self: guest.Paths, path: str) -> Iterator[tuple[str, int | None]]:
        current[:] = [path]
        yield f"/dev/{path}", None

    def fio(
        dev: str, job: str, pid: int | None, runtime: float, ramp: float = 1.0
    ) -> dict[str, float]:
        assert runtime == 2.0 and dev == f"/dev/{current[0]}"
        ran.append((current[0], job, "fio"))
        return _figures(100.0 * len(ran))

    def breakdown(dev: str, job: str, pid: int | None, runtime: float) -> dict[str, float]:
        ran.append((current[0], job, "breakdown"))
        return {"iops": 1.0}

    monkeypatch.setattr(guest.Paths, "open", open_path)
    monkeypatch.setattr(guest, "fio", fio)
    monkeypatch.setattr(guest, "breakdown", breakdown)
    monkeypatch.setattr(guest, "sh", lambda cmd, timeout=0: "")
    assert guest.main() == 0
    steps = schedule(frozenset({"ram"}), 2)
    assert ran == [(s.path, s.job, s.kind) for s in steps]
    out = json.loads((tmp_path / "block.json").read_text())
    assert len(out["reps"]) == 2
    second = [i for i, s in enumerate(steps) if s.rep == 1 and s.path == "udrv ram / ublk 2q"]
    assert out["reps"][1]["udrv ram / ublk 2q"][QD1]["iops"] == 100.0 * (second[0] + 1)
    assert set(out["qd1"]) == {"kernel null_blk", "udrv ram / ublk", "udrv ram / ublk 2q"}


def test_main_prints_the_estimate_and_writes_every_rep_and_the_goals(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("UDRV_BENCH_ONLY", "nvme")
    monkeypatch.setenv("UDRV_BENCH_REPS", "3")
    monkeypatch.setattr(block_main, "RESULTS", tmp_path / "results")
    reps = _reps([600, 400, 550], [700, 900, 800])

    class FakeLab:
        def __init__(self, devices: list[str], memory: int, cpus: int) -> None:
            assert devices == ["nvme:size=64M"]
            self.results = tmp_path / "share"
            self.results.mkdir()

        def __enter__(self) -> FakeLab:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def run(self, args: list[str], timeout: float, stream: bool) -> Any:
            assert args[1:] == ["-m", "bench.block.guest"]
            (self.results / "block.json").write_text(json.dumps({"reps": reps, "qd1": {}}))

            class Result:
                returncode = 0

            return Result()

    monkeypatch.setattr(udrv.lab, "Lab", FakeLab)
    assert block_main.main() == 0
    out = capsys.readouterr().out
    assert "3 repetition(s)" in out and "minutes on a quiet host" in out
    assert "not met (met in 2 of 3)" in out and "host load average" in out
    saved = json.loads((tmp_path / "results" / "block.json").read_text())
    assert saved["repetitions"] == reps
    read = next(g for g in saved["goals"] if (g["path"], g["job"]) == ("udrv nvme / ublk", READ32))
    assert (read["met"], read["met_in"]) == (False, 2)
    assert read["ratios"] == pytest.approx([0.6, 0.4, 0.55])
    # The nvme schedule plans more than this fake guest measured: reported, not a crash.
    assert "rep 1: udrv nvme / nbd, 4k randread QD32" in saved["missing"]
    assert saved["meta"]["reps"] == 3 and len(saved["meta"]["host_load"]) == 2


def test_main_refuses_bad_settings_before_booting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("UDRV_BENCH_ONLY", "disk")
    monkeypatch.setattr(udrv.lab, "Lab", None)  # booting would fail the test
    assert block_main.main() == 2
    assert "UDRV_BENCH_ONLY='disk': unknown disk" in capsys.readouterr().out
