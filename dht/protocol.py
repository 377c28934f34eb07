"""The wire protocol `/potluck/kad/1.0.0`: message shapes and their strict decoders.

Every request is a map {"op": OP, "i": INFO, ...}; every reply a map {"i": INFO, ...}.

INFO, piggybacked on every message (this is how Vivaldi and cluster labels spread):
    {"c": [x, y, height, error],                 the sender's Vivaldi coordinate (seconds)
     "l": [[level, landmark peer id, dist, age,   the sender's cluster label per level ≥ 1: its
            landmark coordinate], …],             distance (seconds) to the landmark, seconds since
                                                  the landmark vouched for it, and the landmark's
                                                  coordinate (see clusters.py)
     "a": multiaddr | nil}                        where to dial the sender; nil = client mode
                                                  (never enters routing tables)

Requests (target ids are 32 bytes; "lv"/"cl" name the cluster the lookup walks, level 0 / "" = global):
    ping        {}                                              → {}
    find_node   {"t": id, "lv": int, "cl": str}                 → {"n": [contact, …]}
    find_value  {"k": key, "lv": int, "cl": str}                → {"n": [contact, …], "e": [entry, …]}
    store       {"k": key, "e": [entry, …]}                     → {"ok": [bool, …]}

A contact is [peer id, multiaddr] or [peer id, multiaddr, coord]: the multiaddr must end in
/p2p/<peer id>, and the coordinate is the responder's latest knowledge (a hint, never trusted for
anything but RTT estimates). An entry is [subkey, value bytes, expires, signature] (see records.py).
A responder asked about a cluster it is not in answers with no contacts; the asker sees the label
mismatch in INFO.

The decoders check every field's type, size and range and raise FrameError with the reason; a
node answers a malformed request with BadRequest and drops a malformed reply.
"""

from __future__ import annotations

from dataclasses import dataclass, field as dfield
from typing import Any

from p2p.errors import FrameError
from p2p.framing import expect_map, field
from p2p.identity import public_key_from_peer_id
from p2p.network import protocol_id

from .clusters import Advert
from .records import MAX_KEY_LEN, InvalidRecord, SignedValue, entry_from_wire
from .vivaldi import Coord

PROTOCOL = protocol_id("kad", "1.0.0")
OPS = ("ping", "find_node", "find_value", "store")
MAX_CONTACTS = 40
MAX_ENTRIES = 256
MAX_ADDR_LEN = 256
MAX_PEER_ID_LEN = 64
MAX_LEVELS = 8
MAX_LEVEL = 15
MAX_LABEL_AGE = 86400.0

_valid_peer_ids: dict[str, bool] = {}


def valid_peer_id(peer_id: Any) -> bool:
    """Is this an Ed25519 peer id? (cached: decoding base58 is the costly part of a reply)"""
    if not isinstance(peer_id, str) or not 0 < len(peer_id) <= MAX_PEER_ID_LEN:
        return False
    ok = _valid_peer_ids.get(peer_id)
    if ok is None:
        try:
            public_key_from_peer_id(peer_id)
            ok = True
        except ValueError:
            ok = False
        if len(_valid_peer_ids) > 200_000:
            _valid_peer_ids.clear()
        _valid_peer_ids[peer_id] = ok
    return ok


@dataclass(slots=True)
class PeerInfo:
    coord: Coord
    labels: dict[int, Advert]
    addr: str | None

    def landmark(self, level: int) -> str:
        advert = self.labels.get(level)
        return "" if advert is None else advert.landmark


@dataclass(slots=True)
class WireContact:
    peer_id: str
    addr: str
    coord: Coord | None = None


@dataclass(slots=True)
class Request:
    op: str
    info: PeerInfo
    target: int = 0
    key: str = ""
    level: int = 0
    cluster: str = ""
    entries: list[SignedValue] = dfield(default_factory=list)


@dataclass(slots=True)
class Reply:
    info: PeerInfo
    contacts: list[WireContact] = dfield(default_factory=list)
    entries: list[SignedValue] = dfield(default_factory=list)
    stored: list[bool] = dfield(default_factory=list)


# --- encoding -------------------------------------------------------------------------------------


def encode_info(coord: Coord, labels_wire: list, addr: str | None) -> dict:
    return {"c": coord.wire(), "l": labels_wire, "a": addr}


def encode_contact(peer_id: str, addr: str, coord: Coord | None) -> list:
    return [peer_id, addr] if coord is None else [peer_id, addr, coord.wire()]


def target_bytes(target: int) -> bytes:
    return target.to_bytes(32, "big")


# --- decoding -------------------------------------------------------------------------------------


def _check_addr(addr: Any, peer_id: str, what: str) -> str:
    if not isinstance(addr, str) or len(addr) > MAX_ADDR_LEN:
        raise FrameError(f"{what} address must be a string of at most {MAX_ADDR_LEN} characters")
    if not addr.endswith("/p2p/" + peer_id):
        raise FrameError(f"{what} address must end in /p2p/<its peer id>")
    return addr


