"""One entry of a peer's append-only credit log, and its canonical binary encoding.

An entry is (author, seq, prev, timestamp, kind, body, signature):

- `author`: the 32-byte Ed25519 public key of the peer whose chain this is (its peer id embeds it).
- `seq`: 1, 2, 3, … with no gaps; `prev`: the hash of entry seq-1 (32 zero bytes at seq 1).
- `timestamp`: milliseconds since the epoch by the author's clock, non-decreasing along a chain.
- `kind`: one of `KINDS`; `body`: bytes, the msgpack of a kind-specific list (see `credits.ledger`).
- `signature`: Ed25519 by `author` over the *header*:
  msgpack([DOMAIN, author, seq, prev, timestamp, kind, sha256(body)]) — a fixed-order list, never a
  map and never JSON, so there is exactly one encoding to sign. The header names the body by its
  hash, so a fork proof (two headers + signatures) stays small whatever the bodies hold.
- The entry's `hash` is sha256(header). Two entries with the same (author, seq) and different hashes,
  both validly signed, are a fork: the author signed two different histories.

On the wire and on disk an entry is the msgpack of [author, seq, prev, timestamp, kind, body,
signature]. `LogEntry.decode` reads that from untrusted bytes and checks every size and type before
anything else looks at it; it raises `InvalidEntry` with the reason and nothing else.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import msgpack
import nacl.exceptions
import nacl.signing

from p2p.framing import brief
from p2p.identity import Identity, peer_id_from_public_key

from .errors import InvalidEntry

DOMAIN = "potluck/credit-entry/1"
KINDS = ("grant", "earn", "spend", "dispute", "fork")
ZERO_HASH = b"\0" * 32
KEY_LEN = 32
HASH_LEN = 32
SIG_LEN = 64
MAX_BODY = 16 * 1024
MAX_ENTRY_BYTES = MAX_BODY + 256  # the wire encoding of one entry, body included
MAX_INT = 2**63 - 1


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _header(author: bytes, seq: int, prev: bytes, timestamp: int, kind: str, body_hash: bytes) -> bytes:
    return msgpack.packb([DOMAIN, author, seq, prev, timestamp, kind, body_hash], use_bin_type=True)


# --- signature checks, memoised ---------------------------------------------------------------------
# Verifying is a pure function of (key, message, signature); an entry's hash covers its key and
# message, so (hash, signature) names one check. Peers meet the same entry many times (several
# peers offer it, a simulation runs thousands of peers in one process): each distinct check runs
# once. Only successes are remembered, and the cache is bounded.
_VERIFIED: "OrderedDict[tuple[bytes, bytes], None]" = OrderedDict()
_VERIFIED_MAX = 1 << 17


def verify_signature(public_key: bytes, message: bytes, signature: bytes, *, memo_key: bytes | None = None) -> bool:
    """True when `signature` is `public_key`'s Ed25519 signature of `message`."""
    key = (memo_key, signature) if memo_key is not None else None
    if key is not None and key in _VERIFIED:
        return True
    if len(public_key) != KEY_LEN or len(signature) != SIG_LEN:
        return False
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError, TypeError):
        return False
    if key is not None:
        _VERIFIED[key] = None
        if len(_VERIFIED) > _VERIFIED_MAX:
            _VERIFIED.popitem(last=False)
    return True


def clear_signature_cache() -> None:
    _VERIFIED.clear()


class _Headed:
    """What an entry and a body-less signed header share: the signed header bytes and the hash."""

    # the signed fields, which each subclass has
    author: bytes
    seq: int
    prev: bytes
    timestamp: int
    kind: str
    if TYPE_CHECKING:  # a field of SignedHeader; Entry computes it from the body
        @property
        def body_hash(self) -> bytes: ...

    @cached_property
    def header(self) -> bytes:
        return _header(self.author, self.seq, self.prev, self.timestamp, self.kind, self.body_hash)

    @cached_property
    def hash(self) -> bytes:
        return sha256(self.header)


