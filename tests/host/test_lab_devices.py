"""Device SPEC parsing and placement for the lab (no QEMU needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from udrv.errors import LabError
from udrv.lab.devices import DeviceSpec, devices_env, parse_size, place


def test_spec_splits_lab_keys_from_qemu_keys() -> None:
    spec = DeviceSpec.parse("nvme:size=256M,serial=abc,max_ioqpairs=4")
    assert spec.model == "nvme" and spec.size == 256 << 20
    assert spec.qemu_opts == {"serial": "abc", "max_ioqpairs": "4"}
    assert spec.is_block and not spec.is_nic


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nvme:size=12X", "bad size '12X'"),
        ("edu:slot", "expected KEY=VALUE"),
        ("edu,addr=4", "expected NAME"),
        ("edu:slot=0x1f", "outside 4..30"),
    ],
)
def test_bad_specs_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(LabError, match=message):
        DeviceSpec.parse(text)


def test_devices_get_fixed_slots_in_order_and_unique_names() -> None:
    placed = place([DeviceSpec.parse(s) for s in ["edu", "nvme", "edu", "e1000"]])
    assert devices_env(placed) == (
        "edu=0000:00:04.0,nvme=0000:00:05.0,edu.1=0000:00:06.0,e1000=0000:00:07.0"
    )


def test_pinned_slots_are_skipped_by_the_others() -> None:
    placed = place(
        [DeviceSpec.parse("edu"), DeviceSpec.parse("edu:slot=5"), DeviceSpec.parse("e1000")]
    )
    assert [d.address for d in placed] == ["0000:00:04.0", "0000:00:05.0", "0000:00:06.0"]
    with pytest.raises(LabError, match="same slot"):
        place([DeviceSpec.parse("edu:slot=5"), DeviceSpec.parse("edu:slot=5")])


def test_too_many_devices_is_an_error() -> None:
    with pytest.raises(LabError, match="too many devices"):
        place([DeviceSpec.parse("edu")] * 28)


def test_qemu_args_for_block_and_nic(tmp_path: Path) -> None:
    nvme, nic = place([DeviceSpec.parse("nvme:size=1M"), DeviceSpec.parse("e1000:hub=2")])
    args = nvme.qemu_args(tmp_path)
    image = tmp_path / "nvme.img"
    assert image.stat().st_size == 1 << 20
    assert args[:2] == ["-drive", f"file={image},if=none,id=udrv4,format=raw,cache=unsafe"]
    assert args[3] == "nvme,addr=04,drive=udrv4,serial=UDRV0004"
    assert nic.qemu_args(tmp_path) == [
        "-netdev",
        "hubport,id=udrv5,hubid=2",
        "-device",
        "e1000,addr=05,netdev=udrv5,mac=52:54:00:12:34:05",
    ]


@given(st.integers(0, 1 << 20), st.sampled_from(["", "K", "M", "G", "k", "m", "g"]))
def test_parse_size(n: int, suffix: str) -> None:
    assert parse_size(f"{n}{suffix}") == n << {"": 0, "K": 10, "M": 20, "G": 30}[suffix.upper()]
