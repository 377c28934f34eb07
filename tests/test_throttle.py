"""tests/testkit/throttle.py: a process started with `wrap` runs inside the throttled cgroup from its start,
and the cgroup is removed after — even when a process in it outlived its test (moved to the parent)."""

from __future__ import annotations

import subprocess

from potluck.localswarm import wait_until
from testkit.throttle import cpu_throttled


def test_a_wrapped_process_runs_in_the_group_and_the_group_is_removed_even_if_it_outlives_it():
    procs: list[subprocess.Popen] = []
    try:
        with cpu_throttled(0.5) as group:
            proc = subprocess.Popen(group.wrap(["sleep", "30"]))
            procs.append(proc)
            # the shell joins, then execs the command: one process in the group, the one we started
            members = wait_until(lambda: (group.path / "cgroup.procs").read_text().split(), 10, 0.05,
                                 message="the process to join the group")
            assert members == [str(proc.pid)]
        assert not group.path.exists()
        assert proc.poll() is None  # moved out alive, not killed: it was not the helper's to end
        with open(f"/proc/{proc.pid}/cgroup") as cgroups:
            assert group.path.name not in cgroups.read()
    finally:
        for p in procs:
            p.kill()
            p.wait()