@dataclass(frozen=True)
class LogEntry(_Headed):
    """One signed entry of an author's append-only credit log (see the module docstring)."""

    author: bytes
    seq: int
    prev: bytes
    timestamp: int
    kind: str
    body: bytes
    signature: bytes

    # --- making one -------------------------------------------------------------------------------

    @classmethod
    def create(cls, identity: Identity, seq: int, prev: bytes, timestamp: int, kind: str, body: bytes) -> "LogEntry":
        """Sign a new entry. The arguments are checked like a decoded entry's."""
        _check_fields(identity.public_key, seq, prev, timestamp, kind, body)
        header = _header(identity.public_key, seq, prev, timestamp, kind, sha256(body))
        return cls(identity.public_key, seq, prev, timestamp, kind, body, identity.sign(header))

    # --- reading one from the wire ------------------------------------------------------------------

    @classmethod
    def decode(cls, data: Any) -> "LogEntry":
        """Strictly decode untrusted bytes into a LogEntry (signature NOT yet checked: call `verify`)."""
        if not isinstance(data, (bytes, bytearray)):
            raise InvalidEntry(f"an entry is msgpack bytes, got {type(data).__name__}")
        if len(data) > MAX_ENTRY_BYTES:
            raise InvalidEntry(f"entry of {len(data)} bytes exceeds the limit of {MAX_ENTRY_BYTES}")
        try:
            obj = msgpack.unpackb(bytes(data), raw=False, use_list=True, strict_map_key=True,
                                  max_ext_len=0, max_map_len=0, max_array_len=8,
                                  max_bin_len=MAX_BODY, max_str_len=64)
        except msgpack.ExtraData:
            raise InvalidEntry("entry has trailing bytes after its msgpack") from None
        except (ValueError, msgpack.UnpackException, UnicodeDecodeError, TypeError, OverflowError) as e:
            raise InvalidEntry(f"entry is not valid msgpack: {type(e).__name__}: {e}"[:200]) from None
        return cls.from_list(obj)

    @classmethod
    def from_list(cls, obj: Any) -> "LogEntry":
        if not isinstance(obj, list) or len(obj) != 7:
            raise InvalidEntry("an entry is a list of 7 fields [author, seq, prev, timestamp, kind, body, signature]")
        author, seq, prev, timestamp, kind, body, signature = obj
        _check_fields(author, seq, prev, timestamp, kind, body)
        if not isinstance(signature, bytes) or len(signature) != SIG_LEN:
            raise InvalidEntry("signature must be 64 bytes")
        return cls(author, seq, prev, timestamp, kind, body, signature)

    def encode(self) -> bytes:
        return msgpack.packb([self.author, self.seq, self.prev, self.timestamp, self.kind, self.body, self.signature],
                             use_bin_type=True)

    # --- derived ------------------------------------------------------------------------------------

    @cached_property
    def body_hash(self) -> bytes:
        return sha256(self.body)


    @property
    def author_id(self) -> str:
        return peer_id_from_public_key(self.author)

    def signed_header(self) -> "SignedHeader":
        return SignedHeader(self.author, self.seq, self.prev, self.timestamp, self.kind, self.body_hash, self.signature)

    def verify(self) -> None:
        """Raise InvalidEntry unless the author's signature over the header is valid."""
        if not verify_signature(self.author, self.header, self.signature, memo_key=self.hash):
            raise InvalidEntry(f"bad signature on entry {self.seq} of {self.author_id}")

    def __repr__(self) -> str:
        return f"LogEntry({self.author_id[-8:]}#{self.seq} {self.kind} {self.hash.hex()[:12]})"


