"""libp2p identify, identify-push and ping on Libp2pNetwork (p2p.libp2p.identify), on real sockets.

Interop with a go-libp2p node is in test_golibp2p_interop.py."""

from __future__ import annotations

from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio
import trio.testing
from libp2p import new_host
from libp2p.crypto import ed25519
from libp2p.host.ping import PingService
from libp2p.identity.identify.pb.identify_pb2 import Identify
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.utils.varint import encode_uvarint
from multiaddr import Multiaddr

from p2p import framing
from p2p.errors import FrameError, P2PError, PeerUnreachable, RemoteError
from p2p.framing import ExactReader
from p2p.identity import Identity
from p2p.libp2p import Libp2pNetwork
from p2p.libp2p.identify import (
    IDENTIFY,
    IDENTIFY_PUSH,
    MAX_MESSAGE,
    MAX_MESSAGES,
    PING,
    IdentifyService,
    ObservedAddrs,
    _uvarint,
    decode,
    read_messages,
)
from p2p.libp2p import gate
from p2p.libp2p import identify as identify_module
from p2p.libp2p import io
from p2p.libp2p.autonat import AUTONAT, Autonat, AutonatLimits, DialBackRefused
from p2p.libp2p.holepunch import DCUTR_PROTOCOL
from p2p.libp2p.network import LIBP2P_PROTOCOL

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


@asynccontextmanager
async def peers(n: int, **options):
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(Libp2pNetwork.open(Identity.generate(), LOOPBACK, **options))
               for _ in range(n)]


@asynccontextmanager
async def plain_host():
    """A stock py-libp2p host (not potluck: it never passes our gate)."""
    host = new_host(listen_addrs=[Multiaddr(LOOPBACK[0])])
    async with host.run(listen_addrs=[Multiaddr(LOOPBACK[0])]):
        yield host


def transport(addr: str) -> str:
    return addr.rsplit("/p2p/", 1)[0]


def reader_of(data: bytes) -> ExactReader:
    left = [data]

    async def read_some(n: int) -> bytes:
        chunk, left[0] = left[0][:n], left[0][n:]
        return chunk

    return ExactReader(read_some)


def delimited(*msgs: Identify) -> bytes:
    return b"".join(_uvarint(len(body)) + body for body in (m.SerializeToString() for m in msgs))


