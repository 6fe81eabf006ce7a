"""udrv benchmarks: each prints a table of ratios against a reference measured in the same run."""
