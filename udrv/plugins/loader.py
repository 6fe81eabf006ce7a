"""Loading an nbdkit Python plugin file and driving its life cycle.

nbdkit-plugin(3) "CALLBACK LIFECYCLE": the script is run (its top-level statements), then
``config(key, value)`` once per ``key=value`` on the command line, ``config_complete()``,
``thread_model()``, ``get_ready()``; per connection ``open(readonly)`` ... ``close(h)``; at
exit ``cleanup()``. :func:`load` does the part before the first ``open``; :class:`Plugin`
calls the rest with errors turned into ``OSError`` carrying the errno the plugin set.

Only API version 2 (``API_VERSION = 2``, nbdkit-python-plugin(3) "API versions") is
accepted: version 1's ``pread(h, count, offset)`` returns a buffer instead of filling one,
and a plugin without the constant is version 1.
"""

from __future__ import annotations

import errno
import importlib.machinery
import importlib.util
import itertools
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from udrv.errors import PluginError
from udrv.plugins import nbdkit

REQUIRED = ("open", "get_size", "pread")
_loaded = itertools.count()


class Plugin:
    """A loaded, configured plugin (use :func:`load`).

    Attributes:
        path: the plugin file.
        module: the plugin's module (its callbacks are attributes).
        thread_model: one of ``nbdkit.THREAD_MODEL_*``: the plugin's ``thread_model()``, or
            SERIALIZE_ALL_REQUESTS, the Python plugin's default.
    """

    def __init__(self, path: Path, module: ModuleType) -> None:
        self.path, self.module = path, module
        self.thread_model = nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS

    @property
    def name(self) -> str:
        return self.path.name

    def has(self, callback: str) -> bool:
        return callable(getattr(self.module, callback, None))

    def call(self, callback: str, *args: Any) -> Any:
        """Call ``callback(*args)``; an exception becomes ``OSError`` with the errno the plugin
        gave :func:`nbdkit.set_error` in this thread (EIO if none, as in nbdkit).

        Raises:
            OSError: the callback raised.
        """
        nbdkit.take_error()
        try:
            return getattr(self.module, callback)(*args)
        except Exception as exc:
            err = nbdkit.take_error() or errno.EIO
            raise OSError(err, f"{self.name}: {callback}() failed: {exc}") from exc

    def ask(self, callback: str, handle: Any, default: Any) -> Any:
        """An optional ``can_*``/``block_size`` style query: ``default`` when not defined."""
        if not self.has(callback):
            return default
        try:
            return self.call(callback, handle)
        except OSError as exc:
            raise PluginError(f"{exc.strerror}; the plugin cannot be served") from None

    def cleanup(self) -> None:
        """nbdkit's ``cleanup()``, at exit; errors are reported, not raised."""
        if self.has("cleanup"):
            try:
                self.call("cleanup")
            except OSError as exc:
                nbdkit.log.warning("%s", exc.strerror)


def _run_script(path: Path) -> ModuleType:
    # A private module name: the script's top level runs once per load, and two plugins
    # loaded in one process (the tests do it) do not share globals.
    name = f"_udrv_nbdkit_plugin_{next(_loaded)}"
    # An explicit source loader: installed plugins are often scripts without ".py"
    # (Debian's /usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-S3-plugin).
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("nbdkit", nbdkit)  # the plugin's `import nbdkit`
    if sys.modules["nbdkit"] is not nbdkit:
        raise PluginError("another module named `nbdkit` is imported in this process")
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise PluginError(f"{path} is not Python: {exc}") from None
    except Exception as exc:
        raise PluginError(f"{path}: the script failed while loading: "
                          f"{type(exc).__name__}: {exc}") from exc  # fmt: skip
    return module


def load(path: str | Path, params: Iterable[str] = ()) -> Plugin:
    """Load the plugin at ``path`` and configure it as ``nbdkit python PATH PARAMS...`` would.

    Args:
        path: the plugin file.
        params: ``key=value`` strings, passed to the plugin's ``config`` in order.

    Returns:
        The configured plugin (``config_complete`` and ``get_ready`` have run).

    Raises:
        PluginError: the file is missing or not a version-2 plugin, a parameter is not
            ``key=value`` or the plugin takes none, or ``config``/``config_complete``
            refused the configuration (its message is in ours).
    """
    p = Path(path)
    if not p.is_file():
        raise PluginError(f"plugin {p} does not exist (give the path of a .py plugin file)")
    module = _run_script(p)
    plugin = Plugin(p, module)
    version = getattr(module, "API_VERSION", 1)
    if version != 2:
        raise PluginError(f"{p} declares API_VERSION = {version}; udrv serves version 2 "
                          "plugins: add `API_VERSION = 2` and the version-2 callbacks "
                          "(pread(h, buf, offset, flags) fills buf)")  # fmt: skip
    missing = [name for name in REQUIRED if not plugin.has(name)]
    if missing:
        raise PluginError(f"{p} has no {', '.join(missing)}(): nbdkit-python-plugin(3) "
                          "requires open, get_size and pread")  # fmt: skip
    for param in params:
        key, eq, value = param.partition("=")
        if not eq or not key:
            raise PluginError(f"parameter {param!r} for {p.name} is not key=value")
        if not plugin.has("config"):
            raise PluginError(f"{p.name} takes no parameters (it has no config()); "
                              f"drop {param!r}")  # fmt: skip
        _lifecycle(plugin, "config", key, value)
    if plugin.has("config_complete"):
        _lifecycle(plugin, "config_complete")
    if plugin.has("thread_model"):
        model = _lifecycle(plugin, "thread_model")
        if model not in nbdkit.THREAD_MODEL_NAMES:
            raise PluginError(f"{p.name}: thread_model() returned {model!r}, not one of "
                              "nbdkit.THREAD_MODEL_*")  # fmt: skip
        plugin.thread_model = model
    if plugin.has("get_ready"):
        _lifecycle(plugin, "get_ready")
    return plugin


def _lifecycle(plugin: Plugin, callback: str, *args: Any) -> Any:
    try:
        return plugin.call(callback, *args)
    except OSError as exc:
        what = f"{callback}({', '.join(map(repr, args))})"
        cause = exc.__cause__ or exc
        raise PluginError(f"{plugin.path}: {what} refused the configuration: {cause}") from None
