"""libp2p identify and ping for other libp2p nodes, and the addresses peers observe us at.

Open swarms serve libp2p's `/ipfs/id/1.0.0` (our agent version, public key, listen addresses,
protocols, and the address we see the asker at), `/ipfs/id/push/1.0.0` and `/ipfs/ping/1.0.0` to
anyone connected, so a go/rust/js libp2p node that dials a potluck peer can identify and ping it. A
private swarm registers none of them: an outsider's multistream `ls` names only `/potluck/1.0.0`
and hole punching's `/libp2p/dcutr`, served to members alone (the swarm-key gate decides everything
else).

When the addresses we advertise change (listen, relay circuit, a NAT's port found dialable), we push
identify to connected peers (`push_on_change`: at most once per few seconds, to a bounded number of
peers), so they learn the new addresses without reconnecting.

Once a peer is admitted, we identify it in turn: its answer says which address it sees us at (our
observed address: behind NAT, the NAT's public side). The gate handshake says it too, in every swarm
(`gate.Admission`): in a private swarm it is how members learn where they are seen. `ObservedAddrs`
keeps one such report per reporting network (the reporter's /24 or /48: Sybils on one network fill
one slot), for a bounded number of networks, from admitted peers only (a stranger's claims are not
stored), and none naming an IP we are never dialled at (`observed_by`); an IP of ours is believed
(`confirmed_ips`) once two networks report it.

Hostile input: an identify message is at most `MAX_MESSAGE` bytes (go-libp2p's own bound on a signed
identify record) after a bounded varint, at most `MAX_MESSAGES` of them; fields are shape-checked
(`decode`), and the public key must be the one the peer id names. Each peer may hold at most
`max_streams_per_peer` of these streams at once (ping, identify and push together); more are reset.
A ping stream that sends nothing for `PING_IDLE` seconds is closed.
"""

from __future__ import annotations

import ipaddress
import logging
import random
from collections import OrderedDict
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Awaitable, Callable, Protocol

import multiaddr
import trio
from google.protobuf.message import EncodeError
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.custom_types import TProtocol
from libp2p.identity.identify.pb.identify_pb2 import Identify
from libp2p.peer.id import ID
from multiaddr.protocols import P_P2P

from ..errors import FrameError, P2PError, StreamClosed
from ..framing import ExactReader
from . import io
from .addresses import may_dial_local
from .gate import GatedHost, plain_addr

log = logging.getLogger(__name__)

IDENTIFY = TProtocol("/ipfs/id/1.0.0")
IDENTIFY_PUSH = TProtocol("/ipfs/id/push/1.0.0")
PING = TProtocol("/ipfs/ping/1.0.0")
PROTOCOL_VERSION = "ipfs/0.1.0"

MAX_MESSAGE = 8 * 1024  # go-libp2p's signedIDSize: the largest identify message it reads
MAX_MESSAGES = 10  # go-libp2p's maxMessages: an identify answer may come in several (merged)
MAX_ADDRS = 64
MAX_PROTOCOLS = 128
MAX_TEXT = 256  # agent version, protocol version, one protocol id
PING_SIZE = 32
PING_IDLE = 10.0  # go-libp2p closes an idle ping stream after 10 s too
ANSWER_TIMEOUT = 5.0
PUSH_POLL = 1.0  # how often our addresses are compared with those last pushed


def _agent_version() -> str:
    try:
        return f"potluck/{metadata.version('potluck')}"
    except metadata.PackageNotFoundError:
        return "potluck"


AGENT_VERSION = _agent_version()


@dataclass(frozen=True)
class PeerRecord:
    """What a peer said about itself (and about us) in identify."""

    agent_version: str
    protocol_version: str
    listen_addrs: tuple[str, ...]
    protocols: tuple[str, ...]
    observed_addr: str | None  # where the peer sees us


class IdentifyHost(GatedHost, Protocol):
    """What identify needs of `Libp2pNetwork` besides `GatedHost`."""

    def advertised_addrs(self) -> list[str]: ...

    def connected_peers(self) -> list[str]: ...

    def is_relayed(self, muxed_conn: Any) -> bool: ...

    def listen_ips(self) -> list[str]: ...


