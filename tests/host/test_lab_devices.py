"""Device SPEC parsing and placement for the lab (no QEMU needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from udrv.errors import LabError, LabSetupError
from udrv.lab.devices import (
    DeviceSpec,
    check_models,
    devices_env,
    parse_device_help,
    parse_size,
    place,
    qemu_models,
)

#: `qemu-system-x86_64 -device help` of QEMU 7.2.22 (Debian 12), captured.
DEVICE_HELP = Path(__file__).parent / "data" / "qemu-7.2-device-help.txt"


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
        ("edu:slot=five", r"bad slot=five .*expected a number"),
        ("edu:fn=1", r"fn= in 'edu:fn=1' needs slot=: e.g. edu:slot=5,fn=1"),
        ("edu:slot=5,fn=8", "fn=8 in 'edu:slot=5,fn=8' is outside 0..7"),
        ("edu:addr=zz", r"bad addr=zz .*SLOT\[\.FN\] in hex"),
        ("edu:addr=1f.0", "slot 0x1f .* is outside"),
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
    with pytest.raises(LabError, match=r"edu and edu both ask for slot=0x5 function 0: .*fn=1"):
        place([DeviceSpec.parse("edu:slot=5"), DeviceSpec.parse("edu:slot=5")])


def test_functions_of_one_slot(tmp_path: Path) -> None:
    placed = place([DeviceSpec.parse("e1000:slot=5"), DeviceSpec.parse("e1000:slot=5,fn=1")])
    assert devices_env(placed) == "e1000=0000:00:05.0,e1000.1=0000:00:05.1"
    f0, f1 = (d.qemu_args(tmp_path) for d in placed)
    # Function 0 announces the others; each function gets its own netdev and MAC.
    assert f0 == [
        "-netdev",
        "hubport,id=udrv5,hubid=0",
        "-device",
        "e1000,addr=05,multifunction=on,netdev=udrv5,mac=52:54:00:12:34:05",
    ]
    assert f1 == [
        "-netdev",
        "hubport,id=udrv5f1,hubid=0",
        "-device",
        "e1000,addr=05.1,netdev=udrv5f1,mac=52:54:00:12:35:05",
    ]


def test_functions_in_any_order_and_auto_slots_skip_them(tmp_path: Path) -> None:
    placed = place(
        [DeviceSpec.parse(s) for s in ["nvme:slot=4,fn=2", "edu", "edu:slot=4", "rtl8139"]]
    )
    assert [d.address for d in placed] == [
        "0000:00:04.2",
        "0000:00:05.0",
        "0000:00:04.0",
        "0000:00:07.0",
    ]
    assert [d.multifunction for d in placed] == [False, False, True, False]
    nvme_args = placed[0].qemu_args(tmp_path)
    assert nvme_args[1].startswith(f"file={tmp_path / 'nvme.img'},if=none,id=udrv4f2,")
    assert nvme_args[3] == "nvme,addr=04.2,drive=udrv4f2,serial=UDRV0004F2"


def test_a_lone_slot_is_not_multifunction() -> None:
    (only,) = place([DeviceSpec.parse("edu:slot=9,fn=0")])
    assert only.address == "0000:00:09.0" and not only.multifunction


def test_qemu_addr_is_read_as_slot_and_function() -> None:
    placed = place(
        [
            DeviceSpec.parse("rtl8139:addr=10.0,multifunction=on"),
            DeviceSpec.parse("e1000:addr=10.1"),
        ]
    )
    assert devices_env(placed) == "rtl8139=0000:00:10.0,e1000=0000:00:10.1"
    assert placed[0].spec.qemu_opts == {"multifunction": "on"}


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (["e1000:slot=5,fn=1"], r"e1000 asks for slot=0x5,fn=1 but no device is function 0"),
        (["edu:slot=6", "e1000:slot=5,fn=1", "e1000:slot=5,fn=2"], r"slot=0x5,fn=1 but no"),
        (["edu:slot=5,fn=3", "nvme:slot=5,fn=3"], r"edu and nvme both ask for slot=0x5 function 3"),
        (["edu:slot=5,fn=0", "nvme:slot=5"], r"both ask for slot=0x5 function 0"),
    ],
)
def test_bad_function_layouts_are_refused(specs: list[str], message: str) -> None:
    with pytest.raises(LabError, match=message):
        place([DeviceSpec.parse(s) for s in specs])


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


def test_device_help_is_parsed_with_aliases_and_buses() -> None:
    models = parse_device_help(DEVICE_HELP.read_text())
    assert models["edu"] == models["e1000"] == models["nvme"] == "PCI"
    assert models["e1000-82540em"] == "PCI"  # alias "e1000-82540em" of e1000
    assert models["virtio-net"] == "PCI"  # alias of virtio-net-pci
    assert models["usb-hub"] == "usb-bus"
    assert models["nvme-subsys"] is None
    assert "Network devices:" not in models and "" not in models
    assert len(models) > 300


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("e100", r"QEMU has no device model 'e100': did you mean e1000, .*-device help"),
        ("nvm", r"no device model 'nvm': did you mean nvme"),
        ("zzzzzz", r"no device model 'zzzzzz': `qemu-system-x86_64 -device help` lists them"),
        ("usb-hub", r"'usb-hub' is not a PCI device \(QEMU puts it on bus usb-bus\)"),
        ("nvme-subsys", r"not a PCI device \(QEMU puts it on no bus\)"),
    ],
)
def test_unknown_or_non_pci_models_are_refused(model: str, message: str) -> None:
    models = parse_device_help(DEVICE_HELP.read_text())
    with pytest.raises(LabError, match=message):
        check_models([DeviceSpec.parse("edu"), DeviceSpec.parse(model)], models)
    check_models([DeviceSpec.parse(m) for m in ("edu", "e1000e", "virtio-blk")], models)


def _fake_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    qemu = bindir / "qemu-fake"
    qemu.write_text(f"#!/bin/sh\necho run >> {tmp_path}/calls\n{body}\n")
    qemu.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    return qemu


def test_qemu_is_asked_once_and_again_after_an_upgrade(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    qemu = _fake_qemu(tmp_path, monkeypatch, f"cat {DEVICE_HELP}")
    cache = tmp_path / "cache"
    first = qemu_models("qemu-fake", cache)
    assert first == parse_device_help(DEVICE_HELP.read_text())
    assert qemu_models("qemu-fake", cache) == first
    assert (tmp_path / "calls").read_text() == "run\n"  # the second answer came from the cache
    qemu.write_text(qemu.read_text() + "\n")  # a new binary: new size and mtime
    assert qemu_models("qemu-fake", cache) == first
    assert (tmp_path / "calls").read_text() == "run\nrun\n"


def test_a_broken_qemu_is_a_setup_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_qemu(tmp_path, monkeypatch, "echo oops >&2; exit 1")
    with pytest.raises(LabSetupError, match=r"`qemu-fake -device help` failed: .*udrv lab setup"):
        qemu_models("qemu-fake", tmp_path / "cache")
    with pytest.raises(LabSetupError, match="qemu-nowhere is not installed"):
        qemu_models("qemu-nowhere", tmp_path / "cache")
