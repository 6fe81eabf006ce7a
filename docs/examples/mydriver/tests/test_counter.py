"""Tests of the driver against the model: `udrv_model` comes from udrv's pytest plugin."""

from __future__ import annotations

from counter_model import CounterModel
from mydriver import Counter


def test_counts(udrv_model) -> None:
    drv = Counter(udrv_model(CounterModel()))
    assert drv.add(3) == 3
    assert drv.add(4) == 7


def test_interrupt_at_threshold(udrv_model) -> None:
    dev = udrv_model(CounterModel())
    drv = Counter(dev)
    drv.add(10)
    assert drv.wait_threshold(5)
    assert dev.model.faults == []


def test_wrong_device_is_refused(udrv_model) -> None:
    import pytest

    with pytest.raises(ValueError, match="is not a counter"):
        Counter(udrv_model("edu"))
