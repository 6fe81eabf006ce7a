"""The kernel's ``/dev/nbdN`` served by a block driver, one connection per hardware queue.

:class:`NbdDevice` hands one end of a socketpair per connection to the kernel's nbd driver
with the classic ioctls (``NBD_SET_SOCK``, ``NBD_DO_IT``...; ``linux/nbd.h``) and serves the
transmission phase on the other end. The kernel makes one blk-mq hardware queue per socket
(drivers/block/nbd.c: ``blk_mq_update_nr_hw_queues(..., num_connections)``) and refuses
more than one without ``NBD_FLAG_CAN_MULTI_CONN``; each socket here is served by its own
:class:`~udrv.frontends.nbd.transmission.Worker` on the driver's hardware queue of the same
number, so NVMe queue pair N carries the requests of the kernel's queue N.

The ioctls need nothing beyond the module and keep the device's life tied to this process
(``NBD_DO_IT`` returns when we disconnect); the netlink interface would add a dependency for
features (dynamic device creation, status) a driver does not need here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from pathlib import Path
from types import TracebackType

from udrv.block.driver import BlockDriver
from udrv.errors import FrontendError
from udrv.frontends.nbd.transmission import Worker, transmission_flags
from udrv.kernel import nbd as N

log = logging.getLogger("udrv.frontends.nbd")


def _whole_batch_fits(sock: socket.socket, size: int) -> None:
    """A send buffer that holds every reply of a pass (AF_UNIX accounts a stream's unread
    bytes to the sender, unix(7)): one sendmsg then, not several with a poll between.
    SO_SNDBUFFORCE (socket(7)) passes net.core.wmem_max, which is for unprivileged users;
    this process is root (it opened /dev/nbdN)."""
    size = min(size, 16 << 20)
    try:
        sock.setsockopt(socket.SOL_SOCKET, N.SO_SNDBUFFORCE, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


class NbdDevice:
    """``driver`` as ``/dev/nbdN`` (context manager). ``modprobe nbd`` first.

    Args:
        driver: the block driver; connection ``i`` is served on its
            ``hardware_queue(i, depth)`` (``AsyncNvme``: I/O queue pair ``i``), or on its
            ``read``/``write`` methods when it has none.
        index: use ``/dev/nbdINDEX``; default: the first free one.
        connections: sockets handed to the kernel, one per hardware queue.
        depth: requests in flight per connection (the kernel sends up to 128 and waits for
            the rest).
        timeout: seconds the kernel waits for a reply before failing the request.
    """

    def __init__(self, driver: BlockDriver, *, index: int | None = None, connections: int = 1,
                 depth: int = 64, timeout: int = 30) -> None:  # fmt: skip
        if connections < 1 or depth < 1:
            raise FrontendError(f"connections={connections}, depth={depth}: need at least one")
        self.driver, self.index, self.connections = driver, index, connections
        self.depth, self.timeout = depth, timeout
        self.path = ""
        self.fd = -1
        self.workers: list[Worker] = []
        self._doit: threading.Thread | None = None
        self._done = threading.Event()
        self._stopping = False
        self._stop_lock = threading.Lock()
        self._rmw = threading.Lock()
        self.error: BaseException | None = None

    def _open_free(self) -> None:
        if not Path("/sys/module/nbd").exists():
            raise FrontendError("the nbd module is not loaded; run `modprobe nbd`")
        candidates = [self.index] if self.index is not None else range(256)
        for i in candidates:
            path = f"/dev/nbd{i}"
            if not os.path.exists(path):
                if self.index is not None:
                    raise FrontendError(f"{path} does not exist; `modprobe nbd nbds_max={i + 1}`")
                break
            if Path(f"/sys/block/nbd{i}/pid").exists():
                continue  # connected to someone else
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                N.nbd_ioctl(fd, N.NBD_CLEAR_SOCK, path=path)
                self.fd, self.path = fd, path
                return
            except FrontendError:
                os.close(fd)
        raise FrontendError("no free /dev/nbdN; disconnect one or `modprobe nbd nbds_max=N`")

    def start(self) -> NbdDevice:
        g = self.driver.geometry
        self._open_free()
        fd, path = self.fd, self.path
        try:
            N.nbd_ioctl(fd, N.NBD_SET_BLKSIZE, g.block_size, path=path)
            N.nbd_ioctl(fd, N.NBD_SET_SIZE_BLOCKS, g.num_blocks, path=path)
            N.nbd_ioctl(fd, N.NBD_SET_TIMEOUT, self.timeout, path=path)
            N.nbd_ioctl(fd, N.NBD_SET_FLAGS, transmission_flags(self.driver, False), path=path)
            for i in range(self.connections):
                w = Worker(self.driver, i, self.depth, name=f"{path}[{i}]", rmw_lock=self._rmw)
                self.workers.append(w.start())
                kernel_end, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                _whole_batch_fits(ours, self.depth * w.bufsize)
                try:
                    N.nbd_ioctl(fd, N.NBD_SET_SOCK, kernel_end.fileno(), path=path)
                except FrontendError:
                    ours.close()
                    raise
                finally:
                    kernel_end.close()  # the kernel holds its own reference
                w.add(ours, f"{path}[{i}]")
        except FrontendError:
            self._cleanup()
            raise
        except OSError as exc:
            self._cleanup()
            raise FrontendError(f"cannot set up {self.path or '/dev/nbdN'}: {exc}",
                                errno=exc.errno) from None  # fmt: skip
        self._doit = threading.Thread(target=self._do_it, name=f"{path}-do-it", daemon=True)
        self._doit.start()
        name = os.path.basename(path)
        size = Path(f"/sys/block/{name}/size")
        for _ in range(400):  # NBD_DO_IT creates the pid file, then sets the capacity
            if size.read_text().strip() not in ("", "0"):
                break
            if self._done.wait(0.025):
                raise FrontendError(f"{path} did not start: {self.error}")
        else:
            self.stop()
            raise FrontendError(f"{path} did not get its size within 10 s; see `dmesg`")
        self._limit_requests(name)
        return self

    def _limit_requests(self, name: str) -> None:
        """Requests no larger than a tag's buffer (``queue/max_sectors_kb``, which the kernel
        lets us lower): they all take the fast path. Larger ones would still be served."""
        most = min(w.hwq.buffer_size for w in self.workers if w.hwq is not None) // 1024
        attr = Path(f"/sys/block/{name}/queue/max_sectors_kb")
        try:
            if int(attr.read_text()) > most:
                attr.write_text(str(most))
        except (OSError, ValueError) as exc:
            log.debug("%s: could not set %s to %d: %s", self.path, attr, most, exc)

    def _do_it(self) -> None:
        try:
            # Blocks (GIL released) until disconnected.
            N.nbd_ioctl(self.fd, N.NBD_DO_IT, path=self.path)
        except FrontendError as exc:
            if not self._stopping:
                self.error = exc
                log.warning("%s: NBD_DO_IT ended: %s", self.path, exc)
        finally:
            self._done.set()

    @property
    def served(self) -> int:
        """Requests served on the hardware queues so far."""
        return sum(w.served for w in self.workers)

    def wait(self) -> None:
        """Until :meth:`stop` or the kernel disconnects."""
        self._done.wait()

    def stop(self) -> None:
        """Disconnect: the kernel fails new I/O, NBD_DO_IT returns, the size drops to 0.
        Safe from several threads at once (the first does it, the others wait)."""
        with self._stop_lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        if self.fd < 0:
            return
        self._stopping = True
        with contextlib.suppress(FrontendError):
            N.nbd_ioctl(self.fd, N.NBD_DISCONNECT, path=self.path)
        self._done.wait(30)
        if self._doit is not None:
            self._doit.join(30)
        self._cleanup()

    def _cleanup(self) -> None:
        # The workers end once the device has given back every request's buffer.
        for w in self.workers:
            w.stop()
        for w in self.workers:
            if not w.join(90):
                log.error("%s: %s still has requests on the device after 90 s", self.path,
                          w.name)  # fmt: skip
        self.workers.clear()
        if self.fd >= 0:
            with contextlib.suppress(FrontendError):
                N.nbd_ioctl(self.fd, N.NBD_CLEAR_SOCK, path=self.path)
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> NbdDevice:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.stop()
