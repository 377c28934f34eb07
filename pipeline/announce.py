"""Server announcements in the DHT: who serves which blocks of which model, how fast, with how much cache.

One record per model, key `pipeline/<model id>`, one entry per server (subkey = its peer id, so
only that server can write it: records are signed by their owner, dht/records.py). A client reads
the whole swarm of a model in one lookup. The value (`ServerInfo.to_value`):

    {"v": 1, "state": "online"|"offline", "start": a, "end": b, "decode_tps": f, "prefill_tps": f,
     "cache_tokens": n, "dtype": "float32", "version": "0.1.0", "addr": multiaddr|None,
     "clusters": {"1": label, ...}, "t": announce time, "reliability": r in [0, 1] (optional, 1.0),
     "started": when this server (process) started serving (optional, 0)}

`reliability` is the server's own factor (pipeline/billing.py: from disputes in its ledger) — a
self-report: routing never believes it above what the client sees itself.
`started` tells a restart from a periodic re-announcement: a client lifts a fault ban on a server
whose announcement says it started after the ban (pipeline/routing.py).
`decode_tps` / `prefill_tps` are tokens per second through ONE block (a span of k blocks takes
k / decode_tps per decoded token), measured by the server at start. `cache_tokens` is how many
more tokens of KV cache (for its whole span) it can hold now. A clean shutdown stores an
"offline" entry over the online one (same TTL, later expiry, so it wins at every holder).

Values arrive from the network: `ServerInfo.from_entry` checks every field and drops what is bad.

Gossip carries the same announcements for fast updates (`GOSSIP_TOPIC`, data `{"model": id,
"ttl": s, "info": value}`, signed by the server as gossip author): a client hears a new server, or
one going offline, at once instead of at its next DHT refresh. The DHT stays the source of truth
for peers that were not listening.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from dht.records import InvalidRecord, SignedValue

from .directory import SwarmDirectory
from .protocol import ANNOUNCE_NAMESPACE

log = logging.getLogger(__name__)

VERSION = "0.1.0"
STATES = ("online", "offline", "joining")


GOSSIP_TOPIC = "pipeline/servers"
MAX_GOSSIP_TTL = 3600.0


def announce_key(model_id: str) -> str:
    return f"{ANNOUNCE_NAMESPACE}/{model_id}"


def gossip_note(model_id: str, info: "ServerInfo", ttl: float) -> dict:
    return {"model": model_id, "ttl": ttl, "info": info.to_value()}


def from_gossip_note(author: str, data: Any, now: float) -> tuple[str, "ServerInfo"]:
    """(model id, announcement) from a gossip note by `author`; raises InvalidRecord if malformed."""
    if not isinstance(data, dict) or not isinstance(data.get("model"), str) or len(data["model"]) > 128:
        raise InvalidRecord("a server note is a map naming its model")
    ttl = data.get("ttl")
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= MAX_GOSSIP_TTL:
        raise InvalidRecord("a server note's ttl must be in (0, 3600] seconds")
    return data["model"], ServerInfo.from_value(author, data.get("info"), expires=now + ttl)


@dataclass
class ServerInfo:
    peer_id: str
    start: int
    end: int
    decode_tps: float
    prefill_tps: float
    cache_tokens: int
    state: str = "online"
    dtype: str = "float32"
    version: str = VERSION
    addr: str | None = None
    clusters: dict[str, str] = field(default_factory=dict)
    t: float = 0.0
    expires: float = math.inf
    reliability: float = 1.0
    started: float = 0.0

    def to_value(self) -> dict:
        d = asdict(self)
        del d["peer_id"], d["expires"]
        d["v"] = 1
        return d

    @classmethod
    def from_value(cls, peer_id: str, value: Any, *, num_blocks: int | None = None,
                   expires: float = math.inf) -> "ServerInfo":
        """Parse a value from the DHT; raises InvalidRecord naming the bad field."""
        if not isinstance(value, dict) or value.get("v") != 1:
            raise InvalidRecord("announcement must be a map with v = 1")

        def num(name: str, lo: float, hi: float, kind=(int, float)) -> Any:
            x = value.get(name)
            if isinstance(x, bool) or not isinstance(x, kind) or not (lo <= x <= hi) or (isinstance(x, float) and not math.isfinite(x)):
                raise InvalidRecord(f"announcement field {name!r} is bad: {str(x)[:40]}")
            return x

        def text(name: str, max_len: int, optional: bool = False) -> Any:
            x = value.get(name)
            if x is None and optional:
                return None
            if not isinstance(x, str) or len(x) > max_len:
                raise InvalidRecord(f"announcement field {name!r} must be a string of at most {max_len}")
            return x

        limit = num_blocks if num_blocks is not None else 1 << 16
        start = num("start", 0, limit - 1, int)
        end = num("end", start + 1, limit, int)
        state = text("state", 16)
        if state not in STATES:
            raise InvalidRecord(f"announcement state {state!r} is unknown")
        clusters = value.get("clusters") or {}
        if not isinstance(clusters, dict) or len(clusters) > 8 or not all(
                isinstance(k, str) and isinstance(v, str) and len(k) < 8 and len(v) <= 128 for k, v in clusters.items()):
            raise InvalidRecord("announcement clusters must be a small map of strings")
        return cls(peer_id=peer_id, start=start, end=end,
                   decode_tps=float(num("decode_tps", 1e-6, 1e12)), prefill_tps=float(num("prefill_tps", 1e-6, 1e12)),
                   cache_tokens=num("cache_tokens", 0, 1 << 40, int), state=state, dtype=text("dtype", 16),
                   version=text("version", 32), addr=text("addr", 512, optional=True), clusters=dict(clusters),
                   t=float(num("t", 0, 1e12)), expires=expires,
                   reliability=float(num("reliability", 0.0, 1.0)) if "reliability" in value else 1.0,
                   started=float(num("started", 0, 1e12)) if "started" in value else 0.0)

    @classmethod
    def from_entry(cls, entry: SignedValue, *, num_blocks: int | None = None) -> "ServerInfo":
        if "/" in entry.subkey:
            raise InvalidRecord("announcements live under the bare peer id subkey")
        return cls.from_value(entry.owner, entry.value, num_blocks=num_blocks, expires=entry.expires)

    @property
    def online(self) -> bool:
        return self.state == "online"

    def covers(self, block: int) -> bool:
        return self.start <= block < self.end


class AnnouncementValidator:
    """DHT validator for the `pipeline/` namespace: refuses malformed announcements and keeps the
    newest announcement time per server (so an "offline" entry replaces the "online" one).
    Register it with `Validators.register(ANNOUNCE_NAMESPACE, AnnouncementValidator())`; without
    it the DHT's default (later expiry wins) gives the same result for our announcements."""

    def validate(self, entry: SignedValue) -> None:
        ServerInfo.from_entry(entry)

    def select(self, current: SignedValue, new: SignedValue) -> SignedValue:
        def key(e: SignedValue) -> tuple:
            t = e.value.get("t", 0) if isinstance(e.value, dict) else 0
            return (t if isinstance(t, (int, float)) else 0, e.expires, e.signature)

        return new if key(new) > key(current) else current


async def fetch_servers(dht: SwarmDirectory, model_id: str, *, num_blocks: int | None = None,
                        online_only: bool = True, quorum: int = 3) -> list[ServerInfo]:
    """Every valid announcement of `model_id` in the DHT (online ones unless told otherwise).
    `quorum` holders are heard (not just our own store, which may hold only part of the record:
    a peer that is also a server keeps the entries that were stored at it)."""
    entries = await dht.get(announce_key(model_id), quorum=quorum)
    out = []
    for entry in entries.values():
        try:
            info = ServerInfo.from_entry(entry, num_blocks=num_blocks)
        except (InvalidRecord, AttributeError, TypeError) as e:
            log.debug("dropped announcement from %s: %s", entry.subkey[:20], e)
            continue
        if info.online or not online_only:
            out.append(info)
    return sorted(out, key=lambda s: (s.start, s.end, s.peer_id))
