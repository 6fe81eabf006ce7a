"""Move frames between an e1000 and a TAP interface, in batches, until told to stop."""

from __future__ import annotations

import logging
import select
import threading
import time

from udrv.drivers.e1000 import regs as R
from udrv.drivers.e1000.driver import E1000
from udrv.frontends.tap import Tap

log = logging.getLogger(__name__)
STUCK_AFTER = 2.0  # seconds a TX descriptor may stay unfinished with the link up


def bridge(nic: E1000, tap: Tap, stop: threading.Event, *, rx_batch: int = 256, tx_batch: int = 64,
           stall_tx_after: int | None = None) -> None:  # fmt: skip
    """The driver's main loop: interrupts (or a short poll) wake it; RX and TX in batches.

    ``stall_tx_after`` is fault injection: after that many frames, TCTL.EN is cleared behind
    the ring's back (SDM 13.4.33), the way a hung transmit unit looks to the driver: TDH stops
    while descriptors wait. The watchdog below must notice and reset the TX unit.
    """
    sent_frames = 0
    link = nic.link_up
    tap.set_carrier(link)
    pending: list[bytes] = []
    tx_waiting_since: float | None = None
    fds = [tap.fd] + ([nic.irq.fileno()] if nic.irq is not None else [])
    while not stop.is_set():
        ready, _, _ = select.select(fds, [], [], 0.05)
        if nic.irq is not None and nic.irq.fileno() in ready:
            nic.irq.poll()  # consume the eventfd count
            nic.ack_interrupts()
        now_link = nic.link_up
        if now_link != link:
            link = now_link
            tap.set_carrier(link)
            log.info("%s: link %s", tap.name, "up" if link else "down")
        frames = nic.receive(rx_batch)
        if frames:
            tap.write_batch(frames)
        if not pending:
            pending = tap.read_batch(tx_batch)
        if pending:
            sent = nic.transmit(pending)
            sent_frames += sent
            if stall_tx_after is not None and sent_frames >= stall_tx_after:
                log.warning("%s: fault injection: wedging the TX unit after %d frames", tap.name,
                            sent_frames)  # fmt: skip
                nic.bar.write32(R.TCTL, 0)
                stall_tx_after = None
            pending = pending[sent:] if sent or not link else []
            if not link:
                pending = []  # no carrier: the kernel should not have sent; drop
        # A TX unit that stops consuming descriptors while the link is up is stuck.
        if nic.tx_pending():
            tx_waiting_since = tx_waiting_since or time.monotonic()
            if link and time.monotonic() - tx_waiting_since > STUCK_AFTER:
                log.warning("%s: TX ring stuck for %.1f s (TDH not advancing); resetting the TX unit",
                            tap.name, STUCK_AFTER)  # fmt: skip
                nic.reset_tx()
                tx_waiting_since = None
        else:
            tx_waiting_since = None
