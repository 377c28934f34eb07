"""Every wire and stored-data decoder against fuzzed inputs: typed refusals, never a crash (issue #13).

`python -m bench.fuzz --json [--quick] [--n N] [--only NAME]` runs N inputs (default 100,000;
`--quick`: 2,000) through each decoder below. Inputs come from `bench.fuzzgen`: mutations of valid
encodings, mutated and random structures of the right top-level shape, and random bytes.

A *crash* is any exception other than the decoder's typed refusal (listed with each target), an
input that takes longer than `--hang-s` (default 5 s), or one that grows the process's peak RSS by
more than `--rss-mb` (default 256 MB). Per decoder the JSON reports inputs, typed rejections,
accepted, crashes (each distinct one with a minimised input, hex), the slowest input's time, and
the peak RSS growth (in all, and the most for one input); `crashes_total` is the goal's figure (0).
The same-run baseline is `msgpack_unpack_per_s`: plain `msgpack.unpackb` over inputs made as
`p2p.framing.decode`'s are, which the `framing.decode` rate is a ratio of.

Decoders that sit inside a handler are driven through it, as a peer's message would be (gossip,
membership, replication, billing, the control socket, the HTTP body), and the asking side of a
protocol is fed fuzzed replies; a handler that answers instead of raising counts as refusing when
it answers no (`Refused`). The server's inference messages are checked with the protocol's own
parsers (`pipeline.protocol`), as the block server calls them on each step.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import msgpack
import trio

from credits import CreditPolicy, ForkProof, Ledger, LogEntry, Receipt
from credits.entry import ZERO_HASH
from credits.errors import InvalidEntry, InvalidForkProof, InvalidReceipt
from credits.receipts import ReceiptTracker, linear_pricing
from credits.replication import Replicator
from dht import protocol as dht_proto
from dht.records import InvalidRecord, SignedValue, Validators, entry_from_wire
from dht.vivaldi import Coord
from p2p import framing, tensor
from p2p.errors import FrameError, P2PError, StreamClosed
from p2p.gossip import Gossip, GossipMessage
from p2p.identity import Identity, IdentityKeyError
from p2p.membership import Membership
from p2p.sim import SimWorld
from p2p.swarm_key import SwarmKeyError, decode_key_file, format_key
from pipeline import protocol as pipe_proto
from pipeline.announce import ModelCard, ServerInfo, from_gossip_note
from pipeline.billing import ServerAccount, ServerBilling, parse_receipt
from potluck import control
from potluck.api import Api
from potluck.openai_schema import ApiError, ChatRequest, CompletionRequest
from potluck.relays import RelayRecordValidator, relay_key

from .fuzzgen import FuzzInputs, minimise

MODEL = "fuzz-model"
PRICING = linear_pricing({MODEL: 1000})


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def framed(obj: Any) -> bytes:
    body = pack(obj)
    return len(body).to_bytes(framing.HEADER_SIZE, "big") + body


class Refused(Exception):
    """A handler that answers rather than raises said no: an error reply, no reply, or nothing taken."""


@dataclass
class Target:
    """One decoder: `decode(input bytes)` returns (accepted) or raises one of `typed` (refused)."""

    name: str
    decode: Callable[[bytes], Any]  # may return an awaitable (handlers are async)
    typed: tuple[type[BaseException], ...]
    seeds: list[Any]
    encode: Callable[[Any], bytes] = pack


@dataclass
class Crash:
    kind: str  # exception type, "hang" or "memory"
    where: str  # file:line that raised
    count: int = 0
    example: bytes = b""
    message: str = ""


@dataclass
class Report:
    inputs: int = 0
    rejected: int = 0
    accepted: int = 0
    max_input_ms: float = 0.0
    max_input_rss_mb: float = 0.0  # the most one input grew the peak RSS
    rss_growth_mb: float = 0.0
    crashes: dict[tuple[str, str], Crash] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"inputs": self.inputs, "rejected": self.rejected, "accepted": self.accepted,
                "crashes": sum(c.count for c in self.crashes.values()), "max_input_ms": round(self.max_input_ms, 3),
                "max_input_rss_mb": round(self.max_input_rss_mb, 1), "rss_growth_mb": round(self.rss_growth_mb, 1),
                "crash_examples": [{"kind": c.kind, "where": c.where, "count": c.count, "message": c.message[:300],
                                    "input_hex": c.example[:1000].hex(), "input_len": len(c.example)}
                                   for c in self.crashes.values()]}


def _where(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    frame = tb[-1] if tb else None
    return f"{frame.filename.rsplit('/', 2)[-2:]!s}:{frame.lineno}" if frame else "?"


async def _outcome(target: Target, data: bytes) -> BaseException | None:
    """None if accepted or refused with a typed error; else the exception."""
    try:
        result = target.decode(data)
        if isinstance(result, Awaitable):
            await result
    except target.typed:
        return None
    except Exception as e:
        return e
    return None


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def run_target(target: Target, n: int, rng: random.Random, hang_s: float, rss_mb: float) -> Report:
    report = Report()
    inputs = FuzzInputs(rng, target.seeds, target.encode)
    start_rss = _peak_rss_mb()
    for _ in range(n):
        data = inputs.next()
        before = _peak_rss_mb()
        t0 = time.perf_counter()
        refused = False
        failure: BaseException | None = None
        try:
            result = target.decode(data)
            if isinstance(result, Awaitable):
                await result
        except target.typed:
            refused = True
        except Exception as e:
            failure = e
        elapsed = time.perf_counter() - t0
        report.inputs += 1
        report.max_input_ms = max(report.max_input_ms, elapsed * 1000)
        grown = _peak_rss_mb() - before
        report.max_input_rss_mb = max(report.max_input_rss_mb, grown)
        if failure is not None:
            key = (type(failure).__name__, _where(failure))
            message = str(failure)
        elif elapsed > hang_s:
            key, message = ("hang", f"over {hang_s} s"), f"took {elapsed:.2f} s"
        elif grown > rss_mb:
            key, message = ("memory", f"over {rss_mb} MB"), f"grew peak RSS by {grown:.0f} MB"
        else:
            if refused:
                report.rejected += 1
            else:
                report.accepted += 1
            continue
        crash = report.crashes.setdefault(key, Crash(key[0], key[1], example=data, message=message))
        crash.count += 1
    report.rss_growth_mb = _peak_rss_mb() - start_rss
    for crash in report.crashes.values():
        if crash.kind in ("hang", "memory"):
            continue
        crash.example = await _minimise(target, crash)
    return report


async def _minimise(target: Target, crash: Crash) -> bytes:
    async def same_crash(data: bytes) -> bool:
        e = await _outcome(target, data)
        return e is not None and (type(e).__name__, _where(e)) == (crash.kind, crash.where)

    budget = 1000 if len(crash.example) <= 64 * 1024 else 50  # a huge input is cut in halves only
    return await minimise(crash.example, same_crash, budget)


# --- the decoders -----------------------------------------------------------------------------------


class _Reader:
    """A stream that hands out `data` in small pieces, then end-of-stream."""

    def __init__(self, data: bytes, chunk: int = 7):
        self.data = memoryview(data)
        self.chunk = max(chunk, len(data) // 256)  # small pieces, but not a million awaits for 4 MiB
        self.sent = bytearray()

    async def receive_some(self, n: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return self._take(self.chunk)

    async def read(self, n: int = -1) -> bytes:  # the libp2p stream interface the relay reads through
        return self._take(self.chunk if n is None or n < 0 else min(n, self.chunk))

    def _take(self, n: int) -> bytes:
        out, self.data = bytes(self.data[:n]), self.data[n:]
        return out

    async def send_all(self, data: bytes) -> None:
        self.sent += data

    async def write(self, data: bytes) -> None:
        self.sent += data

    async def aclose(self) -> None:
        pass


def frames_target() -> Target:
    async def read_all(data: bytes) -> None:
        reader = framing.ExactReader(_Reader(data, 5).receive_some)
        while True:
            try:
                await framing.read_frame(reader.read_exactly, max_size=64 * 1024)
            except StreamClosed:
                return

    seeds = [[1, "a", b"xx"], {"t": "step", "id": 3}, None, list(range(40))]
    return Target("p2p.framing.read_frame", read_all, (FrameError,), seeds,
                  encode=lambda o: framed(o) * 2)


def tensor_target() -> Target:
    import numpy as np

    seeds = [tensor.pack(np.arange(6, dtype=np.float32).reshape(2, 3)), tensor.pack(np.zeros((1, 2, 4), np.int64)),
             tensor.pack(np.ones(3, np.uint16), dtype="bfloat16")]

    def decode(data: bytes) -> None:
        t = tensor.unpack(framing.decode(data))
        t.numpy()

    return Target("p2p.tensor.unpack", decode, (FrameError,), seeds)


def dht_targets(alice: Identity, bob: Identity) -> list[Target]:
    addr = f"/sim/1/p2p/{alice.peer_id}"
    info = {"c": Coord(0.01, 0.02, 0.003, 0.5).wire(),
            "l": [[2, bob.peer_id, 0.012, 3.5, Coord(0.02, 0.01, 0.004, 0.2).wire()]], "a": addr}
    entry = SignedValue.create(alice, "k/1", {"x": 1}, time.time() + 600).wire()
    requests = [{"op": "ping", "i": info}, {"op": "find_node", "i": info, "t": b"\x07" * 32, "lv": 2, "cl": bob.peer_id},
                {"op": "find_value", "i": info, "k": "k/1", "lv": 0, "cl": ""},
                {"op": "store", "i": info, "k": "k/1", "e": [entry]}]
    contact = [bob.peer_id, f"/sim/2/p2p/{bob.peer_id}", Coord(0.02, 0.01, 0.004, 0.2).wire()]
    replies = [{"i": info, "n": [contact], "e": [entry]}, {"i": info, "n": [contact]}, {"i": info}]
    validators = Validators()

    def record(data: bytes) -> None:
        obj = framing.decode(data)
        e = entry_from_wire("k/1", obj)
        validators.check(e, time.time())
        e.value

    def reply(data: bytes) -> None:
        obj = framing.decode(data)
        op = "find_value" if isinstance(obj, dict) and "e" in obj else "find_node"  # the op the client asked
        dht_proto.decode_reply(op, alice.peer_id, obj, "k/1")

    return [
        Target("dht.records.SignedValue", record, (InvalidRecord, FrameError), [entry]),
        Target("dht.protocol.decode_request", lambda d: dht_proto.decode_request(alice.peer_id, framing.decode(d)),
               (FrameError,), requests),
        Target("dht.protocol.decode_reply", reply, (FrameError,), replies),
    ]


def key_file_targets(identity: Identity) -> list[Target]:
    return [
        Target("p2p.swarm_key.decode_key_file", lambda d: decode_key_file(d, "fuzz"), (SwarmKeyError,),
               [format_key(b"\x11" * 32), format_key(bytes(range(32)))], encode=lambda o: o.encode("utf-8", "surrogatepass")
               if isinstance(o, str) else pack(o)),
        Target("p2p.identity.key_file", lambda d: Identity.from_key_file(d, "fuzz"), (IdentityKeyError,),
               [identity.seed], encode=lambda o: o if isinstance(o, bytes) else pack(o)),
    ]


def credit_targets(author: Identity, client: Identity) -> list[Target]:
    now_ms = int(time.time() * 1000)
    entry = LogEntry.create(author, 1, ZERO_HASH, now_ms, "dispute", pack([client.public_key, "bad output", b""]))
    session = b"\x05" * 16
    receipt = Receipt.sign(client, server=author.public_key, model=MODEL, start=0, end=2, tokens=10,
                           flops=PRICING(MODEL, 0, 2, 10), session=session, counter=1)
    fork = _fork_proof(client, now_ms)

    def receipt_from_list(data: bytes) -> None:
        Receipt.from_list(framing.decode(data))

    return [
        Target("credits.LogEntry.decode", lambda d: LogEntry.decode(d), (InvalidEntry,),
               [[entry.author, entry.seq, entry.prev, entry.timestamp, entry.kind, entry.body, entry.signature]]),
        Target("credits.Receipt.from_list", receipt_from_list, (InvalidReceipt, FrameError), [receipt.to_list()]),
        Target("credits.ForkProof.decode", lambda d: ForkProof.decode(d).check(), (InvalidForkProof,), [fork.to_list()]),
    ]


def _fork_proof(who: Identity, now_ms: int) -> ForkProof:
    a = LogEntry.create(who, 1, ZERO_HASH, now_ms, "dispute", pack([b"\x01" * 32, "a", b""]))
    b = LogEntry.create(who, 1, ZERO_HASH, now_ms, "dispute", pack([b"\x01" * 32, "b", b""]))
    return ForkProof.of(a.signed_header(), b.signed_header())


def ledger_targets(authority: Identity, client: Identity) -> list[Target]:
    """Entry bodies as ingestion checks them: each input is the body of a newly signed entry of `kind`."""
    policy = CreditPolicy(grant_authorities=frozenset([authority.public_key]))
    ledger = Ledger.open(Identity.generate(), None, pricing=PRICING, policy=policy)
    now_ms = int(time.time() * 1000)

    def receipt(counter_: int) -> list:
        return Receipt.sign(client, server=authority.public_key, model=MODEL, start=0, end=2, tokens=counter_,
                            flops=PRICING(MODEL, 0, 2, counter_), session=b"\x06" * 16, counter=counter_).to_list()

    def ingest(kind: str) -> Callable[[bytes], None]:
        def decode(body: bytes) -> None:
            seq, prev = ledger.heads.get(authority.public_key, (0, ZERO_HASH))
            entry = LogEntry.create(authority, seq + 1, prev, now_ms, kind, body)  # InvalidEntry: too long a body
            result = ledger.ingest_sync([entry.encode()])
            if result.error:
                raise InvalidEntry(result.error)
        return decode

    seeds: dict[str, list[Any]] = {"grant": [[client.public_key, 10**12, "welcome"]],
             "earn": [[receipt(i)] for i in range(1, 200)],
             "dispute": [[client.public_key, "wrong output", b"evidence"]],
             "fork": [[_fork_proof(Identity(bytes([i]) * 32), now_ms).to_list()] for i in range(1, 40)]}
    return [Target(f"credits.ledger.{kind}_body", ingest(kind), (InvalidEntry,), s) for kind, s in seeds.items()]


def announce_targets(server: Identity) -> list[Target]:
    info = ServerInfo(peer_id=server.peer_id, start=0, end=4, decode_tps=10.0, prefill_tps=100.0, cache_tokens=4096,
                      addrs=(f"/sim/1/p2p/{server.peer_id}",), clusters={"1": "x"}, t=1.7e9, model_name="tiny",
                      num_blocks=8, context_length=2048).to_value()
    card = ModelCard("ab" * 32, "tiny", 8, 2048).to_value()
    note = {"model": "ab" * 32, "ttl": 60.0, "info": info}

    relay = {"addrs": [f"/ip4/203.0.113.7/tcp/4001/p2p/{server.peer_id}"], "region": "eu"}

    def announcement(data: bytes) -> None:
        entry = SignedValue.create(server, "pipeline/" + "ab" * 32, framing.decode(data), time.time() + 600)
        ServerInfo.from_entry(entry, num_blocks=8)

    def relay_announcement(data: bytes) -> None:
        RelayRecordValidator().validate(SignedValue.create(server, relay_key(None), framing.decode(data),
                                                           time.time() + 600))

    return [
        Target("pipeline.announce.ServerInfo", announcement, (InvalidRecord, FrameError), [info]),
        Target("pipeline.announce.gossip_note", lambda d: from_gossip_note(server.peer_id, framing.decode(d), 1.7e9),
               (InvalidRecord, FrameError), [note]),
        Target("pipeline.announce.ModelCard", lambda d: ModelCard.from_value(framing.decode(d)),
               (InvalidRecord, FrameError), [card]),
        Target("potluck.relays.RelayRecordValidator", relay_announcement, (InvalidRecord, FrameError), [relay]),
    ]


def pipeline_targets(client: Identity, server: Identity) -> list[Target]:
    import numpy as np

    hidden = tensor.pack(np.zeros((1, 3, 8), np.float32))
    receipt = Receipt.sign(client, server=server.public_key, model=MODEL, start=0, end=2, tokens=3,
                           flops=PRICING(MODEL, 0, 2, 3), session=b"\x07" * 16, counter=1).to_list()
    steps = [{"t": "step", "id": 1, "pos": 0, "h": hidden, "chunks": [1, 2], "receipt": receipt,
              "push": [{"peer": server.peer_id, "session": b"\x01" * 16}]},
             {"t": "push", "session": b"\x01" * 16, "id": 2, "pos": 3, "h": hidden, "push": []}]
    replies = [{"t": "out", "id": 1, "h": hidden, "compute_s": 0.01, "pushed": False, "served": 3},
               {"t": "error", "kind": "CacheFull", "m": "no room", "limit": 10},
               {"t": "opened", "session": b"\x02" * 16, "start": 0, "end": 2, "max_length": 64, "cache_tokens_left": 9}]

    def step(data: bytes) -> None:
        # what BlockServer._step and _handle_push check, in their order
        m = framing.expect_map(framing.decode(data), "inference message")
        framing.field(m, "t", str, max_len=16)
        pipe_proto.int_field(m, "id", 0, 1 << 62)
        pipe_proto.int_field(m, "pos", 0, 64)
        h = pipe_proto.unpack_hidden(framing.field(m, "h", dict), dtype="float32", hidden_size=8, max_tokens=64)
        pipe_proto.parse_chunks(m.get("chunks"), h.shape[1])
        pipe_proto.parse_push(m.get("push"))
        if m.get("receipt") is not None:
            parse_receipt(m["receipt"])

    def reply(data: bytes) -> None:
        obj = framing.decode(data)
        kind: str = obj["t"] if isinstance(obj, dict) and obj.get("t") in ("opened", "closed") else "out"
        pipe_proto.expect_reply(obj, kind)  # the reply the client waits for

    return [Target("pipeline.protocol.step", step, (P2PError,), steps),
            Target("pipeline.protocol.expect_reply", reply, (P2PError,), replies)]


def billing_target(ledger: Ledger, client: Identity) -> Target:
    billing = ServerBilling(ledger, PRICING)
    session = b"\x08" * 16
    account = ServerAccount(billing, client.public_key,
                            ReceiptTracker(server=ledger.me, client=client.public_key, model=MODEL, start=0, end=2,
                                           session=session, pricing=PRICING), 0.0, 0.0)
    seeds = [Receipt.sign(client, server=ledger.me, model=MODEL, start=0, end=2, tokens=t,
                          flops=PRICING(MODEL, 0, 2, t), session=session, counter=t).to_list() for t in range(1, 100)]

    def check(data: bytes) -> None:
        account.check(framing.decode(data), 10**6, require=False)

    return Target("pipeline.billing.ServerAccount.check", check, (P2PError,), seeds)


def api_targets() -> list[Target]:
    api = Api(None)  # type: ignore[arg-type]  # body parsing needs no peer

    class Body:
        def __init__(self, data: bytes):
            self.data = data

        async def stream(self):
            yield self.data

    def parse(kind: type[ChatRequest] | type[CompletionRequest]) -> Callable[[bytes], Awaitable[None]]:
        async def decode(data: bytes) -> None:
            kind.parse(await api.body_json(Body(data)))  # type: ignore[arg-type]
        return decode

    chat = [{"model": "tiny", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}],
             "max_tokens": 10, "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": ["\n"], "stream": True,
             "stream_options": {"include_usage": True}},
            {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}]
    completion = [{"model": "tiny", "prompt": "Once", "max_completion_tokens": 5, "n": 1},
                  {"model": "tiny", "prompt": [1, 2, 3]}]
    return [Target("potluck.openai_schema.ChatRequest", parse(ChatRequest), (ApiError,), chat, encode=_json),
            Target("potluck.openai_schema.CompletionRequest", parse(CompletionRequest), (ApiError,), completion,
                   encode=_json)]


def _json(value: Any) -> bytes:
    return json.dumps(value, default=lambda b: b.decode("latin-1"), skipkeys=True).encode()


def control_target() -> Target:
    async def status(request: dict) -> dict:
        return {"peer_id": "x", "n": len(request)}

    async def handle(data: bytes) -> None:
        stream = _Reader(data, 4096)
        await control._handle(stream, {"status": status})  # type: ignore[arg-type]
        if not stream.sent or "error" in framing.expect_map(framing.decode(bytes(stream.sent[framing.HEADER_SIZE:]))):
            raise Refused

    return Target("potluck.control", handle, (Refused,), [{"cmd": "status"}, {"cmd": "generate", "prompt": "x", "max_tokens": 3}],
                  encode=framed)


def relay_targets(peer: Identity) -> list[Target]:
    from google.protobuf.message import DecodeError
    from libp2p.io.exceptions import IncompleteReadError, MessageTooLarge
    from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, PeerId, StopMessage
    from libp2p.relay.circuit_v2.utils import read_delimited_msg
    from libp2p.utils.varint import ParseError, encode_uvarint

    from p2p.libp2p.relay import _pid

    raw_id = b"\x00\x24\x08\x01\x12\x20" + peer.public_key  # a libp2p peer id's bytes (see p2p.identity)

    def delimited(msg: Any) -> bytes:
        body = msg.SerializeToString()
        return encode_uvarint(len(body)) + body

    def read(cls: Any) -> Callable[[bytes], Awaitable[None]]:
        async def decode(data: bytes) -> None:
            msg = await read_delimited_msg(_Reader(data, 3), cls)
            if msg.HasField("peer"):
                _pid(msg.peer.id)
        return decode

    hop = [HopMessage(type=HopMessage.CONNECT, peer=PeerId(id=raw_id)), HopMessage(type=HopMessage.RESERVE)]
    stop = [StopMessage(type=StopMessage.CONNECT, peer=PeerId(id=raw_id))]
    typed = (DecodeError, ParseError, MessageTooLarge, IncompleteReadError)
    # protobuf messages are not msgpack structures: byte mutations and random bytes only
    return [Target("p2p.libp2p.relay.HopMessage", read(HopMessage), typed, [delimited(m) for m in hop], encode=_bytes),
            Target("p2p.libp2p.relay.StopMessage", read(StopMessage), typed, [delimited(m) for m in stop], encode=_bytes)]


def gate_targets(dialer: Identity, listener: Identity) -> list[Target]:
    """The session handshake (p2p.libp2p.gate), each side reading what the other would send."""
    from p2p.libp2p import gate, io

    key = b"\x0c" * 32
    nonce = b"\x0d" * gate.NONCE_SIZE

    async def as_listener(data: bytes) -> None:
        stream = _Reader(data, 5)
        reader = framing.ExactReader(stream.receive_some)
        hello = framing.expect_map(await io.read_frame(reader, io.MAX_OPENING_FRAME, 5.0), "first frame")
        if not await gate.handshake_as_listener(stream, reader, hello, own_id=listener.peer_id,
                                                peer_id=dialer.peer_id, key=key, timeout=5.0, seen_at=None):
            raise Refused

    async def as_dialer(data: bytes) -> None:
        stream = _Reader(data, 5)
        await gate.handshake_as_dialer(stream, framing.ExactReader(stream.receive_some), own_id=dialer.peer_id,
                                       peer_id=listener.peer_id, key=None, timeout=5.0, seen_at=None)

    # A proof binds both sides' fresh nonces, so no fixed input passes the listener's check: its
    # seeds carry a wrong proof (refused after the whole exchange) or none (a swarm without a key).
    # The unkeyed seeds also say where the other side sees us ("o"), read once it is admitted.
    seen = "/ip4/192.0.2.1/tcp/4001"
    hellos = [[{"t": "hello", "v": gate.WIRE_VERSION, "n": nonce, "k": True}, {"t": "proof", "p": b"\x01" * 32}],
              [{"t": "hello", "v": gate.WIRE_VERSION, "n": nonce, "k": False}, {"t": "proof", "p": None, "o": seen}]]
    replies = [[{"t": "hello", "v": gate.WIRE_VERSION, "n": nonce, "k": False, "p": None}, {"t": "welcome", "o": seen}],
               [{"t": "refuse", "e": "SwarmKeyMismatch", "m": "keys differ"}]]
    def frames(messages: list) -> bytes:
        return b"".join(framed(m) for m in messages)

    return [Target("p2p.libp2p.gate.listener", as_listener, (Refused, FrameError, StreamClosed), hellos, encode=frames),
            Target("p2p.libp2p.gate.dialer", as_dialer, (P2PError,), replies, encode=frames)]


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else pack(value)


async def network_targets(world: SimWorld, nursery: trio.Nursery, ledger_identity: Identity,
                          author: Identity) -> list[Target]:
    """Gossip, membership and replication, each driven through its handler on a simulated peer."""
    node = world.add_node(ledger_identity)
    other = world.add_node(author)
    gossip = Gossip(node, ledger_identity, history_seconds=3600.0)
    await nursery.start(gossip.run)
    membership = Membership(node)
    ledger = Ledger.open(ledger_identity, None, pricing=PRICING)
    replicator = Replicator(ledger, node, gossip)

    body = pack({"topic": "t", "author": author.peer_id, "seq": 1, "ts": node.now(), "data": {"x": [1, 2]}})
    message = {"b": body, "s": author.sign(b"potluck-gossip/1\x00" + body)}
    pull = {"ids": [b"\x01" * 32, b"\x02" * 32], "since": 0.0}
    hello = {"addrs": [f"/sim/9/p2p/{author.peer_id}"], "region": "eu",
             "peers": [[ledger_identity.peer_id, f"/sim/1/p2p/{ledger_identity.peer_id}", "us"]]}
    now_ms = int(time.time() * 1000)
    entry = LogEntry.create(author, 1, ZERO_HASH, now_ms, "dispute", pack([ledger_identity.public_key, "x", b""]))
    heads = {"full": True, "h": [[author.public_key, 3, b"\x09" * 32]], "x": [_fork_proof(author, now_ms).to_list()]}
    ranges = {"r": [[author.public_key, 1, 5], [ledger_identity.public_key, 1, 1]]}

    # The asking side of each protocol, fed a fuzzed reply: `asker`'s requests all get `answer[0]`.
    asker = world.add_node(Identity(b"\x06" * 32))
    answer: list[Any] = [None]

    async def answering(peer_id: str, protocol: str, body: Any, timeout: float | None = None) -> Any:
        await trio.lowlevel.checkpoint()
        return answer[0]

    asker.request = answering  # type: ignore[method-assign]
    asking_gossip = Gossip(asker, asker.identity, history_seconds=3600.0)
    await nursery.start(asking_gossip.run)
    asking_ledger = Ledger.open(asker.identity, None, pricing=PRICING)
    asking = Replicator(asking_ledger, asker, asking_gossip)
    asking_membership = Membership(asker)

    def replied(ask: Callable[[], Awaitable[bool]]) -> Callable[[bytes], Awaitable[None]]:
        """`ask()` says whether the reply was taken; each of these askers handles a bad reply itself."""
        async def decode(data: bytes) -> None:
            answer[0] = framing.decode(data)
            if not await ask():
                raise Refused
        return decode

    async def pull_taken() -> bool:
        before = asking_gossip.stats.dropped_invalid
        await asking_gossip._pull(other.peer_id)
        return asking_gossip.stats.dropped_invalid == before

    async def exchange() -> bool:
        before = asking.stats["exchange_failures"]
        await asking.exchange(other.peer_id)
        return asking.stats["exchange_failures"] == before

    async def request_ranges() -> bool:
        return await asking._request_ranges(other.peer_id, [[author.public_key, 1, 3]]) is not None

    replies = [
        Target("p2p.gossip.pull_reply", replied(pull_taken), (Refused, FrameError), [{"msgs": [message]}]),
        Target("p2p.membership.hello_reply", replied(lambda: asking_membership._hello(author.peer_id)),
               (Refused, FrameError), [hello]),
        Target("credits.replication.heads_reply", replied(exchange), (Refused, FrameError),
               [{"h": heads["h"], "x": heads["x"]}]),
        Target("credits.replication.range_reply", replied(request_ranges), (Refused, FrameError),
               [{"e": [[entry.encode()]]}]),
    ]

    def gossip_validator(check: Callable[[GossipMessage], bool]) -> Callable[[bytes], bool]:
        def decode(data: bytes) -> bool:
            return check(GossipMessage(b"\x00" * 32, "credits/entry", author.peer_id, 1, node.now(),
                                       framing.decode(data), other.peer_id))
        return decode

    return [
        Target("p2p.gossip.push", lambda d: gossip._on_push(other.peer_id, framing.decode(d)), (P2PError,), [message]),
        Target("p2p.gossip.pull", lambda d: gossip._on_pull(other.peer_id, framing.decode(d)), (P2PError,), [pull]),
        Target("p2p.membership.hello", lambda d: membership._on_hello(author.peer_id, framing.decode(d)), (P2PError,),
               [hello]),
        Target("credits.replication.heads", lambda d: replicator._on_heads(other.peer_id, framing.decode(d)),
               (P2PError,), [heads]),
        Target("credits.replication.range", lambda d: replicator._on_range(other.peer_id, framing.decode(d)),
               (P2PError,), [ranges]),
        Target("credits.replication.entry_message", gossip_validator(replicator._valid_entry_message),
               (InvalidEntry, FrameError), [entry.encode()]),
        Target("credits.replication.fork_message", gossip_validator(replicator._valid_fork_message),
               (InvalidForkProof, FrameError), [_fork_proof(author, now_ms).to_list()]),
        billing_target(ledger, author),
        *replies,
    ]


def framing_target() -> Target:
    return Target("p2p.framing.decode", framing.decode, (FrameError,),
                  [{"t": "open", "model": "ab", "start": 0}, [1, 2.5, None, True, b"x", "y"], {"a": {"b": [1]}}])


async def all_targets(world: SimWorld, nursery: trio.Nursery) -> list[Target]:
    alice, bob, carol = Identity(b"\x01" * 32), Identity(b"\x02" * 32), Identity(b"\x04" * 32)
    return [framing_target(), frames_target(), tensor_target(), *key_file_targets(alice),
            *await network_targets(world, nursery, Identity(b"\x05" * 32), bob), *relay_targets(bob),
            *gate_targets(alice, bob),
            *dht_targets(alice, bob), *credit_targets(alice, bob), *ledger_targets(carol, bob),
            *announce_targets(alice), *pipeline_targets(bob, alice), *api_targets(), control_target()]


def baseline(n: int, rng: random.Random) -> float:
    """Plain msgpack.unpackb per second over the framing target's inputs: what strictness costs is a ratio of it."""
    inputs = FuzzInputs(rng, framing_target().seeds, pack)
    data = [inputs.next() for _ in range(n)]
    t0 = time.perf_counter()
    for d in data:
        try:
            msgpack.unpackb(d)
        except Exception:  # the baseline only times msgpack; what it refuses does not matter here
            pass
    return n / max(time.perf_counter() - t0, 1e-9)


