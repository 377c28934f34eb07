"""Signed records: key → {subkey → SignedValue}, each value signed by the peer that owns its subkey.

A record is one key (e.g. "blocks/SmolLM2/12") holding many entries (`SignedValue`s), one per
subkey. A subkey names its owner: it is the owner's peer id, optionally followed by "/suffix"
("12D3KooW…" or "12D3KooW…/gpu1"). An entry carries (subkey, value bytes, expires, signature) and is valid only when

- the signature verifies under the public key the subkey's peer id embeds, over a canonical binary
  encoding of (key, subkey, value, expires) — so nobody can write or overwrite another owner's
  subkey, and a holder cannot alter what it stores;
- it has not expired (`expires` is wall-clock seconds, `Network.now()`), and does not claim to live
  longer than `max_ttl` ahead (no immortal junk);
- sizes are within limits, and the key's namespace validator (if any) accepts the value.

Validators are per key namespace (the part of the key before the first "/"): `validate(entry)`
raises `InvalidRecord` for a value the namespace refuses; `select(current, new)` picks which of two
valid entries for one subkey to keep (default: the later expiry, ties broken by signature bytes so
every holder converges on the same choice). Signature, owner and expiry checks are not pluggable.

`RecordStore` is one node's storage, within `StoreLimits`: totals, a share per record owner and
per sending peer, and subkeys per owner in a record, so a flood cannot exhaust memory or lock
honest owners out; a refusal raises `StoreRefused` (an `InvalidRecord`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

import msgpack

from p2p import framing
from p2p.identity import Identity, verify_by_peer

MAX_KEY_LEN = 256
MAX_SUBKEY_LEN = 128
MAX_VALUE_BYTES = 16 * 1024
MAX_PEER_ID_LEN = 64
DEFAULT_MAX_TTL = 24 * 3600.0
_DOMAIN = b"potluck-dht-record/1\0"


class InvalidRecord(ValueError):
    """An entry failed validation; the message says why."""


def owner_of(subkey: str) -> str:
    """The peer id a subkey belongs to."""
    return subkey.split("/", 1)[0]


def namespace_of(key: str) -> str:
    return key.split("/", 1)[0]


def signing_bytes(key: str, subkey: str, value: bytes, expires: float) -> bytes:
    return _DOMAIN + msgpack.packb([key, subkey, value, float(expires)], use_bin_type=True)


@dataclass(frozen=True)
class SignedValue:
    """One subkey's entry in a record: a value its owner signed for (key, subkey) until `expires`."""

    key: str
    subkey: str
    raw: bytes  # the signed value bytes (msgpack of the caller's value)
    expires: float
    signature: bytes

    @property
    def owner(self) -> str:
        return owner_of(self.subkey)

    @cached_property
    def value(self) -> Any:
        """The decoded value (msgpack), as the owner stored it."""
        return framing.decode(self.raw)

    def wire(self) -> list:
        return [self.subkey, self.raw, self.expires, self.signature]

    @classmethod
    def create(cls, identity: Identity, key: str, value: Any, expires: float, suffix: str = "") -> "SignedValue":
        """Encode and sign `value` under the identity's own subkey (peer id, or peer id/suffix)."""
        subkey = identity.peer_id + (f"/{suffix}" if suffix else "")
        raw = framing.encode(value, MAX_VALUE_BYTES)
        signature = identity.sign(signing_bytes(key, subkey, raw, expires))
        return cls(key, subkey, raw, float(expires), signature)


