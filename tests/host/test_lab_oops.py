"""Finding the kernel's report in a dead guest's console log (udrv.lab.oops)."""

from __future__ import annotations

from pathlib import Path

from udrv.lab.oops import MAX_LINES, find_oops

#: The console of a lab guest whose command ran `echo c > /proc/sysrq-trigger` (captured, CRLF).
SYSRQ_PANIC = (Path(__file__).parent / "data" / "console-sysrq-panic.txt").read_text()

#: An oops in the x86 format of arch/x86/mm/fault.c and dumpstack.c (6.12), then the panic it
#: causes, between ordinary boot lines.
NULL_DEREF = """\
[    2.100000] virtio_net virtio0: ready
[    5.000001] BUG: kernel NULL pointer dereference, address: 0000000000000008
[    5.000002] #PF: supervisor read access in kernel mode
[    5.000003] #PF: error_code(0x0000) - not-present page
[    5.000004] Oops: Oops: 0000 [#1] PREEMPT SMP NOPTI
[    5.000005] CPU: 0 UID: 0 PID: 90 Comm: python3 Not tainted 6.12.117+deb12-amd64 #1
[    5.000006] RIP: 0010:tun_get_user+0x1a/0x900 [tun]
[    5.000007] Call Trace:
[    5.000008]  <TASK>
[    5.000009]  tun_chr_write_iter+0x52/0xa0 [tun]
[    5.000010]  vfs_write+0x2a1/0x450
[    5.000011]  ksys_write+0x6f/0xf0
[    5.000012]  </TASK>
[    5.000013] Modules linked in: tun vfio_pci
[    5.000014] CR2: 0000000000000008
[    5.000015] ---[ end trace 0000000000000000 ]---
[    5.000016] RIP: 0010:tun_get_user+0x1a/0x900 [tun]
[    5.000017] Kernel panic - not syncing: Fatal exception in interrupt
[    5.000018] Kernel Offset: 0x28c00000 from 0xffffffff81000000
"""


def test_a_panic_is_found_from_its_first_line_with_its_call_trace() -> None:
    oops = find_oops(SYSRQ_PANIC)
    assert oops is not None
    assert oops.title == "Kernel panic - not syncing: sysrq triggered crash"
    assert oops.first_line == 2  # line 1 is "sysrq: Trigger a crash"
    lines = oops.text.splitlines()
    assert lines[0].endswith("Kernel panic - not syncing: sysrq triggered crash")
    assert "\r" not in oops.text
    # The whole trace, not the last 25 lines: the frames that name the culprit are in it.
    assert any(line.endswith(" sysrq_handle_crash+0x1a/0x20") for line in lines)
    assert lines[-1].endswith("(relocation range: 0xffffffff80000000-0xffffffffbfffffff)")
    assert len(lines) == 44
    assert oops.later == ()


def test_an_oops_ends_at_its_end_line_and_the_panic_after_it_is_named() -> None:
    oops = find_oops(NULL_DEREF)
    assert oops is not None
    assert oops.title == "BUG: kernel NULL pointer dereference, address: 0000000000000008"
    assert oops.first_line == 2
    lines = oops.text.splitlines()
    assert lines[0].endswith("BUG: kernel NULL pointer dereference, address: 0000000000000008")
    assert lines[-1].endswith("---[ end trace 0000000000000000 ]---")
    assert "tun_chr_write_iter+0x52/0xa0 [tun]" in oops.text
    assert oops.later == ("Kernel panic - not syncing: Fatal exception in interrupt",)
    text = oops.describe()
    assert text.startswith("--- kernel report from console.log line 2 ---\n[    5.000001] BUG:")
    assert text.endswith(
        "1 more kernel report(s) follow in console.log:\n"
        "  Kernel panic - not syncing: Fatal exception in interrupt"
    )


def test_a_warning_starts_at_cut_here_and_stops_before_the_next_report() -> None:
    console = (
        "[    1.0] ------------[ cut here ]------------\n"
        "[    1.1] WARNING: CPU: 0 PID: 1 at drivers/vfio/vfio_main.c:123 vfio_x+0x1/0x2\n"
        "[    1.2] Call Trace:\n"
        "[    1.3]  vfio_x+0x1/0x2\n"
        "[    2.0] ------------[ cut here ]------------\n"
        "[    2.1] kernel BUG at mm/slub.c:456!\n"
        "[    2.2] Oops: invalid opcode: 0000 [#1] PREEMPT SMP NOPTI\n"
    )
    oops = find_oops(console)
    assert oops is not None
    assert oops.first_line == 1
    assert oops.title.startswith("WARNING: CPU: 0 PID: 1 at drivers/vfio/vfio_main.c:123")
    assert [line[10:] for line in oops.text.splitlines()] == [
        "------------[ cut here ]------------",
        "WARNING: CPU: 0 PID: 1 at drivers/vfio/vfio_main.c:123 vfio_x+0x1/0x2",
        "Call Trace:",
        " vfio_x+0x1/0x2",
    ]
    assert oops.later == (
        "kernel BUG at mm/slub.c:456!",
        "Oops: invalid opcode: 0000 [#1] PREEMPT SMP NOPTI",
    )