def reporter_network(ip: str) -> str:
    """The network a reporter's IP belongs to, as observed-address reports are counted: its /24 (IPv4)
    or /48 (IPv6). One party easily holds many addresses of one network, rarely many networks."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def _ip_of(addr: str) -> str | None:
    try:
        ma = multiaddr.Multiaddr(addr)
        first = ma.protocols()[0]
        return ma.value_for_protocol(first.code) if first.name in ("ip4", "ip6") else None
    except Exception:  # not a multiaddr, or an empty one
        return None


class ObservedAddrs:
    """Our addresses as peers observe them: one report (the latest) per reporting NETWORK
    (`reporter_network`), for at most `max_networks` networks (the least recently reporting ones are
    forgotten first), so Sybil reporters from one network fill one slot, not all of them. An IP is
    believed (`confirmed_ips`) once reported from `min_networks` networks."""

    def __init__(self, max_networks: int = 64, min_networks: int = 2):
        self.max_networks = max_networks
        self.min_networks = min_networks
        self._by_network: OrderedDict[str, str] = OrderedDict()

    def report(self, reporter_ip: str, addr: str) -> None:
        network = reporter_network(reporter_ip)
        self._by_network[network] = addr
        self._by_network.move_to_end(network)
        while len(self._by_network) > self.max_networks:
            self._by_network.popitem(last=False)

    def of(self, reporter_ip: str) -> str | None:
        """What the reporter's network reported last."""
        return self._by_network.get(reporter_network(reporter_ip))

    def addrs(self) -> list[tuple[str, int]]:
        """Each observed address with how many networks report it, most reported first."""
        counts: dict[str, int] = {}
        for addr in self._by_network.values():
            counts[addr] = counts.get(addr, 0) + 1
        return sorted(counts.items(), key=lambda item: -item[1])

    def confirmed_ips(self) -> list[str]:
        """The IPs we are observed at from at least `min_networks` networks (whatever the ports: we are
        seen at a new port on each outbound connection), most reported first."""
        counts: dict[str, int] = {}
        for addr in self._by_network.values():
            ip = _ip_of(addr)
            if ip is not None:
                counts[ip] = counts.get(ip, 0) + 1
        return [ip for ip, n in sorted(counts.items(), key=lambda item: -item[1]) if n >= self.min_networks]

    def __len__(self) -> int:
        return len(self._by_network)


def _observed(raw: Any, net: IdentifyHost) -> multiaddr.Multiaddr | None:
    """Where we see the peer on `raw`'s connection; None over a relay (the socket's far end is the relay)."""
    addr = None if net.is_relayed(raw.muxed_conn) else plain_addr(raw.get_remote_address())
    return multiaddr.Multiaddr(addr) if addr is not None else None


def encode(net: IdentifyHost, observed: multiaddr.Multiaddr | None) -> bytes:
    """Our identify message, as one varint-delimited protobuf."""
    addrs = [multiaddr.Multiaddr(a).decapsulate_code(P_P2P).to_bytes() for a in net.advertised_addrs()[:MAX_ADDRS]]
    protocols = [str(p) for p in net.host.get_mux().get_protocols() if p is not None]
    msg = Identify(
        protocol_version=PROTOCOL_VERSION,
        agent_version=AGENT_VERSION,
        public_key=net.host.get_public_key().serialize(),
        listen_addrs=addrs,
        observed_addr=observed.to_bytes() if observed is not None else b"",
        protocols=protocols,
    )
    body = msg.SerializeToString()
    return _uvarint(len(body)) + body


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


async def _read_uvarint(reader: ExactReader) -> int:
    """A varint of at most 4 bytes (enough for MAX_MESSAGE)."""
    value = 0
    for i in range(4):
        byte = (await reader.read_exactly(1))[0]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value
    raise FrameError("identify message length too long")


async def read_messages(reader: ExactReader) -> Identify:
    """An identify answer: up to MAX_MESSAGES delimited messages until the end of the stream, merged."""
    merged = Identify()
    for _ in range(MAX_MESSAGES):
        if await reader.at_end():
            return merged
        try:
            length = await _read_uvarint(reader)
        except StreamClosed as e:
            raise FrameError(f"identify message cut short: {e}") from None
        if length > MAX_MESSAGE:
            raise FrameError(f"identify message of {length} bytes (limit {MAX_MESSAGE})")
        try:
            body = await reader.read_exactly(length)
        except StreamClosed as e:
            raise FrameError(f"identify message cut short: {e}") from None
        part = Identify()
        try:
            part.ParseFromString(body)
        except Exception as e:  # protobuf's DecodeError (and anything a malformed message raises)
            raise FrameError(f"malformed identify message: {type(e).__name__}") from None
        merged.MergeFrom(part)
        if len(merged.listen_addrs) > MAX_ADDRS or len(merged.protocols) > MAX_PROTOCOLS:
            raise FrameError("identify lists too many addresses or protocols")
    if not await reader.at_end():
        raise FrameError(f"more than {MAX_MESSAGES} identify messages")
    return merged


def _addr(raw: bytes, what: str) -> str:
    try:
        return str(multiaddr.Multiaddr(raw))
    except Exception:
        raise FrameError(f"identify {what} is not a multiaddr") from None


