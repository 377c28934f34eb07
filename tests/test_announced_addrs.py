"""A server announces its addresses as a bounded list (issue #16): at most four, each its own, internet-
routable direct ones first, then circuits; the decoder refuses any other shape. A client's first contact
tries them in order, staggered (Happy Eyeballs), only those its network may dial, and reaches a server whose
first address is dead (a closed port; a relay that died; a black hole that never answers: the next address
is dialled while it is still pending), as does a server pushing to the next one. On real processes a server
announces every address it listens on."""

from __future__ import annotations

import socket
from contextlib import AsyncExitStack, asynccontextmanager
from typing import AsyncIterator

import pytest
import trio

from dht.records import InvalidRecord, SignedValue
from p2p import framing
from p2p.identity import Identity
from p2p.libp2p import Libp2pNetwork
from p2p.libp2p.addresses import announce_order, may_dial_addr
from pipeline.announce import (MAX_ADDR_LEN, MAX_ANNOUNCED_ADDRS, AnnouncementValidator, ServerInfo, announced_addrs,
                               fetch_servers)
from pipeline.client import ClientConfig, DistributedModel
from pipeline.hop import RemoteHop, connect_announced
from pipeline.routing import RouteHop
from potluck.localswarm import wait_until
from testkit.swarms import start_block_server, start_dhts

ME, OTHER, RELAY_A, RELAY_B = (Identity(bytes([i]) * 32).peer_id for i in (7, 8, 9, 10))
PUBLIC = f"/ip4/203.0.113.9/tcp/4001/p2p/{ME}"
PUBLIC6 = f"/ip6/2001:db8::9/tcp/4001/p2p/{ME}"
LAN = f"/ip4/192.168.1.5/tcp/4001/p2p/{ME}"
LOOPBACK = f"/ip4/127.0.0.1/tcp/4001/p2p/{ME}"
CIRCUIT_A = f"/ip4/198.51.100.1/tcp/4001/p2p/{RELAY_A}/p2p-circuit/p2p/{ME}"
CIRCUIT_B = f"/ip4/198.51.100.2/tcp/4001/p2p/{RELAY_B}/p2p-circuit/p2p/{ME}"
PROMPT = [5, 17, 42, 8, 99, 3]


def announcement(addrs) -> dict:
    value = ServerInfo(ME, 0, 4, 100.0, 1000.0, 4096, t=1.7e9).to_value()
    return {**value, "addrs": addrs}


def decoded(value: dict) -> ServerInfo:
    """`value` as a peer receives it: through msgpack, then the decoder."""
    return ServerInfo.from_value(ME, framing.decode(framing.encode(value)), num_blocks=4)


FOUR = (PUBLIC, PUBLIC6, CIRCUIT_A, CIRCUIT_B)
LONGEST = "/dns4/" + "a" * (MAX_ADDR_LEN - len(f"/dns4//tcp/1/p2p/{ME}")) + f"/tcp/1/p2p/{ME}"


def test_an_announcement_lists_at_most_four_addresses_each_the_servers_own():
    assert MAX_ANNOUNCED_ADDRS == 4 and decoded(announcement(list(FOUR))).addrs == FOUR
    assert len(LONGEST) == MAX_ADDR_LEN and decoded(announcement([LONGEST])).addrs == (LONGEST,)
    assert decoded(announcement([])).addrs == ()
    without = announcement([])
    del without["addrs"]
    assert decoded(without).addrs == ()  # an announcement naming no address (the server listens nowhere)


REFUSED = {
    "five addresses": [*FOUR, LAN],
    "an address over the length bound": ["/dns4/a" + LONGEST[len("/dns4/"):]],
    "one string, not a list": PUBLIC,
    "a number in the list": [PUBLIC, 4001],
    "bytes in the list": [PUBLIC.encode()],
    "a map": {"0": PUBLIC},
    "None": None,
    "another peer's address": [PUBLIC, f"/ip4/203.0.113.7/tcp/4001/p2p/{OTHER}"],
    "an address without a peer id": ["/ip4/203.0.113.9/tcp/4001"],
    "a circuit to another peer": [f"/ip4/198.51.100.1/tcp/4001/p2p/{RELAY_A}/p2p-circuit/p2p/{OTHER}"],
    "an address twice": [PUBLIC, PUBLIC],
    "a control character": [f"/ip4/203.0.113.9/tcp/4001\n/p2p/{ME}"],
}


