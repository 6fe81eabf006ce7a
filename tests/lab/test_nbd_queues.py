"""`udrv nvme serve --frontend nbd`: the kernel's NBD device on the NVMe driver's hardware
queues, one connection per queue pair, checked with fio's verify and the interrupts each
queue pair's MSI-X vector takes."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from tests.lab.test_nvme_serve import (  # noqa: F401 - nvme: a fixture
    Server,
    assert_reads_back,
    busy_fio,
    fio,
    nvme,
    sh,
    wait_for_reads,
    write_acknowledged,
)

pytestmark = pytest.mark.lab("nvme:size=32M,serial=udrvtest1", cpus=2)
SIZE = 32 << 20


def vector_counts(address: str) -> dict[int, int]:
    """Interrupts per MSI-X vector of ``address`` so far, summed over CPUs: VFIO names its
    handlers ``vfio-msix[VECTOR](ADDRESS)`` (drivers/vfio/pci/vfio_pci_intrs.c)."""
    counts = {}
    for line in Path("/proc/interrupts").read_text().splitlines():
        m = re.search(rf"vfio-msix\[(\d+)\]\({re.escape(address)}\)", line)
        if m:
            fields = line.split()[1:]
            counts[int(m.group(1))] = sum(int(f) for f in fields if f.isdigit())
    return counts


def test_two_connections_drive_two_queue_pairs_fio_verify(nvme: str) -> None:  # noqa: F811
    srv = Server(nvme, "--frontend", "nbd", "--queues", "2", "--depth", "16")
    try:
        name = os.path.basename(srv.path)
        assert len(os.listdir(f"/sys/block/{name}/mq")) == 2  # a hardware queue per socket
        # Requests no larger than a tag's DMA buffer (AsyncNvme: 128 KiB): all fast path.
        assert int(Path(f"/sys/block/{name}/queue/max_sectors_kb").read_text()) == 128
        before = vector_counts(nvme)
        assert sorted(before) == [0, 1, 2], before  # admin + 2 I/O queue pairs
        # One job per CPU: blk-mq maps CPU N to hardware queue N, so to connection N.
        r = fio(srv.path, "--rw=randwrite --bs=4k --size=8M --iodepth=16 --numjobs=2",
                "--cpus_allowed=0,1 --cpus_allowed_policy=split --offset_increment=12M",
                "--verify=crc32c --verify_fatal=1 --group_reporting")  # fmt: skip
        assert all(j["error"] == 0 for j in r["jobs"])
        assert r["jobs"][0]["write"]["total_ios"] == 2 * 2048
        assert r["jobs"][0]["read"]["total_ios"] == 2 * 2048  # the verify pass
        after = vector_counts(nvme)
        grew = {v: after[v] - before[v] for v in (1, 2)}
        assert all(n >= 100 for n in grew.values()), grew  # both queue pairs carried I/O
        # Large requests, flushes, discard and zeroes: the slow path on the same queues.
        sh(f"dd if=/dev/urandom of=/tmp/big bs=1M count=4 && dd if=/tmp/big of={srv.path} "
           "bs=1M oflag=direct,sync")  # fmt: skip
        sh(f"cmp -n {4 << 20} /tmp/big {srv.path}")
        sh(f"blkdiscard -o 0 -l 1M {srv.path}")
        sh(f"blkdiscard -z -o 1M -l 1M {srv.path}")
        sh(f"cmp -n {1 << 20} -i 0:{1 << 20} /dev/zero {srv.path}")
    finally:
        err = srv.stop()
    assert "Traceback" not in err and "udrv: stopped" in err
    assert int(Path(f"/sys/block/{name}/size").read_text()) == 0  # disconnected


@pytest.mark.slow  # make soak: `make test` stays under 30 minutes
def test_stop_under_load_is_clean_and_keeps_acknowledged_data(nvme: str) -> None:  # noqa: F811
    """SIGINT while fio keeps 32 requests on the NVMe queue: the server answers what the
    device completes, disconnects and exits 0 without a traceback; a new server reads back
    what was acknowledged before."""
    srv = Server(nvme, "--frontend", "nbd", "--depth", "32")
    data = write_acknowledged(srv.path)
    job = busy_fio(srv.path, 32)
    try:
        wait_for_reads(srv.path, job)
    finally:
        srv.proc.send_signal(signal.SIGINT)
        _, err = srv.proc.communicate(timeout=120)
    assert srv.proc.returncode == 0 and "Traceback" not in err, err
    job.communicate(timeout=60)  # the disk went away under it: fio ends, it does not hang
    assert_reads_back(data, nvme, "--frontend", "nbd")
