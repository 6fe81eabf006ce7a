"""The measurements, run inside the lab guest (``python3 -m bench.irq --inside``).

Five edu devices, each with its own owner for the whole run, so that no variant has to
rebind or reopen a device between blocks: the first is udrv's (the Python wait styles, one
MSI vector), the second the C reference's (``vfio_msi_ref``, a child process serving blocks
over a pipe), the third the kernel module's (``edu_irq_ref``); the handler-thread styles
have one each (their thread waits all along, and would take the others' interrupts). :func:`interleave` then runs
one block of each variant in turn (kernel, C, Python styles, kernel, C, ...), so that drift
on a shared machine falls on every variant alike.
"""

from __future__ import annotations

import asyncio
import os
import resource
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


class _Stamped(Style):
    """A style whose waiting code, on another thread, stamps ``self.stamp`` and sets
    ``self.got``; a round is the raise, then this thread waits for the event."""

    def __init__(self, bar: Any, vec: Vector) -> None:
        super().__init__(bar, vec)
        self.got = threading.Event()
        self.stamp = 0

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


class Thread(_Stamped):
    """udrv's handler thread (``vec.start_handler``): the time is taken in the handler.

    The thread runs from construction to :meth:`close`, in ``select`` on its own device's
    vector between rounds (see :data:`OWN_DEVICE`).
    """

    name = "thread"

    def __init__(self, bar: Any, vec: Vector) -> None:
        super().__init__(bar, vec)

        def handler(count: int) -> None:
            self.stamp = time.perf_counter_ns()
            bar.write32(R.INTR_ACK, 1)
            self.got.set()

        vec.start_handler(handler)

    def close(self) -> None:
        self.vec.stop_handler()


class BareThread(_Stamped):
    """No udrv layer: a plain thread in ``select`` + ``os.eventfd_read`` on the vector's fd,
    stamping as soon as the read returns. Next to :class:`Thread` it tells udrv's handler loop
    apart from what waking a second thread and handing it the GIL costs."""

    name = "bare_thread"

    def __init__(self, bar: Any, vec: Vector) -> None:
        super().__init__(bar, vec)
        self.stop = os.eventfd(0, os.EFD_CLOEXEC)
        fd, stop = vec.fileno(), self.stop

        def loop() -> None:
            while True:
                r, _, _ = select.select([fd, stop], [], [])
                if stop in r:
                    return
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    continue
                self.stamp = time.perf_counter_ns()
                bar.write32(R.INTR_ACK, 1)
                self.got.set()

        self.thread = threading.Thread(target=loop, name="bare irq thread", daemon=True)
        self.thread.start()

    def close(self) -> None:
        os.eventfd_write(self.stop, 1)
        self.thread.join(5)
        os.close(self.stop)


STYLES: dict[str, type[Style]] = {
    cls.name: cls for cls in (Floor, Blocking, Epoll, Asyncio, Thread, BareThread)
}
#: A style whose thread waits on its vector all along needs a device of its own: on a shared
#: one it would take the other styles' interrupts. The rest share the first edu device.
OWN_DEVICE = {"thread": "edu.3", "bare_thread": "edu.4"}
#: The edu devices the bench's guest has: udrv's, C's, the kernel module's, the two threads'.
DEVICES = ("edu", "edu", "edu", "edu", "edu")

KERNEL = "kernel: MSI handler"
C_LABEL = "C: read(eventfd)"
#: Python wait style -> its label; ``floor`` is no udrv layer at all (a bare eventfd read).
PY_LABELS = {
    "floor": "Py: os.eventfd_read (floor)",
    "blocking": "Py: vec.wait()",
    "epoll": "Py: epoll + vec.poll()",
    "asyncio": "Py: await vec.wait_async()",
    "thread": "Py: handler thread",
    "bare_thread": "Py: bare thread (floor)",
}

Block = Callable[[int], list[int]]