def test_general_protection_faults_count_and_long_reports_are_cut() -> None:
    trace = "".join(f"[    3.{i:06d}]  frame_{i}+0x1/0x2\n" for i in range(500))
    oops = find_oops(
        "[    3.0] general protection fault, probably for non-canonical address\n" + trace
    )
    assert oops is not None and oops.title.startswith("general protection fault")
    assert len(oops.text.splitlines()) == MAX_LINES


def test_a_clean_log_has_no_report() -> None:
    boot = "[    0.0] Linux version 6.12\n[    1.0] BUGS are not reported here\nWARNING no colon\n"
    assert find_oops(boot) is None
    assert find_oops("") is None


#: What `slub_debug=FZPU` prints when a freed kmalloc object was written to (mm/slub.c
#: slab_bug, check_bytes_and_report, print_trailer, slab_fix; 6.12 format), mid-log.
SLUB_POISON = (
    "[   40.000000] udrv0: link up\n"
    f"[   40.100000] {'=' * 77}\n"
    "[   40.100001] BUG kmalloc-2k (Not tainted): Poison overwritten\n"
    f"[   40.100002] {'-' * 77}\n"
    "[   40.100003] \n"
    "[   40.100004] 0xffff888004a20400-0xffff888004a205bf @offset=1024. First byte 0x45 instead "
    "of 0x6b\n"
    "[   40.100005] Allocated in __alloc_skb+0x8e/0x1d0 age=12 cpu=0 pid=301\n"
    "[   40.100006]  __kmalloc_node_track_caller_noprof+0x1a3/0x440\n"
    "[   40.100007]  kmalloc_reserve+0x66/0xf0\n"
    "[   40.100008] Freed in skb_release_data+0x13d/0x190 age=5 cpu=0 pid=0\n"
    "[   40.100009]  kfree+0x1ed/0x3a0\n"
    + "".join(f"[   40.1001{i:02d}] Object   ffff888004a2{i:04x}: 6b 6b 6b 6b\n" for i in range(90))
    + "[   40.100200] CPU: 0 UID: 0 PID: 301 Comm: iperf3 Tainted: G    B   6.12.117+deb12\n"
    "[   40.100201] Call Trace:\n"
    "[   40.100202]  check_bytes_and_report+0x7d/0x130\n"
    "[   40.100203] FIX kmalloc-2k: Restoring Poison 0xffff888004a20400-0xffff888004a205bf=0x6b\n"
    "[   40.100204] FIX kmalloc-2k: Marking all objects used\n"
    "[   41.000000] udrv0: link down\n"
)


def test_a_slub_poison_report_is_found_with_the_bytes_and_both_call_traces() -> None:
    oops = find_oops(SLUB_POISON)
    assert oops is not None
    assert oops.title == "BUG kmalloc-2k (Not tainted): Poison overwritten"
    lines = oops.text.splitlines()
    assert lines[0].endswith("=" * 77) and oops.first_line == 2
    assert "First byte 0x45 instead of 0x6b" in oops.text
    assert "Allocated in __alloc_skb" in oops.text and "Freed in skb_release_data" in oops.text
    # The object dump does not push the call trace and the FIX line out of the excerpt.
    assert "check_bytes_and_report" in oops.text
    assert lines[-1].endswith(
        "FIX kmalloc-2k: Restoring Poison 0xffff888004a20400-0xffff888004a205bf=0x6b"
    )
    assert "link down" not in oops.text


def test_page_poison_corruption_is_a_report() -> None:
    log = (
        "[    9.0] ok\n[   10.0] pagealloc: memory corruption\n"
        "[   10.1] 00000000: 45 00 05 dc 6b 6b\n[   10.2] CPU: 0 PID: 7 Comm: ksoftirqd/0\n"
    )
    oops = find_oops(log)
    assert oops is not None and oops.title == "pagealloc: memory corruption"
    assert oops.first_line == 2 and "45 00 05 dc" in oops.text
