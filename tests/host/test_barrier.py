"""Barriers: present, callable and honest about the architecture they are correct for."""

from __future__ import annotations

import importlib
import platform
import threading

import pytest

from udrv.core import barrier

NAMES = ("mb", "rmb", "wmb", "dma_rmb", "dma_wmb")


@pytest.mark.parametrize(
    ("machine", "supported"),
    [("x86_64", True), ("AMD64", True), ("aarch64", False), ("riscv64", False)],
)
def test_supported_only_on_x86_64(
    monkeypatch: pytest.MonkeyPatch, machine: str, supported: bool
) -> None:
    """The module picks its barriers by the CPU at import: real no-ops on x86-64, loud
    refusals elsewhere (never silent no-ops on a weakly ordered CPU)."""
    monkeypatch.setattr(platform, "machine", lambda: machine)
    try:
        mod = importlib.reload(barrier)
        assert mod.SUPPORTED is supported
        assert machine.lower() == mod.ARCH
        for name in NAMES:
            if supported:
                assert getattr(mod, name)() is None
            else:
                with pytest.raises(NotImplementedError, match=f"{name}.*not implemented on"):
                    getattr(mod, name)()
    finally:
        monkeypatch.undo()
        importlib.reload(barrier)


@pytest.mark.skipif(not barrier.SUPPORTED, reason="barriers are implemented for x86-64 only")
@pytest.mark.parametrize("name", NAMES)
def test_barriers_run_and_return_nothing(name: str) -> None:
    assert getattr(barrier, name)() is None


@pytest.mark.skipif(not barrier.SUPPORTED, reason="barriers are implemented for x86-64 only")
def test_mb_leaves_its_lock_free_and_works_from_many_threads() -> None:
    """mb() takes and releases a lock; a leak would deadlock the next caller."""
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(2000):
                barrier.mb()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads) and errors == []
    assert barrier._fence_lock.acquire(blocking=False)
    barrier._fence_lock.release()


def test_unsupported_architecture_refuses_loudly() -> None:
    with pytest.raises(
        NotImplementedError, match=r"barrier.wmb\(\) is not implemented on .*x86-64"
    ):
        barrier._unsupported("wmb")
