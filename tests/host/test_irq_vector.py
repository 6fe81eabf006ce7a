"""Vectors on real eventfds: every wait style, counts, cancellation, handler threads."""

from __future__ import annotations

import asyncio
import os
import select
import threading
import time
from collections.abc import Iterator

import pytest

from udrv.errors import IrqError
from udrv.irq.vector import Vector, eventfd_count


@pytest.fixture
def efd() -> Iterator[int]:
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    yield fd
    os.close(fd)


@pytest.fixture
def vec(efd: int) -> Iterator[Vector]:
    v = Vector(efd, name="MSI 0 of test", read_count=eventfd_count)
    yield v
    v.close()


def fire(fd: int, n: int = 1) -> None:
    os.eventfd_write(fd, n)  # what the kernel's eventfd_signal() does per interrupt


def test_wait_returns_the_count_and_consumes_it(vec: Vector, efd: int) -> None:
    assert vec.poll() == 0
    fire(efd)
    fire(efd)
    assert vec.wait(1) == 2  # two interrupts since the last wait, reported once
    assert vec.poll() == 0


def test_wait_times_out_with_zero(vec: Vector) -> None:
    t0 = time.monotonic()
    assert vec.wait(0.05) == 0
    assert 0.04 <= time.monotonic() - t0 < 1


def test_wait_wakes_on_a_later_interrupt(vec: Vector, efd: int) -> None:
    threading.Timer(0.05, fire, (efd,)).start()
    assert vec.wait(5) == 1


def test_fileno_works_with_select_and_epoll(vec: Vector, efd: int) -> None:
    assert select.select([vec], [], [], 0)[0] == []
    fire(efd)
    assert select.select([vec], [], [], 0)[0] == [vec]
    ep = select.epoll()
    ep.register(vec.fileno(), select.EPOLLIN)
    assert ep.poll(0) == [(efd, select.EPOLLIN)]
    ep.close()
    assert vec.poll() == 1


def test_asyncio_wait(vec: Vector, efd: int) -> None:
    async def main() -> int:
        asyncio.get_running_loop().call_later(0.02, fire, efd, 3)
        return await asyncio.wait_for(vec.wait_async(), 5)

    assert asyncio.run(main()) == 3


def test_asyncio_cancel_leaves_nothing_registered_and_consumes_nothing(
    vec: Vector, efd: int
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(vec.wait_async(), 0.02)
        # The reader is gone: remove_reader reports there was none to remove.
        assert loop.remove_reader(vec.fileno()) is False
        fire(efd)
        assert await asyncio.wait_for(vec.wait_async(), 5) == 1
        # Two coroutines on one vector would steal each other's events: refused.
        t = asyncio.ensure_future(vec.wait_async())
        await asyncio.sleep(0)
        with pytest.raises(IrqError, match="already waiting"):
            await vec.wait_async()
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t

    asyncio.run(main())
    fire(efd)
    assert vec.wait(0) == 1  # a pending interrupt survives a cancelled wait


def test_spurious_wakeup_does_not_end_an_async_wait(efd: int) -> None:
    counts = iter([0, 5])  # first readiness: another reader got it; second: a real one
    v = Vector(efd, name="x", read_count=lambda fd: (eventfd_count(fd), next(counts))[1])

    async def main() -> int:
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, fire, efd)
        loop.call_later(0.05, fire, efd)
        return await asyncio.wait_for(v.wait_async(), 5)

    assert asyncio.run(main()) == 5


def test_handler_thread_runs_and_rearms(efd: int) -> None:
    rearmed: list[int] = []
    v = Vector(efd, name="INTx", read_count=eventfd_count, rearm=lambda: rearmed.append(1))
    seen: list[tuple[int, str]] = []
    got = threading.Semaphore(0)

    def handler(n: int) -> None:
        seen.append((n, threading.current_thread().name))
        got.release()

    v.start_handler(handler)
    assert v.handler_running
    with pytest.raises(IrqError, match="handler thread"):
        v.wait(0)  # the thread owns the events
    with pytest.raises(IrqError, match="already has a handler"):
        v.start_handler(handler)
    for _ in range(3):
        fire(efd)
        assert got.acquire(timeout=5)
    v.stop_handler()
    assert [n for n, _ in seen] == [1, 1, 1]
    assert all(name == "irq INTx" for _, name in seen)  # not the main thread
    assert rearmed == [1, 1, 1]
    assert not v.handler_running
    v.close()


def test_handler_exception_is_reraised_by_stop(vec: Vector, efd: int) -> None:
    def handler(n: int) -> None:
        raise ValueError("device said no")

    vec.start_handler(handler)
    fire(efd)
    deadline = time.monotonic() + 5
    while vec.handler_running and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(IrqError, match="device said no") as info:
        vec.stop_handler()
    assert isinstance(info.value.__cause__, ValueError)


def test_closed_vector_refuses_waits(vec: Vector) -> None:
    vec.close()
    with pytest.raises(IrqError, match="disabled"):
        vec.wait(0)
    with pytest.raises(IrqError, match="disabled"):
        asyncio.run(vec.wait_async())


def test_rearm_unmasks_level_interrupts_only(vec: Vector, efd: int) -> None:
    """INTx: rearm() is the backend's unmask; MSI: nothing to unmask, and a pending
    interrupt is neither consumed nor lost by it."""
    unmasks: list[int] = []
    intx = Vector(
        efd, name="INTx of test", read_count=eventfd_count, rearm=lambda: unmasks.append(1)
    )
    intx.rearm()
    intx.rearm()
    assert unmasks == [1, 1]
    fire(efd)
    vec.rearm()
    assert unmasks == [1, 1] and vec.poll() == 1
