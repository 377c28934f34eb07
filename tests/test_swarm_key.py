"""Private swarms: the key file format and the gate, on real sockets (127.0.0.1)."""

from __future__ import annotations

import os
import stat
import time
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio
from libp2p import new_host
from libp2p.custom_types import TProtocol
from libp2p.identity.identify.identify import ID as IDENTIFY_ID
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from p2p import framing
from p2p.errors import SwarmKeyMismatch
from p2p.identity import Identity
from p2p.libp2p import Libp2pNetwork
from p2p.libp2p.holepunch import DCUTR_PROTOCOL
from p2p.libp2p.network import LIBP2P_PROTOCOL
from p2p.swarm_key import SwarmKeyError, format_key, load_key, new_key_file, parse_key

ECHO = "/potluck/echo/1.0.0"
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


# --- key files -------------------------------------------------------------------------------------


def test_new_key_file_round_trip_and_mode(tmp_path):
    path = tmp_path / "swarm.key"
    key = new_key_file(path)
    assert len(key) == 32 and load_key(path) == key
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    lines = path.read_text().splitlines()
    assert lines[:2] == ["/key/swarm/psk/1.0.0/", "/base16/"] and lines[2] == key.hex()
    assert new_key_file(tmp_path / "other.key") != key


def test_new_key_file_refuses_to_overwrite(tmp_path):
    path = tmp_path / "swarm.key"
    key = new_key_file(path)
    with pytest.raises(SwarmKeyError, match="refusing to overwrite"):
        new_key_file(path)
    assert load_key(path) == key


def test_go_ipfs_style_file_is_accepted(tmp_path):
    key = bytes(range(32))
    path = tmp_path / "swarm.key"
    path.write_text(f"/key/swarm/psk/1.0.0/\r\n/base16/\r\n{key.hex().upper()}")
    assert load_key(path) == key
    assert parse_key(format_key(key)) == key


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "first line"),
        ("hello\n/base16/\n" + "00" * 32, "first line"),
        ("/key/swarm/psk/1.0.0/\n/base16/\n", "expected 3 lines"),
        ("/key/swarm/psk/1.0.0/\n/base64/\n" + "00" * 32, "only the /base16/"),
        ("/key/swarm/psk/1.0.0/\n/base16/\n" + "00" * 31, "64 hex characters"),
        ("/key/swarm/psk/1.0.0/\n/base16/\n" + "zz" * 32, "not hexadecimal"),
        ("/key/swarm/psk/1.0.0/\n/base16/\n" + "00" * 32 + "\nmore", "extra lines"),
    ],
)
def test_malformed_key_files_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "swarm.key"
    path.write_text(text)
    with pytest.raises(SwarmKeyError, match=message) as info:
        load_key(path)
    assert str(path) in str(info.value)


def test_missing_binary_and_huge_files(tmp_path):
    with pytest.raises(SwarmKeyError, match="does not exist"):
        load_key(tmp_path / "nope.key")
    (tmp_path / "bin.key").write_bytes(b"\xff\xfe" * 10)
    with pytest.raises(SwarmKeyError, match="not a text"):
        load_key(tmp_path / "bin.key")
    (tmp_path / "big.key").write_text("x" * 10000)
    with pytest.raises(SwarmKeyError, match="too large"):
        load_key(tmp_path / "big.key")


# --- the gate --------------------------------------------------------------------------------------


@asynccontextmanager
async def nets(*keys):
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(Libp2pNetwork.open(Identity.generate(), LOOPBACK, swarm_key=k))
               for k in keys]


async def echo(peer_id, body):
    return body


KEY = b"k" * 32
OTHER = b"o" * 32


async def test_same_key_connects_and_serves():
    async with nets(KEY, KEY) as (a, b):
        b.set_request_handler(ECHO, echo)
        assert await a.connect(b.listen_addrs()[0]) == b.peer_id
        assert await a.request(b.peer_id, ECHO, "in") == "in"
        assert a.connected_peers() == [b.peer_id] and b.connected_peers() == [a.peer_id]


