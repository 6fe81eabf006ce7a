"""A tiny CUSE device for lab tests: /dev/NAME echoes the last write to every reader.

A read blocks until something was written (so tests can kill the server under a blocked
reader). Run: python3 -m tests.lab.helpers.echo_cuse NAME
"""

from __future__ import annotations

import signal
import struct
import sys
import threading

from udrv.frontends.cuse import CharDevice, CuseServer, Ioctl, Request

ECHO_ADD1 = (3 << 30) | (8 << 16) | (ord("E") << 8) | 1  # _IOWR('E', 1, __u64)


class Echo(CharDevice):
    def __init__(self) -> None:
        self.data = b""
        self.ready = threading.Event()

    def write(self, req: Request, handle: object, data: bytes, offset: int) -> int:
        self.data = bytes(data)
        self.ready.set()
        return len(data)

    def read(self, req: Request, handle: object, size: int, offset: int) -> bytes:
        req.wait(self.ready)
        return self.data[:size]

    def ioctl(self, req: Request, handle: object, call: Ioctl) -> tuple[int, bytes]:
        if call.cmd != ECHO_ADD1:
            raise OSError(25, "no such ioctl")
        (v,) = struct.unpack("<Q", call.data)
        return 0, struct.pack("<Q", v + 1)


def main() -> None:
    server = CuseServer(sys.argv[1], Echo()).start()
    print("ready", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop()


if __name__ == "__main__":
    main()
