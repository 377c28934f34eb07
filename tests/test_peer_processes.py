"""Real `potluck serve` processes on 127.0.0.1: joining, seeing each other, noticing deaths, shutting down."""

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from potluck.localswarm import POTLUCK, wait_until

pytestmark = pytest.mark.slow  # many `potluck serve` processes


def test_id_is_stable_and_key_is_private(tmp_path):
    out1 = subprocess.run([*POTLUCK, "id", "--data-dir", str(tmp_path)], capture_output=True, text=True, check=True)
    out2 = subprocess.run([*POTLUCK, "id", "--data-dir", str(tmp_path)], capture_output=True, text=True, check=True)
    peer_id = out1.stdout.strip()
    assert peer_id.startswith("12D3KooW") and peer_id == out2.stdout.strip()
    assert stat.S_IMODE(os.stat(tmp_path / "identity.key").st_mode) == 0o600


def test_console_script_is_installed(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "potluck")
    out = subprocess.run([script, "id", "--data-dir", str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("12D3KooW")


def test_two_peers_find_each_other_and_shut_down_cleanly(spawn):
    a = spawn()
    b = spawn("--bootstrap", a.addr)
    assert a.addr.endswith(f"/p2p/{a.peer_id}")
    wait_until(lambda: a.alive_peers() == {b.peer_id} and b.alive_peers() == {a.peer_id}, 20, message="a and b see each other")
    rtts = [p["rtt_ms"] for p in b.status()["peers"]]
    assert rtts and all(r is not None and r > 0 for r in rtts)
    for proc in (b, a):
        assert proc.stop(signal.SIGINT) < 3.0
        assert proc.proc.returncode == 0


def test_five_peers_all_see_each_other_and_notice_a_kill(spawn):
    first = spawn()
    # Each later peer knows only the previous one: peer exchange must spread the rest.
    peers = [first]
    for _ in range(4):
        peers.append(spawn("--bootstrap", peers[-1].addr))
    ids = {p.peer_id for p in peers}
    for p in peers:
        wait_until(lambda p=p: p.alive_peers() == ids - {p.peer_id}, 30, message=f"{p.peer_id} sees all others")
    victim = peers[2]
    victim.kill()
    start = time.monotonic()
    for p in peers:
        if p is not victim:
            wait_until(lambda p=p: victim.peer_id not in p.alive_peers(), 15, 0.25, message="the killed peer is noticed")
    noticed = time.monotonic() - start
    assert noticed < 15
    # Every peer also got every other peer's signed presence note through gossip.
    for p in peers:
        if p is not victim:
            assert ids <= set(p.status()["presence_seen"])


def test_dead_peer_is_reconnected_when_it_returns(spawn):
    a = spawn()
    b = spawn("--bootstrap", a.addr)
    wait_until(lambda: b.peer_id in a.alive_peers(), 20, message="a sees b")
    b_dir, b_addr = b.data_dir, b.addr
    b.kill()
    wait_until(lambda: b.peer_id not in a.alive_peers(), 15, 0.25, message="a notices b is dead")
    # Same identity, same address: a must find it again by itself.
    port_listen = b_addr.split("/p2p/")[0]
    b2 = spawn("--listen", port_listen, data_dir=b_dir)
    assert b2.peer_id == b.peer_id
    wait_until(lambda: b.peer_id in a.alive_peers(), 40, message="a reconnects to b")


def test_status_without_a_running_peer_says_what_to_do(tmp_path):
    out = subprocess.run([*POTLUCK, "status", "--data-dir", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 1
    assert "no potluck peer is running" in out.stderr and "potluck serve" in out.stderr


def test_status_table_is_readable(spawn):
    a = spawn()
    b = spawn("--bootstrap", a.addr, "--region", "eu-west")
    # An inbound hello marks b alive before a's first ping has measured its RTT.
    wait_until(lambda: [p["rtt_ms"] is not None for p in a.status()["peers"] if p["alive"]] == [True], 20,
               message="a sees b and has measured its RTT")
    out = subprocess.run([*POTLUCK, "status", "--data-dir", str(a.data_dir)], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "80"}, check=True)
    assert "known peers (1 alive of 1)" in out.stdout
    assert "…" + b.peer_id[-8:] in out.stdout and "eu-west" in out.stdout and "ms" in out.stdout
    assert all(len(line) <= 80 for line in out.stdout.splitlines()), out.stdout
    wide = subprocess.run([*POTLUCK, "status", "--wide", "--data-dir", str(a.data_dir)], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "250"}, check=True)
    assert b.peer_id in wide.stdout


def test_credit_chains_replicate_between_processes(spawn):
    # A private swarm's policy: each peer grants itself 1,000 credits, so each has a chain from the start
    # (an open swarm's identities start with none).
    a = spawn("--starting-grant", "1000")
    b = spawn("--bootstrap", a.addr, "--starting-grant", "1000")

    def credits(p):
        out = subprocess.run([*POTLUCK, "credits", "--json", "--data-dir", str(p.data_dir)],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    # Each peer starts its chain with its grant; each ends up holding and verifying the other's.
    def both_known(p):
        return {q["peer_id"] for q in credits(p)["peers"]} == {a.peer_id, b.peer_id}

    wait_until(lambda: both_known(a) and both_known(b), 30, message="both chains replicated")
    ca, cb = credits(a), credits(b)
    assert ca["chain_length"] == 1 and ca["granted"] > 0 and ca["balance"] == ca["granted"]
    assert ca["total"] == cb["total"] == ca["granted"] + cb["granted"]
    table = subprocess.run([*POTLUCK, "credits", "--data-dir", str(a.data_dir)], capture_output=True, text=True,
                           env={**os.environ, "COLUMNS": "80"}, check=True).stdout
    assert "GFLOP-credits" in table and "…" + b.peer_id[-8:] in table
    assert all(len(line) <= 80 for line in table.splitlines()), table
    wide = subprocess.run([*POTLUCK, "credits", "--wide", "--data-dir", str(a.data_dir)], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "250"}, check=True).stdout
    assert b.peer_id in wide


def test_a_failed_command_is_an_error_reply_and_the_peer_keeps_serving(spawn, smollm2_data):
    """A generation with no server to route through fails for that caller only: the peer answers with
    the reason and goes on serving (an error escaping a command must not end a user's peer)."""
    import trio

    from potluck import control

    peer = spawn("--model", str(smollm2_data[1]), "--threads", "1")

    async def generate():
        with trio.fail_after(60):
            return await control.call(peer.data_dir, "generate", prompt="Hi", max_tokens=2)

    try:
        trio.run(generate)
        raise AssertionError("a generation with no servers succeeded")
    except RuntimeError as e:
        assert "no server" in str(e) or "route" in str(e), e
    assert peer.proc.poll() is None, peer.log_tail()
    assert peer.status()["peer_id"] == peer.peer_id
