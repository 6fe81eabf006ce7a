"""Block benchmark: kernel nvme / null_blk vs udrv NVMe and RAM drivers over ublk and NBD."""
