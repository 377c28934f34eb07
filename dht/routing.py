"""k-buckets: who a node knows, organised by XOR distance.

One bucket per distance bit (256 flat buckets: bucket i holds contacts whose distance from us lies in
[2**i, 2**(i+1))), each at most k contacts ordered least- to most-recently seen, plus a replacement
cache of the most recently seen contacts that did not fit.

Eviction is Kademlia's: a full bucket never drops a live old contact for a new one. `add` returns
the least-recently-seen entry of a full bucket; the owner pings it, then calls `touch` (it answered:
it moves to the tail and the newcomer waits in the replacement cache) or `remove` (it did not: the
freshest replacement takes its place). Long-lived contacts are the likeliest to stay, and a flood of
new ids cannot push out peers that answer.

Nothing here does I/O; the node drives pings and refreshes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .ids import ID_BITS, bucket_index, node_id


@dataclass(slots=True)
class Contact:
    peer_id: str
    addr: str
    id: int = field(default=-1)

    def __post_init__(self) -> None:
        if self.id < 0:
            self.id = node_id(self.peer_id)


@dataclass(slots=True)
class KBucket:
    entries: "OrderedDict[str, Contact]" = field(default_factory=OrderedDict)
    replacements: "OrderedDict[str, Contact]" = field(default_factory=OrderedDict)
    last_touched: float = 0.0


class RoutingTable:
    def __init__(self, self_id: int, k: int = 20):
        self.self_id = self_id
        self.k = k
        self._buckets: dict[int, KBucket] = {}  # created on first use: most of the 256 stay empty
        self._where: dict[str, int] = {}

    def bucket(self, index: int) -> KBucket:
        b = self._buckets.get(index)
        if b is None:
            b = self._buckets[index] = KBucket()
        return b

    @property
    def buckets(self) -> list[KBucket]:
        """All 256 buckets in index order (empty ones are fresh objects)."""
        return [self._buckets.get(i) or KBucket() for i in range(ID_BITS)]

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, peer_id: str) -> bool:
        return peer_id in self._where

    def get(self, peer_id: str) -> Contact | None:
        index = self._where.get(peer_id)
        return None if index is None else self._buckets[index].entries.get(peer_id)

    def contacts(self) -> list[Contact]:
        return [c for _, b in sorted(self._buckets.items()) for c in b.entries.values()]

    def add(self, contact: Contact, now: float = 0.0) -> Contact | None:
        """Record that `contact` was seen. Returns the bucket's least-recently-seen contact when the
        bucket is full (ping it, then `touch` or `remove` it); None otherwise."""
        index = bucket_index(self.self_id, contact.id)
        if index < 0:
            return None
        bucket = self.bucket(index)
        bucket.last_touched = now
        known = bucket.entries.get(contact.peer_id)
        if known is not None:
            known.addr = contact.addr
            bucket.entries.move_to_end(contact.peer_id)
            return None
        if len(bucket.entries) < self.k:
            bucket.entries[contact.peer_id] = contact
            self._where[contact.peer_id] = index
            bucket.replacements.pop(contact.peer_id, None)
            return None
        bucket.replacements[contact.peer_id] = contact
        bucket.replacements.move_to_end(contact.peer_id)
        while len(bucket.replacements) > self.k:
            bucket.replacements.popitem(last=False)
        return next(iter(bucket.entries.values()))

    def touch(self, peer_id: str, now: float = 0.0) -> None:
        index = self._where.get(peer_id)
        if index is not None:
            bucket = self._buckets[index]
            bucket.entries.move_to_end(peer_id)
            bucket.last_touched = now

    def remove(self, peer_id: str) -> bool:
        """Drop a contact (it failed); the freshest replacement, if any, takes its place."""
        index = self._where.pop(peer_id, None)
        if index is None:
            for bucket in self._buckets.values():
                bucket.replacements.pop(peer_id, None)
            return False
        bucket = self._buckets[index]
        del bucket.entries[peer_id]
        if bucket.replacements:
            _, promoted = bucket.replacements.popitem(last=True)
            bucket.entries[promoted.peer_id] = promoted
            self._where[promoted.peer_id] = index
        return True

    def nearest(self, target: int, n: int, exclude: Callable[[Contact], bool] | None = None) -> list[Contact]:
        """The `n` known contacts closest to `target` by XOR, closest first.

        Walks buckets in distance order instead of sorting the whole table: the bucket the target
        falls in holds everything closer than 2**b, all lower buckets together lie in
        [2**b, 2**(b+1)), and each higher bucket i lies entirely in [2**i, 2**(i+1))."""
        b = bucket_index(self.self_id, target)
        picked: list[Contact] = []
        buckets = self._buckets

        def take(indices) -> None:
            for i in indices:
                bucket = buckets.get(i)
                if bucket is None:
                    continue
                if exclude is None:
                    picked.extend(bucket.entries.values())
                else:
                    picked.extend(c for c in bucket.entries.values() if not exclude(c))

        if b >= 0:
            take([b])
            if len(picked) < n:
                take([i for i in buckets if i < b])  # one distance band: all or nothing
        for i in sorted(i for i in buckets if i > b):
            if len(picked) >= n:
                break
            take([i])
        picked.sort(key=lambda c: c.id ^ target)
        return picked[:n]

    def stale_buckets(self, now: float, interval: float) -> list[int]:
        """Indices of buckets worth refreshing: not touched for `interval`, from the first bucket
        that holds anyone (closer buckets are empty because the id space there is empty)."""
        lowest = min((i for i, b in self._buckets.items() if b.entries), default=None)
        if lowest is None:
            return []
        out = []
        for i in range(lowest, ID_BITS):
            b = self._buckets.get(i)
            if now - (b.last_touched if b is not None else 0.0) >= interval:
                out.append(i)
        return out

    def bucket_sizes(self) -> dict[int, int]:
        return {i: len(b.entries) for i, b in sorted(self._buckets.items()) if b.entries}

    def extend(self, contacts: Iterable[Contact], now: float = 0.0) -> None:
        for c in contacts:
            self.add(c, now)
