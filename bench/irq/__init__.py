"""bench/irq: interrupt response time on QEMU edu (the seed's interrupt-response graph).

``python3 -m bench.irq`` boots one lab guest with three edu devices and measures, inside it,
"write INTR_RAISE -> the waiting code runs" for a kernel module's MSI handler
(kmod/edu_irq_ref.c, built on the host against the lab kernel's headers), a C program doing
the VFIO MSI round trip (vfio_msi_ref.c) and udrv's Python wait styles (blocking wait, epoll,
asyncio, handler thread), interleaved round by round. See :mod:`bench.irq.__main__`.
"""
