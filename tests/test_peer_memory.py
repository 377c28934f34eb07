"""A peer process gives big freed blocks back to the OS (potluck/memory.py): what a KV-cache hog or a
16 MiB frame took does not stay in the peer's RSS after it is freed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A 16 MiB block freed (glibc then raises its mmap threshold to 16 MiB unless it is fixed), then
# 160 blocks of 1 MiB with a small block pinned after each (so the freed ones cannot merge into the
# top of the heap and be trimmed), freed: how much of their 160 MiB the process still holds.
RETAINED = """
import sys
from potluck import memory
if sys.argv[1] == "fixed":
    assert memory.return_big_blocks()
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) * 1024
def block(size):
    b = bytearray(size)
    b[::4096] = b"x" * len(range(0, size, 4096))  # every page touched: resident
    return b
first = block(16 << 20)
del first
before = rss()
blocks, pins = [], []
for _ in range(160):
    blocks.append(block(1 << 20))
    pins.append(block(64 << 10))
assert rss() - before > 160 << 20
del blocks
print((rss() - before) >> 20)
"""


def retained_mib(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", RETAINED, mode], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_big_freed_blocks_go_back_to_the_os():
    assert retained_mib("fixed") < 32  # the pins (10 MiB) and noise; not the 160 MiB freed
