"""e1000 driven from Python as a Linux interface (udrv0), talking to a kernel-driven e1000.

Wiring: both NICs sit on QEMU hub 0. NIC A (0000:00:04.0) is ours, behind TAP udrv0 in the
root namespace (10.9.0.1); NIC B (0000:00:05.0) runs the kernel's e1000 driver in
namespace "peer" (10.9.0.2).
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.helpers.netns import kernel_peer, python_in_namespace

pytestmark = pytest.mark.lab("e1000", "e1000")
A, B = "0000:00:04.0", "0000:00:05.0"


def sh(cmd: str, timeout: float = 60) -> str:
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}: {r.stdout}{r.stderr}"
    return r.stdout


@pytest.fixture(scope="module")
def peer() -> Iterator[str]:
    kif = kernel_peer(B, "peer", "10.9.0.2")
    sh(f"udrv bind {A}")
    yield kif
    sh("ip netns del peer")


def start_driver(*extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "udrv", "e1000", "serve", A, "--tap", "udrv0",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "udrv0: 82540EM" in line, line + (proc.stderr.read() if proc.poll() is not None else "")
    sh("ip addr add 10.9.0.1/24 dev udrv0")
    return proc


def stop_driver(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    return err


@pytest.fixture
def driver(peer: str) -> Iterator[subprocess.Popen[str]]:
    proc = start_driver()
    yield proc
    if proc.poll() is None:
        stop_driver(proc)


def ping(target: str, ns: str = "", size: int = 56, count: int = 3) -> None:
    prefix = f"ip netns exec {ns} " if ns else ""
    sh(f"{prefix}ping -c {count} -i 0.3 -W 5 -s {size} -M do {target}", timeout=90)


def test_ping_both_ways_and_frame_sizes(driver: subprocess.Popen[str]) -> None:
    ping("10.9.0.2")
    ping("10.9.0.1", ns="peer")
    ping("10.9.0.2", size=1472)  # 1514-byte frames: a full MTU
    ping("10.9.0.2", size=0)  # 42-byte frames, padded to the 60-byte minimum by the NIC
    err = stop_driver(driver)
    assert "rx_good_packets=" in err and "tx_good_packets=" in err


def counters(err: str) -> dict[str, int]:
    """The driver's exit line as ``{name: value}``: udrv's software counters first (frames it
    was handed), then the device's (``tx_good_packets``: frames the NIC put on the wire)."""
    out: dict[str, int] = {}
    for k, v in re.findall(r"(\w+)=(\d+)", err.split("counters:")[-1]):
        out.setdefault(k, int(v))
    return out


def peer_stat(iface: str, name: str) -> int:
    return int(sh(f"ip netns exec peer cat /sys/class/net/{iface}/statistics/{name}"))


def snmp(ns: str, proto: str, field: str) -> int:
    """A counter of /proc/net/snmp in a namespace, e.g. ``Tcp`` ``InCsumErrors``."""
    head, vals = [ln.split() for ln in sh(f"ip netns exec {ns} cat /proc/net/snmp").splitlines()
                  if ln.startswith(proto + ":")]  # fmt: skip
    return int(vals[head.index(field)])


