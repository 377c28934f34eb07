"""256-bit DHT ids, XOR distance, and the optional identity puzzle.

A node's id is sha256 of its peer id (the "12D3KooW…" string, utf-8), so the id is bound to the
Ed25519 public key that the peer id embeds (S/Kademlia): nobody can choose where in the id space
they land without grinding keys. A key's id is sha256 of the key string. Distance is XOR.

Optional crypto-puzzle (S/Kademlia's static puzzle, off by default): an identity is admitted only
when sha256(b"potluck-puzzle\\0" + public key) starts with `difficulty` zero bits. It makes every
identity cost about 2**difficulty hash-and-keygen attempts, so flooding the table with Sybils or
grinding ids next to a key gets expensive, while checking costs one hash.
"""

from __future__ import annotations

import hashlib
import random
from functools import lru_cache

from p2p.identity import Identity, public_key_from_peer_id

ID_BITS = 256
ID_BYTES = ID_BITS // 8
MAX_ID = (1 << ID_BITS) - 1


@lru_cache(maxsize=1 << 17)
def node_id(peer_id: str) -> int:
    """The 256-bit DHT id of a peer: sha256 of its peer id string."""
    return int.from_bytes(hashlib.sha256(peer_id.encode()).digest(), "big")


def key_id(key: str) -> int:
    """The 256-bit DHT id a key is stored under."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest(), "big")


def distance(a: int, b: int) -> int:
    return a ^ b


def bucket_index(self_id: int, other_id: int) -> int:
    """Index of the k-bucket `other_id` falls in: floor(log2(distance)), or -1 for the id itself."""
    return (self_id ^ other_id).bit_length() - 1


def random_id_in_bucket(self_id: int, index: int, rng: random.Random | None = None) -> int:
    """A uniformly random id whose distance from `self_id` lies in [2**index, 2**(index+1))."""
    low = (rng or random).getrandbits(index) if index > 0 else 0
    return self_id ^ ((1 << index) | low)


# --- optional identity puzzle ---------------------------------------------------------------------


def _puzzle_bits(public_key: bytes) -> int:
    digest = hashlib.sha256(b"potluck-puzzle\0" + public_key).digest()
    value = int.from_bytes(digest, "big")
    return ID_BITS - value.bit_length()


def puzzle_ok(peer_id: str, difficulty: int) -> bool:
    """True when the peer's key solves the puzzle at `difficulty` (always true for difficulty 0)."""
    if difficulty <= 0:
        return True
    try:
        key = public_key_from_peer_id(peer_id)
    except ValueError:
        return False
    return _puzzle_bits(key) >= difficulty


def solve_puzzle(difficulty: int, max_tries: int = 1 << 24) -> Identity:
    """Generate identities until one solves the puzzle (about 2**difficulty tries)."""
    for _ in range(max_tries):
        identity = Identity.generate()
        if difficulty <= 0 or _puzzle_bits(identity.public_key) >= difficulty:
            return identity
    raise RuntimeError(f"no identity solved the puzzle at difficulty {difficulty} in {max_tries} tries")
