"""Hardware queues, as blk-mq drivers have them: start a request now, complete it later.

``read``/``write`` (``udrv.block.driver``) are simplest to write, but each request costs a
call that returns only when the data is there. A driver for a queueing device (NVMe, or any
with a submission ring and an interrupt) can instead serve each frontend queue with a
:class:`HardwareQueue`, the way a kernel driver implements ``blk_mq_ops``:

- :meth:`~HardwareQueue.queue_rq` starts request ``tag``; :meth:`~HardwareQueue.commit`
  after a batch tells the device (one doorbell for many commands: blk-mq's ``commit_rqs``);
- :meth:`~HardwareQueue.complete` returns the requests that finished, when
  :meth:`~HardwareQueue.fileno` (the completion interrupt's eventfd) polls readable, or on
  every pass when there is none (a polled queue);
- :meth:`~HardwareQueue.expire`, about once a second, fails requests the device forgot.

Requests carry no buffer: the queue owns one DMA-able buffer per tag
(:meth:`~HardwareQueue.buffer`) and the frontend moves the request's data in and out of it.
ublk lends it to the kernel (:meth:`~HardwareQueue.address`), which copies the request's
pages to or from it (no copy in Python); NBD copies a WRITE's payload into it from the bytes received
on the socket, and sends a READ's reply straight from it with ``sendmsg``.

Both frontends ask every driver for its hardware queues with
:meth:`BlockDriver.hardware_queue <udrv.block.driver.BlockDriver.hardware_queue>`: ublk
for each of its queues, NBD for each worker (a ``/dev/nbdN`` connection, or the clients of
an NBD server that share it). A driver that has none (``None``) is served through its
``read``/``write`` methods: ublk calls them itself, NBD wraps them in a
:class:`~udrv.frontends.nbd.driverqueue.DriverQueue`.
"""

from __future__ import annotations

import abc
import enum


class Op(enum.IntEnum):
    """A request's operation, numbered as ublk_cmd.h's ``UBLK_IO_OP_*``."""

    READ = 0
    WRITE = 1
    FLUSH = 2
    DISCARD = 3
    WRITE_ZEROES = 5


class HardwareQueue(abc.ABC):
    """One queue of requests ``0 .. tags - 1``, driven from one thread.

    Results are blk-mq's: the bytes transferred (the request's length) or ``-errno``.
    """

    tags: int
    buffer_size: int  # bytes per tag's buffer: the largest request

    @abc.abstractmethod
    def address(self, tag: int) -> int:
        """The address, in this process, of ``tag``'s buffer (page-aligned)."""

    @abc.abstractmethod
    def buffer(self, tag: int) -> memoryview:
        """``tag``'s buffer, ``buffer_size`` bytes: the data of its READs and WRITEs."""

    @abc.abstractmethod
    def queue_rq(self, tag: int, op: int, offset: int, length: int) -> int | None:
        """Start request ``tag`` (``op``: an :class:`Op` value, passed as a plain int for
        speed). Return its result if it finished (or failed) at once, or
        ``None``: :meth:`complete` will return it. A WRITE's data is in the buffer already; a
        READ's must be there before it is completed."""

    def commit(self) -> None:  # noqa: B027 - optional: a device without doorbells
        """The requests queued since the last call may go to the device now."""

    @abc.abstractmethod
    def complete(self) -> list[tuple[int, int]]:
        """Requests that finished since the last call: ``[(tag, result)]``."""

    def fileno(self) -> int:
        """An fd that polls readable when :meth:`complete` has work (and that this queue
        resets itself), or -1: the frontend polls :meth:`complete` while requests are out."""
        return -1

    def steer_interrupt(self, cpus: set[int]) -> bool:
        """The frontend serves this queue on ``cpus`` only: have the completion interrupt
        handled there too (see :mod:`udrv.irq.affinity`). Returns whether it was steered;
        the default, for a queue without an interrupt, steers nothing."""
        return False

    def expire(self) -> list[tuple[int, int]]:
        """Called about once a second: requests to fail because they took too long."""
        return []

    def close(self) -> None:  # noqa: B027 - optional hook
        """The frontend is done with this queue (no request is out)."""
