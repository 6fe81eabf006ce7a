"""Device models in Python, served over vfio-user (``udrv emulate NAME --socket PATH``).

:mod:`.base` is the framework (:class:`~udrv.models.base.PciModel`), :mod:`.pci` the config
space; each model is one module.
"""

from __future__ import annotations

from udrv.errors import ModelError
from udrv.models.base import PciModel

#: ``udrv emulate NAME``: module and class of each model.
MODELS = {
    "edu": ("udrv.models.edu", "EduModel"),
    "nvme": ("udrv.models.nvme", "NvmeModel"),
    "e1000": ("udrv.models.e1000", "E1000Model"),
}


def create(name: str, **options: object) -> PciModel:
    """A new model by name.

    Raises:
        ModelError: no such model (the message lists them).
    """
    import importlib

    if name not in MODELS:
        raise ModelError(f"no device model {name!r}; choose one of {', '.join(MODELS)}")
    module, cls = MODELS[name]
    model: PciModel = getattr(importlib.import_module(module), cls)(**options)
    return model
