"""A real go-libp2p node (go-libp2p-daemon `p2pd`, from the PyPI wheel hivemind==1.1.12) dials real
`potluck serve` processes: it pings and identifies a peer of an open swarm, and gets neither from a
peer of a private swarm. Skips, saying why, where the wheel or p2pclient cannot be fetched."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import trio
from multiaddr import Multiaddr

from p2p.framing import ExactReader
from p2p.libp2p.identify import IDENTIFY, IDENTIFY_PUSH, PING, decode, read_messages
from p2p.libp2p.network import LIBP2P_PROTOCOL
from p2p.swarm_key import new_key_file
from testkit import golibp2p

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def go_node():
    """(p2pd binary, PYTHONPATH folder of p2pclient), cached in ~/.cache/potluck/golibp2p."""
    cache = Path(os.environ.get("POTLUCK_TEST_CACHE", Path.home() / ".cache" / "potluck")) / "golibp2p"
    try:
        return golibp2p.fetch(cache)
    except golibp2p.Unavailable as e:
        pytest.skip(f"no go-libp2p node to test against: {e}")


async def run_go_node(go_node, peer_addr: str) -> dict:
    p2pd, client = go_node
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(client), str(TESTS)])}
    with trio.fail_after(90):
        out = await trio.run_process([sys.executable, "-m", "testkit.golibp2p", str(p2pd), peer_addr],
                                     capture_stdout=True, capture_stderr=True, env=env, check=False)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    return json.loads(out.stdout)


async def decode_answer(hex_answer: str, peer_id: str):
    left = [bytes.fromhex(hex_answer)]

    async def read_some(n: int) -> bytes:
        chunk, left[0] = left[0][:n], left[0][n:]
        return chunk

    return decode(await read_messages(ExactReader(read_some)), peer_id)


def transport(addr: str) -> str:
    return addr.rsplit("/p2p/", 1)[0]


@pytest.mark.slow
async def test_go_libp2p_pings_and_identifies_an_open_swarm_peer(spawn, go_node):
    a = spawn()
    b = spawn("--bootstrap", a.addr)
    got = await run_go_node(go_node, a.addr)
    print("interop:", json.dumps({k: v for k, v in got.items() if k != "identify_hex"}))

    rtts = got["ping_rtts_ms"]
    assert len(rtts) == golibp2p.PINGS and all(rtt > 0 for rtt in rtts)
    record = await decode_answer(got["identify_hex"], a.peer_id)  # the key must be the peer id's, too
    assert record.agent_version.startswith("potluck/")
    assert {str(LIBP2P_PROTOCOL), IDENTIFY, IDENTIFY_PUSH, PING} <= set(record.protocols)
    assert transport(a.addr) in record.listen_addrs
    # Where the potluck peer sees the go node: go-libp2p dials from its listening port (SO_REUSEPORT).
    observed = Multiaddr(record.observed_addr)
    assert observed.value_for_protocol("ip4") == "127.0.0.1"
    assert record.observed_addr in got["go_addrs"]

    # The potluck peers identified each other too: each knows where the other sees it. b dialled a's
    # listening address; a sees b at the port b dialled from.
    observed = {}
    for peer in (a, b):
        with trio.fail_after(30):
            while not (await trio.to_thread.run_sync(peer.status))["observed_addrs"]:
                await trio.sleep(0.5)
        observed[peer.peer_id] = (await trio.to_thread.run_sync(peer.status))["observed_addrs"]
    assert observed[a.peer_id] == [transport(a.addr)]
    assert [Multiaddr(o).value_for_protocol("ip4") for o in observed[b.peer_id]] == ["127.0.0.1"]


@pytest.mark.slow
async def test_go_libp2p_gets_neither_ping_nor_identify_from_a_private_swarm_peer(spawn, go_node, tmp_path):
    key = tmp_path / "swarm.key"
    new_key_file(key)
    a = spawn("--swarm-key", str(key))
    got = await run_go_node(go_node, a.addr)
    assert "ping_rtts_ms" not in got and "protocol" in got["ping_error"].lower(), got
    assert "identify_hex" not in got and "protocol" in got["identify_error"].lower(), got
    assert (await trio.to_thread.run_sync(a.status))["observed_addrs"] == []
