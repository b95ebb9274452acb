"""Host memory for weights that every decode step streams through.

A token at batch 1 reads every dense weight and every chosen expert once: hundreds of MB spread
over thousands of 4 KB pages, each a TLB miss and a stop for the hardware prefetcher, and where
those pages land in physical memory changes from process to process. Blocks of their own
anonymous mapping, advised for transparent huge pages (MADV_HUGEPAGE: honoured under THP
"always" or "madvise", the usual kernel defaults, ignored under "never"), are read through 2 MB
pages instead. Measured on the GraniteMoE-shaped int4 artifact (1 thread, Zen 5): 17.2-25.3 ms
per token over 16 runs of 4 KB pages, 16.0-16.9 ms (one outlier) with huge pages.

Advice alone is not enough on a machine whose free memory is fragmented (the page cache of a
few GB of model files leaves no free 2 MB block): faults then take 4 KB pages, and the same
artifact ran at 41.7 instead of ~58 tok/s. Once a block is filled, `settle` asks the kernel to
collapse it into huge pages now (MADV_COLLAPSE, Linux 6.1+: compaction and copying, ~1 s for
256 MB when nothing was huge, nothing when everything already is).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import mmap

import numpy as np

HUGE_PAGE = 2 << 20
MADV_COLLAPSE = 25  # <linux/mman.h>; Python 3.11's mmap module does not name it
ALIGN = 64  # bytes: where each array starts (the kernels' vector alignment)


def host_arrays(specs: list[tuple[tuple[int, ...], str]]) -> tuple[mmap.mmap, list[np.ndarray]]:
    """(the mapping, zeroed arrays of these (shape, dtype)s in it), each array starting at a
    multiple of ALIGN bytes, the mapping advised for huge pages: the arrays start on a huge-page
    boundary (the mapping is one huge page longer, for the alignment; the part never written is
    never backed), and their last partial huge page is small pages. Each array keeps the mapping
    alive."""
    starts, end = [], 0
    for shape, dtype in specs:
        starts.append(-(-end // ALIGN) * ALIGN)
        end = starts[-1] + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    block = mmap.mmap(-1, max(1, -(-end // HUGE_PAGE)) * HUGE_PAGE + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    first = -np.frombuffer(block, np.uint8, count=1).ctypes.data % HUGE_PAGE
    if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux; elsewhere the block is plain pages
        # Huge pages for the whole ones the arrays fill; their last, partial one takes small
        # pages: a huge page there backs up to 2 MB never used (11.6 MB of fp32 GraniteMoE's peak RSS).
        whole = first + end // HUGE_PAGE * HUGE_PAGE
        if whole > first:
            block.madvise(mmap.MADV_HUGEPAGE, first, whole - first)
        block.madvise(mmap.MADV_NOHUGEPAGE, whole, len(block) - whole)
    return block, [np.frombuffer(block, dtype, count=int(np.prod(shape, dtype=np.int64)), offset=first + start).reshape(shape)
                   for (shape, dtype), start in zip(specs, starts)]


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised C-contiguous array starting at a multiple of ALIGN bytes (what a tensor
    wrapped from DLPack must be, without a copy by TVM)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def aligned_copy(array) -> np.ndarray:
    """A copy of `array` in an aligned_empty array."""
    array = np.asarray(array)
    out = aligned_empty(array.shape, array.dtype)
    out[...] = array
    return out


def settle(blocks: list[mmap.mmap]) -> None:
    """Collapse these filled mappings (from host_arrays) into huge pages, best effort: kernels
    before 6.1, THP "never", or pages never written leave them as they are."""
    for block in blocks:
        try:
            block.madvise(MADV_COLLAPSE)
        except (OSError, AttributeError):  # not collapsible here; the advice of host_arrays stands
            pass


def _malloc_trim():
    """glibc's malloc_trim, or None (other C libraries, other systems)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Hand the memory malloc holds free back to the system (glibc; elsewhere nothing). An expert
    load frees ~1 MB buffers (an evicted expert's file buffer, weight_files.py) that glibc keeps in its
    heap: at a 25% budget of the int4 GraniteMoE (~220 loads per token) peak RSS was 430-442 MB,
    400-404 MB with a trim every 16 loads."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
