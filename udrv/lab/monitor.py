"""The QEMU monitor, reachable from inside the guest: what a cable pull is for a test.

Some events only the machine can cause: a NIC's link going down (HMP ``set_link``), a
device unplugged. The host side runs QEMU with an HMP monitor on a Unix socket and relays
requests that the guest drops into the control share (``monitor/N.req``, one HMP command)
and answers in ``monitor/N.out``. In the guest, :func:`command` does the round trip:

    from udrv.lab.monitor import command
    command("set_link udrv4 off")      # the NIC in slot 4 loses its link

NIC netdevs are named ``udrv<slot>`` (see :mod:`udrv.lab.devices`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from udrv.errors import LabError, LabTimeout

GUEST_CTL = Path("/run/udrv-ctl")  # where init.sh mounts the control share in the guest
PROMPT = b"(qemu) "


class Relay:
    """Host side: pass HMP commands from ``ctl/monitor/*.req`` to QEMU's monitor socket."""

    def __init__(self, socket_path: Path, ctl: Path) -> None:
        self.socket_path, self.dir = socket_path, ctl / "monitor"
        self.dir.mkdir(exist_ok=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lab-monitor", daemon=True)
        self._sock: socket.socket | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        if self._sock is not None:
            self._sock.close()

    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(self.socket_path))
        self._read_prompt(s)  # the banner
        return s

    @staticmethod
    def _read_prompt(s: socket.socket) -> bytes:
        data = b""
        while not data.endswith(PROMPT):
            chunk = s.recv(4096)
            if not chunk:
                raise LabError("the QEMU monitor closed its socket")
            data += chunk
        return data[: -len(PROMPT)]

    def send(self, cmd: str) -> str:
        """One HMP command; its output (without the echo and the prompt)."""
        if self._sock is None:
            self._sock = self._connect()
        self._sock.sendall(cmd.encode() + b"\n")
        out = self._read_prompt(self._sock).decode(errors="replace").replace("\r", "")
        # The monitor echoes the command line (with terminal escapes) before the output.
        lines = out.split("\n")
        return "\n".join(lines[1:]).strip() if lines and cmd in lines[0] else out.strip()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for req in sorted(self.dir.glob("*.req")):
                try:
                    cmd = req.read_text().strip()
                    reply = self.send(cmd)
                except (OSError, LabError) as exc:
                    reply = f"error: {exc}"
                tmp = req.with_suffix(".tmp")
                tmp.write_text(reply)
                tmp.rename(req.with_suffix(".out"))
                with contextlib.suppress(OSError):
                    req.unlink()


def command(cmd: str, timeout: float = 20.0, ctl: Path = GUEST_CTL) -> str:
    """In the guest: run one HMP command in the QEMU that runs this guest; its output."""
    box = ctl / "monitor"
    if not box.is_dir():
        raise LabError(f"{box} is missing: this is not a lab guest (or its QEMU has no monitor)")
    name = uuid.uuid4().hex
    tmp, req, out = box / f"{name}.new", box / f"{name}.req", box / f"{name}.out"
    tmp.write_text(cmd)
    os.rename(tmp, req)
    deadline = time.monotonic() + timeout
    while not out.exists():
        if time.monotonic() > deadline:
            raise LabTimeout(
                f"the host did not answer the monitor command {cmd!r} in {timeout:g} s"
            )
        time.sleep(0.02)
    reply = out.read_text()
    out.unlink()
    if reply.startswith("error: "):
        raise LabError(f"monitor command {cmd!r} failed: {reply[7:]}")
    return reply
