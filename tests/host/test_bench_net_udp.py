"""bench.net.udp's host-side logic: the parsers it reads the guest with (/proc/PID/stat,
``strace -c``, iperf3's JSON, the driver's exit line), the variant specs, and the round
order of the guest part (kernel before every variant run) with the lab replaced by fakes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import bench.net.udp as U

# strace -c -f as strace 6.x prints it: an errors column only where there were errors.
STRACE = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 41.20    0.412000          20     20600      1030 read
 30.10    0.301000          29     10300           poll
  9.00    0.090000          45      2000           ioctl
------ ----------- ----------- --------- --------- ----------------
100.00    0.803000          24     32900      1030 total
"""


def test_strace_counts_reads_calls_and_errors_without_the_total() -> None:
    assert U.strace_counts(STRACE) == {"read": (20600, 1030), "poll": (10300, 0),
                                       "ioctl": (2000, 0)}  # fmt: skip


def test_proc_cpu_ticks_counts_after_a_command_name_with_spaces_and_parens() -> None:
    # proc(5): pid (comm) state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt
    # cmajflt utime stime ...
    line = "4242 (py (x) 1) S 1 4242 4242 0 -1 4194560 900 0 0 0 731 269 0 0 20 0 1 0 5 0"
    assert U.proc_cpu_ticks(line) == 731 + 269
    assert U.proc_cpu_ticks(Path("/proc/self/stat").read_text()) >= 0


def test_udp_rate_is_delivered_packets_per_second() -> None:
    rep = {"end": {"sum": {"packets": 20000, "lost_packets": 2000, "seconds": 4.0}}}
    assert U.udp_rate(rep) == 4500.0


def test_driver_counters_come_from_the_exit_line_software_counters_first() -> None:
    log = "udrv e1000: udrv0: link up\ncounters: tx_packets=7 rx_packets=3; device: tx_packets=9\n"
    assert U.driver_counters(log) == {"tx_packets": 7, "rx_packets": 3}
    assert U.driver_counters("") == {}


def test_variant_specs() -> None:
    assert U.parse_variant("offload=.") == U.Variant("offload", None, [])
    assert U.parse_variant("old=2b53787^:no-offload") == U.Variant("old", "2b53787^",
                                                                   ["--no-offload"])  # fmt: skip
    assert U.parse_variant("slow=.:itr-us=200,polling").args == ["--itr-us=200", "--polling"]
    for bad in ("offload", "=main", "x=", "x=main:TSO", "x=.:a;rm"):
        with pytest.raises(ValueError, match="NAME=REV"):
            U.parse_variant(bad)


def test_rounds_run_the_kernel_before_each_variant_and_ratios_use_that_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, int]] = []
    rates = iter(range(1000, 100000, 1000))  # every run faster than the one before
    frames = {"n": 0}

    class FakeDriver:
        def __init__(self, v: U.Variant, results: Path, profile: Path | None = None) -> None:
            self.variant = v
            calls.append((f"start {v.name}", 0))

        def cpu_ticks(self) -> int:
            return frames["n"]  # one tick per 100 frames below

        def stop(self) -> dict[str, int]:
            calls.append((f"stop {self.variant.name}", 0))
            return {"to_nic": 1}

    def fake_iperf(prefix: str, length: int, seconds: int = 4) -> dict[str, Any]:
        who = "kernel" if prefix else "udrv"
        calls.append((who, length))
        if who == "udrv":
            frames["n"] += 100
        return {"end": {"sum": {"packets": next(rates), "lost_packets": 0, "seconds": 1.0}}}

    monkeypatch.setattr(U, "wire", lambda: None)
    monkeypatch.setattr(U, "Driver", FakeDriver)
    monkeypatch.setattr(U, "iperf_udp", fake_iperf)
    monkeypatch.setattr(U, "tap_stats", lambda: (frames["n"] * 100, 0))
    monkeypatch.setattr(U.shutil, "which", lambda name: None)  # no strace pass
    monkeypatch.setenv("UDRV_LAB_RESULTS", str(tmp_path))
    cfg = tmp_path / "config.json"
    variants = [U.parse_variant("a=."), U.parse_variant("b=.:no-offload")]
    cfg.write_text(U.json.dumps({"rounds": 2, "variants": [U.asdict(v) for v in variants]}))
    assert U.guest_main(cfg) == 0
    one = [("kernel", 18), ("udrv", 18), ("kernel", 1472), ("udrv", 1472)]
    per_round = [("start a", 0), *one, ("stop a", 0), ("start b", 0), *one, ("stop b", 0)]
    assert calls == per_round * 2
    data = U.json.loads((tmp_path / "net-udp.json").read_text())
    s = U.summarize(data)
    # round 1, variant a, 64 B: kernel 1000 pps then udrv 2000 pps; round 2 starts at 9000
    assert s["a"]["64"]["ratios"] == [2.0, 10000 / 9000]
    assert s["b"]["1514"]["ratios"] == [8000 / 7000, 16000 / 15000]
    assert s["a"]["64"]["kernel_kpps"] == pytest.approx((1 + 9) / 2)
    # 100 frames' worth of TAP counter (x100) per run, one clock tick per run
    tick_us = 1e6 / U.os.sysconf("SC_CLK_TCK")
    assert s["a"]["64"]["cpu_rounds"] == pytest.approx([100 * tick_us / 10000] * 2)
    assert data["counters"] == {"a": [{"to_nic": 1}] * 2, "b": [{"to_nic": 1}] * 2}


