"""Network devices: the :class:`Nic` interface that NIC drivers implement and network
frontends (TAP) serve."""

from udrv.net.nic import Frame, Link, Nic, NicStats, Offload, TxOffload, format_mac

__all__ = ["Frame", "Link", "Nic", "NicStats", "Offload", "TxOffload", "format_mac"]