class CReference:
    """``vfio_msi_ref ADDRESS`` as a child process that runs a block of rounds per request
    and counts how often it slept during them.

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
        self.sleeps, self.rounds = 0, 0

    def __call__(self, rounds: int) -> list[int]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(f"{rounds}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        sleeps, *samples = [int(x) for x in line.split()] or [0]
        if len(samples) != rounds:
            self.proc.kill()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise LabError(
                f"vfio_msi_ref {self.address}: asked for {rounds} samples, got {len(samples)}"
                f" (exit {self.proc.wait()}): {err.strip()}"
            )
        self.sleeps += sleeps
        self.rounds += rounds
        return samples

    def per_round(self) -> float:
        """Sleeps in the eventfd read per round so far."""
        return self.sleeps / self.rounds if self.rounds else 0.0

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _sleeps() -> int:
    """Voluntary context switches of every thread of this process (getrusage): how often
    one of them blocked. Preemptions by other tasks (involuntary switches) are load, not
    the wait's own cost, and are not counted."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw


class Counted:
    """A variant run in this process, with how often it slept (blocked) per round.

    A wait that finds the interrupt already signalled does not sleep; one that gets there
    first sleeps once; a handler thread adds its own sleep and the GIL's hand-over.
    """

    def __init__(self, run: Block) -> None:
        self.run, self.sleeps, self.rounds = run, 0, 0

    def __call__(self, rounds: int) -> list[int]:
        before = _sleeps()
        out = self.run(rounds)
        self.sleeps += _sleeps() - before
        self.rounds += rounds
        return out

    def per_round(self) -> float:
        """Sleeps per round so far."""
        return self.sleeps / self.rounds if self.rounds else 0.0


def interleave(variants: dict[str, Block], rounds: int, block: int) -> dict[str, list[int]]:
    """``rounds`` samples of every variant, ``block`` rounds of each in turn (ABC ABC ...);
    each turn runs one round more and drops it (see below).

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
                # One more round than kept: the first round of a turn runs right after the
                # switch from another variant (another process for C, QEMU's soft TLB flushed
                # with the page tables), and would charge that switch to this variant.
                samples = run(n + 1)
                if len(samples) != n + 1:
                    raise LabError(f"{label}: asked for {n + 1} samples, got {len(samples)}")
                out[label] += samples[1:]
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
        devices: the lab's ``UDRV_LAB_DEVICES`` as a dict (a guest booted with
            :data:`DEVICES`): ``edu`` is udrv's, ``edu.1`` the C reference's, ``edu.2`` the
            kernel module's, and :data:`OWN_DEVICE` the thread styles'.
        ko: the built ``edu_irq_ref.ko``; None leaves the kernel out.
        c_exe: the compiled ``vfio_msi_ref``.
        styles: Python wait styles (keys of :data:`STYLES`).
    """
    with ExitStack() as stack:
        out: dict[str, Block] = {}
        bind(devices["edu.1"], "vfio-pci")
        stack.callback(bind, devices["edu.1"], None)
        if ko is not None:
            kref = stack.enter_context(KernelReference(ko, devices["edu.2"]))
            out[KERNEL] = Counted(lambda n: kref.measure(n).tolist())
        c = CReference(c_exe, devices["edu.1"])
        stack.callback(c.close)
        out[C_LABEL] = c
        opened: dict[str, tuple[Any, Vector]] = {}
        for style in styles:
            name = OWN_DEVICE.get(style, "edu")
            if name not in opened:
                bind(devices[name], "vfio-pci")
                stack.callback(bind, devices[name], None)
                dev = stack.enter_context(udrv.open(devices[name]))
                opened[name] = dev.bar(0), dev.irq.enable("msi")[0]
            run = STYLES[style](*opened[name])
            stack.callback(run.close)
            out[PY_LABELS[style]] = Counted(run)
        yield out


def run_all(
    devices: dict[str, str], ko: Path | None, c_exe: Path, rounds: int, block: int, reps: int
) -> dict[str, Any]:
    """``reps`` interleaved measurements of every variant, in one guest.

    Returns:
        ``reps``: one ``{label: latencies in ns}`` per repetition; ``sleeps``: per variant,
        how often its process blocked per round (voluntary context switches, over all
        repetitions, warm-up included).
    """
    with variants(devices, ko, c_exe, list(STYLES)) as runs:
        out = [interleave(runs, rounds, block) for _ in range(reps)]
        sleeps = {
            label: run.per_round()
            for label, run in runs.items()
            if isinstance(run, (Counted, CReference))
        }
    return {"reps": out, "sleeps": sleeps}
