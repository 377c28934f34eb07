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

`RecordStore` is one node's storage, with caps on keys and subkeys per key so a flood cannot
exhaust memory.
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

    def register(self, namespace: str, validator: Validator) -> None:
        self.by_namespace[namespace] = validator

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


class RecordStore:
    """A node's local records. `put` validates; `get` drops what has expired."""

    def __init__(self, validators: Validators | None = None, *, max_keys: int = 100_000, max_subkeys: int = 1024):
        self.validators = validators or Validators()
        self.max_keys = max_keys
        self.max_subkeys = max_subkeys
        self._records: dict[str, dict[str, SignedValue]] = {}

    def __len__(self) -> int:
        return len(self._records)

    def keys(self) -> list[str]:
        return list(self._records)

    def put(self, entry: SignedValue, now: float) -> bool:
        """Validate and merge one entry. True when it is now the stored entry for its subkey;
        False when an existing entry wins. Raises InvalidRecord for an invalid entry or a full store."""
        self.validators.check(entry, now)
        record = self._records.get(entry.key)
        if record is None:
            if len(self._records) >= self.max_keys:
                self.prune(now)
                if len(self._records) >= self.max_keys:
                    raise InvalidRecord("store is full")
            record = self._records[entry.key] = {}
        current = record.get(entry.subkey)
        if current is None:
            if len(record) >= self.max_subkeys:
                self._prune_record(entry.key, now)
                if len(record) >= self.max_subkeys:
                    raise InvalidRecord("record has too many subkeys")
            record[entry.subkey] = entry
            return True
        if current == entry:
            return True
        chosen = self.validators.select(current, entry)
        record[entry.subkey] = chosen
        return chosen is entry

    def get(self, key: str, now: float) -> dict[str, SignedValue]:
        self._prune_record(key, now)
        return dict(self._records.get(key, {}))

    def _prune_record(self, key: str, now: float) -> None:
        record = self._records.get(key)
        if record is None:
            return
        for subkey in [s for s, e in record.items() if e.expires <= now]:
            del record[subkey]
        if not record:
            del self._records[key]

    def prune(self, now: float) -> int:
        before = sum(len(r) for r in self._records.values())
        for key in list(self._records):
            self._prune_record(key, now)
        return before - sum(len(r) for r in self._records.values())

    def items(self) -> list[tuple[str, dict[str, SignedValue]]]:
        return [(k, dict(v)) for k, v in self._records.items()]


def merge(validators: Validators, *records: dict[str, SignedValue]) -> dict[str, SignedValue]:
    """Union of already-validated records, keeping the selected entry per subkey."""
    out: dict[str, SignedValue] = {}
    for record in records:
        for subkey, entry in record.items():
            current = out.get(subkey)
            out[subkey] = entry if current is None else validators.select(current, entry)
    return out
