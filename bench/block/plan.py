"""What bench.block measures and in which order: the fio jobs, the paths, the goals, the schedule.

The method is the project's: every figure is read as a ratio against a reference measured in
the same lab session (the kernel's own driver on the same emulated device, or nbdkit for the
nbdkit plugin); reference and candidate alternate (A B A B A B), never one block of each, so
that drift on a shared machine falls on both alike; the whole sequence is repeated
``UDRV_BENCH_REPS`` times (3) and a goal counts as met only if it holds in every repetition.

A repetition runs the groups in turn (nbdkit's plugin, then NVMe, then the RAM disk), each
group its reference first and then the udrv paths compared with it; the next repetition starts
with the references again (for NVMe: the device goes back from vfio-pci to the kernel's
nvme). To keep a full run within about 25 minutes on two TCG vCPUs, every repetition runs
only the jobs that a goal or the 1 -> 2 queue scaling compares; the other jobs (4k random
writes at QD1, 128k sequential reads, the nbdkit QD1 jobs, NVMe over NBD but its goal job,
nbdkit's C memory plugin), the QD1 per-I/O breakdowns and the yappi profile run once, in the
first repetition (the profile at the very end).

:func:`schedule` is the order the guest runs (``bench/block/guest.py`` executes it step by
step) and :func:`estimate_seconds` what it should cost.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

#: fio job name -> fio arguments.
JOBS = {
    "4k randread QD1": "--rw=randread --bs=4k --iodepth=1",
    "4k randread QD32": "--rw=randread --bs=4k --iodepth=32",
    "4k randwrite QD1": "--rw=randwrite --bs=4k --iodepth=1",
    "4k randwrite QD32": "--rw=randwrite --bs=4k --iodepth=32",
    "128k seqread QD8": "--rw=read --bs=128k --iodepth=8",
    # Two fio jobs of QD32 each (blk-mq maps each job's CPU to a queue): for 1 -> 2 queues.
    "4k randread QD32 x2": "--rw=randread --bs=4k --iodepth=32 --numjobs=2 --group_reporting",
}
QD1 = "4k randread QD1"
QUEUES_JOB = "4k randread QD32 x2"
_NVME = ("4k randread QD1", "4k randread QD32", "4k randwrite QD1", "4k randwrite QD32",
         "128k seqread QD8")  # fmt: skip
_NULL = ("4k randread QD1", "4k randread QD32", "4k randwrite QD32")
_NBDKIT = ("4k randread QD1", "4k randread QD32", "4k randwrite QD1", "4k randwrite QD32")

#: ``UDRV_BENCH_ONLY``'s words: which comparisons a run makes.
CATEGORIES = ("nvme", "ram", "nbdkit", "queues")

#: Every path in the order a repetition runs them: path -> {UDRV_BENCH_ONLY word: the jobs
#: that word selects}. A path runs the union of its selected jobs, in JOBS' order. Each group
#: (nbdkit's plugin, NVMe, the RAM disk) starts with its reference.
PATHS: dict[str, dict[str, tuple[str, ...]]] = {
    "nbdkit python / nbd-client": {"nbdkit": _NBDKIT},
    "udrv plugin / ublk": {"nbdkit": _NBDKIT},
    "udrv plugin / nbd": {"nbdkit": _NBDKIT},
    "kernel nvme": {"nvme": _NVME, "queues": (QUEUES_JOB,)},
    "udrv nvme / ublk": {"nvme": _NVME, "queues": (QD1, QUEUES_JOB)},
    "udrv nvme / ublk 2q": {"nvme": (QD1,), "queues": (QD1, QUEUES_JOB)},
    "udrv nvme / nbd": {"nvme": _NVME},
    "kernel null_blk": {"ram": _NULL, "queues": (QUEUES_JOB,)},
    "nbdkit memory (C) / nbd-client": {"nbdkit": _NULL},
    "udrv ram / ublk": {"ram": _NULL, "queues": (QD1, QUEUES_JOB), "nbdkit": _NULL},
    "udrv ram / ublk 2q": {"ram": (QD1,), "queues": (QD1, QUEUES_JOB)},
}
#: The yappi profile's path (udrv NVMe over ublk, one queue, under bench.block.profile).
PROFILE_PATH = "udrv nvme / ublk (yappi)"
PROFILE_JOB = "4k randread QD32"

REFERENCES = {  # path prefix -> the path its IOPS are compared with
    "udrv nvme": "kernel nvme",
    "udrv ram": "kernel null_blk",
    "udrv plugin": "nbdkit python / nbd-client",
    "nbdkit memory": "udrv ram / ublk",
}


def reference(path: str) -> str | None:
    """The path whose figures ``path``'s are divided by, or None (a reference itself)."""
    return next((ref for prefix, ref in REFERENCES.items() if path.startswith(prefix)), None)


