"""From the guest's per-repetition fio figures to bench.block's summary (no lab needed).

Ratios are taken within a repetition (candidate / its reference, both measured in that
repetition, one after the other), then spread over the repetitions as median (min-max); a
goal is met only if its ratio holds in every planned repetition ("met in k of n" otherwise);
a figure the schedule planned but the guest did not deliver is listed as missing and counts
as not met.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from bench.block.plan import GOALS, QUEUES_JOB, SCALING, Step, reference

#: The figures kept per repetition and spread over them.
METRICS = ("iops", "mbps", "mean_us", "p99_us", "cpu_us_per_io")
#: One repetition as the guest writes it: path -> job -> metric -> value.
Rep = dict[str, dict[str, dict[str, float]]]


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """``values`` (one per repetition, None where missing) with the median, min and max of
    those present (all three None if none is)."""
    present = [v for v in values if v is not None]
    return {
        "reps": list(values),
        "median": statistics.median(present) if present else None,
        "min": min(present) if present else None,
        "max": max(present) if present else None,
    }


def _figure(reps: Sequence[Rep], rep: int, path: str, job: str, metric: str) -> float | None:
    if rep >= len(reps):
        return None
    value = reps[rep].get(path, {}).get(job, {}).get(metric)
    return float(value) if value is not None else None


def summarise(reps: Sequence[Rep], steps: Sequence[Step]) -> dict[str, Any]:
    """The summary of a run.

    Args:
        reps: the guest's figures, one :data:`Rep` per repetition (a failed run may deliver
            fewer repetitions, or repetitions without some paths or jobs).
        steps: the schedule the guest was to run (:func:`bench.block.plan.schedule`): which
            (path, job) each repetition should hold.

    Returns:
        ``paths`` (path -> job -> ``rep_numbers`` (1-based, the planned ones), a
        :func:`spread` per metric, and ``ratio`` (the IOPS ratio to ``vs``, per rep) where
        the path has a reference), ``goals`` (one per goal whose path the schedule runs:
        ratios per rep, ``minimum``, ``met_in`` (reps), ``n``, ``met`` (in all n),
        ``missing_reps``), ``scaling`` (one-queue path -> per-rep IOPS of one and two queues
        and their ratio) and ``missing`` (planned figures the guest did not deliver, as
        "rep N: path, job").
    """
    planned: dict[tuple[str, str], list[int]] = {}
    for s in steps:
        if s.kind == "fio" and s.rep not in planned.setdefault((s.path, s.job), []):
            planned[(s.path, s.job)].append(s.rep)
    paths: dict[str, dict[str, dict[str, Any]]] = {}
    missing = []
    for (path, job), rep_list in planned.items():
        row: dict[str, Any] = {"rep_numbers": [r + 1 for r in rep_list]}
        for metric in METRICS:
            row[metric] = spread([_figure(reps, r, path, job, metric) for r in rep_list])
        missing += [f"rep {r + 1}: {path}, {job}" for r in rep_list if not _has(reps, r, path, job)]
        ref = reference(path)
        if ref is not None and (ref, job) in planned:
            row["vs"] = ref
            row["ratio"] = spread([_ratio(reps, r, path, ref, job) for r in rep_list])
        paths.setdefault(path, {})[job] = row
    goals = []
    for g in GOALS:
        if (g.path, g.job) not in planned:  # not in this run (UDRV_BENCH_ONLY)
            continue
        goal_reps = planned[(g.path, g.job)]
        ratios = [_ratio(reps, r, g.path, g.reference, g.job) for r in goal_reps]
        met_in = sum(1 for x in ratios if x is not None and x >= g.minimum)
        goals.append({
            "path": g.path, "reference": g.reference, "job": g.job, "minimum": g.minimum,
            "ratios": ratios, "met_in": met_in, "n": len(goal_reps),
            "met": met_in == len(goal_reps),
            "missing_reps": [r + 1 for r, x in zip(goal_reps, ratios, strict=True) if x is None],
        })  # fmt: skip
    scaling = {}
    for one, two in SCALING:
        if (two, QUEUES_JOB) not in planned:
            continue
        scale_reps = planned[(two, QUEUES_JOB)]
        a = [_figure(reps, r, one, QUEUES_JOB, "iops") for r in scale_reps]
        b = [_figure(reps, r, two, QUEUES_JOB, "iops") for r in scale_reps]
        scaling[one] = {
            "two_queues": two,
            "rep_numbers": [r + 1 for r in scale_reps],
            "one": a,
            "two": b,
            "scaling": spread(
                [y / x if x and y is not None else None for x, y in zip(a, b, strict=True)]
            ),
        }
    return {"n_reps": 1 + max((s.rep for s in steps), default=0), "paths": paths,
            "goals": goals, "scaling": scaling, "missing": missing}  # fmt: skip


def _has(reps: Sequence[Rep], rep: int, path: str, job: str) -> bool:
    return _figure(reps, rep, path, job, "iops") is not None


def _ratio(reps: Sequence[Rep], rep: int, path: str, ref: str, job: str) -> float | None:
    """``path``'s IOPS / ``ref``'s in ``job``, both from repetition ``rep``; None if either
    is missing or the reference did no I/O."""
    a, b = _figure(reps, rep, path, job, "iops"), _figure(reps, rep, ref, job, "iops")
    return a / b if a is not None and b else None
