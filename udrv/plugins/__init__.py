"""nbdkit-compatible Python plugins served as udrv block devices.

A plugin written for ``nbdkit python`` (nbdkit-python-plugin(3), API version 2) is loaded
unchanged (:mod:`udrv.plugins.loader`), finds udrv's :mod:`udrv.plugins.nbdkit` module when
it imports ``nbdkit``, and is served through any udrv frontend as a
:class:`~udrv.plugins.driver.PluginDriver` (``udrv plugin serve PLUGIN.py key=value``).
"""

from udrv.plugins.driver import ParallelPluginDriver, PluginDriver, open_driver
from udrv.plugins.loader import Plugin, load

__all__ = ["ParallelPluginDriver", "Plugin", "PluginDriver", "load", "open_driver"]
