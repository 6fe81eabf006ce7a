"""Network benchmark: udrv's e1000 vs the kernel's, and the driver's per-packet cost."""
