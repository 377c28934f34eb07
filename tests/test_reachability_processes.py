"""Reachability detection between real `potluck serve` processes on loopback: a peer others can dial
is public; a peer whose listening address is not where its connections come from (like a host behind
NAT: it listens on 127.0.0.2, its connections leave from 127.0.0.1) is private. `potluck status` says so."""

from __future__ import annotations

import subprocess
import time

import pytest
import trio

from potluck.localswarm import POTLUCK

pytestmark = pytest.mark.slow


async def verdict(peer) -> dict:
    with trio.fail_after(60):
        while True:
            reachability = (await trio.to_thread.run_sync(peer.status))["reachability"]
            if reachability["status"] != "unknown":
                return reachability
            await trio.sleep(0.3)


async def test_a_dialable_peer_is_public_and_a_hidden_one_private(spawn):
    public = spawn()
    launched = time.time()
    hidden = spawn("--listen", "/ip4/127.0.0.2/tcp/0", "--bootstrap", public.addr)
    listening = time.time()  # `spawn` returns once the peer printed its address
    assert hidden.addr.startswith("/ip4/127.0.0.2/")

    seen_public, seen_hidden = await verdict(public), await verdict(hidden)
    for name, seen in (("public", seen_public), ("hidden", seen_hidden)):
        print(f"{name} peer: {seen['status']}, known {seen['checked_at'] - launched:.2f} s after the hidden "
              f"peer's process was launched ({seen['checked_at'] - listening:+.2f} s from its 'listening on')")
    assert seen_public["status"] == "public"
    assert seen_public["reachable_addrs"] == [public.addr.rsplit("/p2p/", 1)[0]]
    assert seen_hidden["status"] == "private" and seen_hidden["reachable_addrs"] == []

    def shown(peer) -> str:
        out = subprocess.run([*POTLUCK, "status", "--data-dir", str(peer.data_dir)], capture_output=True,
                             text=True, timeout=30, env=peer.env)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "dialable (public)" in await trio.to_thread.run_sync(shown, public)
    assert "not dialable (behind NAT)" in await trio.to_thread.run_sync(shown, hidden)
