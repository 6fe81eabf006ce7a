"""vfio-user wire layouts against the specification's tables (QEMU docs/interop/vfio-user.rst)."""

from __future__ import annotations

import ctypes
import json

import pytest

from udrv.errors import VfioUserError
from udrv.vfio_user import protocol as P


@pytest.mark.parametrize(
    ("struct", "fields"),
    [
        # (name, offset, size) straight from the spec's tables
        (P.vfio_user_header, [("msg_id", 0, 2), ("command", 2, 2), ("msg_size", 4, 4), ("flags", 8, 4), ("error_no", 12, 4)]),
        (P.vfio_user_dma_map, [("argsz", 0, 4), ("flags", 4, 4), ("offset", 8, 8), ("addr", 16, 8), ("size", 24, 8)]),
        (P.vfio_user_dma_unmap, [("argsz", 0, 4), ("flags", 4, 4), ("addr", 8, 8), ("size", 16, 8)]),
        (P.vfio_user_device_info, [("argsz", 0, 4), ("flags", 4, 4), ("num_regions", 8, 4), ("num_irqs", 12, 4)]),
        (P.vfio_region_info, [("argsz", 0, 4), ("flags", 4, 4), ("index", 8, 4), ("cap_offset", 12, 4), ("size", 16, 8), ("offset", 24, 8)]),
        (P.vfio_irq_info, [("argsz", 0, 4), ("flags", 4, 4), ("index", 8, 4), ("count", 12, 4)]),
        (P.vfio_irq_set, [("argsz", 0, 4), ("flags", 4, 4), ("index", 8, 4), ("start", 12, 4), ("count", 16, 4)]),
        (P.vfio_user_region_access, [("offset", 0, 8), ("region", 8, 4), ("count", 12, 4)]),
        (P.vfio_user_dma_region_access, [("addr", 0, 8), ("count", 8, 8)]),
    ],
)  # fmt: skip
def test_layouts_match_the_spec_tables(struct: type, fields: list[tuple[str, int, int]]) -> None:
    for name, offset, size in fields:
        f = getattr(struct, name)
        assert (f.offset, f.size) == (offset, size), name
    last = fields[-1]
    assert ctypes.sizeof(struct) == last[1] + last[2]


def test_command_numbers() -> None:
    assert [P.Command.VERSION, P.Command.DMA_MAP, P.Command.REGION_READ, P.Command.DMA_WRITE,
            P.Command.DEVICE_RESET, P.Command.REGION_WRITE_MULTI] == [1, 2, 9, 12, 13, 15]  # fmt: skip


def test_version_payload_round_trip() -> None:
    ours = P.Negotiated(max_msg_fds=8, max_data_xfer_size=4096)
    payload = bytes(P.vfio_user_version(0, 1)) + ours.to_json()
    assert payload.endswith(b"\0")  # "including terminating NUL"
    back = P.Negotiated.from_payload(payload, "test")
    assert (back.major, back.minor, back.max_msg_fds, back.max_data_xfer_size) == (0, 1, 8, 4096)


def test_version_defaults_without_json() -> None:
    back = P.Negotiated.from_payload(bytes(P.vfio_user_version(0, 1)), "test")
    assert back.max_msg_fds == 1 and back.max_data_xfer_size == 1 << 20  # spec defaults


@pytest.mark.parametrize(
    "data",
    [b"{", b'{"capabilities": 3}', json.dumps({"capabilities": {"max_msg_fds": -1}}).encode(),
     json.dumps({"capabilities": {"max_data_xfer_size": "big"}}).encode()],
)  # fmt: skip
def test_bad_version_data_is_einval(data: bytes) -> None:
    with pytest.raises(VfioUserError) as exc:
        P.Negotiated.from_payload(bytes(P.vfio_user_version(0, 1)) + data + b"\0", "VERSION")
    assert exc.value.errno == 22


def test_truncated_payload_is_named() -> None:
    with pytest.raises(VfioUserError, match="shorter than vfio_user_dma_map"):
        P.parse(P.vfio_user_dma_map, b"\0" * 31, "DMA_MAP")
