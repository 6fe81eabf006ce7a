"""Shared pieces of the vfio-user host tests: a model served on a short socket path."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from udrv.models.base import PciModel
from udrv.vfio_user.server import Server


@contextmanager
def served(model: PciModel, timeout: float = 2.0) -> Iterator[tuple[Server, str]]:
    """``model`` served on a fresh socket (under /tmp: AF_UNIX paths are limited to 108
    bytes, which pytest's tmp_path can exceed)."""
    d = tempfile.mkdtemp(prefix="vu", dir="/tmp")
    path = str(Path(d) / "dev.sock")
    server = Server(model, path, timeout=timeout).start()
    try:
        yield server, path
    finally:
        server.stop()
        shutil.rmtree(d, ignore_errors=True)
