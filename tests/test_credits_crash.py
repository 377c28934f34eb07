"""SIGKILL a process in the middle of durable appends, again and again: no acknowledged entry is lost,
and the chain on disk always verifies."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from credits import CreditPolicy, Ledger, Store, linear_pricing
from p2p.identity import Identity

pytestmark = pytest.mark.slow  # eight child processes, each SIGKILLed

CHILD = r"""
import sys, msgpack
from credits import CreditPolicy, Ledger, Store, linear_pricing
from p2p.identity import Identity
data = sys.argv[1]
# a private swarm's policy: an open swarm (starting grant 0) would refuse the first entry
led = Ledger(Identity.load_or_create(data), Store(data), pricing=linear_pricing({}),
             policy=CreditPolicy(starting_grant=1000))
other = b"\x05" * 32
if led.heads.get(led.me, (0,))[0] == 0:
    led.append_sync("grant", msgpack.packb([led.me, 1000, "start"]))
    print(1, flush=True)
while True:
    e = led.append_sync("dispute", msgpack.packb([other, "seq %d" % (led.heads[led.me][0] + 1), b"x" * 200]))
    print(e.seq, flush=True)  # only after the commit returned: acknowledged
"""


def test_sigkill_during_appends_loses_no_acknowledged_entry(tmp_path):
    rng = random.Random(7)
    acked: set[int] = set()
    started = time.perf_counter()
    for round_ in range(8):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        first = proc.stdout.readline()  # wait until it is appending
        assert first.strip().isdigit(), proc.stderr.read()
        acked.add(int(first))
        time.sleep(rng.uniform(0.02, 0.25))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        lines = out.split("\n")
        # The last line may be cut mid-write by the kill; every complete line is an acknowledged seq.
        acked.update(int(x) for x in lines[:-1] if x.strip())
        assert proc.returncode == -signal.SIGKILL

    led = Ledger(Identity.load_or_create(tmp_path), Store(tmp_path), pricing=linear_pricing({}),
                 policy=CreditPolicy(starting_grant=1000))
    length = led.verify_chain(led.me)
    assert length >= max(acked) > 8
    stored = {e.seq for e in led.store.entries(led.me)}
    assert acked <= stored, f"lost acknowledged entries: {sorted(acked - stored)[:10]}"
    assert stored == set(range(1, length + 1))
    assert time.perf_counter() - started < 60