@pytest.mark.parametrize(
    "dialer_key, listener_key, message",
    [
        (OTHER, KEY, "swarm keys differ"),
        (None, KEY, "this peer has no swarm key"),
        (KEY, None, "has no swarm key"),
    ],
    ids=["different-key", "no-key", "keyed-dialer-unkeyed-swarm"],
)
async def test_mismatched_keys_are_refused_quickly(dialer_key, listener_key, message):
    async with nets(dialer_key, listener_key) as (a, b):
        seen = []
        b.add_connection_listener(lambda p, up: seen.append((p, up)))
        b.set_request_handler(ECHO, echo)
        t0 = time.perf_counter()
        with pytest.raises(SwarmKeyMismatch, match=message) as info:
            await a.connect(b.listen_addrs()[0])
        assert time.perf_counter() - t0 < 2.0
        assert "--swarm-key" in str(info.value)
        with pytest.raises(SwarmKeyMismatch):
            await a.request(b.peer_id, ECHO, 1)  # implicit dials are refused the same way
        assert a.connected_peers() == [] and b.connected_peers() == [] and seen == []
        with trio.fail_after(3):  # and no connection lingers on either side
            while b._swarm.get_connections() or a._swarm.get_connections():
                await trio.sleep(0.05)


async def test_outsider_learns_nothing_and_is_disconnected():
    """A plain py-libp2p host (with identify and ping) dials a keyed peer and tries what it can."""
    async with nets(KEY, KEY) as (member, friend):
        member.set_request_handler(ECHO, echo)
        member.set_stream_handler(ECHO, lambda s: trio.sleep(0))
        await friend.connect(member.listen_addrs()[0])
        outsider = new_host(listen_addrs=[Multiaddr(LOOPBACK[0])])
        async with outsider.run(listen_addrs=[Multiaddr(LOOPBACK[0])]):
            pid = ID.from_base58(member.peer_id)
            t0 = time.perf_counter()
            await outsider.connect(info_from_p2p_addr(Multiaddr(member.listen_addrs()[0])))
            # identify would list our protocols, addresses and observed address: not served
            with pytest.raises(Exception):
                await outsider.new_stream(pid, [IDENTIFY_ID, TProtocol("/ipfs/ping/1.0.0")])
            # multistream `ls` names only the one opaque potluck protocol, never the inner ones (and hole
            # punching's, which serves members alone: test_libp2p_identify.py)
            listed = await outsider.send_command(pid, "ls")
            assert listed == [str(LIBP2P_PROTOCOL), str(DCUTR_PROTOCOL)]
            # the potluck protocol without the handshake: a request or a stream open is refused,
            # and the outsider is disconnected at once, never having been admitted
            for first in [{"q": 1, "p": ECHO, "b": 1}, {"t": "open", "p": ECHO}]:
                with trio.fail_after(3):
                    while outsider.get_network().get_connections(pid):
                        await trio.sleep(0.05)
                await outsider.connect(info_from_p2p_addr(Multiaddr(member.listen_addrs()[0])))
                raw = await outsider.new_stream(pid, [LIBP2P_PROTOCOL])
                await raw.write(framing.frame(first))
                with trio.fail_after(3), pytest.raises(Exception):
                    while await raw.read(100):
                        pass
                    raise EOFError
            with trio.fail_after(3):
                while outsider.get_network().get_connections(pid):
                    await trio.sleep(0.05)
            assert time.perf_counter() - t0 < 3.0
            assert member.connected_peers() == [friend.peer_id]
            # an outsider that just sits on a connection is dropped too
            await outsider.connect(info_from_p2p_addr(Multiaddr(member.listen_addrs()[0])))
            t0 = time.perf_counter()
            with trio.fail_after(4):
                while outsider.get_network().get_connections(pid):
                    await trio.sleep(0.05)
            assert 1.5 < time.perf_counter() - t0 < 3.0
        assert await friend.request(member.peer_id, ECHO, "ok") == "ok"


async def test_proof_is_bound_to_both_peer_ids():
    """A proof computed for one pair of peers does not verify for another (no relaying)."""
    from p2p.libp2p.gate import proof as _proof

    a, b, c = (Identity.generate().peer_id for _ in range(3))
    nd, nl = os.urandom(32), os.urandom(32)
    p = _proof(KEY, b"dialer", nd, nl, a, b)
    assert p == _proof(KEY, b"dialer", nd, nl, a, b)
    assert p != _proof(KEY, b"dialer", nd, nl, c, b)
    assert p != _proof(KEY, b"dialer", nd, nl, a, c)
    assert p != _proof(KEY, b"listener", nd, nl, a, b)
    assert p != _proof(OTHER, b"dialer", nd, nl, a, b)