def entry_from_wire(key: str, item: Any) -> SignedValue:
    """Shape-check one wire entry [subkey, value, expires, signature]; signature is checked later."""
    if not isinstance(item, list) or len(item) != 4:
        raise InvalidRecord("an entry is a list [subkey, value, expires, signature]")
    subkey, raw, expires, signature = item
    if not isinstance(subkey, str) or not 0 < len(subkey) <= MAX_SUBKEY_LEN:
        raise InvalidRecord("entry subkey must be a non-empty string of at most 128 characters")
    if not isinstance(raw, bytes) or len(raw) > MAX_VALUE_BYTES:
        raise InvalidRecord(f"entry value must be bytes of at most {MAX_VALUE_BYTES}")
    if isinstance(expires, bool) or not isinstance(expires, (int, float)) or not math.isfinite(expires):
        raise InvalidRecord("entry expires must be a finite number")
    if not isinstance(signature, bytes) or len(signature) != 64:
        raise InvalidRecord("entry signature must be 64 bytes")
    return SignedValue(key, subkey, raw, float(expires), signature)


class Validator(Protocol):
    def validate(self, entry: SignedValue) -> None: ...

    def select(self, current: SignedValue, new: SignedValue) -> SignedValue: ...


class DefaultValidator:
    """Accepts any value; keeps the entry that expires later."""

    def validate(self, entry: SignedValue) -> None:
        return None

    def select(self, current: SignedValue, new: SignedValue) -> SignedValue:
        if (new.expires, new.signature) > (current.expires, current.signature):
            return new
        return current


@dataclass
class Validators:
    """Validators by key namespace, with a default for the rest; also the core checks."""

    by_namespace: dict[str, Validator] = field(default_factory=dict)
    default: Validator = field(default_factory=DefaultValidator)
    max_ttl: float = DEFAULT_MAX_TTL
    max_entries: dict[str, int] = field(default_factory=dict)  # namespace -> entries one record holds

    def register(self, namespace: str, validator: Validator, max_entries: int | None = None) -> None:
        """`max_entries`: a smaller cap than `StoreLimits.max_subkeys` on each record of the namespace."""
        self.by_namespace[namespace] = validator
        if max_entries is not None:
            self.max_entries[namespace] = max_entries

    def for_key(self, key: str) -> Validator:
        return self.by_namespace.get(namespace_of(key), self.default)

    def check(self, entry: SignedValue, now: float) -> None:
        """Raise InvalidRecord unless the entry is signed by its subkey's owner, current, and valid."""
        if not entry.key or len(entry.key) > MAX_KEY_LEN:
            raise InvalidRecord("key must be a non-empty string of at most 256 characters")
        owner = entry.owner
        if not owner or len(owner) > MAX_PEER_ID_LEN:
            raise InvalidRecord("subkey does not start with a peer id")
        if entry.expires <= now:
            raise InvalidRecord("entry has expired")
        if entry.expires > now + self.max_ttl:
            raise InvalidRecord(f"entry expires more than {self.max_ttl:.0f} s ahead")
        if not verify_by_peer(owner, signing_bytes(entry.key, entry.subkey, entry.raw, entry.expires), entry.signature):
            raise InvalidRecord(f"bad signature: subkey {entry.subkey[:60]!r} is not signed by its owner")
        try:
            entry.value
        except framing.FrameError as e:
            raise InvalidRecord(f"value is not msgpack: {e}") from None
        self.for_key(entry.key).validate(entry)

    def select(self, current: SignedValue, new: SignedValue) -> SignedValue:
        return self.for_key(new.key).select(current, new)


class StoreRefused(InvalidRecord):
    """A valid entry this node will not store: a quota is full (the message names which)."""


@dataclass(frozen=True)
class StoreLimits:
    """What one node stores for others, sized for a volunteer's machine: at most `max_bytes` of
    entries (a value is at most 16 KiB) in `max_values` entries. One owner, and one sending peer,
    may fill only a small share, so neither one identity nor one connection can fill the store; an
    announcement is a few hundred bytes and a server writes one per model, so honest owners stay far
    below their share. The node's own writes (`sender=None`) count per owner but not per sender."""

    max_values: int = 50_000
    max_bytes: int = 64 * 1024 * 1024
    max_subkeys: int = 1024  # entries per record
    owner_subkeys: int = 8  # entries one owner may hold in one record (its peer id plus suffixes)
    owner_values: int = 256  # entries of one owner over all records
    owner_bytes: int = 1024 * 1024
    sender_values: int = 2048  # entries a peer sent (the last sender of each) over all records
    sender_bytes: int = 8 * 1024 * 1024