def _text(value: str, what: str) -> str:
    if len(value) > MAX_TEXT:
        raise FrameError(f"identify {what} longer than {MAX_TEXT} characters")
    return value


def decode(msg: Identify, peer_id: str) -> PeerRecord:
    """The record in `msg` from `peer_id`; FrameError when its shape is wrong or its public key is
    not the one the peer id names."""
    if len(msg.listen_addrs) > MAX_ADDRS or len(msg.protocols) > MAX_PROTOCOLS:
        raise FrameError("identify lists too many addresses or protocols")
    if msg.public_key:
        try:
            key_id = ID.from_pubkey(deserialize_public_key(msg.public_key)).to_base58()
        except Exception:
            raise FrameError("identify public key is malformed") from None
        if key_id != peer_id:
            raise FrameError("identify public key is not the peer's")
    return PeerRecord(
        agent_version=_text(msg.agent_version, "agent version"),
        protocol_version=_text(msg.protocol_version, "protocol version"),
        listen_addrs=tuple(_addr(a, "listen address") for a in msg.listen_addrs),
        protocols=tuple(_text(p, "protocol") for p in msg.protocols),
        observed_addr=_addr(msg.observed_addr, "observed address") if msg.observed_addr else None,
    )


class IdentifyService:
    """Serves identify, identify-push and ping (registered only by open swarms), identifies admitted
    peers, and keeps what they said: their records while admitted, our observed addresses."""

    def __init__(self, net: IdentifyHost, *, serve: bool, max_streams_per_peer: int = 4,
                 max_networks: int = 64, push_interval: float = 5.0, max_push_peers: int = 32):
        self.net = net
        self.serve = serve
        self.max_streams_per_peer = max_streams_per_peer
        self.push_interval = push_interval
        self.max_push_peers = max_push_peers
        self.observed = ObservedAddrs(max_networks)
        self.records: dict[str, PeerRecord] = {}  # admitted peers only; forgotten with their session
        self._streams: dict[str, int] = {}
        self.stats = {"identify_served": 0, "pings_served": 0, "streams_refused": 0, "pushes_sent": 0}
        if serve:
            net.host.set_stream_handler(IDENTIFY, self._on_identify)
            net.host.set_stream_handler(IDENTIFY_PUSH, self._on_push)
            net.host.set_stream_handler(PING, self._on_ping)

    # --- serving ------------------------------------------------------------------------------------

    def _take(self, peer_id: str) -> bool:
        n = self._streams.get(peer_id, 0)
        if n >= self.max_streams_per_peer:
            self.stats["streams_refused"] += 1
            return False
        self._streams[peer_id] = n + 1
        return True

    def _give_back(self, peer_id: str) -> None:
        self._streams[peer_id] -= 1
        if not self._streams[peer_id]:
            del self._streams[peer_id]

    async def _bounded(self, raw: Any, protocol: str, serve: Callable[[Any, str], Awaitable[None]]) -> None:
        try:
            peer_id = io.peer_of(raw)
        except Exception:
            await io.reset(raw)
            return
        if not self._take(peer_id):
            log.info("reset a %s stream from %s: %d open", protocol, peer_id, self.max_streams_per_peer)
            await io.reset(raw)
            return
        try:
            await serve(raw, peer_id)
        # ValueError: an address we cannot write as a multiaddr (e.g. an IPv6 link-local one with a
        # zone) or a message protobuf will not encode; a peer's stream must never crash its connection
        except (StreamClosed, FrameError, trio.TooSlowError, ValueError, EncodeError) as e:
            log.info("%s stream from %s ended: %s", protocol, peer_id, e or type(e).__name__)
            await io.reset(raw)
        finally:
            self._give_back(peer_id)

    async def _on_identify(self, raw: Any) -> None:
        await self._bounded(raw, IDENTIFY, self._answer_identify)

    async def _answer_identify(self, raw: Any, peer_id: str) -> None:
        observed = _observed(raw, self.net)
        with trio.fail_after(ANSWER_TIMEOUT):
            await io.write(raw, encode(self.net, observed))
        self.stats["identify_served"] += 1
        await io.close(raw)

    async def _on_push(self, raw: Any) -> None:
        await self._bounded(raw, IDENTIFY_PUSH, self._take_push)

    async def _take_push(self, raw: Any, peer_id: str) -> None:
        with trio.fail_after(ANSWER_TIMEOUT):
            record = decode(await read_messages(io.exact_reader(raw)), peer_id)
        await io.close(raw)
        self._keep(peer_id, record, raw)

    async def _on_ping(self, raw: Any) -> None:
        await self._bounded(raw, PING, self._echo)

    async def _echo(self, raw: Any, peer_id: str) -> None:
        reader = io.exact_reader(raw)
        while True:
            with trio.move_on_after(PING_IDLE) as idle:
                if await reader.at_end():
                    break  # the pinger is done
            if idle.cancelled_caught:
                break
            with trio.fail_after(ANSWER_TIMEOUT):
                await io.write(raw, await reader.read_exactly(PING_SIZE))
            self.stats["pings_served"] += 1
        await io.close(raw)

    # --- identifying admitted peers -----------------------------------------------------------------

    async def identify(self, peer_id: str) -> PeerRecord:
        """Ask `peer_id` (connected) for its identify record; keep it and the address it sees us at.
        Raises StreamClosed (no such protocol, connection gone), FrameError or trio.TooSlowError."""
        with trio.fail_after(ANSWER_TIMEOUT):  # opening the stream (protocol negotiation) included
            try:
                raw = await self.net.host.new_stream(ID.from_base58(peer_id), [IDENTIFY])
            except trio.Cancelled:
                raise
            except Exception as e:
                raise StreamClosed(f"cannot open identify to {peer_id}: {type(e).__name__}") from None
            try:
                record = decode(await read_messages(io.exact_reader(raw)), peer_id)
            except BaseException:
                await io.reset(raw)
                raise
        await io.close(raw)
        self._keep(peer_id, record, raw)
        return record

    def _keep(self, peer_id: str, record: PeerRecord, raw: Any) -> None:
        if not self.net.admitted(peer_id):  # a stranger's record is not kept
            return
        self.records[peer_id] = record
        self.observed_by(raw, record.observed_addr)

    def observed_by(self, raw: Any, addr: str | None) -> None:
        """Keep `addr`, where the admitted peer on `raw`'s connection sees us (its identify, or its gate
        handshake: `gate.Admission`), as reported from that connection's network. Not over a relay:
        the peer sees the relay's view of us, no address of ours (and we cannot tell which network it
        reports from); not an IP that is never ours to be dialled at (`may_dial_local`: unspecified,
        multicast, link-local, loopback unless we listen on loopback alone)."""
        if addr is None or "/p2p-circuit" in addr or self.net.is_relayed(raw.muxed_conn):
            return
        ip = _ip_of(addr)
        if ip is not None and not may_dial_local(ip, self.net.listen_ips()):
            log.info("ignored an observation of us at %s", addr)
            return
        remote = raw.get_remote_address()
        if remote:
            self.observed.report(remote[0], addr)

    # --- pushing our address changes ------------------------------------------------------------------

    async def push_on_change(self) -> None:
        """Whenever the addresses we advertise change (a relay reservation made or lost, a NAT's port
        found dialable), push identify to connected peers that identified to us: at most once per
        `push_interval`, to at most `max_push_peers` of them (chosen at random), so they learn our
        new addresses without reconnecting."""
        pushed = self.net.advertised_addrs()
        while True:
            await trio.sleep(PUSH_POLL)
            now = self.net.advertised_addrs()
            if now == pushed:
                continue
            pushed = now
            peers = [p for p in self.net.connected_peers() if p in self.records]
            async with trio.open_nursery() as nursery:
                for peer_id in random.sample(peers, min(self.max_push_peers, len(peers))):
                    nursery.start_soon(self._push_quietly, peer_id)
            await trio.sleep(self.push_interval)

    async def _push_quietly(self, peer_id: str) -> None:
        try:
            await self.push(peer_id)
        except (P2PError, trio.TooSlowError, ValueError, EncodeError) as e:
            # A push that fails says nothing against the peer; it learns our addresses when it asks.
            log.info("identify-push to %s failed: %s", peer_id, e or type(e).__name__)

    async def push(self, peer_id: str) -> None:
        """Send `peer_id` (connected) our identify record on `/ipfs/id/push/1.0.0`. Raises StreamClosed
        (no such protocol, connection gone) or trio.TooSlowError."""
        with trio.fail_after(ANSWER_TIMEOUT):
            try:
                raw = await self.net.host.new_stream(ID.from_base58(peer_id), [IDENTIFY_PUSH])
            except trio.Cancelled:
                raise
            except Exception as e:
                raise StreamClosed(f"cannot open identify-push to {peer_id}: {type(e).__name__}") from None
            try:
                observed = _observed(raw, self.net)
                await io.write(raw, encode(self.net, observed))
            except BaseException:
                await io.reset(raw)
                raise
        await io.close(raw)
        self.stats["pushes_sent"] += 1

    def forget(self, peer_id: str) -> None:
        self.records.pop(peer_id, None)
