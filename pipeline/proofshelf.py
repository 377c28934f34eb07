"""Proofs too large for a dispute entry: the accuser keeps them and serves them to verifiers.

A dispute entry holds at most `MAX_PROOF_BYTES` of evidence; a proof's inputs grow with the session
and the model's hidden size (a single token of a 4096-wide model is 16 KiB). So a larger proof is
filed as a `DisputeClaim` (pipeline/proofs.py: the accused's signed step, and the sha256 and size of
the full proof) and the proof itself stays on the accuser's `ProofShelf`, served by request
(`/potluck/dispute-proof/1.0.0`: {"digest": 32 bytes} → {"proof": bytes | None}). A verifier checks the
claim's signature before it asks (a forged record costs it no transfer), fetches the proof only when it
holds the span (`fetch_proof`, bounded by `MAX_FETCHED_PROOF` and the claim's own size), and checks it
against the claim's digest. An accuser that does not serve its proof gets no verdict: the dispute
counts nothing. The shelf is bounded (`max_bytes`, oldest dropped first) and lives in memory: a
restart forgets it, and the accuser's disputes filed before count nothing at peers that had not
fetched them yet.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import trio

from p2p.errors import P2PError
from p2p.framing import expect_map, field
from p2p.network import Network, protocol_id

from .proofs import DIGEST_LEN, MAX_FETCHED_PROOF

PROOF_PROTOCOL = protocol_id("dispute-proof", "1.0.0")


class ProofShelf:
    """The proofs this peer filed claims for, by sha256; at most `max_bytes` of them (oldest dropped first)."""

    def __init__(self, max_bytes: int = 256 * 1024 * 1024):
        self.max_bytes = max_bytes
        self._proofs: OrderedDict[bytes, bytes] = OrderedDict()
        self._size = 0

    def put(self, proof: bytes) -> bytes:
        """Keep `proof`; its digest (what the claim names)."""
        digest = hashlib.sha256(proof).digest()
        if digest not in self._proofs:
            self._proofs[digest] = proof
            self._size += len(proof)
        while self._size > self.max_bytes and len(self._proofs) > 1:
            _, dropped = self._proofs.popitem(last=False)
            self._size -= len(dropped)
        return digest

    def get(self, digest: bytes) -> bytes | None:
        return self._proofs.get(digest)

    def serve_on(self, network: Network) -> None:
        network.set_request_handler(PROOF_PROTOCOL, self._on_request)

    async def _on_request(self, peer_id: str, body: Any) -> dict:
        m = expect_map(body, "proof request")
        digest = field(m, "digest", bytes, max_len=DIGEST_LEN)
        return {"proof": self.get(digest)}


async def fetch_proof(network: Network, peer_id: str, digest: bytes, size: int, *, timeout: float = 30.0) -> bytes | None:
    """The proof `digest` from `peer_id`'s shelf, if it serves one of `size` bytes that hashes to it; else None."""
    if size > MAX_FETCHED_PROOF:
        return None
    try:
        with trio.fail_after(timeout):
            reply = await network.request(peer_id, PROOF_PROTOCOL, {"digest": digest}, timeout=timeout)
    except (P2PError, trio.TooSlowError):
        return None
    proof = reply.get("proof") if isinstance(reply, dict) else None
    if not isinstance(proof, bytes) or len(proof) != size or hashlib.sha256(proof).digest() != digest:
        return None
    return proof