class FakeDriver:
    """A driver variant that serves nothing; the one named "broken" fails to start."""

    def __init__(self, v: U.Variant, results: Path, profile: Path | None = None) -> None:
        if v.name == "broken":
            raise RuntimeError("driver broken did not start: Traceback ...")

    def cpu_ticks(self) -> int:
        return 0

    def stop(self) -> dict[str, int]:
        return {}


def test_a_variant_that_fails_is_recorded_and_the_others_are_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rep = {"end": {"sum": {"packets": 10, "lost_packets": 0, "seconds": 1.0}}}
    monkeypatch.setattr(U, "wire", lambda: None)
    monkeypatch.setattr(U, "Driver", FakeDriver)
    monkeypatch.setattr(U, "iperf_udp", lambda prefix, length, seconds=4: rep)
    monkeypatch.setattr(U, "tap_stats", lambda: (0, 0))
    monkeypatch.setattr(U.shutil, "which", lambda name: None)
    monkeypatch.setenv("UDRV_LAB_RESULTS", str(tmp_path))
    cfg = tmp_path / "config.json"
    variants = [U.parse_variant("broken=."), U.parse_variant("ok=.")]
    cfg.write_text(U.json.dumps({"rounds": 2, "variants": [U.asdict(v) for v in variants]}))
    assert U.guest_main(cfg) == 0
    data = U.json.loads((tmp_path / "net-udp.json").read_text())
    assert len(data["errors"]) == 2 and data["errors"][0].startswith("round 1 broken:")
    assert [len(data["runs"][n]["64"]) for n in ("broken", "ok")] == [0, 2]
    s = U.summarize(data)
    assert s["broken"] == {} and s["ok"]["64"]["ratios"] == [1.0, 1.0]
    assert s["ok"]["64"]["cpu_us_per_frame"] is None  # no frames through the TAP


def test_with_tcp_each_round_adds_a_kernel_and_a_variant_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    rep = {"end": {"sum": {"packets": 10, "lost_packets": 0, "seconds": 1.0}}}
    monkeypatch.setattr(U, "wire", lambda: None)
    monkeypatch.setattr(U, "Driver", FakeDriver)
    monkeypatch.setattr(
        U, "iperf_udp", lambda prefix, length, seconds=4: calls.append("udp") or rep
    )

    def tcp(prefix: str) -> float:
        calls.append("tcp kernel" if prefix == "ip netns exec ref " else "tcp udrv")
        return 100.0 if prefix else 55.0

    monkeypatch.setattr(U, "tcp_mbps", tcp)
    monkeypatch.setattr(U, "tap_stats", lambda: (0, 0))
    monkeypatch.setattr(U.shutil, "which", lambda name: None)
    monkeypatch.setenv("UDRV_LAB_RESULTS", str(tmp_path))
    cfg = tmp_path / "config.json"
    cfg.write_text(U.json.dumps({"rounds": 2, "tcp": True,
                                 "variants": [U.asdict(U.parse_variant("a=."))]}))  # fmt: skip
    assert U.guest_main(cfg) == 0
    assert calls == (["udp"] * 4 + ["tcp kernel", "tcp udrv"]) * 2
    data = U.json.loads((tmp_path / "net-udp.json").read_text())
    assert data["tcp"] == {"a": [{"kernel_mbps": 100.0, "udrv_mbps": 55.0}] * 2}