def _check_fields(author: Any, seq: Any, prev: Any, timestamp: Any, kind: Any, body: Any) -> None:
    if not isinstance(author, bytes) or len(author) != KEY_LEN:
        raise InvalidEntry("author must be a 32-byte Ed25519 public key")
    if type(seq) is not int or not 1 <= seq <= MAX_INT:
        raise InvalidEntry("seq must be an integer >= 1")
    if not isinstance(prev, bytes) or len(prev) != HASH_LEN:
        raise InvalidEntry("prev must be a 32-byte hash")
    if seq == 1 and prev != ZERO_HASH:
        raise InvalidEntry("the first entry of a chain must have an all-zero prev hash")
    if seq > 1 and prev == ZERO_HASH:
        raise InvalidEntry(f"entry {seq} has an all-zero prev hash")
    if type(timestamp) is not int or not 0 <= timestamp <= MAX_INT:
        raise InvalidEntry("timestamp must be a non-negative integer (milliseconds)")
    if not isinstance(kind, str) or kind not in KINDS:
        raise InvalidEntry(f"kind must be one of {', '.join(KINDS)}, got {brief(kind)}")
    if not isinstance(body, bytes) or len(body) > MAX_BODY:
        raise InvalidEntry(f"body must be at most {MAX_BODY} bytes")


@dataclass(frozen=True)
class SignedHeader(_Headed):
    """An entry without its body: enough to check the signature and the hash (used in fork proofs)."""

    author: bytes
    seq: int
    prev: bytes
    timestamp: int
    kind: str
    body_hash: bytes
    signature: bytes

    @classmethod
    def from_list(cls, obj: Any) -> "SignedHeader":
        if not isinstance(obj, list) or len(obj) != 7:
            raise InvalidEntry("a signed header is a list of 7 fields")
        author, seq, prev, timestamp, kind, body_hash, signature = obj
        _check_fields(author, seq, prev, timestamp, kind, b"")
        if not isinstance(body_hash, bytes) or len(body_hash) != HASH_LEN:
            raise InvalidEntry("body hash must be 32 bytes")
        if not isinstance(signature, bytes) or len(signature) != SIG_LEN:
            raise InvalidEntry("signature must be 64 bytes")
        return cls(author, seq, prev, timestamp, kind, body_hash, signature)

    def to_list(self) -> list:
        return [self.author, self.seq, self.prev, self.timestamp, self.kind, self.body_hash, self.signature]


    def valid(self) -> bool:
        return verify_signature(self.author, self.header, self.signature, memo_key=self.hash)


@dataclass(frozen=True)
class ForkProof:
    """Two validly signed entries (headers suffice) by one author with the same seq and different
    hashes: the author signed two histories. Anyone can check it; nobody can forge it."""

    a: SignedHeader
    b: SignedHeader

    @classmethod
    def of(cls, x: SignedHeader, y: SignedHeader) -> "ForkProof":
        a, b = (x, y) if x.hash < y.hash else (y, x)  # one canonical order
        return cls(a, b)

    @property
    def author(self) -> bytes:
        return self.a.author

    @property
    def seq(self) -> int:
        return self.a.seq

    def check(self) -> None:
        from .errors import InvalidForkProof

        if self.a.author != self.b.author or self.a.seq != self.b.seq:
            raise InvalidForkProof("a fork proof needs two entries of one author at one seq")
        if self.a.hash == self.b.hash:
            raise InvalidForkProof("a fork proof needs two different entries")
        if not (self.a.valid() and self.b.valid()):
            raise InvalidForkProof("an entry of the fork proof is not signed by its author")

    def to_list(self) -> list:
        return [self.a.to_list(), self.b.to_list()]

    @classmethod
    def from_list(cls, obj: Any) -> "ForkProof":
        from .errors import InvalidForkProof

        if not isinstance(obj, list) or len(obj) != 2:
            raise InvalidForkProof("a fork proof is a list of two signed headers")
        try:
            return cls.of(SignedHeader.from_list(obj[0]), SignedHeader.from_list(obj[1]))
        except InvalidEntry as e:
            raise InvalidForkProof(f"fork proof: {e}") from None

    def encode(self) -> bytes:
        return msgpack.packb(self.to_list(), use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> "ForkProof":
        from .errors import InvalidForkProof

        try:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=True, max_ext_len=0, max_map_len=0,
                                  max_array_len=8, max_bin_len=64, max_str_len=64)
        except Exception as e:
            raise InvalidForkProof(f"fork proof is not valid msgpack: {type(e).__name__}") from None
        return cls.from_list(obj)