def queues(path: str) -> str:
    """How many ublk queues (NBD connections) ``path`` serves with, for the tables."""
    if path.startswith("kernel"):
        return "1 per CPU"
    if path.endswith(" 2q"):
        return "2, pinned"
    return "1" if path.startswith("udrv") else "-"


@dataclass(frozen=True)
class Goal:
    """``path``'s IOPS in ``job`` are at least ``minimum`` x ``reference``'s, in every rep."""

    path: str
    reference: str
    job: str
    minimum: float


GOALS = (
    Goal("udrv nvme / ublk", "kernel nvme", "4k randread QD32", 0.5),
    Goal("udrv nvme / ublk", "kernel nvme", "4k randwrite QD32", 0.5),
    Goal("udrv ram / ublk", "kernel null_blk", "4k randread QD32", 0.3),
    Goal("udrv nvme / ublk", "kernel nvme", QD1, 0.6),
    # QD1 with udrv's recommended configuration: fio's I/O is served on fio's CPU, as by the
    # kernel's nvme (a queue per CPU); under TCG a cross-vCPU wake-up costs milliseconds.
    Goal("udrv nvme / ublk 2q", "kernel nvme", QD1, 0.6),
    Goal("udrv ram / ublk", "kernel null_blk", QD1, 0.2),
    Goal("udrv ram / ublk 2q", "kernel null_blk", QD1, 0.2),
    Goal("udrv plugin / ublk", "nbdkit python / nbd-client", "4k randread QD32", 2.0),
    Goal("udrv plugin / ublk", "nbdkit python / nbd-client", "4k randwrite QD32", 2.0),
    Goal("udrv nvme / ublk 2q", "kernel nvme", QUEUES_JOB, 0.9),
    Goal("udrv ram / ublk 2q", "kernel null_blk", QUEUES_JOB, 0.5),
    Goal("udrv nvme / nbd", "kernel nvme", "4k randread QD32", 0.4),
)
#: The 1 -> 2 queue scaling (QUEUES_JOB's IOPS): (one queue, two queues).
SCALING = (("udrv nvme / ublk", "udrv nvme / ublk 2q"), ("udrv ram / ublk", "udrv ram / ublk 2q"))
#: Paths that get the QD1 per-I/O breakdown (once), with the UDRV_BENCH_ONLY word that asks.
BREAKDOWN = {
    "kernel nvme": "nvme",
    "udrv nvme / ublk": "nvme",
    "udrv nvme / ublk 2q": "nvme",
    "kernel null_blk": "ram",
    "udrv ram / ublk": "ram",
    "udrv ram / ublk 2q": "ram",
}


class Step(NamedTuple):
    """One thing the guest runs: ``kind`` "fio" (a measured job), "breakdown" (the QD1
    per-I/O counts of ``path``) or "profile" (``job`` under yappi)."""

    rep: int
    path: str
    job: str
    kind: str = "fio"


@dataclass(frozen=True)
class Settings:
    """A run's parameters, from the environment (the guest reads the same variables)."""

    only: frozenset[str]
    reps: int
    runtime: float


def settings(environ: Mapping[str, str] = os.environ) -> Settings:
    """``UDRV_BENCH_ONLY`` (comma-separated words of CATEGORIES; all by default),
    ``UDRV_BENCH_REPS`` (3) and ``UDRV_BENCH_RUNTIME`` (fio's measured seconds per job, 4).

    Raises:
        ValueError: a value the benchmark cannot use, naming the variable and what it takes.
    """
    only = frozenset(filter(None, environ.get("UDRV_BENCH_ONLY", ",".join(CATEGORIES)).split(",")))
    unknown = sorted(only - set(CATEGORIES))
    if unknown or not only:
        raise ValueError(
            f"UDRV_BENCH_ONLY={environ.get('UDRV_BENCH_ONLY', '')!r}: "
            f"{'unknown ' + ', '.join(unknown) if unknown else 'empty'}; "
            f"use comma-separated words of {', '.join(CATEGORIES)}"
        )
    try:
        reps = int(environ.get("UDRV_BENCH_REPS", "3"))
        runtime = float(environ.get("UDRV_BENCH_RUNTIME", "4"))
    except ValueError as e:
        raise ValueError(
            f"UDRV_BENCH_REPS must be an integer and UDRV_BENCH_RUNTIME a number of seconds: {e}"
        ) from None
    if reps < 1 or not runtime > 0:
        raise ValueError(
            f"UDRV_BENCH_REPS={reps} and UDRV_BENCH_RUNTIME={runtime:g}: "
            "need at least 1 repetition and a positive runtime"
        )
    return Settings(only, reps, runtime)


