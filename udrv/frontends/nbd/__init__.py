"""NBD: a block driver as the kernel's ``/dev/nbdN`` (:class:`NbdDevice`), or as an NBD
server on a socket (:class:`NbdServer`).

Both serve the transmission phase the same way (:mod:`.transmission`): a worker thread per
hardware queue of the driver, requests started on the queue as they are parsed, replies of
a whole pass sent in one ``sendmsg``. A driver without hardware queues is served through
:class:`~udrv.frontends.nbd.driverqueue.DriverQueue`, which calls its ``read``/``write``.
"""

from udrv.frontends.nbd.device import NbdDevice
from udrv.frontends.nbd.server import NbdServer, tls_context
from udrv.frontends.nbd.transmission import MAX_REQUEST, ProtocolError, transmission_flags

__all__ = ["MAX_REQUEST", "NbdDevice", "NbdServer", "ProtocolError", "tls_context",
           "transmission_flags"]  # fmt: skip
