"""The measurements, run inside the lab guest (``python3 -m bench.irq --inside``)."""

from __future__ import annotations

import asyncio
import os
import select
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import udrv
from udrv.drivers.edu import regs as R
from udrv.irq import Vector
from udrv.lab.pytest_plugin import bind

HERE = Path(__file__).parent


def _loop(bar: Any, vec: Vector, rounds: int, wait: Callable[[], object]) -> list[int]:
    """rounds x: t0; raise; wait(); t1; ack; rearm. Returns t1 - t0 in ns."""
    raise_, ack = bar.write32, bar.write32
    clock = time.perf_counter_ns
    out = []
    for _ in range(rounds):
        t0 = clock()
        raise_(R.INTR_RAISE, 1)
        wait()
        t1 = clock()
        ack(R.INTR_ACK, 1)
        vec.rearm()
        out.append(t1 - t0)
    return out


def _blocking(bar: Any, vec: Vector, rounds: int) -> list[int]:
    return _loop(bar, vec, rounds, lambda: vec.wait(5))


def _epoll(bar: Any, vec: Vector, rounds: int) -> list[int]:
    ep = select.epoll()
    ep.register(vec.fileno(), select.EPOLLIN)

    def epoll_wait() -> None:
        ep.poll(5)
        vec.poll()  # consume the count after the waiting code ran

    try:
        return _loop(bar, vec, rounds, epoll_wait)
    finally:
        ep.close()


def _asyncio(bar: Any, vec: Vector, rounds: int) -> list[int]:
    async def run() -> list[int]:
        clock, out = time.perf_counter_ns, []
        for _ in range(rounds):
            t0 = clock()
            bar.write32(R.INTR_RAISE, 1)
            await vec.wait_async()
            t1 = clock()
            bar.write32(R.INTR_ACK, 1)
            vec.rearm()
            out.append(t1 - t0)
        return out

    return asyncio.run(run())


def _thread(bar: Any, vec: Vector, rounds: int) -> list[int]:
    got = threading.Event()
    stamp = [0]

    def handler(count: int) -> None:
        stamp[0] = time.perf_counter_ns()
        bar.write32(R.INTR_ACK, 1)
        got.set()

    vec.start_handler(handler)
    out = []
    try:
        for _ in range(rounds):
            got.clear()
            t0 = time.perf_counter_ns()
            bar.write32(R.INTR_RAISE, 1)
            if not got.wait(5):
                raise TimeoutError("no interrupt reached the handler thread")
            out.append(stamp[0] - t0)
    finally:
        vec.stop_handler()
    return out


def _floor(bar: Any, vec: Vector, rounds: int) -> list[int]:
    """No udrv wait layer: os.eventfd_read on the vector's fd. What the interpreter costs."""
    fd, read = vec.fileno(), os.eventfd_read

    def raw_wait() -> None:
        while True:
            try:
                read(fd)
                return
            except BlockingIOError:
                select.select([fd], [], [], 5)

    return _loop(bar, vec, rounds, raw_wait)


STYLES: dict[str, Callable[[Any, Vector, int], list[int]]] = {
    "floor": _floor,
    "blocking": _blocking,
    "epoll": _epoll,
    "asyncio": _asyncio,
    "thread": _thread,
}


def python_styles(address: str, kind: str, styles: list[str], rounds: int) -> dict[str, list[int]]:
    """Open ``address``, enable one ``kind`` vector, and time each wait style."""
    with udrv.open(address) as dev:
        vec = dev.irq.enable(kind)[0]
        bar = dev.bar(0)
        return {style: STYLES[style](bar, vec, rounds) for style in styles}


def c_reference(address: str, rounds: int) -> list[int]:
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "vfio_msi_ref"
        subprocess.run(["gcc", "-O2", "-o", str(exe), str(HERE / "vfio_msi_ref.c")], check=True)
        out = subprocess.run(
            [str(exe), address, str(rounds)], check=True, capture_output=True, text=True
        ).stdout
    return [int(x) for x in out.split()]


def run_all(address: str, rounds: int) -> dict[str, list[int]]:
    """Every variant, with a warm-up pass of each discarded. Keys are table labels."""
    warm = max(20, rounds // 20)
    res: dict[str, list[int]] = {}
    bind(address, "vfio-pci")
    c_reference(address, warm)
    res["C  VFIO MSI (read)"] = c_reference(address, rounds)
    styles = ["floor", "blocking", "epoll", "asyncio", "thread"]
    python_styles(address, "msi", styles, warm)
    for style, samples in python_styles(address, "msi", styles, rounds).items():
        label = "Py VFIO MSI (raw read: floor)" if style == "floor" else f"Py VFIO MSI ({style})"
        res[label] = samples
    python_styles(address, "intx", ["blocking"], warm)
    res["Py VFIO INTx (blocking)"] = python_styles(address, "intx", ["blocking"], rounds)[
        "blocking"
    ]
    bind(address, "uio_pci_generic")
    python_styles(address, "intx", ["blocking"], warm)
    res["Py UIO INTx (blocking)"] = python_styles(address, "intx", ["blocking"], rounds)["blocking"]
    bind(address, None)
    return res
