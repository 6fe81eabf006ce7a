"""udrv's e1000 driver on the 82540EM model, over vfio-user: bring-up (PHY through MDIC),
frames both ways through the :class:`udrv.net.Nic` interface, filters, ring exhaustion, link
changes, the I/O BAR, faults."""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterator

import pytest

from udrv.drivers.e1000 import E1000
from udrv.drivers.e1000.driver import BUF_SIZE
from udrv.drivers.e1000.phy import PhyError
from udrv.errors import IrqError
from udrv.models.e1000 import BMCR, BMCR_POWER_DOWN, E1000Model, connect, socket_pair
from udrv.pci.capabilities import CapId
from udrv.pci.config import decode as decode_config
from udrv.testing import ModelDevice, open_model

BROADCAST = b"\xff" * 6
OTHER = bytes.fromhex("020000000001")


def frame(dst: bytes, payload: bytes = b"x" * 46) -> bytes:
    return dst + OTHER + b"\x08\x00" + payload


def wait_frames(nic: E1000, n: int, timeout: float = 2.0) -> list[bytes]:
    """Frames from rx_batch() until ``n`` arrived or ``timeout``; copied, since rx_batch()
    lends its buffers only until the next call."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += [bytes(f) for f in nic.rx_batch()]
        time.sleep(0.002)
    return got


@pytest.fixture
def nic_pair() -> Iterator[tuple[E1000Model, E1000Model, ModelDevice, ModelDevice]]:
    a, b = (
        E1000Model(mac=bytes.fromhex("52540000000a")),
        E1000Model(mac=bytes.fromhex("52540000000b")),
    )
    connect(a, b)
    with open_model(a) as da, open_model(b) as db:
        yield a, b, da, db


def test_bring_up_mac_and_link(udrv_model: Callable[..., ModelDevice]) -> None:
    dev = udrv_model(E1000Model())
    with E1000(dev, interrupts="intx") as nic:
        assert nic.model == "82540EM"
        assert nic.mac == bytes.fromhex("525400123456")
        assert [nic.read_eeprom(i) for i in range(3)] == [0x5452, 0x1200, 0x5634]
        assert sum(nic.read_eeprom(i) for i in range(64)) & 0xFFFF == 0xBABA  # SDM 5.6.1
        link = nic.link()
        assert link.up and link.speed_mbps == 1000 and link.full_duplex
        # Both ends advertise symmetric PAUSE (ANAR, ANLPAR bit 10): CTRL.RFCE and TFCE on.
        assert nic.bar.read32(0) & (3 << 27) == 3 << 27


def test_two_nics_talk(nic_pair: tuple[E1000Model, E1000Model, ModelDevice, ModelDevice]) -> None:
    a, b, da, db = nic_pair
    with E1000(da, interrupts="intx") as na, E1000(db, interrupts="intx") as nb:
        sent = [frame(nb.mac, bytes([i]) * 100) for i in range(20)]
        assert na.tx_batch(sent) == 20
        assert nb.irq is not None and nb.irq.wait(2.0)
        got = wait_frames(nb, 20)
        assert got == sent
        assert nb.ack_interrupts() & 0x80  # RXT0
        assert nb.tx_batch([frame(na.mac, b"pong" * 20)]) == 1
        assert wait_frames(na, 1) == [frame(na.mac, b"pong" * 20)]
        stats = nb.update_stats()
        assert stats["rx_good_packets"] == 20 and stats["tx_good_packets"] == 1
        assert stats["rx_good_octets"] == sum(len(f) + 4 for f in sent)  # with FCS
        # The software counters: the FCS the NIC kept (RCTL.SECRC = 0) is not counted.
        assert nb.stats.rx_packets == 20 and nb.stats.rx_bytes == sum(map(len, sent))
        assert na.stats.tx_packets == 20 and na.stats.tx_bytes == sum(map(len, sent))
        assert not nb.stats.rx_dropped and not na.stats.tx_dropped
    assert a.faults == b.faults == []


def test_filters(nic_pair: tuple[E1000Model, E1000Model, ModelDevice, ModelDevice]) -> None:
    _, _, da, db = nic_pair
    with E1000(da, interrupts=None) as na, E1000(db, interrupts=None) as nb:
        mcast = bytes.fromhex("01005e000001")
        na.tx_batch([frame(OTHER), frame(mcast), frame(BROADCAST)])
        assert wait_frames(nb, 1, timeout=0.3) == [frame(BROADCAST)]  # not for us: filtered
        nb.add_multicast(mcast)
        na.tx_batch([frame(mcast)])
        assert wait_frames(nb, 1) == [frame(mcast)]
        nb.set_promiscuous(True)
        na.tx_batch([frame(OTHER)])
        assert wait_frames(nb, 1) == [frame(OTHER)]


def test_short_frames_are_padded(
    nic_pair: tuple[E1000Model, E1000Model, ModelDevice, ModelDevice],
) -> None:
    _, _, da, db = nic_pair
    with E1000(da, interrupts=None) as na, E1000(db, interrupts=None) as nb:
        na.tx_batch([frame(nb.mac, b"")])  # 14 bytes: TCTL.PSP pads to 60
        [got] = wait_frames(nb, 1)
        assert len(got) == 60 and got[:14] == frame(nb.mac, b"")


def test_full_ring_counts_missed_packets(
    nic_pair: tuple[E1000Model, E1000Model, ModelDevice, ModelDevice],
) -> None:
    _, b, da, db = nic_pair
    with E1000(da, interrupts=None) as na, E1000(db, interrupts=None, rx_ring=8) as nb:
        for _ in range(3):
            na.tx_batch([frame(nb.mac)] * 5)
        assert b.idle(2.0)
        deadline = time.monotonic() + 2
        while nb.update_stats()["missed_packets"] < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(nb.rx_batch(64)) == 7  # RDT = n - 1: seven descriptors for the NIC
        assert nb.hw_stats["missed_packets"] == 8


def test_link_down_and_up(udrv_model: Callable[..., ModelDevice]) -> None:
    dev = udrv_model(E1000Model(loopback=True))
    model = dev.model
    assert isinstance(model, E1000Model)
    with E1000(dev, interrupts="intx") as nic:
        nic.ack_interrupts()
        model.set_carrier(False)
        assert nic.irq is not None and nic.irq.wait(2.0)
        assert nic.ack_interrupts() & 0x4 and not nic.link().up  # LSC
        nic.tx_batch([frame(nic.mac)])
        assert wait_frames(nic, 1, timeout=0.2) == []  # no link: nothing arrives
        model.set_carrier(True)
        assert nic.irq.wait(2.0) and nic.ack_interrupts() & 0x4 and nic.link().up
        assert wait_frames(nic, 1, timeout=0.2) == []  # the frame sent while down is gone
        nic.tx_batch([frame(nic.mac)])
        assert wait_frames(nic, 1) == [frame(nic.mac)]


def test_socket_wire(udrv_model: Callable[..., ModelDevice]) -> None:
    model = E1000Model()
    wire, far = socket_pair()
    model.attach_socket(wire)
    dev = udrv_model(model)
    with E1000(dev, interrupts=None) as nic:
        nic.tx_batch([frame(OTHER, b"out" * 20)])
        far.settimeout(2.0)
        assert far.recv(2048) == frame(OTHER, b"out" * 20)
        far.send(frame(nic.mac, b"in" * 30))
        assert wait_frames(nic, 1) == [frame(nic.mac, b"in" * 30)]
    far.close()


def test_io_bar_reaches_the_registers(udrv_model: Callable[..., ModelDevice]) -> None:
    dev = udrv_model(E1000Model())
    info = dev.region_info(1)
    assert info.kind.value == "io" and info.size == 64
    io = dev.bar(1)
    io.write32(0, 0x5400)  # IOADDR = RAL0
    assert io.read32(4) == int.from_bytes(bytes.fromhex("52540012"), "little")  # IODATA


def test_rx_descriptor_longer_than_its_buffer_is_dropped(
    udrv_model: Callable[..., ModelDevice],
) -> None:
    """A device that claims to have written past the 2 KiB buffer: the frame is dropped and
    counted, never handed out with the next buffer's bytes; the next frame comes through."""
    dev = udrv_model(E1000Model(loopback=True))
    model = dev.model
    assert isinstance(model, E1000Model)
    with E1000(dev, interrupts=None) as nic:
        model.inject.rx_length_overrun = BUF_SIZE
        nic.tx_batch([frame(nic.mac, b"a" * 46)])
        deadline = time.monotonic() + 2
        got: list[bytes] = []
        while not nic.stats.rx_dropped and time.monotonic() < deadline:
            got += [bytes(f) for f in nic.rx_batch()]
            time.sleep(0.002)
        assert got == []
        assert nic.stats.rx_dropped == {"bad_length": 1}
        assert nic.stats.rx_packets == 0
        nic.tx_batch([frame(nic.mac, b"b" * 46)])
        assert wait_frames(nic, 1) == [frame(nic.mac, b"b" * 46)]


