"""Server announcements in the DHT: who serves which blocks of which model, how fast, with how much cache.

One record per model, key `pipeline/<model id>`, one entry per server (subkey = its peer id, so
only that server can write it: records are signed by their owner, dht/records.py). A client reads
the whole swarm of a model in one lookup. The value (`ServerInfo.to_value`):

    {"v": 1, "state": "online"|"offline", "start": a, "end": b, "decode_tps": f, "prefill_tps": f,
     "cache_tokens": n, "dtype": "float32", "version": "0.1.0", "addrs": [multiaddr, ...] (optional, []),
     "clusters": {"1": label, ...}, "t": announce time, "reliability": r in [0, 1] (optional, 1.0),
     "started": when this server (process) started serving (optional, 0),
     "model_name": the model folder's name, "num_blocks": n, "context_length": n (each optional, None),
     "batch_decode_tps": f (optional, None), "batch_size": n (optional, 1), "sessions": n (optional, 0),
     "grid": {"load": L, "carbon": C, "renewable": R, "timestamp": t} (optional, None),
     "supersedes": the model id this model is a new version of (optional, None),
     "tier": name, "tier_milli": m, "flops_per_s": f (each optional, None)}

`addrs` are where the server can be dialled, in the order to try them (its network's `announce_addrs`:
direct addresses reachable across the internet first, then those through its relays, then a LAN's): at
most `MAX_ANNOUNCED_ADDRS`, each printable ASCII of at most `MAX_ADDR_LEN` characters ending in
/p2p/<its own peer id> (a circuit address ends in …/p2p-circuit/p2p/<its id>), none twice. An
announcement naming another peer's address is refused whole, not trimmed: no honest server writes one
(`announced_addrs` builds ours within these bounds), and a client must never be aimed at someone else.
A client tries them in order, staggered (pipeline/hop.py `connect_announced`), only those its network may dial.

`reliability` is the server's own factor (pipeline/billing.py: from disputes in its ledger) — a
self-report: routing never believes it above what the client sees itself.
`started` tells a restart from a periodic re-announcement: a client lifts a fault ban on a server
whose announcement says it started after the ban (pipeline/routing.py).
`decode_tps` / `prefill_tps` are tokens per second through ONE block (a span of k blocks takes
k / decode_tps per decoded token), measured by the server at start. `cache_tokens` is how many
more tokens of KV cache (for its whole span) it can hold now. `batch_decode_tps` is the aggregate
decode tokens/s through one block when `batch_size` sessions step together (the server batches them,
pipeline/batching.py): its capacity, where `decode_tps` is what one stream sees (`capacity_tps`).
`sessions` is its load: the sessions it held when it announced (at most `MAX_ANNOUNCED_SESSIONS`);
routing counts the wait they cause (pipeline/routing.py `block_time`). Claiming more drives clients
away from it; claiming fewer earns it no more than claiming a higher `decode_tps` would.
A clean shutdown stores an "offline" entry over the online one (same TTL, later expiry, so it wins at every holder).

`grid` is the server's grid signal (pipeline/grid.py: from its `--grid-signal` file), signed with
the rest; routing with a green preference reads it while it is fresh.

`supersedes` is the servers' declaration that their model replaces an older id (pipeline/versions.py).

`tier` is the server's hardware tier (pipeline/tiers.py), `flops_per_s` the effective FLOP/s its start-up
measurement placed it by, and `tier_milli` the multiplier it prices at (thousandths; lower than its
tier's while quarantined after a change of tier). Signed with the rest, and still a self-report: a
client believes it only as far as the announced and its own measured speed bear it out (pipeline/routing.py).

`model_name`, `num_blocks` and `context_length` let a peer that has not loaded the model show it
(`ServerInfo.card`); announcements from before they existed decode with None.

Values arrive from the network: `ServerInfo.from_entry` checks every field and drops what is bad.

Gossip carries the same announcements for fast updates (`GOSSIP_TOPIC`, data `{"model": id,
"ttl": s, "info": value}`, signed by the server as gossip author): a client hears a new server, or
one going offline, at once instead of at its next DHT refresh. The DHT stays the source of truth
for peers that were not listening.

The swarm's model index: one more record, key `models` (`MODEL_INDEX_KEY`), one entry per server
(subkey = its peer id; the DHT's store limits bound a record's entries and each owner's share) whose
value is the `ModelCard` of the model it serves: `{"v": 1, "model": id, "model_name": name,
"num_blocks": n, "context_length": n|None}`. A peer that serves nothing reads it (`fetch_models`) to
list the models the swarm serves, then each model's announcements for its coverage.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from dht.records import InvalidRecord, SignedValue
from p2p.framing import brief

from .config import ModelConfig
from .directory import SwarmDirectory
from .grid import GridSignal
from .protocol import ANNOUNCE_NAMESPACE
from .tiers import MAX_MILLI, MIN_MILLI, TIER_NAMES

log = logging.getLogger(__name__)

VERSION = "0.1.0"
STATES = ("online", "offline", "joining")


GOSSIP_TOPIC = "pipeline/servers"
MAX_GOSSIP_TTL = 3600.0
MODEL_INDEX_KEY = "models"
MAX_MODEL_ID_LEN = 128
MAX_MODEL_NAME_LEN = 64  # a server announces its folder's name cut to this
MAX_NUM_BLOCKS = 1 << 16
MAX_CONTEXT_LENGTH = 1 << 30
MAX_BATCH_SIZE = 1 << 12
MAX_ANNOUNCED_SESSIONS = 1 << 16
MAX_ANNOUNCED_ADDRS = 4  # two relays' circuits and two direct addresses (IPv4, IPv6)
MAX_ADDR_LEN = 512


def announce_key(model_id: str) -> str:
    return f"{ANNOUNCE_NAMESPACE}/{model_id}"


def gossip_note(model_id: str, info: "ServerInfo", ttl: float) -> dict:
    return {"model": model_id, "ttl": ttl, "info": info.to_value()}


def from_gossip_note(author: str, data: Any, now: float) -> tuple[str, "ServerInfo"]:
    """(model id, announcement) from a gossip note by `author`; raises InvalidRecord if malformed."""
    if not isinstance(data, dict) or not isinstance(data.get("model"), str) or len(data["model"]) > MAX_MODEL_ID_LEN:
        raise InvalidRecord("a server note is a map naming its model")
    ttl = data.get("ttl")
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= MAX_GOSSIP_TTL:
        raise InvalidRecord("a server note's ttl must be in (0, 3600] seconds")
    return data["model"], ServerInfo.from_value(author, data.get("info"), expires=now + ttl)


def _check_model_name(name: Any) -> str:
    # Printable only: peers print it in terminals (`potluck status`) and the dashboard.
    if not isinstance(name, str) or not 0 < len(name) <= MAX_MODEL_NAME_LEN or not name.isprintable():
        raise InvalidRecord(f"a model name must be printable text of 1 to {MAX_MODEL_NAME_LEN} characters")
    return name


def _check_addrs(peer_id: str, addrs: Any) -> tuple[str, ...]:
    if not isinstance(addrs, (list, tuple)) or len(addrs) > MAX_ANNOUNCED_ADDRS:
        raise InvalidRecord(f"announcement addrs must be a list of at most {MAX_ANNOUNCED_ADDRS} addresses")
    for addr in addrs:
        if not isinstance(addr, str) or not _own_addr(peer_id, addr):
            raise InvalidRecord(f"announcement address {brief(addr)} is not a printable address of at most "
                                f"{MAX_ADDR_LEN} characters ending in /p2p/<the server's peer id>")
    if len(set(addrs)) != len(addrs):
        raise InvalidRecord("announcement addrs name an address twice")
    return tuple(addrs)


def _own_addr(peer_id: str, addr: str) -> bool:
    return len(addr) <= MAX_ADDR_LEN and addr.isascii() and addr.isprintable() and addr.endswith(f"/p2p/{peer_id}")


def announced_addrs(peer_id: str, addrs: list[str]) -> tuple[str, ...]:
    """The addresses a server announces from its network's `announce_addrs` (in that order): its own,
    within the bounds every peer checks (`from_value` refuses an announcement outside them)."""
    return tuple(a for a in dict.fromkeys(addrs) if _own_addr(peer_id, a))[:MAX_ANNOUNCED_ADDRS]


def _check_count(value: Any, what: str, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= hi:
        raise InvalidRecord(f"{what} must be an integer in [1, {hi}]")
    return value


@dataclass(frozen=True)
class ModelCard:
    """What a peer knows of a model without loading it: its id, and its name, number of blocks and
    context length as a server announced them (the id is checked against the weights only by loading)."""

    model_id: str
    name: str
    num_blocks: int
    context_length: int | None = None

    def to_value(self) -> dict:
        return {"v": 1, "model": self.model_id, "model_name": self.name, "num_blocks": self.num_blocks,
                "context_length": self.context_length}

    @classmethod
    def from_value(cls, value: Any) -> "ModelCard":
        """Parse a model index entry; raises InvalidRecord naming the bad field."""
        if not isinstance(value, dict) or value.get("v") != 1:
            raise InvalidRecord("a model index entry must be a map with v = 1")
        model_id = value.get("model")
        if not isinstance(model_id, str) or not 0 < len(model_id) <= MAX_MODEL_ID_LEN:
            raise InvalidRecord(f"a model index entry names a model id of at most {MAX_MODEL_ID_LEN} characters")
        context = value.get("context_length")
        return cls(model_id, _check_model_name(value.get("model_name")),
                   _check_count(value.get("num_blocks"), "num_blocks", MAX_NUM_BLOCKS),
                   None if context is None else _check_count(context, "context_length", MAX_CONTEXT_LENGTH))

    @classmethod
    def announced(cls, model_id: str, folder_name: str, config: ModelConfig) -> "ModelCard":
        """The card a server announces for its model folder: within the bounds every peer checks."""
        name = "".join(c if c.isprintable() else "?" for c in folder_name)[:MAX_MODEL_NAME_LEN] or "?"
        context = config.max_position_embeddings
        return cls(model_id, name, config.num_layers, context if 0 < context <= MAX_CONTEXT_LENGTH else None)

    def as_dict(self) -> dict:
        """The model card as `/v1/models`, `/api/status` and `potluck status` show it."""
        return {"name": self.name, "model_id": self.model_id, "num_blocks": self.num_blocks,
                "context_length": self.context_length}


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
    addrs: tuple[str, ...] = ()  # where to dial it, in the order to try them
    clusters: dict[str, str] = field(default_factory=dict)
    t: float = 0.0
    expires: float = math.inf
    reliability: float = 1.0
    started: float = 0.0
    model_name: str | None = None
    num_blocks: int | None = None
    context_length: int | None = None
    batch_decode_tps: float | None = None
    batch_size: int = 1
    sessions: int = 0  # its load: sessions it held at `t`
    grid: GridSignal | None = None
    supersedes: str | None = None  # the model id this one is a new version of
    tier: str | None = None
    tier_milli: int | None = None
    flops_per_s: float | None = None

    @property
    def capacity_tps(self) -> float:
        """Decode tokens/s through one block over all the sessions it serves at once (batched)."""
        return max(self.decode_tps, self.batch_decode_tps or 0.0)

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
                raise InvalidRecord(f"announcement field {name!r} is bad: {brief(x)}")
            return x

        def text(name: str, max_len: int, optional: bool = False) -> Any:
            x = value.get(name)
            if x is None and optional:
                return None
            if not isinstance(x, str) or len(x) > max_len:
                raise InvalidRecord(f"announcement field {name!r} must be a string of at most {max_len}")
            return x

        def optional(name: str, check: Callable[[Any], Any]) -> Any:
            return None if value.get(name) is None else check(value[name])

        def tier_name(x: Any) -> str:
            if x not in TIER_NAMES:
                raise InvalidRecord(f"announcement tier must be one of {', '.join(TIER_NAMES)}")
            return x

        announced_blocks = optional("num_blocks", lambda n: _check_count(n, "announcement num_blocks", MAX_NUM_BLOCKS))
        if num_blocks is not None and announced_blocks not in (None, num_blocks):
            raise InvalidRecord(f"announcement num_blocks {announced_blocks} disagrees with the model's {num_blocks}")
        limit = num_blocks or announced_blocks or MAX_NUM_BLOCKS
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
                   version=text("version", 32), addrs=_check_addrs(peer_id, value.get("addrs", [])), clusters=dict(clusters),
                   t=float(num("t", 0, 1e12)), expires=expires,
                   reliability=float(num("reliability", 0.0, 1.0)) if "reliability" in value else 1.0,
                   started=float(num("started", 0, 1e12)) if "started" in value else 0.0,
                   model_name=optional("model_name", _check_model_name), num_blocks=announced_blocks,
                   context_length=optional("context_length", lambda n: _check_count(
                       n, "announcement context_length", MAX_CONTEXT_LENGTH)),
                   batch_decode_tps=float(num("batch_decode_tps", 1e-6, 1e12)) if value.get("batch_decode_tps") is not None else None,
                   batch_size=num("batch_size", 1, MAX_BATCH_SIZE, int) if "batch_size" in value else 1,
                   sessions=num("sessions", 0, MAX_ANNOUNCED_SESSIONS, int) if "sessions" in value else 0,
                   grid=optional("grid", GridSignal.from_value),
                   supersedes=text("supersedes", MAX_MODEL_ID_LEN, optional=True),
                   tier=optional("tier", tier_name),
                   tier_milli=num("tier_milli", MIN_MILLI, MAX_MILLI, int) if value.get("tier_milli") is not None else None,
                   flops_per_s=float(num("flops_per_s", 1.0, 1e18)) if value.get("flops_per_s") is not None else None)

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

    def card(self, model_id: str) -> ModelCard | None:
        """The card of the model this server announces; None if the announcement does not say (an old one)."""
        if self.model_name is None or self.num_blocks is None:
            return None
        return ModelCard(model_id, self.model_name, self.num_blocks, self.context_length)


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


async def announce_model(dht: SwarmDirectory, card: ModelCard, ttl: float) -> int:
    """Store our entry in the swarm's model index; how many peers accepted it."""
    return await dht.store(MODEL_INDEX_KEY, card.to_value(), ttl=ttl, republish=False)


async def fetch_models(dht: SwarmDirectory, *, quorum: int = 3) -> list[tuple[ModelCard, float]]:
    """The models the swarm's servers list in the model index: per model id, its card (when servers
    disagree about it, the one most of them announce) and when the last of its entries expires."""
    entries = await dht.get(MODEL_INDEX_KEY, quorum=quorum)
    votes: dict[str, dict[ModelCard, int]] = {}
    expires: dict[str, float] = {}
    for entry in entries.values():
        if "/" in entry.subkey:  # one entry per server, under its bare peer id
            continue
        try:
            card = ModelCard.from_value(entry.value)
        except InvalidRecord as e:
            log.debug("dropped model index entry from %s: %s", entry.subkey[:20], e)
            continue
        cards = votes.setdefault(card.model_id, {})
        cards[card] = cards.get(card, 0) + 1
        expires[card.model_id] = max(expires.get(card.model_id, 0.0), entry.expires)
    return [(max(cards, key=lambda c: (cards[c], c.name)), expires[model_id]) for model_id, cards in votes.items()]