@pytest.mark.parametrize("addrs", list(REFUSED.values()), ids=list(REFUSED))
def test_an_announcement_of_any_other_addresses_is_refused_with_the_decoders_error(addrs):
    with pytest.raises(InvalidRecord, match="addr"):
        decoded(announcement(addrs))
    entry = SignedValue.create(Identity(bytes([7]) * 32), "pipeline/m", announcement(addrs), 1000.0)
    with pytest.raises(InvalidRecord):  # the DHT's validator stores none of them
        AnnouncementValidator().validate(entry)


def test_a_server_lists_routable_direct_addresses_then_circuits_then_the_rest_within_the_bound():
    unspecified = f"/ip4/0.0.0.0/tcp/4001/p2p/{ME}"
    ordered = announce_order([unspecified, LAN, LOOPBACK, PUBLIC], [CIRCUIT_A, CIRCUIT_B])
    assert ordered == [PUBLIC, CIRCUIT_A, CIRCUIT_B, LAN, LOOPBACK]  # 0.0.0.0: nobody dials it
    foreign = f"/ip4/203.0.113.7/tcp/4001/p2p/{OTHER}"
    too_long = "/dns4/" + "a" * MAX_ADDR_LEN + f"/tcp/1/p2p/{ME}"
    assert announced_addrs(ME, [foreign, too_long, *ordered, PUBLIC]) == (PUBLIC, CIRCUIT_A, CIRCUIT_B, LAN)
    assert decoded(announcement(list(announced_addrs(ME, ordered)))).addrs == (PUBLIC, CIRCUIT_A, CIRCUIT_B, LAN)


def test_an_announced_address_is_dialled_only_where_we_may_dial():
    public, lan = ["203.0.113.9"], ["192.168.1.5"]
    for ours in (public, lan):
        assert may_dial_addr(PUBLIC, ours) and may_dial_addr(PUBLIC6, ours) and may_dial_addr(CIRCUIT_A, ours)
        for addr in (LOOPBACK, f"/ip4/0.0.0.0/tcp/1/p2p/{ME}", f"/ip4/169.254.169.254/tcp/80/p2p/{ME}",
                     f"/ip4/127.0.0.1/tcp/1/p2p/{RELAY_A}/p2p-circuit/p2p/{ME}",  # a relay on this host
                     f"/dns4/example.com/tcp/1/p2p/{ME}",  # no IP to judge
                     f"/ip4/198.51.100.1/tcp/1/p2p-circuit/p2p/{ME}",  # a circuit naming no relay
                     "not an address"):
            assert not may_dial_addr(addr, ours), addr
    assert not may_dial_addr(LAN, public) and may_dial_addr(LAN, lan)  # a private range only from one
    circuit_in_lan = f"/ip4/10.0.0.1/tcp/1/p2p/{RELAY_A}/p2p-circuit/p2p/{ME}"
    assert not may_dial_addr(circuit_in_lan, public) and may_dial_addr(circuit_in_lan, lan)


