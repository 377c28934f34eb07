"""Private swarms with real `potluck serve` processes: members join, outsiders are refused fast and learn nothing."""

import subprocess
import time

import pytest

from potluck.localswarm import POTLUCK, wait_until

pytestmark = pytest.mark.slow


def _new_key(path):
    out = subprocess.run([*POTLUCK, "swarm", "new-key", str(path)], capture_output=True, text=True, check=True)
    assert "wrote a new swarm key" in out.stdout
    again = subprocess.run([*POTLUCK, "swarm", "new-key", str(path)], capture_output=True, text=True)
    assert again.returncode == 2 and "exists" in again.stderr  # never overwrites a key


def _outsider(tmp_path, name, bootstrap, *extra):
    """Run a peer that tries to join; return (exit code, stderr, seconds)."""
    start = time.monotonic()
    out = subprocess.run([*POTLUCK, "serve", "--data-dir", str(tmp_path / name), "--bootstrap", bootstrap, *extra],
                         capture_output=True, text=True, timeout=60)
    return out.returncode, out.stderr, time.monotonic() - start


def test_members_join_and_outsiders_are_refused(spawn, tmp_path):
    key, other = tmp_path / "swarm.key", tmp_path / "other.key"
    _new_key(key)
    _new_key(other)
    a = spawn("--swarm-key", str(key))
    b = spawn("--swarm-key", str(key), "--bootstrap", a.addr)
    wait_until(lambda: a.alive_peers() == {b.peer_id} and b.alive_peers() == {a.peer_id}, 20, message="members see each other")

    rc, err, took = _outsider(tmp_path, "nokey", a.addr)
    assert rc == 2 and "swarm" in err and "--swarm-key" in err, err
    assert took < 10  # includes interpreter start-up; the refusal itself is bounded by the 2 s gate

    rc, err, took = _outsider(tmp_path, "wrongkey", a.addr, "--swarm-key", str(other))
    assert rc == 2 and "keys differ" in err, err
    assert took < 10

    # A keyed peer reaching an open swarm is refused too, with the reason.
    open_peer = spawn()
    rc, err, _ = _outsider(tmp_path, "keyed", open_peer.addr, "--swarm-key", str(key))
    assert rc == 2 and "no swarm key" in err, err

    # The members never took the outsiders in.
    for p in (a, b):
        assert p.alive_peers() == ({a.peer_id, b.peer_id} - {p.peer_id})