def test_driver_powers_up_a_phy_left_powered_down(udrv_model: Callable[..., ModelDevice]) -> None:
    """Linux's e1000 powers the PHY down when it lets go; a MAC reset does not undo that, so
    the driver must clear BMCR.PD through MDIC or never see a link."""
    dev = udrv_model(E1000Model(loopback=True, phy_power_down=True))
    model = dev.model
    assert isinstance(model, E1000Model)
    assert model.phy.regs[BMCR] & BMCR_POWER_DOWN
    with E1000(dev, interrupts=None, link_timeout=1.0) as nic:
        assert not model.phy.regs[BMCR] & BMCR_POWER_DOWN
        assert nic.link().up
        assert nic.phy.read(2) << 16 | nic.phy.read(3) == 0x01410C20  # M88E1011_I_PHY_ID
        nic.tx_batch([frame(nic.mac)])
        assert wait_frames(nic, 1) == [frame(nic.mac)]


def test_phy_power_down_takes_the_link_down(udrv_model: Callable[..., ModelDevice]) -> None:
    """BMCR.PD written through MDIC drops STATUS.LU (with LSC); clearing it brings it back."""
    dev = udrv_model(E1000Model())
    with E1000(dev, interrupts="intx") as nic:
        nic.ack_interrupts()
        ctrl = nic.phy.read(BMCR)
        nic.phy.write(BMCR, ctrl | BMCR_POWER_DOWN)
        assert not nic.link().up and nic.ack_interrupts() & 0x4  # LSC
        assert not nic.phy.read(1) & 0x4  # BMSR link status
        nic.phy.write(BMCR, ctrl & ~BMCR_POWER_DOWN)
        assert nic.link().up and nic.ack_interrupts() & 0x4
        assert nic.phy.read(1) & 0x24 == 0x24  # BMSR link status, auto-negotiation complete


