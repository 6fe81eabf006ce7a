"""The measurements, run inside the lab guest (``python3 -m bench.irq --inside``).

Three edu devices, each with its own owner for the whole run, so that no variant has to
rebind or reopen a device between blocks: the first is udrv's (every Python wait style, one
MSI vector), the second the C reference's (``vfio_msi_ref``, a child process serving blocks
over a pipe), the third the kernel module's (``edu_irq_ref``). :func:`interleave` then runs
one block of each variant in turn (kernel, C, Python styles, kernel, C, ...), so that drift
on a shared machine falls on every variant alike.
"""

from __future__ import annotations

import asyncio
import os
import select
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import udrv
from bench.irq.kmod import KernelReference
from udrv.drivers.edu import regs as R
from udrv.errors import LabError
from udrv.irq import Vector
from udrv.lab.pytest_plugin import bind


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


def _no_interrupt(style: str) -> LabError:
    return LabError(f"Python {style} wait: no interrupt within 5 s of raising it")


class Style:
    """A Python way of waiting for the vector; ``style(n)`` times n rounds (ns each).

    What a style sets up (an epoll set, an event loop, a handler thread) lives from
    construction to :meth:`close`, so that a block may be as short as one round.
    """

    name = ""

    def __init__(self, bar: Any, vec: Vector) -> None:
        self.bar, self.vec = bar, vec

    def __call__(self, rounds: int) -> list[int]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the style set up."""


class Blocking(Style):
    """``vec.wait(timeout)``: udrv's blocking wait."""

    name = "blocking"

    def __call__(self, rounds: int) -> list[int]:
        def wait() -> None:
            if not self.vec.wait(5):
                raise _no_interrupt(self.name)

        return _loop(self.bar, self.vec, rounds, wait)


class Floor(Style):
    """No udrv wait layer: ``os.eventfd_read`` on the vector's fd. What the interpreter costs."""

    name = "floor"

    def __call__(self, rounds: int) -> list[int]:
        fd, read = self.vec.fileno(), os.eventfd_read

        def raw_wait() -> None:
            while True:
                try:
                    read(fd)
                    return
                except BlockingIOError:
                    if not select.select([fd], [], [], 5)[0]:
                        raise _no_interrupt(self.name) from None

        return _loop(self.bar, self.vec, rounds, raw_wait)


class Epoll(Style):
    """An epoll set with the vector in it, then ``vec.poll()`` to consume the count."""

    name = "epoll"

    def __init__(self, bar: Any, vec: Vector) -> None:
        super().__init__(bar, vec)
        self.ep = select.epoll()
        self.ep.register(vec.fileno(), select.EPOLLIN)

    def __call__(self, rounds: int) -> list[int]:
        def epoll_wait() -> None:
            if not self.ep.poll(5):
                raise _no_interrupt(self.name)
            self.vec.poll()  # consume the count after the waiting code ran

        return _loop(self.bar, self.vec, rounds, epoll_wait)

    def close(self) -> None:
        self.ep.close()


class Asyncio(Style):
    """``await vec.wait_async()`` on one event loop that lives across blocks."""

    name = "asyncio"

    def __init__(self, bar: Any, vec: Vector) -> None:
        super().__init__(bar, vec)
        self.loop = asyncio.new_event_loop()

    async def _rounds(self, rounds: int) -> list[int]:
        bar, vec = self.bar, self.vec
        clock, out = time.perf_counter_ns, []
        for _ in range(rounds):
            t0 = clock()
            bar.write32(R.INTR_RAISE, 1)
            await asyncio.wait_for(vec.wait_async(), 5)
            t1 = clock()
            bar.write32(R.INTR_ACK, 1)
            vec.rearm()
            out.append(t1 - t0)
        return out

    def __call__(self, rounds: int) -> list[int]:
        return self.loop.run_until_complete(self._rounds(rounds))

    def close(self) -> None:
        self.loop.close()


class Thread(Style):
    """udrv's handler thread (``vec.start_handler``): the time is taken in the handler.

    The thread runs from construction to :meth:`close`; between this style's rounds it sits
    in ``select`` on this device's vector, which the other variants' devices do not raise.
    """

    name = "thread"

    def __init__(self, bar: Any, vec: Vector) -> None:
        super().__init__(bar, vec)
        self.got = threading.Event()
        self.stamp = 0

        def handler(count: int) -> None:
            self.stamp = time.perf_counter_ns()
            bar.write32(R.INTR_ACK, 1)
            self.got.set()

        vec.start_handler(handler)

    def __call__(self, rounds: int) -> list[int]:
        bar, got, clock, out = self.bar, self.got, time.perf_counter_ns, []
        for _ in range(rounds):
            got.clear()
            t0 = clock()
            bar.write32(R.INTR_RAISE, 1)
            if not got.wait(5):
                raise _no_interrupt(self.name)
            out.append(self.stamp - t0)
        return out

    def close(self) -> None:
        self.vec.stop_handler()