def selected(only: frozenset[str]) -> dict[str, tuple[str, ...]]:
    """Path -> the jobs it runs for ``only`` (paths with none left out), in run order.

    A goal's reference runs its job whenever the goal's path does, and a scaling's one-queue
    path whenever the two-queue one does, whatever words selected them.
    """
    chosen = {
        path: {job for word, jobs in by_word.items() if word in only for job in jobs}
        for path, by_word in PATHS.items()
    }
    for g in GOALS:
        if g.job in chosen[g.path]:
            chosen[g.reference].add(g.job)
    for one, two in SCALING:
        if QUEUES_JOB in chosen[two]:
            chosen[one].add(QUEUES_JOB)
    return {path: tuple(j for j in JOBS if j in jobs) for path, jobs in chosen.items() if jobs}


def compared(paths: Mapping[str, Sequence[str]]) -> set[tuple[str, str]]:
    """The (path, job) pairs of ``paths`` (from :func:`selected`) that a goal or the scaling
    compares with another of ``paths``: they run in every rep."""
    pairs = [(g.path, g.reference, g.job) for g in GOALS]
    pairs += [(one, two, QUEUES_JOB) for one, two in SCALING]
    out = set()
    for a, b, job in pairs:
        if job in paths.get(a, ()) and job in paths.get(b, ()):
            out |= {(a, job), (b, job)}
    return out


def schedule(only: frozenset[str], reps: int) -> list[Step]:
    """Every step the guest runs, in order (see the module docstring for the method).

    Args:
        only: the UDRV_BENCH_ONLY words (a subset of CATEGORIES).
        reps: repetitions (at least 1).

    Returns:
        The steps; the steps of one (rep, path) are consecutive: one session of that path
        (one bind, server or nbdkit for them all).
    """
    paths = selected(only)
    every_rep = compared(paths)
    steps = []
    for rep in range(reps):
        for path, jobs in paths.items():
            steps += [Step(rep, path, job) for job in jobs if rep == 0 or (path, job) in every_rep]
            if rep == 0 and BREAKDOWN.get(path) in only and QD1 in jobs:
                steps.append(Step(rep, path, QD1, "breakdown"))
    if "nvme" in only:
        steps.append(Step(reps - 1, PROFILE_PATH, PROFILE_JOB, "profile"))
    return steps


def sessions(steps: Sequence[Step]) -> Iterator[tuple[int, str, list[Step]]]:
    """``steps`` grouped into sessions: (rep, path, its consecutive steps)."""
    for (rep, path), group in itertools.groupby(steps, key=lambda s: (s.rep, s.path)):
        yield rep, path, list(group)


#: Fixed costs for the estimate, seconds, measured in two short runs (2 TCG vCPUs, host load
#: 1-4): fio's start, exit and JSON beyond its ramp and runtime; starting and stopping a
#: server (a Python process importing udrv, or nbdkit and nbd-client); binding or loading a
#: kernel driver; booting the guest and stopping it; strace's attach in a breakdown.
FIO_OVERHEAD_S = 2.0
SESSION_S = 8.0
KERNEL_SESSION_S = 2.0
BOOT_S = 30.0
STRACE_S = 1.5
RAMP_S = 1.0


def estimate_seconds(steps: Sequence[Step], runtime: float) -> float:
    """What running ``steps`` with fio's ``runtime`` should take on a quiet host."""
    total = BOOT_S
    for _, path, _ in sessions(steps):
        total += KERNEL_SESSION_S if path.startswith("kernel") else SESSION_S
    for s in steps:
        if s.kind == "breakdown":  # no ramp; two fio runs where a driver process is traced
            runs = 1 if s.path.startswith("kernel") else 2
            total += runs * (runtime + FIO_OVERHEAD_S) + (runs - 1) * STRACE_S
        else:
            total += runtime + RAMP_S + FIO_OVERHEAD_S
    return total