@pytest.mark.parametrize("offload", [True, False], ids=["tso", "no-offload"])
def test_tcp_transfer_with_checksum(peer: str, offload: bool) -> None:
    """4 MiB to the kernel's e1000 and its SHA-256 checked there. With offloads the kernel
    hands udrv0 TCP super-frames (its tx_packets counts far fewer frames than the peer
    receives) and the NIC segments and checksums them (TSO, SDM 3.5): the device's
    transmitted-frames counter exceeds the frames udrv was given, and the peer's TCP saw no
    checksum error. Without, one frame in, one frame out."""
    driver = start_driver(*([] if offload else ["--no-offload"]))
    try:
        tx0, rx0 = (
            int(Path("/sys/class/net/udrv0/statistics/tx_packets").read_text()),
            peer_stat(peer, "rx_packets"),
        )
        csum_errors = snmp("peer", "Tcp", "InCsumErrors")
        size = 4 << 20  # TCG + Python: 4 MiB keeps this test near half a minute
        data = os.urandom(size)
        receiver = (
            "import hashlib, socket\n"
            "srv = socket.create_server(('10.9.0.2', 5001))\n"
            "print('ready', flush=True)\n"
            "conn, _ = srv.accept(); h = hashlib.sha256(); n = 0\n"
            "while chunk := conn.recv(1 << 16):\n    h.update(chunk); n += len(chunk)\n"
            "print(n, h.hexdigest())\n"
        )
        with python_in_namespace("peer", receiver) as server:
            with socket.create_connection(("10.9.0.2", 5001), timeout=30) as s:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                s.recv(1)  # wait for the receiver to close
            out, _ = server.communicate(timeout=120)
        assert out.split() == [str(size), hashlib.sha256(data).hexdigest()]
        handed = int(Path("/sys/class/net/udrv0/statistics/tx_packets").read_text()) - tx0
        received = peer_stat(peer, "rx_packets") - rx0
        c = counters(stop_driver(driver))
        assert snmp("peer", "Tcp", "InCsumErrors") == csum_errors
        assert received > size // 1500  # at least one wire frame per MSS of data
        if offload:
            assert handed < received // 2, (handed, received)  # super-frames from the kernel
            assert c["tx_good_packets"] > 2 * c["tx_packets"], c  # cut into segments by the NIC
        else:
            assert handed >= size // 1500, (handed, received)
            assert c["tx_good_packets"] == c["tx_packets"], c
    finally:
        if driver.poll() is None:
            stop_driver(driver)


def test_udp_with_checksum_offload(driver: subprocess.Popen[str]) -> None:
    """UDP datagrams leave udrv0 with their checksum left to the NIC (CHECKSUM_PARTIAL through
    the virtio_net_hdr, a checksum context descriptor): all arrive, none with a bad sum."""
    receiver = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('10.9.0.2', 5002))\n"
        "s.settimeout(20); print('ready', flush=True)\n"
        "got = [s.recv(2048) for _ in range(20)]\n"
        "print(sum(g == bytes([i % 251]) * (100 + 50 * i) for i, g in enumerate(got)))\n"
    )
    errors = snmp("peer", "Udp", "InCsumErrors")
    with python_in_namespace("peer", receiver) as server:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for i in range(20):
                s.sendto(bytes([i % 251]) * (100 + 50 * i), ("10.9.0.2", 5002))
                time.sleep(0.02)
        out, _ = server.communicate(timeout=60)
    assert out.strip() == "20"
    assert snmp("peer", "Udp", "InCsumErrors") == errors


