"""The ``nbdkit`` module that a Python plugin imports, as nbdkit-python-plugin(3) defines it.

A plugin written for ``nbdkit python`` does ``import nbdkit`` and finds this module there
(:func:`udrv.plugins.loader.load` puts it in ``sys.modules`` under that name). The constants
have the values nbdkit 1.32's own module has (checked against it in
tests/host/test_nbdkit_plugin.py when nbdkit-plugin-python is installed); they are
nbdkit-plugin(3)'s ``NBDKIT_FLAG_*``, ``NBDKIT_THREAD_MODEL_*``, ``NBDKIT_FUA_*``,
``NBDKIT_CACHE_*`` and ``NBDKIT_EXTENT_*``.

Errors: :func:`set_error` records an errno for the calling thread; when the callback then
raises, :class:`udrv.plugins.driver.PluginDriver` turns the exception into ``OSError`` with
that errno (EIO when none was set, as nbdkit does). The frontends carry it as far as their
protocol allows (see docs/block-device-in-python.md, "Errors").
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable

# Module constants (nbdkit-python-plugin(3) "Module constants").
THREAD_MODEL_SERIALIZE_CONNECTIONS = 0
THREAD_MODEL_SERIALIZE_ALL_REQUESTS = 1
THREAD_MODEL_SERIALIZE_REQUESTS = 2
THREAD_MODEL_PARALLEL = 3

FLAG_MAY_TRIM = 1 << 0
FLAG_FUA = 1 << 1
FLAG_REQ_ONE = 1 << 2
FLAG_FAST_ZERO = 1 << 3

FUA_NONE, FUA_EMULATE, FUA_NATIVE = 0, 1, 2
CACHE_NONE, CACHE_EMULATE, CACHE_NATIVE = 0, 1, 2

# Extent types: the same bits as NBD's base:allocation (proto.md "Metadata contexts":
# NBD_STATE_HOLE = 1, NBD_STATE_ZERO = 2).
EXTENT_HOLE = 1 << 0
EXTENT_ZERO = 1 << 1

THREAD_MODEL_NAMES = {
    THREAD_MODEL_SERIALIZE_CONNECTIONS: "serialize_connections",
    THREAD_MODEL_SERIALIZE_ALL_REQUESTS: "serialize_all_requests",
    THREAD_MODEL_SERIALIZE_REQUESTS: "serialize_requests",
    THREAD_MODEL_PARALLEL: "parallel",
}

log = logging.getLogger("udrv.plugins.nbdkit")
_state = threading.local()
_export_name = ""
_shutdown_hook: Callable[[], None] | None = None


def set_error(err: int) -> None:
    """Record ``err`` (an errno value) as the reason for the exception about to be raised."""
    _state.errno = int(err)


def take_error() -> int:
    """The errno the calling thread set since the last call (0: none); resets it."""
    err = getattr(_state, "errno", 0)
    _state.errno = 0
    return err


def debug(msg: str) -> None:
    """A debug message (shown with ``udrv plugin serve -v``, like ``nbdkit -v``)."""
    log.debug("%s", msg)


def export_name() -> str:
    """The export name the client asked for ("" over ublk: there is none)."""
    return _export_name


_SIZE = re.compile(r"\s*(\d+)\s*([bBsSkKmMgGtTpPeE]?)\s*")
_SHIFT = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


def parse_size(text: str) -> int:
    """``"100M"`` -> 104857600, as ``nbdkit_parse_size``: a number with an optional suffix
    b, s (512-byte sectors), k, m, g, t, p or e (powers of 1024).

    Raises:
        ValueError: ``text`` is not a size.
    """
    m = _SIZE.fullmatch(text)
    if m is None:
        raise ValueError(f"parse_size: cannot parse {text!r} as a size (e.g. 4096, 64M, 1G)")
    num, unit = int(m.group(1)), m.group(2).lower()
    if unit == "s":
        return num * 512
    size = num << _SHIFT[unit]
    if size >= 1 << 63:
        raise ValueError(f"parse_size: {text!r} is too large")
    return size


def shutdown() -> None:
    """Ask the server to stop (asynchronously), as ``nbdkit_shutdown``."""
    if _shutdown_hook is not None:
        _shutdown_hook()
