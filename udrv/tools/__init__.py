"""Programs built from udrv's parts: the demo, latency measurement."""
