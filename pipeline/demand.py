"""Demand: how many requests each model gets, as peers saw them, shared by gossip.

A peer counts the requests its own front doors take (the HTTP API, the control socket: `saw`) per
model over the last `window` seconds and publishes them on the gossip topic `TOPIC` — at once after a
quiet spell, then every `interval` while the window holds any —
as a `DemandNote` `{"v": 1, "window": s, "counts": {model id: n}}` — signed by the gossip layer
(the author is the requester), rate-limited per author like every topic (p2p/gossip.py
`GossipQuotas`). Only the latest note of each author counts, while it is younger than `note_ttl`.

What strangers can buy (a key costs nothing, so demand is capped on the reading side):
- each author's count of a model is capped at `per_author` requests;
- authors without standing in this peer's own view (credits.standing; a fresh key has none) share one
  pool per model, also capped at `per_author`: any number of Sybil keys weigh at most what one
  requester does, while authors with standing (their work reached us) each count up to the cap;
- our own requests count as an author with standing.
So a flood of fresh keys can make a model nobody uses look as wanted as one stranger's requests, never
more; demand from peers with standing outweighs it as soon as two of them ask.

Bounded and typed: a note names at most `MAX_MODELS` models (ids of at most `MAX_MODEL_ID_LEN`
characters), counts are integers in [0, `MAX_COUNT`], the window in (0, `MAX_WINDOW`]; the book keeps
the notes of at most `max_trusted` authors with standing and, apart, of at most `max_strangers` authors
without (each the least recently heard dropped, so fresh keys only ever push out one another, never an
author with standing), and our own counts at most `MAX_COUNT` requests a model, of at most `MAX_MODELS`
models.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Protocol

import trio

from p2p.errors import FrameError
from p2p.gossip import GossipMessage, OnMessage, Validator
from p2p.identity import public_key_from_peer_id

from .announce import MAX_MODEL_ID_LEN

log = logging.getLogger(__name__)

TOPIC = "pipeline/demand/1"
MAX_MODELS = 16  # models one note names
MAX_COUNT = 1 << 16  # requests one note says it saw of one model
MAX_WINDOW = 3600.0  # seconds a note's counts may span


class InvalidDemandNote(FrameError):
    """A demand note that is malformed or out of bounds."""


@dataclass(frozen=True)
class DemandNote:
    window: float  # the seconds the counts span (the author's recent past)
    counts: Mapping[str, int]  # model id → requests seen

    def to_value(self) -> dict:
        return {"v": 1, "window": self.window, "counts": dict(self.counts)}

    @classmethod
    def from_value(cls, value: Any) -> "DemandNote":
        """A checked note; raises InvalidDemandNote naming what is wrong."""
        if not isinstance(value, dict) or value.get("v") != 1:
            raise InvalidDemandNote("a demand note is a map with v = 1")
        window = value.get("window")
        if isinstance(window, bool) or not isinstance(window, (int, float)) or not 0 < window <= MAX_WINDOW:
            raise InvalidDemandNote(f"a demand note's window must be in (0, {MAX_WINDOW:g}] seconds")
        counts = value.get("counts")
        if not isinstance(counts, dict) or len(counts) > MAX_MODELS:
            raise InvalidDemandNote(f"a demand note's counts are a map of at most {MAX_MODELS} models")
        for model_id, n in counts.items():
            if not isinstance(model_id, str) or not 0 < len(model_id) <= MAX_MODEL_ID_LEN:
                raise InvalidDemandNote(f"a demand note names model ids of 1..{MAX_MODEL_ID_LEN} characters")
            if type(n) is not int or not 0 <= n <= MAX_COUNT:
                raise InvalidDemandNote(f"a demand note's counts are integers in [0, {MAX_COUNT}]")
        return cls(float(window), dict(counts))


class Publisher(Protocol):
    """What the book needs of gossip (p2p/gossip.py `Gossip`), structurally."""

    async def publish(self, topic: str, data: Any) -> bytes: ...

    def subscribe(self, topic: str, on_message: OnMessage, validator: Validator | None = None) -> None: ...


@dataclass
class _Heard:
    note: DemandNote
    at: float  # the note's gossip timestamp (the author's network time)


@dataclass
class DemandBook:
    """Our requests per model (to publish) and the latest note of each other author (to tally)."""

    me: str  # our peer id: our own notes come back by gossip and are not counted twice
    standing: Callable[[], Awaitable[Mapping[bytes, int]]]  # this peer's view (credits.StandingView.standings)
    now: Callable[[], float]  # network time (gossip timestamps are in it)
    window: float = 600.0  # seconds of our requests a note counts
    interval: float = 30.0  # seconds between our notes
    note_ttl: float = 120.0  # a note older than this no longer counts (its author stopped publishing)
    per_author: int = 64  # requests of a model one author (or all strangers together) counts for
    max_trusted: int = 1024  # authors with standing here whose notes are kept
    max_strangers: int = 256  # authors without standing whose notes are kept (apart: they never evict the others)
    _mine: dict[str, deque[float]] = field(default_factory=dict)  # model id → times of our requests
    # author → latest note, the least recently heard first: authors with standing when heard, and the others
    _trusted: OrderedDict[str, _Heard] = field(default_factory=OrderedDict)
    _strangers: OrderedDict[str, _Heard] = field(default_factory=OrderedDict)
    _asked: trio.Event = field(default_factory=trio.Event)  # set by a request: a quiet publisher wakes up
    stats: dict[str, int] = field(default_factory=lambda: {"published": 0, "heard": 0, "stale": 0})

    # --- our requests ---------------------------------------------------------------------------

    def saw(self, model_id: str) -> None:
        """A request for `model_id` came in at one of our front doors."""
        times = self._mine.get(model_id)
        if times is None:
            if len(self._mine) >= MAX_MODELS:
                return  # our front doors serve one model; more would be a bug, and a bound keeps it small
            times = self._mine[model_id] = deque(maxlen=MAX_COUNT)
        times.append(self.now())
        self._asked.set()

    def own_counts(self) -> dict[str, int]:
        """Our requests per model in the last `window` seconds (models with none left out)."""
        since = self.now() - self.window
        out = {}
        for model_id, times in list(self._mine.items()):
            while times and times[0] < since:
                times.popleft()
            if times:
                out[model_id] = len(times)
            else:
                del self._mine[model_id]
        return out

    async def publish(self, gossip: Publisher) -> bool:
        """Publish our counts if we saw any request in the window; whether a note went out."""
        counts = self.own_counts()
        if not counts:
            return False
        await gossip.publish(TOPIC, DemandNote(self.window, counts).to_value())
        self.stats["published"] += 1
        return True

    async def run(self, gossip: Publisher, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Take in others' notes; publish ours as soon as we see a request, then every `interval`
        seconds while our window holds any."""
        gossip.subscribe(TOPIC, self._on_message, validator=_valid)
        task_status.started()
        while True:
            self._asked = trio.Event()
            if await self.publish(gossip):
                await trio.sleep(self.interval)
            else:
                await self._asked.wait()

    # --- others' requests -----------------------------------------------------------------------

    async def _on_message(self, message: GossipMessage) -> None:
        await self.hear(message.author, DemandNote.from_value(message.data), message.timestamp)

    async def hear(self, author: str, note: DemandNote, at: float) -> bool:
        """Keep `note` as `author`'s latest (a checked one); whether it was newer than what we held."""
        if author == self.me:
            return False
        trusted = has_standing(await self.standing(), author)
        known = self._trusted.pop(author, None) or self._strangers.pop(author, None)
        shelf, bound = (self._trusted, self.max_trusted) if trusted else (self._strangers, self.max_strangers)
        if known is not None and known.at >= at:
            shelf[author] = known
            self.stats["stale"] += 1
            return False
        shelf[author] = _Heard(note, at)
        while len(shelf) > bound:
            shelf.popitem(last=False)
        self.stats["heard"] += 1
        return True

    async def demand(self) -> dict[str, int]:
        """Requests per model in the recent past, as this peer counts them: each author's capped at
        `per_author`, the authors without standing here together capped at `per_author` (see above)."""
        standings = await self.standing()
        since = self.now() - self.note_ttl
        out = {model_id: min(n, self.per_author) for model_id, n in self.own_counts().items()}
        strangers: dict[str, int] = {}
        for shelf in (self._trusted, self._strangers):
            for author, heard in list(shelf.items()):
                if heard.at < since:
                    del shelf[author]
                    continue
                trusted = has_standing(standings, author)  # as we see it now, whichever shelf it is on
                for model_id, n in heard.note.counts.items():
                    n = min(n, self.per_author)
                    if trusted:
                        out[model_id] = out.get(model_id, 0) + n
                    else:
                        strangers[model_id] = strangers.get(model_id, 0) + n
        for model_id, n in strangers.items():
            out[model_id] = out.get(model_id, 0) + min(n, self.per_author)
        return {model_id: n for model_id, n in out.items() if n > 0}


def has_standing(standings: Mapping[bytes, int], peer_id: str) -> bool:
    """Whether `peer_id` has standing in `standings` (a StandingView's table)."""
    try:
        return standings.get(public_key_from_peer_id(peer_id), 0) > 0
    except ValueError:  # not an Ed25519 peer id: nobody we have seen work from
        return False


def _valid(message: GossipMessage) -> bool:
    """Gossip validator: a well-formed note (else neither delivered nor forwarded)."""
    DemandNote.from_value(message.data)
    return True