async def run(n: int, seed: int, only: list[str] | None, hang_s: float, rss_mb: float) -> dict:
    out: dict[str, Any] = {"inputs_per_decoder": n, "seed": seed}
    async with SimWorld.open(seed=seed) as world:
        async with trio.open_nursery() as nursery:
            targets = await all_targets(world, nursery)
            if only:
                targets = [t for t in targets if any(o in t.name for o in only)]
            decoders: dict[str, dict] = {}
            t_framing = 0.0
            for i, target in enumerate(targets):
                t0 = time.perf_counter()
                report = await run_target(target, n, random.Random(seed * 1000 + i), hang_s, rss_mb)
                elapsed = time.perf_counter() - t0
                if target.name == "p2p.framing.decode":
                    t_framing = elapsed
                decoders[target.name] = dict(report.as_dict(), per_s=round(n / max(elapsed, 1e-9)))
                print(f"{target.name}: {n} inputs, {decoders[target.name]['crashes']} crashes, "
                      f"peak RSS {_peak_rss_mb():.0f} MB", file=sys.stderr)
            nursery.cancel_scope.cancel()
    out["decoders"] = decoders
    out["decoder_count"] = len(decoders)
    out["crashes_total"] = sum(d["crashes"] for d in decoders.values())
    base = baseline(min(n, 20_000), random.Random(seed))
    out["msgpack_unpack_per_s"] = round(base)
    if t_framing:
        out["framing_decode_vs_msgpack"] = round(n / t_framing / base, 3)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=None, help="inputs per decoder (default 100000; --quick: 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", help="run only the decoders whose name contains one of these")
    parser.add_argument("--hang-s", type=float, default=5.0,
                        help="an input that takes longer is a crash (a hang); inputs take micro- to milliseconds")
    parser.add_argument("--rss-mb", type=float, default=256.0, help="an input that grows peak RSS more is a crash")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="2,000 inputs per decoder: a smoke run (the test suite)")
    args = parser.parse_args(argv)
    n = args.n if args.n is not None else (2000 if args.quick else 100_000)
    result = trio.run(run, n, args.seed, args.only, args.hang_s, args.rss_mb)
    if args.json:
        print(json.dumps(result))
    else:
        for name, d in result["decoders"].items():
            print(f"{name:45s} {d['inputs']:7d} in, {d['rejected']:7d} refused, {d['accepted']:6d} accepted, "
                  f"{d['crashes']:4d} crashes, slowest {d['max_input_ms']:.1f} ms")
            for c in d["crash_examples"]:
                print(f"    {c['kind']} at {c['where']} x{c['count']}: {c['message'][:120]} input={c['input_hex'][:120]}")
        print(f"crashes: {result['crashes_total']}")


if __name__ == "__main__":
    main()
