"""vfio-user (QEMU docs/interop/vfio-user.rst): VFIO's device interface over a Unix socket.

- :mod:`.protocol`: the message header and payload layouts;
- :mod:`.transport`: framing and file-descriptor passing;
- :mod:`.server`: serves a device model (:mod:`udrv.models`);
- :mod:`.client`: what the ``vfio-user`` backend (:mod:`udrv.backends.vfio_user`) talks through.
"""