async def until(predicate, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


# --- open swarms --------------------------------------------------------------------------------------


async def test_admitted_peers_identify_each_other_and_learn_where_they_are_seen():
    async with peers(2) as (a, b):
        await a.connect(b.listen_addrs()[0])
        await until(lambda: a.identified(b.peer_id) and b.identified(a.peer_id))
        record = a.identified(b.peer_id)
        assert record.agent_version.startswith("potluck/") and record.protocol_version == "ipfs/0.1.0"
        assert record.listen_addrs == (transport(b.listen_addrs()[0]),)
        assert set(record.protocols) == {str(LIBP2P_PROTOCOL), IDENTIFY, IDENTIFY_PUSH, PING, DCUTR_PROTOCOL}
        # a dialled b's listening address: a sees b there, and b sees a at the port a dialled from
        assert b.observed_addrs() == [(transport(b.listen_addrs()[0]), 1)]
        assert a.observed_addrs() == [(record.observed_addr, 1)]
        assert Multiaddr(record.observed_addr).value_for_protocol("ip4") == "127.0.0.1"
        await a.disconnect(b.peer_id)
        await until(lambda: a.identified(b.peer_id) is None and b.identified(a.peer_id) is None)
        assert len(a.observed_addrs()) == 1  # what a peer reported outlives its connection (bounded)


async def test_a_plain_libp2p_host_can_ping_and_identify_an_open_swarm_peer():
    async with peers(1) as (member,), plain_host() as outsider:
        pid = ID.from_base58(member.peer_id)
        await outsider.connect(info_from_p2p_addr(Multiaddr(member.listen_addrs()[0])))
        rtts = await PingService(outsider).ping(pid, ping_amt=3)
        assert len(rtts) == 3
        raw = await outsider.new_stream(pid, [IDENTIFY])
        record = decode(await read_messages(io.exact_reader(raw)), member.peer_id)
        assert Multiaddr(record.observed_addr).value_for_protocol("ip4") == "127.0.0.1"
        assert transport(member.listen_addrs()[0]) in record.listen_addrs
        # a stranger is still no member: nothing of it is kept, and the gate still closes its connection
        assert member.connected_peers() == [] and member.identified(outsider.get_id().to_base58()) is None
        with trio.fail_after(member.gate_timeout + 3):
            while outsider.get_network().get_connections(pid):
                await trio.sleep(0.05)


async def test_pushes_are_kept_from_admitted_peers_only():
    async with peers(2) as (a, b), plain_host() as outsider:
        await a.connect(b.listen_addrs()[0])
        await until(lambda: b.identified(a.peer_id) is not None)
        pushed = Identify(agent_version="pushed/1", listen_addrs=[Multiaddr("/ip4/10.0.0.1/tcp/7").to_bytes()],
                          observed_addr=Multiaddr("/ip4/203.0.113.9/tcp/4001").to_bytes())
        raw = await a._host.new_stream(ID.from_base58(b.peer_id), [IDENTIFY_PUSH])
        await raw.write(delimited(pushed))
        await raw.close()
        await until(lambda: b.identified(a.peer_id).agent_version == "pushed/1")
        assert b.identified(a.peer_id).listen_addrs == ("/ip4/10.0.0.1/tcp/7",)
        assert ("/ip4/203.0.113.9/tcp/4001", 1) in b.observed_addrs()
        # the same push from a stranger changes nothing
        before = b.observed_addrs()
        await outsider.connect(info_from_p2p_addr(Multiaddr(b.listen_addrs()[0])))
        raw = await outsider.new_stream(ID.from_base58(b.peer_id), [IDENTIFY_PUSH])
        await raw.write(delimited(Identify(agent_version="stranger/1",
                                           observed_addr=Multiaddr("/ip4/198.51.100.1/tcp/1").to_bytes())))
        await raw.close()
        await trio.sleep(0.5)
        assert b.observed_addrs() == before and b.identified(outsider.get_id().to_base58()) is None


async def test_identify_and_ping_streams_are_bounded_per_peer():
    async with peers(1) as (member,), plain_host() as outsider:
        pid = ID.from_base58(member.peer_id)
        await outsider.connect(info_from_p2p_addr(Multiaddr(member.listen_addrs()[0])))
        held = [await outsider.new_stream(pid, [PING]) for _ in range(4)]  # open, never pinging
        await until(lambda: member._identify._streams.get(outsider.get_id().to_base58()) == 4)
        with trio.fail_after(3), pytest.raises(Exception):  # reset, never an echo
            extra = await outsider.new_stream(pid, [PING])
            await extra.write(b"x" * 32)
            if not await extra.read(32):
                raise EOFError
        assert member._identify.stats["streams_refused"] == 1
        await held[0].close()
        await until(lambda: member._identify._streams.get(outsider.get_id().to_base58()) == 3)
        again = await outsider.new_stream(pid, [PING])
        await again.write(b"y" * 32)
        with trio.fail_after(3):
            assert await again.read(32) == b"y" * 32


class _FakeStream:
    def __init__(self, peer_id: str):
        self.muxed_conn = type("Conn", (), {"peer_id": ID.from_base58(peer_id)})()
        self.was_reset = False

    async def reset(self) -> None:
        self.was_reset = True


class _HostThatNeverOpens:
    async def new_stream(self, peer_id, protocols):
        await trio.sleep_forever()


async def test_a_stream_whose_answer_cannot_be_written_is_reset_not_raised():
    """E.g. an IPv6 link-local asker with a zone: its address is no multiaddr (ValueError)."""
    pid = Identity.generate().peer_id
    service = IdentifyService(None, serve=False)  # type: ignore[arg-type]  # serving needs no net here
    raw = _FakeStream(pid)

    async def unwritable(raw, peer_id: str) -> None:
        Multiaddr("/ip6/fe80::1%eth0/tcp/4001")

    await service._bounded(raw, IDENTIFY, unwritable)
    assert raw.was_reset and service._streams == {}


async def test_identify_bounds_opening_its_stream_too(monkeypatch):
    monkeypatch.setattr(identify_module, "ANSWER_TIMEOUT", 0.2)
    net = type("Net", (), {"host": _HostThatNeverOpens()})()
    service = IdentifyService(net, serve=False)
    with trio.fail_after(5), pytest.raises(trio.TooSlowError):
        await service.identify(Identity.generate().peer_id)


# --- private swarms -----------------------------------------------------------------------------------


KEY = b"k" * 32


async def test_private_swarm_peers_serve_no_identify_and_learn_where_they_are_seen_in_the_handshake():
    """Members serve identify to no one, yet each learns where the other sees it from the gate
    handshake (they learned nothing before hole punching came to private swarms): the dialer at the
    port it dialed from, the listener at the address it was dialed at."""
    async with peers(2, swarm_key=KEY) as (a, b):
        await a.connect(b.listen_addrs()[0])
        a_port = b._session(a.peer_id).raw.get_remote_address()[1]
        assert a.observed_addrs() == [(f"/ip4/127.0.0.1/tcp/{a_port}", 1)]
        assert b.observed_addrs() == [(transport(b.listen_addrs()[0]), 1)]
        with trio.fail_after(5), pytest.raises(Exception):  # no identify, even for a member
            await a.host.new_stream(ID.from_base58(b.peer_id), [IDENTIFY])
        await trio.sleep(0.3)
        assert a.identified(b.peer_id) is None and b.identified(a.peer_id) is None
        assert set(b._host.get_mux().get_protocols()) == {LIBP2P_PROTOCOL, DCUTR_PROTOCOL}
        assert a.connected_peers() == [b.peer_id]


def _ids() -> tuple[str, str]:
    return Identity.generate().peer_id, Identity.generate().peer_id


class _Pipe:
    """One end of an in-memory byte stream, read and written as a libp2p stream is (`io`)."""

    def __init__(self, stream):
        self.stream = stream

    async def write(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def read(self, n: int) -> bytes:
        return await self.stream.receive_some(n)


def _pipes() -> tuple[_Pipe, _Pipe]:
    left, right = trio.testing.memory_stream_pair()
    return _Pipe(left), _Pipe(right)


async def _against(script, handshake):
    """`await handshake()` while `script()` plays the other side; what the handshake returns or raises."""
    outcome: list = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(script)
        try:
            with trio.fail_after(5):
                outcome.append(await handshake())
        except (P2PError, FrameError) as e:
            outcome.append(e)
            nursery.cancel_scope.cancel()
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


async def _dial_a_scripted_listener(welcome: dict) -> gate.Admission:
    """Our dialer's handshake against a member that ends it with `welcome`."""
    dialer, listener = _ids()
    ours, theirs = _pipes()

    async def member() -> None:
        reader = io.exact_reader(theirs)
        hello = await io.read_frame(reader, io.MAX_OPENING_FRAME, 5)
        nonce = bytes(gate.NONCE_SIZE)
        await io.write(theirs, framing.frame({"t": "hello", "v": gate.WIRE_VERSION, "n": nonce, "k": True,
                                              "p": gate.proof(KEY, b"listener", hello["n"], nonce, dialer, listener)}))
        assert (await io.read_frame(reader, io.MAX_OPENING_FRAME, 5))["o"] == "/ip4/192.0.2.1/tcp/4001"
        await io.write(theirs, framing.frame(welcome))

    return await _against(member, lambda: gate.handshake_as_dialer(
        ours, io.exact_reader(ours), own_id=dialer, peer_id=listener, key=KEY, timeout=5,
        seen_at="/ip4/192.0.2.1/tcp/4001"))


WELCOMES = {
    "an older member's (none)": ({"t": "welcome"}, None),
    "plain ip4": ({"t": "welcome", "o": "/ip4/198.51.100.7/tcp/40001"}, "/ip4/198.51.100.7/tcp/40001"),
    "plain ip6": ({"t": "welcome", "o": "/ip6/2001:db8::7/tcp/4001"}, "/ip6/2001:db8::7/tcp/4001"),
    "a newer member's, with a field we do not know": (
        {"t": "welcome", "o": "/ip4/198.51.100.7/tcp/1", "future": {"x": [1, 2]}}, "/ip4/198.51.100.7/tcp/1"),
    "not a multiaddr": ({"t": "welcome", "o": "somewhere"}, None),
    "udp": ({"t": "welcome", "o": "/ip4/198.51.100.7/udp/4001"}, None),
    "a circuit": ({"t": "welcome", "o": "/ip4/198.51.100.7/tcp/1/p2p/"
                                        "12D3KooWJ4sZ2MBHhKprbKhHuAweyNCC4p4KQoqEb2AoRBzWHzbm/p2p-circuit"}, None),
    "port 0": ({"t": "welcome", "o": "/ip4/198.51.100.7/tcp/0"}, None),
}


@pytest.mark.parametrize("case", sorted(WELCOMES))
async def test_the_welcome_says_where_the_member_sees_us_in_a_plain_tcp_address_or_nothing(case):
    welcome, observed = WELCOMES[case]
    assert await _dial_a_scripted_listener(welcome) == gate.Admission(observed)


@pytest.mark.parametrize("value, message", [("/ip4/1.2.3.4/tcp/1" + "0" * gate.MAX_ADDR_LEN, "too long"),
                                            (4001, "must be str"), (b"/ip4/1.2.3.4/tcp/1", "must be str"),
                                            (["/ip4/1.2.3.4/tcp/1"], "must be str")])
async def test_a_welcome_whose_observed_address_is_too_long_or_no_string_breaks_the_handshake(value, message):
    with pytest.raises(PeerUnreachable, match=message):
        await _dial_a_scripted_listener({"t": "welcome", "o": value})


async def _answer_a_scripted_dialer(proof_frame) -> gate.Admission | None:
    """Our listener's handshake with a dialer that proves it holds KEY (or not) and sends `proof_frame(p)`."""
    dialer, listener = _ids()
    ours, theirs = _pipes()
    said: list[dict] = []

    async def member() -> None:
        reader = io.exact_reader(theirs)
        await io.write(theirs, framing.frame({"t": "hello", "v": gate.WIRE_VERSION, "n": bytes(gate.NONCE_SIZE),
                                              "k": True}))
        hello = await io.read_frame(reader, io.MAX_OPENING_FRAME, 5)
        await io.write(theirs, framing.frame(proof_frame(gate.proof(KEY, b"dialer", bytes(gate.NONCE_SIZE),
                                                                    hello["n"], dialer, listener))))
        said.append(await io.read_frame(reader, io.MAX_OPENING_FRAME, 5))

    reader = io.exact_reader(ours)

    async def answer() -> gate.Admission | None:
        first = await io.read_frame(reader, io.MAX_OPENING_FRAME, 5)
        return await gate.handshake_as_listener(ours, reader, first, own_id=listener, peer_id=dialer, key=KEY,
                                                timeout=5, seen_at="/ip4/192.0.2.9/tcp/5555")

    admission = await _against(member, answer)
    assert said[0]["t"] == ("welcome" if admission else "refuse")
    if admission:
        assert said[0]["o"] == "/ip4/192.0.2.9/tcp/5555"
    return admission


async def test_the_listener_learns_what_a_member_dialed_and_nothing_from_an_older_member_or_a_stranger():
    dialed = "/ip4/198.51.100.3/tcp/4001"
    assert await _answer_a_scripted_dialer(lambda p: {"t": "proof", "p": p, "o": dialed}) == gate.Admission(dialed)
    assert await _answer_a_scripted_dialer(lambda p: {"t": "proof", "p": p}) == gate.Admission(None)
    # a wrong proof: refused, and what it claimed is not even read
    assert await _answer_a_scripted_dialer(lambda p: {"t": "proof", "p": bytes(32), "o": dialed}) is None
    assert await _answer_a_scripted_dialer(lambda p: {"t": "proof", "p": bytes(32), "o": 7}) is None
    with pytest.raises(FrameError, match="too long"):
        await _answer_a_scripted_dialer(lambda p: {"t": "proof", "p": p, "o": dialed * 10})


class _Conn:
    def __init__(self, relayed: bool):
        self.relayed = relayed


class _Raw:
    def __init__(self, remote, relayed: bool = False):
        self.remote, self.muxed_conn = remote, _Conn(relayed)

    def get_remote_address(self):
        return self.remote


class _ObservedNet:
    """What `IdentifyService.observed_by` reads of a network: whether a connection is relayed, our IPs."""

    def __init__(self, listen_ips):
        self.ips = listen_ips

    def is_relayed(self, muxed_conn) -> bool:
        return muxed_conn.relayed

    def listen_ips(self) -> list[str]:
        return self.ips


def test_observations_naming_no_ip_we_are_ever_dialled_at_or_made_over_a_relay_are_ignored():
    service = IdentifyService(_ObservedNet(["10.0.0.5"]), serve=False)  # type: ignore[arg-type]
    for i, ignored in enumerate(["/ip4/0.0.0.0/tcp/4001", "/ip4/224.0.0.1/tcp/4001", "/ip4/169.254.169.254/tcp/80",
                                 "/ip6/::/tcp/4001", "/ip6/fe80::1/tcp/4001", "/ip4/127.0.0.1/tcp/4001",
                                 "/ip4/240.0.0.1/tcp/4001", "/ip6/::1/tcp/4001"]):
        service.observed_by(_Raw((f"198.51.{i}.9", 4001)), ignored)
    service.observed_by(_Raw(("192.0.2.1", 4001), relayed=True), "/ip4/203.0.113.77/tcp/4001")
    service.observed_by(_Raw(None), "/ip4/203.0.113.78/tcp/4001")
    assert service.observed.addrs() == []
    service.observed_by(_Raw(("198.51.100.9", 4001)), "/ip4/203.0.113.5/tcp/4001")
    service.observed_by(_Raw(("192.0.2.1", 4001)), "/ip4/10.0.0.5/tcp/4001")  # a LAN peer sees us at our LAN IP
    assert sorted(service.observed.addrs()) == [("/ip4/10.0.0.5/tcp/4001", 1), ("/ip4/203.0.113.5/tcp/4001", 1)]
    loopback = IdentifyService(_ObservedNet(["127.0.0.1"]), serve=False)  # type: ignore[arg-type]
    loopback.observed_by(_Raw(("127.0.0.1", 4001)), "/ip4/127.0.0.1/tcp/4001")  # a swarm on one machine
    assert loopback.observed.addrs() == [("/ip4/127.0.0.1/tcp/4001", 1)]


async def test_a_stranger_cannot_tell_a_member_where_it_is_seen():
    """A stranger runs the handshake to its end with a made-up proof and an address: refused, not kept."""
    async with peers(1, swarm_key=KEY) as (member,), plain_host() as stranger:
        pid = ID.from_base58(member.peer_id)
        await stranger.connect(info_from_p2p_addr(Multiaddr(member.listen_addrs()[0])))
        raw = await stranger.new_stream(pid, [LIBP2P_PROTOCOL])
        reader = io.exact_reader(raw)
        with trio.fail_after(5):
            await io.write(raw, framing.frame({"t": "hello", "v": gate.WIRE_VERSION, "n": bytes(gate.NONCE_SIZE),
                                               "k": True}))
            assert (await io.read_frame(reader, io.MAX_OPENING_FRAME, 5))["t"] == "hello"
            await io.write(raw, framing.frame({"t": "proof", "p": bytes(32), "o": "/ip4/203.0.113.66/tcp/4001"}))
            assert (await io.read_frame(reader, io.MAX_OPENING_FRAME, 5))["e"] == "SwarmKeyMismatch"
        assert member.observed_addrs() == [] and member.connected_peers() == []


async def test_an_outsider_gets_no_hole_punching_from_a_private_swarm_member():
    async with peers(1, swarm_key=KEY) as (member,), plain_host() as outsider:
        pid = ID.from_base58(member.peer_id)
        await outsider.connect(info_from_p2p_addr(Multiaddr(member.listen_addrs()[0])))
        answer = b""
        with trio.fail_after(5):
            try:
                stream = await outsider.new_stream(pid, [DCUTR_PROTOCOL])
                await stream.write(encode_uvarint(2) + b"\x08\x64")  # a CONNECT
                answer = await stream.read(1)
            except Exception:
                pass  # reset: what we expect
        assert answer == b""
        assert member.relay_status()["hole_punch"] == {"attempts": 0, "direct": 0, "failed": 0}
        assert member.connected_peers() == [] and member.observed_addrs() == []


# --- hostile identify answers -------------------------------------------------------------------------


def _other_key() -> bytes:
    return ed25519.create_new_key_pair().public_key.serialize()


HOSTILE = {
    "oversized message": (_uvarint(MAX_MESSAGE + 1) + b"\0" * 16, "limit"),
    "endless length varint": (b"\xff" * 8, "length too long"),
    "cut short": (_uvarint(100) + b"\x0a\x02", "cut short"),
    "not protobuf": (_uvarint(3) + b"\xff\xff\xff", "malformed identify"),
    "too many messages": (delimited(*[Identify(agent_version="x")] * (MAX_MESSAGES + 1)), "more than"),
    "too many addresses": (delimited(*[Identify(listen_addrs=[Multiaddr("/ip4/1.2.3.4/tcp/1").to_bytes()] * 40)] * 2),
                           "too many"),
    "bad address": (delimited(Identify(listen_addrs=[b"\xff\xfe"])), "not a multiaddr"),
    "bad observed address": (delimited(Identify(observed_addr=b"\xff\xfe")), "not a multiaddr"),
    "long agent": (delimited(Identify(agent_version="a" * 300)), "longer than"),
    "someone else's key": (delimited(Identify(public_key=_other_key())), "not the peer's"),
    "malformed key": (delimited(Identify(public_key=b"\x08\x01")), "malformed"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_identify_answers_are_refused(case):
    data, message = HOSTILE[case]
    peer = Identity.generate().peer_id
    with pytest.raises(FrameError, match=message):
        decode(await read_messages(reader_of(data)), peer)


async def test_a_lying_identify_answer_stores_nothing():
    """An admitted peer that answers identify with another peer's key: its record and its claim about
    our address are dropped, and its session goes on."""
    async with peers(2) as (a, liar):
        lie = delimited(Identify(public_key=_other_key(), observed_addr=Multiaddr("/ip4/6.6.6.6/tcp/6").to_bytes()))

        async def lying(raw):
            await raw.write(lie)
            await raw.close()

        liar._host.set_stream_handler(IDENTIFY, lying)
        await a.connect(liar.listen_addrs()[0])
        await until(lambda: liar.identified(a.peer_id) is not None)  # the liar identified a
        await trio.sleep(0.3)
        # what a holds is what the liar's gate handshake said (where it sees a), not the lie
        a_port = liar._session(a.peer_id).raw.get_remote_address()[1]
        assert a.identified(liar.peer_id) is None and a.observed_addrs() == [(f"/ip4/127.0.0.1/tcp/{a_port}", 1)]
        assert a.connected_peers() == [liar.peer_id]


def test_observed_addresses_are_kept_per_reporter_network_and_bounded():
    observed = ObservedAddrs(max_networks=4)
    for i in range(10):
        observed.report(f"198.51.{i}.7", "/ip4/203.0.113.1/tcp/1" if i % 2 else "/ip4/203.0.113.2/tcp/2")
    assert len(observed) == 4 and observed.of("198.51.0.7") is None and observed.of("198.51.9.7") is not None
    observed.report("198.51.9.8", "/ip4/203.0.113.2/tcp/2")  # a network's new report replaces its old one
    assert observed.addrs() == [("/ip4/203.0.113.2/tcp/2", 3), ("/ip4/203.0.113.1/tcp/1", 1)]
    assert observed.confirmed_ips() == ["203.0.113.2"]


def test_sybils_on_one_network_fill_one_observed_address_slot():
    observed = ObservedAddrs(max_networks=4)
    for honest in ("192.0.2.10", "198.51.100.20", "2001:db8:1::5"):
        observed.report(honest, "/ip4/203.0.113.7/tcp/40001")
    for i in range(100):  # a hundred reporters on one /24 (and one /48): two networks
        observed.report(f"10.66.0.{i}", "/ip4/6.6.6.6/tcp/6")
        observed.report(f"2001:db8:66:{i:x}::1", "/ip4/6.6.6.6/tcp/6")
    assert sorted(observed.addrs()) == [("/ip4/203.0.113.7/tcp/40001", 2), ("/ip4/6.6.6.6/tcp/6", 2)]
    assert len(observed) == 4 and observed.of("2001:db8:66:ffff::9") == "/ip4/6.6.6.6/tcp/6"
    assert observed.of("192.0.2.99") is None  # the least recently reporting network made room


# --- reachability (autonat) ---------------------------------------------------------------------------


async def settled(*nets: Libp2pNetwork, timeout: float = 20.0) -> None:
    await until(lambda: all(n.reachability()["status"] != "unknown" for n in nets), timeout)


async def test_a_dialable_peer_is_public_and_one_whose_listen_address_is_elsewhere_is_private():
    eager = AutonatLimits(per_peer_interval=0.0)  # so that the re-check below is answered at once
    async with peers(2, autonat_limits=eager) as (a, b), \
            Libp2pNetwork.open(Identity.generate(), ["/ip4/127.0.0.2/tcp/0"]) as hidden:
        await b.connect(a.listen_addrs()[0])
        # `hidden` listens on 127.0.0.2 but its connections come from 127.0.0.1 (like a host behind
        # NAT): nobody may dial 127.0.0.2 for it, and nothing of it listens on 127.0.0.1.
        await hidden.connect(a.listen_addrs()[0])
        await hidden.connect(b.listen_addrs()[0])
        await settled(a, b, hidden)
        assert a.reachability()["status"] == b.reachability()["status"] == "public"
        assert a.reachability()["reachable_addrs"] == [transport(a.listen_addrs()[0])]
        assert hidden.reachability()["status"] == "private" and hidden.reachability()["reachable_addrs"] == []
        # it starts listening where it can be dialled: its candidates change, and it checks again
        await hidden._swarm.listen(Multiaddr("/ip4/127.0.0.1/tcp/0"))
        await until(lambda: hidden.reachability()["status"] == "public", 20)
        assert all(addr.startswith("/ip4/127.0.0.1/") for addr in hidden.reachability()["reachable_addrs"])


class _AutonatNet:
    """What `Autonat` serving needs: requests come from `seen_at`; we listen at `ours`."""

    def __init__(self, seen_at: str, ours: list[str]):
        self.seen_at, self.ours = seen_at, ours

    def set_request_handler(self, protocol, handler) -> None:
        pass

    def add_connection_listener(self, listener) -> None:
        pass

    def remote_ip(self, peer_id: str) -> str:
        return self.seen_at

    def direct_addrs(self) -> list[str]:
        return self.ours


class _AskingNet:
    """What `Autonat.check` needs: connected peers seen at an IP (None: over a relay), each answering
    a dial-back request as it pleases."""

    def __init__(self, peers: dict[str, tuple[str | None, bool]]):
        self.peers = peers  # peer id -> (remote IP or None, whether it says it reached us)
        self.asked: list[str] = []

    def set_request_handler(self, protocol, handler) -> None:
        pass

    def add_connection_listener(self, listener) -> None:
        pass

    def direct_addrs(self) -> list[str]:
        return ["/ip4/10.0.0.5/tcp/4001"]

    def confirmed_ips(self) -> list[str]:
        return []

    def connected_peers(self) -> list[str]:
        return list(self.peers)

    def admitted(self, peer_id: str) -> bool:
        return True

    def remote_ip(self, peer_id: str) -> str | None:
        return self.peers[peer_id][0]

    async def request(self, peer_id, protocol, body, timeout=None):
        self.asked.append(peer_id)
        if self.peers[peer_id][1]:
            return {"ok": body["addrs"], "failed": []}
        return {"ok": [], "failed": body["addrs"]}


async def test_reachability_counts_direct_peers_one_per_network():
    honest = {f"honest{i}": (f"198.51.{i}.9", False) for i in range(2)}  # we are behind a NAT
    sybils_relayed = {f"relayed{i}": (None, True) for i in range(5)}
    sybils_one_network = {f"sybil{i}": (f"203.0.113.{i + 1}", True) for i in range(5)}
    net = _AskingNet({**honest, **sybils_relayed, **sybils_one_network})
    autonat = Autonat(net, None, ask=10)  # type: ignore[arg-type]  # asks only, never dials
    verdict = await autonat.check()
    assert verdict.status == "private" and verdict.answered == 3
    assert not any(p.startswith("relayed") for p in net.asked)
    assert sum(p.startswith("sybil") for p in net.asked) == 1


@pytest.mark.parametrize("seen_at, ours, served", [
    ("127.0.0.1", ["/ip4/127.0.0.1/tcp/4001"], True),  # a swarm on one machine
    ("127.0.0.1", ["/ip4/127.0.0.1/tcp/4001", "/ip4/192.0.2.7/tcp/4001"], False),  # a local forward
    ("127.0.0.1", ["/ip4/0.0.0.0/tcp/4001"], False),
    ("::1", ["/ip6/2001:db8::7/tcp/4001"], False),
    ("fe80::1", ["/ip4/127.0.0.1/tcp/4001"], False),
    ("169.254.3.4", ["/ip4/127.0.0.1/tcp/4001"], False),
    ("0.0.0.0", ["/ip4/127.0.0.1/tcp/4001"], False),
    ("224.0.0.1", ["/ip4/192.0.2.7/tcp/4001"], False),
    ("198.51.100.9", ["/ip4/192.0.2.7/tcp/4001"], True),
])
async def test_dial_backs_to_our_own_host_or_link_are_refused(seen_at, ours, served):
    autonat = Autonat(_AutonatNet(seen_at, ours), None)  # type: ignore[arg-type]  # no dial: no addresses asked
    requester = Identity.generate().peer_id
    if served:
        assert await autonat._serve(requester, {"addrs": []}) == {"ok": [], "failed": []}
    else:
        with pytest.raises(DialBackRefused):
            await autonat._serve(requester, {"addrs": []})
        assert autonat.stats["dialbacks_refused"] == 1


@asynccontextmanager
async def tcp_listener(host: str):
    """A TCP listener on `host` that accepts, counts, and never speaks; yields (port, accepted list)."""
    accepted: list = []
    listeners = await trio.open_tcp_listeners(0, host=host)

    async def hold(stream):
        accepted.append(stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, hold, listeners)
        yield listeners[0].socket.getsockname()[1], accepted
        nursery.cancel_scope.cancel()


async def test_dial_backs_go_only_to_the_requester_itself():
    async with peers(3, autonat_limits=AutonatLimits(per_peer_interval=0.0)) as (server, requester, bystander), \
            tcp_listener("127.0.0.3") as (port, accepted):
        await requester.connect(server.listen_addrs()[0])
        await until(lambda: requester.reachability()["status"] != "unknown")
        # an address at another IP than the request comes from is never dialled, whoever listens there
        elsewhere = f"/ip4/127.0.0.3/tcp/{port}"
        # an address at the requester's IP where another peer answers: dialled, but Noise shows it is
        # not the requester
        other = transport(bystander.listen_addrs()[0])
        answer = await requester.request(server.peer_id, AUTONAT, {"addrs": [elsewhere, other]})
        assert answer == {"ok": [], "failed": [other]}
        await trio.sleep(0.3)
        assert accepted == []


async def test_dial_back_requests_are_rate_limited_and_bounded():
    limits = AutonatLimits(per_peer_interval=60.0, max_concurrent=1, dial_timeout=2.0)
    async with peers(3, autonat_limits=limits) as (server, one, two), tcp_listener("127.0.0.1") as (port, accepted):
        for net in (one, two):
            await net.connect(server.listen_addrs()[0])
        await until(lambda: server._autonat.stats["dialbacks_served"] == 2)  # their own first checks
        server._autonat._asked_by.clear()
        with pytest.raises(RemoteError) as again:
            for _ in range(2):
                await one.request(server.peer_id, AUTONAT, {"addrs": []})
        assert again.value.kind == "DialBackRefused"
        # a dial-back that hangs (a listener that never speaks Noise) holds the only job slot
        silent = f"/ip4/127.0.0.1/tcp/{port}"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(two.request, server.peer_id, AUTONAT, {"addrs": [silent]})
            await until(lambda: len(accepted) == 1)
            server._autonat._asked_by.clear()
            with pytest.raises(RemoteError) as busy:
                await one.request(server.peer_id, AUTONAT, {"addrs": [silent]})
            assert busy.value.kind == "DialBackRefused"
        assert len(accepted) == 1
