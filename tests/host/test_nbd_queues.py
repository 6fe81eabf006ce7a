"""The NBD frontends on hardware queues: batched replies, one queue per connection,
multi-conn negotiated where it holds, and requests a dead client left on the device."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.host.nvme_fake import FakeDevice, FakeNvme, Model
from tests.host.test_nbd_server import connected
from udrv.block.driver import BlockDriver
from udrv.block.queue import HardwareQueue, Op
from udrv.block.ram import RamDisk
from udrv.drivers.nvme import AsyncNvme, Nvme
from udrv.frontends.nbd import NbdServer, transmission_flags
from udrv.kernel import nbd as N

SIZE = 8 << 20
needs_nbdinfo = pytest.mark.skipif(not shutil.which("nbdinfo"),
                                   reason="needs nbdinfo (apt install libnbd-bin)")  # fmt: skip
needs_nbdcopy = pytest.mark.skipif(not shutil.which("nbdcopy"),
                                   reason="needs nbdcopy (apt install libnbd-bin)")  # fmt: skip


class FakeQueue(HardwareQueue):
    """A device queue over a RAM disk's bytes that completes only when the test opens it
    (``gated``), and that records what a device would notice: a tag started again while the
    device still owns it, or a buffer touched after its request was handed back."""

    def __init__(self, ram: RamDisk, tags: int, *, gated: bool) -> None:
        self.ram, self.tags, self.buffer_size = ram, tags, 64 * 1024
        self._mem = bytearray(tags * self.buffer_size)
        self._view = memoryview(self._mem)
        self.out: dict[int, tuple[int, int, int]] = {}
        self.reused: list[int] = []  # tags started while out: the bug this catches
        self.opened = not gated
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.started = 0
        self.closed = False

    def address(self, tag: int) -> int:
        raise NotImplementedError

    def buffer(self, tag: int) -> memoryview:
        return self._view[tag * self.buffer_size : (tag + 1) * self.buffer_size]

    def fileno(self) -> int:
        return self.efd

    def queue_rq(self, tag: int, op: int, offset: int, length: int) -> int | None:
        if tag in self.out:
            self.reused.append(tag)
        self.out[tag] = (op, offset, length)
        self.started += 1
        if self.opened:
            os.eventfd_write(self.efd, 1)  # done at once: interrupt
        return None

    def open(self) -> None:
        """Let the device complete everything it holds, and interrupt."""
        self.opened = True
        os.eventfd_write(self.efd, 1)

    def complete(self) -> list[tuple[int, int]]:
        if not self.opened:
            return []
        done = []
        for tag, (op, offset, length) in self.out.items():
            buf = self.buffer(tag)[:length]
            if op == Op.READ:
                self.ram.read(offset, buf)
            elif op == Op.WRITE:
                self.ram.write(offset, buf)
            done.append((tag, length))
        self.out.clear()
        return done

    def close(self) -> None:
        assert not self.out, "closed while the device holds requests"
        self.closed = True
        os.close(self.efd)


class QueuedRam(RamDisk):
    """A RAM disk served through :class:`FakeQueue`s, one per frontend queue."""

    def __init__(self, size: int, *, gated: bool = False) -> None:
        super().__init__(size)
        self.gated = gated
        self.queues: dict[int, FakeQueue] = {}

    def hardware_queue(self, index: int, tags: int) -> FakeQueue:
        assert index not in self.queues, f"queue {index} handed out twice"
        q = self.queues[index] = FakeQueue(self, tags, gated=self.gated)
        return q


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[tuple[QueuedRam, NbdServer]]:
    disk = QueuedRam(SIZE, gated=True)
    disk.write(0, memoryview(os.urandom(SIZE)))
    with NbdServer(disk, str(tmp_path / "q.sock"), depth=32) as s:
        yield disk, s
    disk.close()


def _wait(cond: object, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def test_replies_of_one_pass_go_out_in_one_sendmsg(gated: tuple[QueuedRam, NbdServer]) -> None:
    disk, server = gated
    c = connected(server)
    offsets = [(i * 7919 % 2048) * 4096 for i in range(32)]
    c.s.sendall(b"".join(N.REQUEST.pack(N.NBD_REQUEST_MAGIC, 0, N.NBD_CMD_READ, 100 + i, off,
                                        4096) for i, off in enumerate(offsets)))  # fmt: skip
    q = disk.queues[0]
    _wait(lambda: len(q.out) == 32, "the 32 reads did not all reach the queue")
    (worker,) = server.workers
    sends = worker.sends
    q.open()
    got = {}
    for _ in range(32):
        magic, error, cookie = N.REPLY.unpack(c.recv(N.REPLY.size))
        assert (magic, error) == (N.NBD_SIMPLE_REPLY_MAGIC, 0)
        got[cookie] = c.recv(4096)
    assert got == {100 + i: bytes(disk._view[off : off + 4096]) for i, off in enumerate(offsets)}
    _wait(lambda: worker.sends > sends, "no send counted")  # counted after sendmsg returned
    assert worker.sends - sends == 1  # 32 headers and 32 data buffers in one system call
    assert q.started == 32 and not q.reused
    c.close()


def test_a_dead_client_s_requests_keep_their_tags_until_the_device_is_done(
    gated: tuple[QueuedRam, NbdServer], caplog: pytest.LogCaptureFixture
) -> None:
    disk, server = gated
    q = disk.queues.get(0)
    with caplog.at_level(logging.DEBUG, logger="udrv"):
        dying = connected(server)
        q = disk.queues[0]
        dying.s.sendall(b"".join(N.REQUEST.pack(N.NBD_REQUEST_MAGIC, 0, N.NBD_CMD_READ, i,
                                                i * 4096, 4096) for i in range(32)))  # fmt: skip
        _wait(lambda: len(q.out) == 32, "the dead client's reads did not reach the queue")
        dying.close()  # every tag is on the device
        # A second client on the same queue: its request must wait for a tag, not take one
        # whose buffer the device may still write.
        c = connected(server)
        c.s.sendall(N.REQUEST.pack(N.NBD_REQUEST_MAGIC, 0, N.NBD_CMD_READ, 7, 8192, 4096))
        time.sleep(0.3)
        assert len(q.out) == 32 and q.started == 32
        q.open()
        _, error, cookie = N.REPLY.unpack(c.recv(N.REPLY.size))
        assert (error, cookie) == (0, 7) and c.recv(4096) == bytes(disk._view[8192:12288])
        assert not q.reused
        c.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "Traceback" not in caplog.text


def test_garbage_with_requests_on_the_device_closes_cleanly(
    gated: tuple[QueuedRam, NbdServer], caplog: pytest.LogCaptureFixture
) -> None:
    disk, server = gated
    c = connected(server)
    q = disk.queues[0]
    c.s.sendall(N.REQUEST.pack(N.NBD_REQUEST_MAGIC, 0, N.NBD_CMD_READ, 1, 0, 4096)
                + b"\xde\xad" * 14)  # fmt: skip
    _wait(lambda: len(q.out) == 1, "the read did not reach the queue")
    time.sleep(0.1)  # the garbage is read too: no more requests, the read still out
    q.open()
    _, error, cookie = N.REPLY.unpack(c.recv(N.REPLY.size))
    assert (error, cookie) == (0, 1) and c.recv(4096) == bytes(disk._view[:4096])
    assert c.s.recv(1) == b""  # then the server closes
    c.close()
    assert "bad request magic" in caplog.text and "Traceback" not in caplog.text


@needs_nbdinfo
def test_multi_conn_is_advertised_only_where_a_flush_covers_every_connection(
    tmp_path: Path,
) -> None:
    class PerQueueCache(RamDisk):
        flush_per_queue = True  # each queue's flush covers only its own writes

    def can_multi_conn(disk: RamDisk, read_only: bool) -> bool:
        with NbdServer(disk, str(tmp_path / "m.sock"), read_only=read_only) as s:
            out = subprocess.run(["nbdinfo", "--json", s.uri], capture_output=True, text=True,
                                 check=True).stdout  # fmt: skip
        (export,) = json.loads(out)["exports"]
        assert (
            bool(transmission_flags(disk, read_only) & N.NBD_FLAG_CAN_MULTI_CONN)
            == (export["can_multi_conn"])
        )
        return bool(export["can_multi_conn"])

    disk, private = RamDisk(SIZE), PerQueueCache(SIZE)
    assert can_multi_conn(disk, False) and can_multi_conn(disk, True)
    assert not can_multi_conn(private, False)
    assert can_multi_conn(private, True)  # nothing to flush: every connection sees the same
    disk.close()
    private.close()


@needs_nbdinfo
def test_an_nvme_export_has_multi_conn_because_its_flush_is_device_wide(tmp_path: Path) -> None:
    """NVMe's Flush (Base 2.0 §7.1) covers every queue's completed writes: both NVMe block
    drivers declare it, and an export of one advertises multi-conn; a driver with the same
    queues that declares a per-queue flush does not get it."""
    assert BlockDriver.flush_per_queue is False  # the BlockDriver durability contract
    assert Nvme.flush_per_queue is False and AsyncNvme.flush_per_queue is False
    assert RamDisk.flush_per_queue is False

    class PerQueueNvme(AsyncNvme):
        flush_per_queue = True

    def nbdinfo_multi_conn(drv: BlockDriver) -> bool:
        with NbdServer(drv, str(tmp_path / "n.sock"), queues=2, depth=7) as s:
            out = subprocess.run(["nbdinfo", "--json", s.uri], capture_output=True, text=True,
                                 check=True).stdout  # fmt: skip
        (export,) = json.loads(out)["exports"]
        return bool(export["can_multi_conn"])

    for cls, want in ((AsyncNvme, True), (PerQueueNvme, False)):
        nvme = Nvme(FakeDevice(FakeNvme(Model())), queues=2, depth=8, interrupts=False)
        drv = cls(nvme)
        assert nbdinfo_multi_conn(drv) is want, cls.__name__
        drv.close()
    nvme = Nvme(FakeDevice(FakeNvme(Model())), depth=8, interrupts=False)
    assert nbdinfo_multi_conn(nvme)
    nvme.close()


@needs_nbdcopy
@pytest.mark.parametrize("queues", [4, 2])
def test_nbdcopy_connections_each_get_a_hardware_queue(queues: int, tmp_path: Path) -> None:
    """nbdcopy opens 4 connections to a multi-conn export: with 4 queues each has its own,
    with 2 they share; the copy is exact either way."""
    src, out = tmp_path / "in.img", tmp_path / "out.img"
    src.write_bytes(os.urandom(SIZE))
    disk = QueuedRam(SIZE)
    with NbdServer(disk, str(tmp_path / "c.sock"), queues=queues, depth=16) as s:
        subprocess.run(
            ["nbdcopy", "--connections=4", "--threads=4", "--request-size=65536", str(src), s.uri],
            check=True,
            timeout=120,
        )
        subprocess.run(
            ["nbdcopy", "--connections=4", "--threads=4", "--request-size=65536", s.uri, str(out)],
            check=True,
            timeout=120,
        )
        assert sorted(disk.queues) == list(range(queues))
        assert not any(q.reused for q in disk.queues.values())
        assert sum(w.served for w in s.workers) >= 2 * SIZE // (64 * 1024)
    assert out.read_bytes() == src.read_bytes() == bytes(disk._view[:SIZE])
    assert all(q.closed for q in disk.queues.values())
    disk.close()


def test_each_client_gets_a_queue_until_they_run_out_then_they_share(tmp_path: Path) -> None:
    disk = QueuedRam(SIZE)
    disk.write(0, memoryview(os.urandom(SIZE)))
    with NbdServer(disk, str(tmp_path / "q.sock"), queues=3) as s:
        clients = [connected(s) for _ in range(5)]
        for round_ in range(2):
            for i, c in enumerate(clients):
                off = (i * 5 + round_) * 4096
                c.s.sendall(N.REQUEST.pack(N.NBD_REQUEST_MAGIC, 0, N.NBD_CMD_READ, i, off, 4096))
                assert N.REPLY.unpack(c.recv(N.REPLY.size))[1:] == (0, i)
                assert c.recv(4096) == bytes(disk._view[off : off + 4096])
        assert sorted(disk.queues) == [0, 1, 2]
        assert sorted(q.started for q in disk.queues.values()) == [2, 4, 4]
        assert sorted(w.load for w in s.workers) == [1, 2, 2]
        for c in clients:
            c.close()
    disk.close()


def test_stop_waits_for_requests_on_the_device(tmp_path: Path) -> None:
    disk = QueuedRam(SIZE, gated=True)
    s = NbdServer(disk, str(tmp_path / "s.sock")).start()
    c = connected(s)
    c.s.sendall(N.REQUEST.pack(N.NBD_REQUEST_MAGIC, 0, N.NBD_CMD_READ, 1, 0, 4096))
    q = disk.queues.get(0)
    _wait(lambda: 0 in disk.queues and disk.queues[0].out, "the read did not reach the queue")
    q = disk.queues[0]
    stopper = threading.Thread(target=s.stop)
    stopper.start()
    time.sleep(0.3)
    assert stopper.is_alive() and not q.closed  # the device still owns the buffer
    q.open()
    stopper.join(10)
    assert not stopper.is_alive() and q.closed
    c.close()
    disk.close()
