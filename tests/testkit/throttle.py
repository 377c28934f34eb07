"""A CPU-throttled cgroup: a slow server on the same machine as a fast one, for real.

`cpu_throttled(fraction)` makes a fresh cgroup capped at `fraction` of one core — cgroup v1's cpu
controller (`cpu.cfs_quota_us` over `cpu.cfs_period_us`) where it is mounted at /sys/fs/cgroup/cpu,
else cgroup v2's `cpu.max` where /sys/fs/cgroup is a cgroup2 mount with the cpu controller — and
removes it after. A process is started inside it with `CpuCgroup.wrap(command)`: a shell joins the
group and then execs the command, so the process runs throttled from its first instruction (its
start-up throughput measurement included). Where neither hierarchy is writable (not root, a
read-only /sys) the test is skipped saying why."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

V1_ROOT = Path("/sys/fs/cgroup/cpu")
V2_ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 100_000
# `sh -c SCRIPT GROUP COMMAND...`: $0 is the group's folder, "$@" the command
JOIN_THEN_EXEC = 'echo $$ > "$0/cgroup.procs" && exec "$@"'


@dataclass(frozen=True)
class CpuCgroup:
    path: Path
    version: int  # 1 or 2

    def wrap(self, command: list[str]) -> list[str]:
        """`command`, started inside this group."""
        return ["sh", "-c", JOIN_THEN_EXEC, str(self.path), *command]

    def throttled_periods(self) -> int:
        """Scheduler periods in which the group used up its quota and waited (`nr_throttled`)."""
        stat = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
        return int(stat["nr_throttled"])


def _is_cgroup2_mount(path: Path) -> bool:
    with open("/proc/mounts") as mounts:
        return any(fields[1] == str(path) and fields[2] == "cgroup2"
                   for fields in (line.split() for line in mounts) if len(fields) > 2)


def _make_v1(name: str, quota_us: int) -> CpuCgroup:
    path = V1_ROOT / name
    path.mkdir()
    try:
        (path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (path / "cpu.cfs_quota_us").write_text(str(quota_us))
    except OSError:
        path.rmdir()
        raise
    return CpuCgroup(path, 1)


def _make_v2(name: str, quota_us: int) -> CpuCgroup:
    if "cpu" not in (V2_ROOT / "cgroup.subtree_control").read_text().split():
        (V2_ROOT / "cgroup.subtree_control").write_text("+cpu")
    path = V2_ROOT / name
    path.mkdir()
    try:
        (path / "cpu.max").write_text(f"{quota_us} {PERIOD_US}")
    except OSError:
        path.rmdir()
        raise
    return CpuCgroup(path, 2)


def _remove(group: CpuCgroup, timeout: float = 10.0) -> None:
    """Move what is still in the group (a process its test did not close) to the parent, then remove it."""
    parent = group.path.parent / "cgroup.procs"
    deadline = time.monotonic() + timeout
    while True:
        left = (group.path / "cgroup.procs").read_text().split()
        for pid in left:
            try:
                parent.write_text(pid)
            except ProcessLookupError:
                pass  # it exited meanwhile
        try:
            group.path.rmdir()
            return
        except OSError:  # busy: a process exiting, or one forked since we read the list
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@contextmanager
def cpu_throttled(fraction: float) -> Iterator[CpuCgroup]:
    """A fresh cgroup whose processes together get at most `fraction` of one core; removed after."""
    assert 0.01 <= fraction <= 1.0, fraction
    quota_us = round(fraction * PERIOD_US)
    name = f"potluck-test-{os.getpid()}-{time.monotonic_ns()}"
    reasons = []
    group = None
    if (V1_ROOT / "cpu.cfs_quota_us").exists():
        try:
            group = _make_v1(name, quota_us)
        except OSError as e:
            reasons.append(f"cgroup v1 at {V1_ROOT}: {e}")
    else:
        reasons.append(f"no cgroup v1 cpu controller at {V1_ROOT}")
    if group is None:
        if _is_cgroup2_mount(V2_ROOT):
            try:
                group = _make_v2(name, quota_us)
            except OSError as e:
                reasons.append(f"cgroup v2 at {V2_ROOT}: {e}")
        else:
            reasons.append(f"{V2_ROOT} is not a cgroup2 mount")
    if group is None:
        pytest.skip("no writable cgroup cpu controller to throttle a process with (" + "; ".join(reasons) + ")")
    try:
        yield group
    finally:
        _remove(group)