def test_mdic_to_another_phy_address_sets_error(udrv_model: Callable[..., ModelDevice]) -> None:
    """Only the internal PHY (address 1) answers: MDIC.E on any other, which the driver
    reports as a PhyError naming the NIC."""
    dev = udrv_model(E1000Model())
    with E1000(dev, interrupts=None) as nic:
        nic.bar.write32(0x20, (0b10 << 26) | (2 << 21) | (1 << 16))  # read PHY 2, register 1
        mdic = nic.bar.read32(0x20)
        assert mdic & (1 << 28) and mdic & (1 << 30)  # R and E
        nic.phy.write(4, nic.phy.read(4))  # the internal PHY still answers
    with E1000(dev, interrupts=None) as nic, pytest.MonkeyPatch.context() as mp:
        mp.setattr("udrv.drivers.e1000.phy.PHY_ADDR", 3)
        with pytest.raises(PhyError, match="did not answer"):
            nic.phy.read(1)


def test_a_shared_unmaskable_intx_line_falls_back_to_polling(
    nic_pair: tuple[E1000Model, E1000Model, ModelDevice, ModelDevice],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 15 item 15: vfio-pci refuses a shared INTx line without PCI 2.3 masking with
    EBUSY; the driver logs it and polls, and frames still flow."""
    _, b, da, db = nic_pair
    b.intx_unmaskable_shared = True
    with caplog.at_level(logging.WARNING, logger="udrv.core.interrupts"):
        nb = E1000(db, interrupts="intx")
    with E1000(da, interrupts=None) as na, nb:
        assert nb.irq is None and nb.fileno() == -1 and db.irq.enabled is None
        assert "shared with another device" in caplog.text and "polling" in caplog.text
        sent = [frame(nb.mac, bytes([i]) * 60) for i in range(5)]
        assert na.tx_batch(sent) == 5
        assert wait_frames(nb, 5) == sent
    with pytest.raises(IrqError, match="EBUSY") as exc:
        db.irq.enable("intx")  # the plain call still raises, with the errno
    assert exc.value.errno == errno.EBUSY


@pytest.mark.parametrize(("firmware", "after"), [(3, 2), (2, 2), (1, 1)])
def test_pcix_mmrbc_is_capped_at_2048(
    udrv_model: Callable[..., ModelDevice], firmware: int, after: int
) -> None:
    """Issue 15 item 11: on a PCI-X bus the driver lowers MMRBC above 2048 bytes to 2048
    (Linux e1000_init_hw) and leaves smaller values alone."""
    dev = udrv_model(E1000Model(pcix_mmrbc=firmware))
    with E1000(dev, interrupts=None):
        cap = decode_config(bytes(dev.config.read8(i) for i in range(256))).cap(CapId.PCIX)
        assert cap is not None
        assert (dev.config.read16(cap.offset + 2) >> 2) & 3 == after


def test_no_pcix_capability_no_change(udrv_model: Callable[..., ModelDevice]) -> None:
    dev = udrv_model(E1000Model())
    before = bytes(dev.config.read8(i) for i in range(0x40, 0x100))
    with E1000(dev, interrupts=None):
        assert bytes(dev.config.read8(i) for i in range(0x40, 0x100)) == before
