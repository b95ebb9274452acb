"""Host memory for weights that every decode step streams through.

A token at batch 1 reads every dense weight and every chosen expert once: hundreds of MB spread
over thousands of 4 KB pages, each a TLB miss and a stop for the hardware prefetcher, and where
those pages land in physical memory changes from process to process. Blocks of their own
anonymous mapping, advised for transparent huge pages (MADV_HUGEPAGE: honoured under THP
"always" or "madvise", the usual kernel defaults, ignored under "never"), are read through 2 MB
pages instead. Measured on the GraniteMoE-shaped int4 artifact (1 thread, Zen 5): 17.2-25.3 ms
per token over 16 runs of 4 KB pages, 16.0-16.9 ms (one outlier) with huge pages.
"""
from __future__ import annotations

import mmap

import numpy as np

HUGE_PAGE = 2 << 20
ALIGN = 64  # bytes: where each array starts (the kernels' vector alignment)


def host_arrays(specs: list[tuple[tuple[int, ...], str]]) -> list[np.ndarray]:
    """Zeroed arrays of these (shape, dtype)s, each starting at a multiple of ALIGN bytes, all in
    one anonymous mapping advised for huge pages (its size rounded up to whole huge pages, so the
    last one is not split). Each array keeps the mapping alive."""
    starts, end = [], 0
    for shape, dtype in specs:
        starts.append(-(-end // ALIGN) * ALIGN)
        end = starts[-1] + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    block = mmap.mmap(-1, max(HUGE_PAGE, -(-end // HUGE_PAGE) * HUGE_PAGE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux; elsewhere the block is plain pages
        block.madvise(mmap.MADV_HUGEPAGE)
    return [np.frombuffer(block, dtype, count=int(np.prod(shape, dtype=np.int64)), offset=start).reshape(shape)
            for (shape, dtype), start in zip(specs, starts)]
