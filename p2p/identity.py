"""Ed25519 identities with libp2p-compatible peer ids.

A peer id is base58btc(identity-multihash(protobuf PublicKey{Ed25519, key})), the "12D3KooW…" form
that libp2p uses, so the same key names the peer on the wire and in our signed records.
"""

from __future__ import annotations

import os
from functools import cached_property
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.signing

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_PROTOBUF_ED25519_PREFIX = b"\x08\x01\x12\x20"  # PublicKey{Type: Ed25519, Data: <32 bytes>}
_IDENTITY_MULTIHASH_PREFIX = b"\x00\x24"  # identity hash, 36-byte digest
KEY_FILE = "identity.key"
KEY_SIZE = 32  # an identity key file holds the Ed25519 seed and nothing else


class IdentityKeyError(ValueError):
    """An identity key file is not a potluck identity key."""


def b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58[r])
    pad = len(data) - len(data.lstrip(b"\0"))
    return "1" * pad + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    n = 0
    for ch in text:
        i = _B58.find(ch)
        if i < 0:
            raise ValueError(f"not base58: {text[:60]!r}")
        n = n * 58 + i
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    pad = len(text) - len(text.lstrip("1"))
    return b"\0" * pad + body


def peer_id_from_public_key(public_key: bytes) -> str:
    if len(public_key) != 32:
        raise ValueError("an Ed25519 public key has 32 bytes")
    return b58encode(_IDENTITY_MULTIHASH_PREFIX + _PROTOBUF_ED25519_PREFIX + public_key)


def public_key_from_peer_id(peer_id: str) -> bytes:
    """The Ed25519 key a peer id embeds; raises ValueError for anything that is not such an id."""
    if not isinstance(peer_id, str) or len(peer_id) > 64:
        raise ValueError("a peer id is a short base58 string")
    raw = b58decode(peer_id)
    prefix = _IDENTITY_MULTIHASH_PREFIX + _PROTOBUF_ED25519_PREFIX
    if len(raw) != len(prefix) + 32 or not raw.startswith(prefix):
        raise ValueError(f"not an Ed25519 peer id: {peer_id[:60]!r}")
    return raw[len(prefix):]


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True when `signature` is a valid Ed25519 signature of `message` by `public_key`."""
    if not isinstance(signature, bytes) or len(signature) != 64 or len(public_key) != 32:
        return False
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
        return True
    except (nacl.exceptions.BadSignatureError, ValueError):
        return False


def verify_by_peer(peer_id: str, message: bytes, signature: bytes) -> bool:
    try:
        key = public_key_from_peer_id(peer_id)
    except ValueError:
        return False
    return verify(key, message, signature)


@dataclass(frozen=True)
class Identity:
    """A peer's key pair. `seed` is the 32-byte Ed25519 private seed."""

    seed: bytes

    @classmethod
    def generate(cls) -> "Identity":
        return cls(os.urandom(32))

    @classmethod
    def load_or_create(cls, data_dir: Path | str) -> "Identity":
        """Read the key from `data_dir`, creating it (mode 0600) on first run."""
        path = Path(data_dir) / KEY_FILE
        if path.exists():
            with open(path, "rb") as f:
                return cls.from_key_file(f.read(KEY_SIZE + 1), str(path))  # a longer file is refused unread
        path.parent.mkdir(parents=True, exist_ok=True)
        identity = cls.generate()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(identity.seed)
        return identity

    @classmethod
    def from_key_file(cls, raw: bytes, source: str) -> "Identity":
        """The identity whose seed is `raw`, a key file's bytes; IdentityKeyError if it is not one."""
        if len(raw) != KEY_SIZE:
            raise IdentityKeyError(f"{source} is not a potluck identity key (expected {KEY_SIZE} bytes); "
                                   "move it away to make a new one")
        return cls(raw)

    @cached_property
    def _signing_key(self) -> nacl.signing.SigningKey:
        return nacl.signing.SigningKey(self.seed)

    @cached_property
    def public_key(self) -> bytes:
        return bytes(self._signing_key.verify_key)

    @cached_property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self._signing_key.sign(message).signature
