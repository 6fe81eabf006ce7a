"""Test drivers against device models: helpers and a pytest plugin.

The plugin is registered as a ``pytest11`` entry point, so any project that installs udrv
gets its fixtures with no configuration:

    from udrv.models.edu import EduModel

    def test_factorial(udrv_model):
        dev = udrv_model(EduModel())        # a Device over vfio-user, closed after the test
        ...

- ``udrv_model(model_or_name, *, process=False)``: serve a model and open it. In-process
  (a server thread; the test can reach ``dev.model`` to inject faults and look at state) or,
  with ``process=True`` and a model name, ``udrv emulate NAME`` in a child process.
- the ``lab`` marker (:mod:`udrv.lab.pytest_plugin`) for tests that need a real kernel and a
  QEMU guest.

Outside pytest, :func:`serve` and :func:`open_model` are context managers doing the same.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from udrv.backends.vfio_user import VfioUserDevice
from udrv.errors import ModelError
from udrv.models.base import PciModel
from udrv.vfio_user.server import Server

# The lab marker and its runner come with this plugin (loaded once even if also given -p).
pytest_plugins = ["udrv.lab.pytest_plugin"]

__all__ = ["ModelDevice", "open_model", "serve"]


@contextlib.contextmanager
def serve(model: PciModel, *, timeout: float = 5.0) -> Iterator[str]:
    """Serve ``model`` on a fresh socket (a server thread); yields the socket path.

    The path is under /tmp: AF_UNIX paths are limited to 108 bytes.
    """
    d = tempfile.mkdtemp(prefix="udrv-model-", dir="/tmp")
    path = str(Path(d) / f"{model.name}.sock")
    server = Server(model, path, timeout=timeout).start()
    try:
        yield path
    finally:
        server.stop()
        shutil.rmtree(d, ignore_errors=True)


class ModelDevice(VfioUserDevice):
    """A :class:`~udrv.backends.vfio_user.VfioUserDevice` that knows the model behind it
    (``None`` when the model runs in another process)."""

    model: PciModel | None = None


@contextlib.contextmanager
def open_model(model: PciModel, *, timeout: float = 5.0) -> Iterator[ModelDevice]:
    """Serve ``model`` and open it: ``with open_model(EduModel()) as dev: ...``."""
    with serve(model, timeout=timeout) as path:
        dev = ModelDevice(path, timeout=timeout)
        dev.model = model
        try:
            yield dev
        finally:
            dev.close()


@contextlib.contextmanager
def _emulate_process(name: str, timeout: float, options: list[str]) -> Iterator[ModelDevice]:
    d = tempfile.mkdtemp(prefix="udrv-model-", dir="/tmp")
    path = f"{d}/{name}.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "udrv", "emulate", name, "--socket", path, *options],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once the socket listens
        if "serving on" not in line:
            proc.kill()
            _, err = proc.communicate(timeout=10)
            raise ModelError(f"`udrv emulate {name}` did not start: {err.strip() or line}")
        dev = ModelDevice(path, timeout=timeout)
        try:
            yield dev
        finally:
            dev.close()
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def udrv_model() -> Iterator[Callable[..., ModelDevice]]:
    """A factory: ``udrv_model(EduModel())`` or ``udrv_model("nvme", process=True,
    options=["--size", "16M"])`` returns an opened device; all are closed after the test."""
    with contextlib.ExitStack() as stack:

        def make(
            model: PciModel | str,
            *,
            process: bool = False,
            timeout: float = 5.0,
            options: list[str] | None = None,
        ) -> ModelDevice:
            if process:
                if not isinstance(model, str):
                    raise ModelError("process=True needs a model name (`udrv emulate NAME`)")
                return stack.enter_context(_emulate_process(model, timeout, options or []))
            if isinstance(model, str):
                from udrv.models import create

                model = create(model)
            return stack.enter_context(open_model(model, timeout=timeout))

        yield make