STYLES: dict[str, type[Style]] = {
    cls.name: cls for cls in (Floor, Blocking, Epoll, Asyncio, Thread)
}

KERNEL = "kernel: MSI handler"
C_LABEL = "C: read(eventfd)"
#: Python wait style -> its label; ``floor`` is no udrv layer at all (a bare eventfd read).
PY_LABELS = {
    "floor": "Py: os.eventfd_read (floor)",
    "blocking": "Py: vec.wait()",
    "epoll": "Py: epoll + vec.poll()",
    "asyncio": "Py: await vec.wait_async()",
    "thread": "Py: handler thread",
}

Block = Callable[[int], list[int]]


class CReference:
    """``vfio_msi_ref ADDRESS`` as a child process that runs a block of rounds per request.

    Raises:
        LabError: the program ended or printed something else than the samples asked for.
    """

    def __init__(self, exe: Path, address: str) -> None:
        self.address = address
        self.proc = subprocess.Popen(
            [str(exe), address],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def block(self, rounds: int) -> list[int]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(f"{rounds}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        samples = [int(x) for x in line.split()]
        if len(samples) != rounds:
            self.proc.kill()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise LabError(
                f"vfio_msi_ref {self.address}: asked for {rounds} samples, got {len(samples)}"
                f" (exit {self.proc.wait()}): {err.strip()}"
            )
        return samples

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def interleave(variants: dict[str, Block], rounds: int, block: int) -> dict[str, list[int]]:
    """``rounds`` samples of every variant, ``block`` rounds of each in turn (ABC ABC ...).

    A first pass of ``max(20, rounds // 20)`` rounds each, interleaved the same way, warms
    the variants up (QEMU's translated code, lazy imports, the first MSI) and is dropped.

    Args:
        variants: label -> a function that runs ``n`` rounds and returns their latencies (ns).
        rounds: samples per variant.
        block: rounds per turn (1: strictly round by round).

    Returns:
        label -> ``rounds`` latencies in ns, in the order measured.

    Raises:
        LabError: a variant returned another number of samples than asked for.
    """

    def turns(total: int) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {label: [] for label in variants}
        done = 0
        while done < total:
            n = min(block, total - done)
            for label, run in variants.items():
                samples = run(n)
                if len(samples) != n:
                    raise LabError(f"{label}: asked for {n} samples, got {len(samples)}")
                out[label] += samples
            done += n
        return out

    turns(max(20, rounds // 20))
    return turns(rounds)


@contextmanager
def variants(
    devices: dict[str, str], ko: Path | None, c_exe: Path, styles: list[str]
) -> Iterator[dict[str, Block]]:
    """Every variant, ready to run blocks: the kernel's (when ``ko`` is given), C's, Python's.

    Args:
        devices: the lab's ``UDRV_LAB_DEVICES`` as a dict: ``edu`` is udrv's, ``edu.1`` the C
            reference's, ``edu.2`` the kernel module's.
        ko: the built ``edu_irq_ref.ko``; None leaves the kernel out.
        c_exe: the compiled ``vfio_msi_ref``.
        styles: Python wait styles (keys of :data:`STYLES`).
    """
    with ExitStack() as stack:
        out: dict[str, Block] = {}
        bind(devices["edu"], "vfio-pci")
        bind(devices["edu.1"], "vfio-pci")
        stack.callback(bind, devices["edu"], None)
        stack.callback(bind, devices["edu.1"], None)
        if ko is not None:
            kref = stack.enter_context(KernelReference(ko, devices["edu.2"]))
            out[KERNEL] = lambda n: kref.measure(n).tolist()
        c = CReference(c_exe, devices["edu.1"])
        stack.callback(c.close)
        out[C_LABEL] = c.block
        dev = stack.enter_context(udrv.open(devices["edu"]))
        vec = dev.irq.enable("msi")[0]
        bar = dev.bar(0)
        for style in styles:
            run = STYLES[style](bar, vec)
            stack.callback(run.close)
            out[PY_LABELS[style]] = run
        yield out


def run_all(
    devices: dict[str, str], ko: Path | None, c_exe: Path, rounds: int, block: int, reps: int
) -> list[dict[str, list[int]]]:
    """``reps`` interleaved measurements of every variant, in one guest."""
    with variants(devices, ko, c_exe, list(STYLES)) as runs:
        return [interleave(runs, rounds, block) for _ in range(reps)]
