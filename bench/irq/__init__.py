"""bench/irq: interrupt response time on QEMU edu (the seed's interrupt-response graph).

``python3 -m bench.irq`` boots one lab guest with an edu device and measures, inside it,
"write INTR_RAISE -> the waiting code runs" for VFIO MSI (blocking wait, epoll, asyncio,
handler thread), VFIO INTx, UIO INTx, and a C program doing the VFIO MSI round trip
(vfio_msi_ref.c, compiled with gcc in the guest). See :mod:`bench.irq.__main__`.
"""
