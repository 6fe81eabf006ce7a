"""Host-tier fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from udrv.dma import hugepage


@pytest.fixture(autouse=True)
def _private_dma_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """UIO DMA buffers and their locks (udrv.dma.hugepage.DmaFiles) go to a directory of the
    test's, never to the machine's /run/udrv, and nothing is mounted."""
    base = tmp_path_factory.mktemp("dmafiles")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hugepage, "HUGETLBFS", base / "hugepages")
        mp.setattr(hugepage, "LOCK_DIR", base / "locks")
        mp.setattr(hugepage, "mount_hugetlbfs", lambda path: None)
        yield