def test_a_burst_of_udp_datagrams_is_checksummed_by_the_nic(driver: subprocess.Popen[str]) -> None:
    """Datagrams sent back to back reach the driver in batches (one checksum context, then
    one data descriptor per frame asking for TXSM): every one arrives intact and the peer's
    UDP saw no checksum error."""
    n = 300
    ping("10.9.0.2", count=1)  # the peer's address resolved: no datagram waits for ARP
    receiver = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: hold the burst\n"
        "s.bind(('10.9.0.2', 5003)); s.settimeout(30); print('ready', flush=True)\n"
        f"got = [s.recv(2048) for _ in range({n})]\n"
        "print(sum(g == bytes([i % 251]) * (18 + 5 * i % 1455) for i, g in enumerate(got)))\n"
    )
    server = subprocess.Popen(["ip", "netns", "exec", "peer", sys.executable, "-c", receiver],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    errors = snmp("peer", "Udp", "InCsumErrors")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(n):  # 18..1472-byte payloads: 60- to 1514-byte frames
            s.sendto(bytes([i % 251]) * (18 + 5 * i % 1455), ("10.9.0.2", 5003))
    out, _ = server.communicate(timeout=120)
    assert out.strip() == str(n)
    assert snmp("peer", "Udp", "InCsumErrors") == errors
    c = counters(stop_driver(driver))
    assert c["tx_packets"] >= n and c["tx_good_packets"] == c["tx_packets"], c


def test_oversize_frames_are_dropped_and_counted(driver: subprocess.Popen[str]) -> None:
    # The kernel never hands a TAP less than an Ethernet header, so runts cannot come from
    # this side; a bare 14-byte header is legal and goes out padded to 60 bytes.
    header = b"\xff" * 6 + b"\x52\x54\x00\x12\x34\x04" + b"\x88\xb5"  # local experimental type
    sh("ip link set udrv0 mtu 4000")
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind(("udrv0", 0))
    s.send(header + b"x" * 3000)  # over the NIC's 1514-byte frame limit
    s.send(header + b"y" * 1501)
    s.send(header)
    s.close()
    sh("ip link set udrv0 mtu 1500")
    ping("10.9.0.2")  # the driver survives and still works
    err = stop_driver(driver)
    m = re.search(r"tx_dropped\[oversize\]=(\d+) \(dropped sizes ([\d ]+)\)", err)
    assert m, err
    sizes = [int(x) for x in m[2].split()]
    assert 3014 in sizes and 1515 in sizes and 14 not in sizes, err
    assert int(m[1]) == len(sizes)


def test_killed_driver_restarts_and_traffic_resumes(peer: str) -> None:
    proc = start_driver()
    ping("10.9.0.2")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    deadline = time.monotonic() + 10
    while Path("/sys/class/net/udrv0").exists():  # the TAP goes with its process
        assert time.monotonic() < deadline
        time.sleep(0.1)
    proc = start_driver()
    try:
        ping("10.9.0.2")
    finally:
        stop_driver(proc)


def test_link_down_and_up(driver: subprocess.Popen[str]) -> None:
    """A cable pull from the QEMU monitor: the NIC reports link down (STATUS.LU, an LSC
    interrupt), udrv0 loses its carrier and traffic stops; link up brings both back."""
    from udrv.lab.monitor import command

    carrier = Path("/sys/class/net/udrv0/carrier")

    def wait_carrier(value: str) -> None:
        deadline = time.monotonic() + 15
        while carrier.read_text().strip() != value:
            assert time.monotonic() < deadline, f"udrv0 carrier did not become {value}"
            time.sleep(0.1)

    ping("10.9.0.2")
    assert carrier.read_text().strip() == "1"
    command("set_link udrv4 off")  # the lab names NIC A's netdev after its slot
    try:
        wait_carrier("0")
        r = subprocess.run(["ping", "-c", "2", "-W", "1", "10.9.0.2"], capture_output=True)
        assert r.returncode != 0
    finally:
        command("set_link udrv4 on")
    wait_carrier("1")
    ping("10.9.0.2")
    err = stop_driver(driver)
    assert "udrv0: link down" in err and "udrv0: link up" in err, err


def test_stuck_tx_ring_is_detected_and_reset(peer: str) -> None:
    """Fault injection wedges the TX unit (TCTL.EN cleared behind the ring's back); the
    watchdog notices TDH standing still, says so, resets the TX unit, and traffic resumes.

    With an 8-descriptor ring the wedged ring fills (QEMU otherwise finishes every descriptor
    during the TDT write, so a full ring is seen only here): the loop waits instead of
    dropping, and only the 7 frames inside the ring at the reset are lost, counted."""
    proc = subprocess.Popen([sys.executable, "-m", "udrv", "e1000", "serve", A, "--tap", "udrv0",
                             "--inject-tx-stall", "30", "--tx-ring", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None and "udrv0: 82540EM" in proc.stdout.readline()
    sh("ip addr add 10.9.0.1/24 dev udrv0")
    try:
        # Enough traffic to cross 30 frames; some pings are lost while the unit is wedged.
        subprocess.run(
            ["ping", "-c", "40", "-i", "0.1", "-W", "1", "10.9.0.2"], capture_output=True
        )
        deadline = time.monotonic() + 30
        while subprocess.run(["ping", "-c", "1", "-W", "1", "10.9.0.2"]).returncode != 0:
            assert time.monotonic() < deadline, "traffic did not resume after the TX reset"
        ping("10.9.0.2")
    finally:
        err = stop_driver(proc)
    assert "fault injection: wedging the TX unit" in err, err
    assert "TX ring stuck" in err and "resetting the TX unit" in err, err
    assert "tx_resets=1" in err, err
    assert "tx_dropped[tx_timeout]=7" in err, err
    m = re.search(r"tx_ring_full=(\d+)", err)
    assert m and int(m[1]) > 0, err
    assert "dropped[" not in err.split("tap:")[1].split(";")[0], err  # the loop dropped nothing


PHY_SNIPPET = """
import sys, udrv
from udrv.drivers.e1000.phy import Phy, PHY_CTRL, PHY_CTRL_POWER_DOWN
with udrv.open("{address}") as dev:
    phy = Phy(dev.bar(0), "{address}")
    ctrl = phy.read(PHY_CTRL)
    if sys.argv[1] == "down":
        phy.write(PHY_CTRL, ctrl | PHY_CTRL_POWER_DOWN)
        ctrl = phy.read(PHY_CTRL)
    print(ctrl)
"""


def phy_ctrl(action: str) -> int:
    """PHY register 0 of NIC A read through MDIC (after powering the PHY down if asked)."""
    out = subprocess.run([sys.executable, "-c", PHY_SNIPPET.format(address=A), action],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


def test_the_tap_interface_carries_the_nics_mac(driver: subprocess.Popen[str]) -> None:
    address = Path("/sys/class/net/udrv0/address").read_text().strip()
    assert address == "52:54:00:12:34:04"  # the lab's MAC for the NIC in slot 4
    err = stop_driver(driver)
    # QEMU's e1000 ignores the I/O BAR (IOADDR/IODATA are stubs): the driver tried the reset
    # there first, as an 82540EM needs, saw it had no effect, and reset through BAR0.
    assert "reset through the I/O BAR (IOADDR/IODATA) was ignored" in err, err


def test_a_powered_down_phy_is_powered_up(peer: str) -> None:
    """Linux's e1000 powers the PHY down when it lets an 82540 go: the driver must clear
    PHY_CTRL.POWER_DOWN (bit 11) through MDIC, restart auto-negotiation and get a link."""
    assert phy_ctrl("down") & (1 << 11)
    proc = start_driver()
    try:
        ping("10.9.0.2")
    finally:
        err = stop_driver(proc)
    assert "the PHY was powered down (PHY_CTRL bit 11); powered it up" in err, err
    assert not phy_ctrl("read") & (1 << 11)


def test_full_size_vlan_frames_both_ways(driver: subprocess.Popen[str], peer: str) -> None:
    """1518-byte 802.1Q frames (1522 with the FCS the NIC keeps) go out and come in."""
    sh("ip link add link udrv0 name udrv0.7 type vlan id 7 && ip addr add 10.9.7.1/24 dev udrv0.7 "
       "&& ip link set udrv0.7 up")  # fmt: skip
    sh(f"ip -n peer link add link {peer} name vl7 type vlan id 7 && "
       "ip -n peer addr add 10.9.7.2/24 dev vl7 && ip -n peer link set vl7 up")  # fmt: skip
    try:
        ping("10.9.7.2", size=1472)  # 1472 + 28 + 14 + 4 = 1518 bytes each way
        ping("10.9.7.1", ns="peer", size=1472)
    finally:
        sh("ip link del udrv0.7; ip -n peer link del vl7")
    err = stop_driver(driver)
    assert "rx_dropped" not in err and "tx_dropped" not in err, err
