"""Interrupt response time on edu: write the raise register -> the waiting code runs.

The seed's interrupt-response graph. Used by the demo and by ``bench/irq``.
"""

from __future__ import annotations

import asyncio
import select
import threading
import time
from collections.abc import Callable

import numpy as np

import udrv
from udrv.drivers.edu import regs as R

Sample = Callable[[int], list[float]]


def percentiles(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1e6
    return {
        "n": float(len(a)),
        **{f"p{p:g}": float(np.percentile(a, p)) for p in (50, 90, 99, 99.9)},
        "max": float(a.max()),
    }


def measure(address: str, style: str, kind: str = "msi", rounds: int = 200) -> list[float]:
    """Seconds from the raise write to the waiting code running, ``rounds`` times.

    style: "blocking" (read), "epoll", "asyncio" or "thread" (handler thread).
    """
    with udrv.open(address) as dev:
        vec = dev.irq.enable(kind)[0]
        bar = dev.bar(0)
        out: list[float] = []

        def ack() -> None:
            bar.write32(R.INTR_ACK, 1)
            vec.rearm()

        if style == "blocking":
            for _ in range(rounds):
                t0 = time.perf_counter()
                bar.write32(R.INTR_RAISE, 1)
                vec.wait(5)
                out.append(time.perf_counter() - t0)
                ack()
        elif style == "epoll":
            ep = select.epoll()
            ep.register(vec.fileno(), select.EPOLLIN)
            for _ in range(rounds):
                t0 = time.perf_counter()
                bar.write32(R.INTR_RAISE, 1)
                ep.poll(5)
                out.append(time.perf_counter() - t0)
                vec.poll()
                ack()
            ep.close()
        elif style == "asyncio":

            async def run() -> None:
                for _ in range(rounds):
                    t0 = time.perf_counter()
                    bar.write32(R.INTR_RAISE, 1)
                    await vec.wait_async()
                    out.append(time.perf_counter() - t0)
                    ack()

            asyncio.run(run())
        elif style == "thread":
            got = threading.Event()
            stamp: list[float] = []

            def handler(count: int) -> None:
                stamp.append(time.perf_counter())
                bar.write32(R.INTR_ACK, 1)
                got.set()

            vec.start_handler(handler)
            for _ in range(rounds):
                got.clear()
                t0 = time.perf_counter()
                bar.write32(R.INTR_RAISE, 1)
                got.wait(5)
                out.append(stamp[-1] - t0)
            vec.stop_handler()
        else:
            raise ValueError(f"unknown style {style!r}")
        return out
