"""Block drivers: the interface the ublk and NBD frontends serve, and simple drivers."""

from udrv.block.driver import BlockDriver, BlockGeometry

__all__ = ["BlockDriver", "BlockGeometry"]