def closed_port() -> int:
    """A loopback TCP port where nothing listens (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_a_client_never_dials_an_announced_address_its_network_may_not():
    target = Identity.generate().peer_id
    forbidden = [f"/ip4/10.1.2.3/tcp/4001/p2p/{target}",  # a private network: we listen on loopback only
                 f"/ip4/0.0.0.0/tcp/{closed_port()}/p2p/{target}",  # Linux would dial this host
                 f"/ip4/169.254.169.254/tcp/80/p2p/{target}",
                 f"/ip4/10.9.9.9/tcp/4001/p2p/{RELAY_A}/p2p-circuit/p2p/{target}"]
    with trio.fail_after(30):
        async with Libp2pNetwork.open(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as net:
            assert not await connect_announced(net, target, forbidden, each=1.0)
            assert net.address_of(target) is None  # a dial would have noted the address it tried


async def test_a_client_opens_a_session_with_a_server_whose_first_announced_address_is_dead(llama, monkeypatch):
    """The server is no DHT server (client mode): a client learns where it listens from its announcement
    alone, which lists a closed port first."""
    path, mid, local = llama
    want = local.generate_greedy(PROMPT, 4)
    with trio.fail_after(120):
        async with AsyncExitStack() as stack:
            boot_net, server_net, client_net, checker_net = [
                await stack.enter_async_context(Libp2pNetwork.open(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]))
                for _ in range(4)]
            live = server_net.listen_addrs()
            dead = f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{server_net.peer_id}"
            monkeypatch.setattr(server_net, "announce_addrs", lambda: [dead, *live])
            async with trio.open_nursery() as nursery:
                server_dht, client_dht = await start_dhts(nursery, boot_net, [server_net, client_net])
                await start_block_server(nursery, server_net, server_dht, path, 0, 4, mid)

                [info] = await fetch_servers(client_dht, mid)
                assert info.addrs == (dead, *live)
                assert server_net.peer_id not in client_net.connected_peers()
                model = await DistributedModel.from_pretrained(path, client_net, client_dht, model_id=mid,
                                                               config=ClientConfig(spot_check=None))
                g = await model.generate(PROMPT, max_new_tokens=4, stop_token_ids=[])
                assert g.token_ids == want and [p for p, _, _ in g.route] == [server_net.peer_id]
                # one first contact, a success: the dead address cost a dial, not the server
                assert model.sequence.dials_failed == 0 and server_net.peer_id in model.sequence.reached
                # where it dials the server from now on: the address that answered, not the dead one tried first
                assert client_net.address_of(server_net.peer_id) == live[0]

                # a spot checker's open (RemoteHop.open) of a server never dialled tries them in turn too
                hop = await RemoteHop.open(checker_net, RouteHop(server_net.peer_id, 0, 4), info.addrs, model_id=mid,
                                           max_length=32, dtype=model.dtype_name, timeout=10.0)
                assert checker_net.address_of(server_net.peer_id) == live[0]
                await hop.close(True, None)
                nursery.cancel_scope.cancel()


async def _relay(stop: trio.Event, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with Libp2pNetwork.open(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"], relay_service=True) as relay:
        task_status.started(relay.listen_addrs()[0])
        await stop.wait()


async def test_a_peer_reserved_on_two_relays_is_reached_through_the_second_when_the_first_dies():
    """The issue's case: a NATed server's announcement names its circuits through two relays; the first
    relay dies before the server announces again, and a client holding that announcement still reaches it."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            stops = [trio.Event(), trio.Event()]
            relays = [await nursery.start(_relay, stop) for stop in stops]
            async with Libp2pNetwork.open(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"], relays=relays,
                                          hole_punch=False) as nated, \
                    Libp2pNetwork.open(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as dialer:
                while len(nated.announce_addrs()) < 3:  # two circuits, then its loopback address
                    await trio.sleep(0.05)
                addrs = announced_addrs(nated.peer_id, nated.announce_addrs())
                assert sorted(addrs[:2]) == sorted(f"{r}/p2p-circuit/p2p/{nated.peer_id}" for r in relays)
                assert list(addrs[2:]) == nated.direct_addrs()  # a loopback address: no peer elsewhere dials it
                first = relays.index(addrs[0].partition("/p2p-circuit")[0])
                stops[first].set()  # the relay behind the first address goes away
                while addrs[0] in nated.announce_addrs():
                    await trio.sleep(0.05)
                # a client with the announcement made before: the circuits only, as a peer elsewhere
                assert await connect_announced(dialer, nated.peer_id, addrs[:2], each=5.0)
                assert dialer.address_of(nated.peer_id) == addrs[1]
                assert dialer.connection_kinds(nated.peer_id) == ["relayed"]
            stops[1 - first].set()


BLACK_HOLE_HELD = 8  # connections a black hole holds open at most (more are closed at once)


@asynccontextmanager
async def black_hole() -> AsyncIterator[int]:
    """A loopback port that accepts TCP connections and never says a word (held open, at most
    `BLACK_HOLE_HELD`, until the end): a dial there hangs in its handshake until its timeout."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(BLACK_HOLE_HELD)
    held: list[trio.socket.SocketType] = []

    async def accept() -> None:
        while True:
            sock, _ = await listener.accept()
            if len(held) < BLACK_HOLE_HELD:
                held.append(sock)
            else:
                sock.close()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept)
            yield listener.getsockname()[1]
            nursery.cancel_scope.cancel()
    finally:
        for sock in held:
            sock.close()
        listener.close()


def record_dials(monkeypatch, net, via: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """Instrument `net.connect`: the list it returns gets ("start", addr) when a dial starts and then
    ("reached", addr), ("failed", addr) or ("cancelled", addr), in the order they happen. `via` dials
    some addresses at another instead (a network whose dial there reaches someone else)."""
    events: list[tuple[str, str]] = []
    connect = net.connect

    async def recorded(addr: str, timeout: float = 5.0) -> str:
        events.append(("start", addr))
        try:
            reached = await connect((via or {}).get(addr, addr), timeout=timeout)
        except trio.Cancelled:
            events.append(("cancelled", addr))
            raise
        except BaseException:
            events.append(("failed", addr))
            raise
        events.append(("reached", addr))
        return reached

    monkeypatch.setattr(net, "connect", recorded)
    return events


async def test_a_black_hole_announced_first_is_raced_not_waited_for(monkeypatch):
    """A server's first address accepts TCP and never answers, its second we may not dial: the client
    dials the third while the first is still pending, reaches the server there, and the black hole's
    dial is cancelled (not timed out) and never noted; the address we may not dial is never dialled."""
    with trio.fail_after(60):
        async with black_hole() as port, \
                Libp2pNetwork.open(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as server, \
                Libp2pNetwork.open(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as client:
            hole = f"/ip4/127.0.0.1/tcp/{port}/p2p/{server.peer_id}"
            refused = f"/ip4/10.1.2.3/tcp/4001/p2p/{server.peer_id}"  # a private network: we listen on loopback
            [live] = server.listen_addrs()
            assert not client.may_dial(refused)
            events = record_dials(monkeypatch, client)
            assert await connect_announced(client, server.peer_id, [hole, refused, live], each=10.0)
            assert events == [("start", hole), ("start", live), ("reached", live), ("cancelled", hole)]
            assert client.address_of(server.peer_id) == live and server.peer_id in client.connected_peers()


async def test_a_dial_that_reaches_another_peer_is_a_failure(monkeypatch):
    """The first announced address answers as someone else: that dial failed — the race goes on, and
    the server is reached (and noted) at the next one."""
    with trio.fail_after(60):
        async with Libp2pNetwork.open(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as server, \
                Libp2pNetwork.open(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as other, \
                Libp2pNetwork.open(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as client:
            [live], [elsewhere] = server.listen_addrs(), other.listen_addrs()
            impostor = f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{server.peer_id}"
            events = record_dials(monkeypatch, client, via={impostor: elsewhere})
            assert await connect_announced(client, server.peer_id, [impostor, live], each=10.0)
            assert events == [("start", impostor), ("reached", impostor), ("start", live), ("reached", live)]
            assert client.address_of(server.peer_id) == live


async def test_a_server_pushes_to_a_next_hop_whose_first_announced_address_is_a_black_hole(llama, monkeypatch):
    """Push (server to server): the server of blocks [0, 2) has never contacted that of [2, 4), whose
    announcement lists a black hole first; it dials the announced addresses as a client does, and the
    push arrives (the client never falls back to sending the step itself)."""
    path, mid, local = llama
    want = local.generate_greedy(PROMPT, 4)
    with trio.fail_after(120):
        async with AsyncExitStack() as stack:
            port = await stack.enter_async_context(black_hole())
            boot_net, first_net, second_net, client_net = [
                await stack.enter_async_context(Libp2pNetwork.open(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]))
                for _ in range(4)]
            live = second_net.listen_addrs()
            hole = f"/ip4/127.0.0.1/tcp/{port}/p2p/{second_net.peer_id}"
            monkeypatch.setattr(second_net, "announce_addrs", lambda: [hole, *live])
            events = record_dials(monkeypatch, first_net)
            async with trio.open_nursery() as nursery:
                dhts = await start_dhts(nursery, boot_net, [first_net, second_net, client_net])
                servers = [await start_block_server(nursery, net, dht, path, a, b, mid)
                           for net, dht, (a, b) in zip((first_net, second_net), dhts, [(0, 2), (2, 4)])]
                model = await DistributedModel.from_pretrained(path, client_net, dhts[2], model_id=mid,
                                                               config=ClientConfig(spot_check=None, push=True))
                assert second_net.peer_id not in first_net.connected_peers()
                g = await model.generate(PROMPT, max_new_tokens=4, stop_token_ids=[])
                assert g.token_ids == want and g.route == [(first_net.peer_id, 0, 2), (second_net.peer_id, 2, 4)]
                assert g.push_fallbacks == 0 and servers[0].stats["push_failures"] == 0
                assert servers[0].stats["pushes_sent"] == servers[1].stats["pushes_received"] > 0
                assert ("start", live[0]) in events and ("reached", hole) not in events
                assert first_net.address_of(second_net.peer_id) == live[0]
                nursery.cancel_scope.cancel()


def test_a_server_process_announces_every_address_it_listens_on(spawn, llama_folder):
    """Real processes: a server listening on two addresses announces both, and a peer that loaded no
    model lists them with the model's servers (`potluck status --json`)."""
    boot = spawn()
    server = spawn("--model", str(llama_folder), "--blocks", "0:4", "--threads", "1", "--bootstrap", boot.addr,
                   "--listen", "/ip4/127.0.0.1/tcp/0", "--listen", "/ip4/127.0.0.2/tcp/0")
    own = server.status()["addrs"]
    assert len(own) == 2 and all(a.endswith(f"/p2p/{server.peer_id}") for a in own)

    def listed() -> list[dict] | None:
        models = boot.status().get("models") or []
        return (models[0].get("coverage") or {}).get("servers") if models else None

    (seen,) = wait_until(listed, 90, 1, message="the bootstrap peer lists the model's server")
    assert seen["peer_id"] == server.peer_id and seen["addrs"] == own


def test_a_listener_on_an_unspecified_ip_stands_for_each_interface_ip():
    """0.0.0.0 (or ::) is where we listen, not where anyone can dial us: it becomes one address per IP
    of this host, internet-routable first, a LAN's next, loopback last; other addresses stay."""
    from p2p.libp2p.addresses import expand_unspecified

    ips = ["127.0.0.1", "192.168.1.5", "203.0.113.9", "::1", "2001:db8::9"]
    assert expand_unspecified(f"/ip4/0.0.0.0/tcp/4001/p2p/{ME}", ips) == [PUBLIC, LAN, LOOPBACK]
    assert expand_unspecified(f"/ip6/::/tcp/4001/p2p/{ME}", ips) == [PUBLIC6, f"/ip6/::1/tcp/4001/p2p/{ME}"]
    assert expand_unspecified(LAN, ips) == [LAN]
    assert expand_unspecified(CIRCUIT_A, ips) == [CIRCUIT_A]


# Run in a network namespace of its own (unshare): a veth pair gives it two LAN IPs; a peer listening
# on 0.0.0.0 there must list and announce them (and loopback), never 0.0.0.0, and a peer on the LAN must
# be allowed to dial, and reach, what it announces first — the address its DHT messages carry too.
_IN_NAMESPACE = """
import json, subprocess, trio
for cmd in ("ip link set lo up", "ip link add v0 type veth peer name v1", "ip addr add 10.99.0.1/24 dev v0",
            "ip addr add 10.99.0.2/24 dev v1", "ip link set v0 up", "ip link set v1 up"):
    subprocess.run(cmd.split(), check=True)
from p2p.identity import Identity
from p2p.libp2p import Libp2pNetwork

async def main():
    async with Libp2pNetwork.open(Identity.generate(), ["/ip4/0.0.0.0/tcp/0"]) as a, \\
            Libp2pNetwork.open(Identity.generate(), ["/ip4/10.99.0.2/tcp/0"]) as b:
        print("DIRECT", json.dumps(a.direct_addrs()))
        print("ANNOUNCED", a.announce_addrs())
        print("FIRST", a.listen_addrs()[0])
        first = a.announce_addrs()[0]
        print("MAY", b.may_dial(first))
        print("REACHED", await b.connect(first, timeout=5) == a.peer_id)

trio.run(main)
"""


def test_a_peer_listening_on_0000_announces_addresses_a_lan_peer_may_dial():
    import json
    import os
    import subprocess
    import sys

    if os.geteuid() != 0 or subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode:
        pytest.skip("needs root and unshare --net (a network namespace of the test's own)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(["unshare", "--net", sys.executable, "-c", _IN_NAMESPACE], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    direct = json.loads(lines["DIRECT"])
    ips = [a.split("/")[2] for a in direct]
    assert ips[-1] == "127.0.0.1" and set(ips[:-1]) == {"10.99.0.1", "10.99.0.2"} and "0.0.0.0" not in ips
    assert "0.0.0.0" not in lines["ANNOUNCED"] and "0.0.0.0" not in lines["FIRST"]
    assert lines["MAY"] == "True" and lines["REACHED"] == "True"
