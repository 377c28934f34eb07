"""What a hostile stranger sends, shared by the hostile tests (tests/test_*_hostile.py) and the attack
bench (bench/attack.py): frames that decode into millions of objects, a corpus of malformed frames,
raw sessions that skip a Network's own framing, idle sockets (slowloris), and pipeline messages.
"""

from __future__ import annotations

import struct

import trio
from libp2p.peer.id import ID

from p2p import framing
from p2p.gossip import _SIGNING_DOMAIN
from p2p.identity import Identity
from p2p.libp2p import Libp2pNetwork
from p2p.libp2p.network import LIBP2P_PROTOCOL


def empty_arrays_body(size: int) -> bytes:
    """A valid msgpack body of `size` bytes: an array of (size - 5) empty arrays."""
    return b"\xdd" + struct.pack(">I", size - 5) + b"\x90" * (size - 5)


def nested_empty_arrays_body(size: int) -> bytes:
    """A valid msgpack body: arrays of 65535 empty arrays each, so no single container is long."""
    inner = b"\xdc\xff\xff" + b"\x90" * 0xFFFF
    n = size // len(inner)
    return b"\xdd" + struct.pack(">I", n) + inner * n


def as_frame(body: bytes) -> bytes:
    """`body` with the 4-byte length prefix every frame of the wire carries."""
    return struct.pack(">I", len(body)) + body


def object_bomb_frame() -> bytes:
    """The largest frame a peer reads (16 MiB), decoding into 16 million empty lists unless bounded."""
    return as_frame(nested_empty_arrays_body(framing.DEFAULT_MAX_FRAME))


def malformed_frames() -> dict[str, bytes]:
    """Frames no decoder may fall over on, by name: each is written whole on a fresh raw session."""
    return {
        "longer_than_max": struct.pack(">I", framing.DEFAULT_MAX_FRAME + 1) + b"\x90" * 64,
        "empty": as_frame(b""),
        "reserved_byte": as_frame(b"\xc1"),
        "truncated_map": as_frame(b"\x83\xa1a\x01"),
        "trailing_bytes": as_frame(framing.encode({"a": 1}) + b"\x00\x00"),
        "deep_nesting": as_frame(b"\x91" * 100_000 + b"\xc0"),
        "huge_map_header": as_frame(b"\xdf\xff\xff\xff\xff"),
        "huge_array_header": as_frame(b"\xdd\xff\xff\xff\xff"),
        "huge_str_header": as_frame(b"\xdb\xff\xff\xff\xff" + b"x" * 16),
        "huge_bin_header": as_frame(b"\xc6\xff\xff\xff\xff" + b"x" * 16),
        "ext_type": as_frame(b"\xd4\x01\x00"),
        "timestamp_ext": as_frame(b"\xd6\xff\x00\x00\x00\x00"),
        "non_string_keys": as_frame(b"\x81\x90\x01"),
        "not_a_map": as_frame(framing.encode([1, 2, 3])),
        "unknown_fields": as_frame(framing.encode({"zz": b"x" * 1000, "n": -1})),
        "invalid_utf8": as_frame(b"\xa2\xff\xfe"),
        "many_small_maps": as_frame(b"\xdd\x00\x01\x00\x00" + b"\x80" * 65536),
    }


async def raw_session(attacker: Libp2pNetwork, peer_id: str):
    """A request session to `peer_id` whose frames the caller writes itself (`session.raw.write`) and
    reads with `framing.read_frame(session.reader.read_exactly)`: past the gate, but not through the
    Network's own encoder. The attacker must be connected to the peer."""
    raw = await attacker._host.new_stream(ID.from_base58(peer_id), [LIBP2P_PROTOCOL])
    return await attacker._handshake_as_dialer(peer_id, raw)


async def open_idle_sockets(port: int, n: int, source: str) -> list:
    """`n` TCP connections to 127.0.0.1:`port` from `source` that never say anything (slowloris)."""
    sockets = []
    for _ in range(n):
        sock = trio.socket.socket()
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
        sockets.append(sock)
    return sockets


def open_msg(model_id: str, start: int, end: int, max_length: int = 8, dtype: str = "float32") -> dict:
    """A pipeline session's "open" message."""
    return {"t": "open", "model": model_id, "start": start, "end": end, "max_length": max_length, "dtype": dtype}


def signed_gossip(author: Identity, topic: str, data: object, *, seq: int, now: float) -> dict:
    """A gossip message in `author`'s name, as its push carries it: one connection can send the
    messages of any number of (fresh, free) identities."""
    body = framing.encode({"topic": topic, "author": author.peer_id, "seq": seq, "ts": now, "data": data})
    return {"b": body, "s": author.sign(_SIGNING_DOMAIN + body)}