def entry_bytes(entry: SignedValue) -> int:
    """What an entry costs the store, for quotas: its value, subkey and key."""
    return len(entry.raw) + len(entry.subkey) + len(entry.key)


@dataclass(slots=True)
class _Usage:
    values: int = 0
    bytes: int = 0

    def add(self, values: int, size: int) -> None:
        self.values += values
        self.bytes += size


class RecordStore:
    """A node's local records. `put` validates and enforces `StoreLimits`; `get` drops what has expired.

    When a record is full, a new subkey may take the place of the entry that arrived last among those
    of the owners holding the most entries in that record, if its own owner holds fewer: the record
    is shared out by owner, so squatting many subkeys cannot lock a new owner out, and entries held
    longest stay (as Kademlia keeps its oldest contacts), so a flood of fresh identities, whatever
    their TTL, churns among itself instead of pushing out the servers that were there before it."""

    def __init__(self, validators: Validators | None = None, limits: StoreLimits | None = None):
        self.validators = validators or Validators()
        self.limits = limits or StoreLimits()
        self._records: dict[str, dict[str, SignedValue]] = {}
        self._senders: dict[tuple[str, str], str] = {}  # (key, subkey) -> peer that sent the held entry
        self._arrival: dict[tuple[str, str], int] = {}  # (key, subkey) -> when it first came (a count; kept on updates)
        self._arrivals = 0
        self._total = _Usage()
        self._by_owner: dict[str, _Usage] = {}
        self._by_sender: dict[str, _Usage] = {}
        self._next_prune = -math.inf

    def __len__(self) -> int:
        return len(self._records)

    def keys(self) -> list[str]:
        return list(self._records)

    def usage(self) -> tuple[int, int]:
        """(entries, bytes) held in all records."""
        return self._total.values, self._total.bytes

    def put(self, entry: SignedValue, now: float, sender: str | None = None) -> bool:
        """Validate and merge one entry sent by `sender` (None: this node itself). True when it is now
        the stored entry for its subkey; False when an existing entry wins. Raises InvalidRecord for
        an invalid entry, StoreRefused when a limit refuses it."""
        self.validators.check(entry, now)
        current = self._records.get(entry.key, {}).get(entry.subkey)
        if current is not None:
            if current == entry:
                return True
            if self.validators.select(current, entry) is current:
                return False
        try:
            self._check_room(entry, sender, current)
        except StoreRefused:
            if now < self._next_prune:
                raise
            self._next_prune = now + 1.0  # expired entries count until pruned: prune, once a second at most
            self.prune(now)
            self._check_room(entry, sender, current)
        arrival = self._arrival.get((entry.key, entry.subkey))
        if current is None:
            self._make_room(entry, now)
        else:
            self._drop(entry.key, entry.subkey)
        self._hold(entry, sender)
        if arrival is None:
            self._arrivals += 1
            arrival = self._arrivals
        self._arrival[(entry.key, entry.subkey)] = arrival
        return True

    def _check_room(self, entry: SignedValue, sender: str | None, replacing: SignedValue | None) -> None:
        """Raise StoreRefused if holding `entry` (instead of `replacing`) exceeds the store's totals or
        its owner's or sender's share."""
        limits, size = self.limits, entry_bytes(entry)
        new, old_size = (1, 0) if replacing is None else (0, entry_bytes(replacing))
        if self._total.values + new > limits.max_values or self._total.bytes - old_size + size > limits.max_bytes:
            raise StoreRefused(f"this node's store is full ({limits.max_values} entries, {limits.max_bytes} bytes)")
        owner = self._by_owner.get(entry.owner, _Usage())
        if owner.values + new > limits.owner_values or owner.bytes - old_size + size > limits.owner_bytes:
            raise StoreRefused(f"owner {entry.owner[-12:]} has its share of this node's store "
                               f"({limits.owner_values} entries, {limits.owner_bytes} bytes)")
        if sender is None:
            return
        if replacing is not None and self._senders.get((entry.key, entry.subkey)) == sender:
            values, size_after = 0, size - old_size
        else:
            values, size_after = 1, size
        usage = self._by_sender.get(sender, _Usage())
        if usage.values + values > limits.sender_values or usage.bytes + size_after > limits.sender_bytes:
            raise StoreRefused(f"peer {sender[-12:]} has sent its share of this node's store "
                               f"({limits.sender_values} entries, {limits.sender_bytes} bytes)")

    def _make_room(self, entry: SignedValue, now: float) -> None:
        """Before a new subkey joins its record: enforce the per-owner share and the record's size."""
        record = self._records.get(entry.key)
        if record is None:
            return
        self._prune_record(entry.key, now)
        counts: dict[str, int] = {}
        for held in record.values():
            counts[held.owner] = counts.get(held.owner, 0) + 1
        mine = counts.get(entry.owner, 0)
        if mine >= self.limits.owner_subkeys:
            raise StoreRefused(f"owner {entry.owner[-12:]} holds {mine} subkeys of {entry.key[:60]!r}, its limit")
        cap = min(self.limits.max_subkeys, self.validators.max_entries.get(namespace_of(entry.key), self.limits.max_subkeys))
        if len(record) < cap:
            return
        most = max(counts.values())
        if mine >= most:
            raise StoreRefused(f"record {entry.key[:60]!r} is full and no owner there holds more subkeys than this one")
        victim = max((e for e in record.values() if counts[e.owner] == most),
                     key=lambda e: self._arrival[(e.key, e.subkey)])
        self._drop(entry.key, victim.subkey)

    def _hold(self, entry: SignedValue, sender: str | None) -> None:
        size = entry_bytes(entry)
        self._records.setdefault(entry.key, {})[entry.subkey] = entry
        self._total.add(1, size)
        self._by_owner.setdefault(entry.owner, _Usage()).add(1, size)
        if sender is not None:
            self._senders[(entry.key, entry.subkey)] = sender
            self._by_sender.setdefault(sender, _Usage()).add(1, size)

    def _drop(self, key: str, subkey: str) -> None:
        record = self._records[key]
        entry = record.pop(subkey)
        if not record:
            del self._records[key]
        size = entry_bytes(entry)
        self._total.add(-1, -size)
        _release(self._by_owner, entry.owner, size)
        self._arrival.pop((key, subkey), None)
        sender = self._senders.pop((key, subkey), None)
        if sender is not None:
            _release(self._by_sender, sender, size)

    def get(self, key: str, now: float) -> dict[str, SignedValue]:
        """The record's current entries, those held longest first (a reply carries only the first
        `protocol.MAX_ENTRIES`: a flood of newcomers cannot crowd out the entries that were there before)."""
        self._prune_record(key, now)
        record = self._records.get(key, {})
        return {subkey: record[subkey] for subkey in sorted(record, key=lambda s: self._arrival[(key, s)])}

    def _prune_record(self, key: str, now: float) -> None:
        record = self._records.get(key)
        if record is None:
            return
        for subkey in [s for s, e in record.items() if e.expires <= now]:
            self._drop(key, subkey)

    def prune(self, now: float) -> int:
        before = self._total.values
        for key in list(self._records):
            self._prune_record(key, now)
        return before - self._total.values

    def items(self) -> list[tuple[str, dict[str, SignedValue]]]:
        return [(k, dict(v)) for k, v in self._records.items()]


def _release(usages: dict[str, _Usage], who: str, size: int) -> None:
    usage = usages[who]
    usage.add(-1, -size)
    if usage.values == 0:
        del usages[who]


def merge(validators: Validators, *records: dict[str, SignedValue]) -> dict[str, SignedValue]:
    """Union of already-validated records, keeping the selected entry per subkey."""
    out: dict[str, SignedValue] = {}
    for record in records:
        for subkey, entry in record.items():
            current = out.get(subkey)
            out[subkey] = entry if current is None else validators.select(current, entry)
    return out