def _coord(item: Any, what: str) -> Coord:
    try:
        return Coord.from_wire(item)
    except ValueError as e:
        raise FrameError(f"{what}: {e}") from None


def decode_info(msg: dict, sender: str) -> PeerInfo:
    info = expect_map(field(msg, "i", dict), "info")
    coord = _coord(field(info, "c", list, max_len=4), "info coordinate")
    labels: dict[int, Advert] = {}
    for item in field(info, "l", list, max_len=MAX_LEVELS):
        if not isinstance(item, list) or len(item) != 5:
            raise FrameError("a cluster label is [level, landmark, dist, age, landmark coordinate]")
        level, landmark, dist, age, centre = item
        if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= MAX_LEVEL:
            raise FrameError(f"cluster level must be an integer in 1..{MAX_LEVEL}")
        if not valid_peer_id(landmark):
            raise FrameError("cluster landmark must be a peer id")
        if isinstance(dist, bool) or not isinstance(dist, (int, float)) or not 0 <= dist <= 60.0:
            raise FrameError("landmark distance must be a number of seconds in [0, 60]")
        if isinstance(age, bool) or not isinstance(age, (int, float)) or not 0 <= age <= MAX_LABEL_AGE:
            raise FrameError(f"label age must be a number of seconds in [0, {MAX_LABEL_AGE:.0f}]")
        labels[level] = Advert(landmark, float(dist), float(age), _coord(centre, "landmark coordinate"))
    addr = field(info, "a", str, optional=True, max_len=MAX_ADDR_LEN)
    if addr is not None:
        _check_addr(addr, sender, "sender")
    return PeerInfo(coord, labels, addr)


def _level_cluster(msg: dict) -> tuple[int, str]:
    level = field(msg, "lv", int)
    if not 0 <= level <= MAX_LEVEL:
        raise FrameError(f"level must be in 0..{MAX_LEVEL}")
    cluster = field(msg, "cl", str, max_len=MAX_PEER_ID_LEN)
    if (level == 0) != (cluster == ""):
        raise FrameError("level 0 has no cluster label; other levels need one")
    return level, cluster


def _key(msg: dict) -> str:
    key = field(msg, "k", str, max_len=MAX_KEY_LEN)
    if not key:
        raise FrameError("key must not be empty")
    return key


def _entries(msg: dict, key: str) -> list[SignedValue]:
    out = []
    for item in field(msg, "e", list, max_len=MAX_ENTRIES):
        try:
            out.append(entry_from_wire(key, item))
        except InvalidRecord as e:
            raise FrameError(f"bad entry: {e}") from None
    return out


def decode_request(sender: str, body: Any) -> Request:
    """Shape-check a request; raises FrameError with the reason."""
    msg = expect_map(body, "request")
    op = field(msg, "op", str, max_len=16)
    if op not in OPS:
        raise FrameError(f"unknown op {op[:16]!r}")
    info = decode_info(msg, sender)
    req = Request(op, info)
    if op == "find_node":
        target = field(msg, "t", bytes, max_len=32)
        if len(target) != 32:
            raise FrameError("target id must be 32 bytes")
        req.target = int.from_bytes(target, "big")
        req.level, req.cluster = _level_cluster(msg)
    elif op == "find_value":
        req.key = _key(msg)
        req.level, req.cluster = _level_cluster(msg)
    elif op == "store":
        req.key = _key(msg)
        req.entries = _entries(msg, req.key)
    return req


def decode_contacts(msg: dict) -> list[WireContact]:
    out = []
    for item in field(msg, "n", list, max_len=MAX_CONTACTS):
        if not isinstance(item, list) or len(item) not in (2, 3):
            raise FrameError("a contact is [peer id, address] or [peer id, address, coord]")
        peer_id = item[0]
        if not valid_peer_id(peer_id):
            raise FrameError("contact peer id is not an Ed25519 peer id")
        addr = _check_addr(item[1], peer_id, "contact")
        coord = _coord(item[2], "contact coordinate") if len(item) == 3 else None
        out.append(WireContact(peer_id, addr, coord))
    return out


def decode_reply(op: str, sender: str, body: Any, key: str = "") -> Reply:
    """Shape-check the reply to an `op` request (`key` for find_value); raises FrameError."""
    msg = expect_map(body, "reply")
    reply = Reply(decode_info(msg, sender))
    if op in ("find_node", "find_value"):
        reply.contacts = decode_contacts(msg)
    if op == "find_value":
        reply.entries = _entries(msg, key)
    if op == "store":
        stored = field(msg, "ok", list, max_len=MAX_ENTRIES)
        if not all(isinstance(x, bool) for x in stored):
            raise FrameError("store acknowledgements must be booleans")
        reply.stored = stored
    return reply
