"""What a peer process gives back to the OS: big blocks, as soon as they are freed.

glibc maps each allocation above its mmap threshold (128 KiB) on its own and unmaps it on free, but
by default it raises the threshold to the size of every such block freed (up to 32 MiB): after the
first KV cache or 16 MiB frame is freed, blocks of that size come from the heap, whose freed memory
the process keeps (measured with `bench.attack --smollm2`: a KV-cache hog's 121 MB stayed after its
sessions ended). Fixing the threshold turns the adjustment off.

Whether something fits at all (`check_room`): a local answer (potluck/localfallback.py) loads a whole
model only when the memory the OS can give now holds it, else `NotEnoughMemory` says how much is missing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value


def return_big_blocks() -> bool:
    """Fix glibc's mmap threshold at `MMAP_THRESHOLD` for this process; False where the C library
    is not glibc (nothing to do there)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


class NotEnoughMemory(Exception):
    """This machine cannot hold what a local answer needs (`check_room`): its message says how much."""

    def __init__(self, need: int, available: int):
        super().__init__(f"it needs {need >> 20} MiB and this machine has {available >> 20} MiB available")
        self.need, self.available = need, available


def available_bytes() -> int:
    """Memory the OS can give this process now without swapping (/proc/meminfo's MemAvailable)."""
    from pipeline.server import available_memory

    return available_memory()


def check_room(need: int, available: int | None = None) -> None:
    """Raise NotEnoughMemory unless `need` bytes fit in `available` (default: `available_bytes()`)."""
    have = available_bytes() if available is None else available
    if need > have:
        raise NotEnoughMemory(need, have)
