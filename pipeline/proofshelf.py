"""Proofs too large for a dispute entry: the accuser keeps them and serves them to verifiers.

A dispute entry holds at most `MAX_PROOF_BYTES` of evidence; a proof's inputs grow with the session
and the model's hidden size (a single token of a 4096-wide model is 16 KiB). So a larger proof is
filed as a `DisputeClaim` (pipeline/proofs.py: the accused's signed step, and the sha256 and size of
the full proof) and the proof itself stays on the accuser's `ProofShelf`, served by request
(`/potluck/dispute-proof/1.0.0`: {"digest": 32 bytes} → {"proof": bytes | None}). A verifier checks the
claim's signature before it asks (a forged record costs it no transfer), fetches the proof only when it
holds the span (`fetch_proof`, bounded by `MAX_FETCHED_PROOF` and the claim's own size), and checks it
against the claim's digest. An accuser that does not serve its proof gets no verdict: the dispute
counts nothing. The shelf is bounded (`max_bytes` and `max_count`, oldest dropped first). A peer keeps
it in its data directory (`ProofShelf.open`: SQLite, `proofs.sqlite` beside the ledger's
`credits.sqlite`; each put is committed before the dispute entry naming it is signed), so a restarted
accuser still serves the proofs of the disputes it filed before; without a directory (tests,
benchmarks) it lives in memory. Requests read it in a worker thread, one at a time.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import Any

import trio

from p2p.errors import P2PError
from p2p.framing import expect_map, field
from p2p.network import Network, protocol_id

from .proofs import DIGEST_LEN, MAX_FETCHED_PROOF

PROOF_PROTOCOL = protocol_id("dispute-proof", "1.0.0")
DB_FILE = "proofs.sqlite"


class ProofShelf:
    """The proofs this peer filed claims for, by sha256; at most `max_bytes` and `max_count` of them
    (oldest dropped first), in SQLite at `path` (None: in memory)."""

    def __init__(self, path: str | Path | None = None, *, max_bytes: int = 256 * 1024 * 1024,
                 max_count: int = 4096):
        self.max_bytes = max_bytes
        self.max_count = max_count
        self.db = sqlite3.connect(":memory:" if path is None else str(path), isolation_level=None,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS proofs (n INTEGER PRIMARY KEY AUTOINCREMENT, "
                        "digest BLOB NOT NULL UNIQUE, proof BLOB NOT NULL)")
        self._size, self._count = self.db.execute("SELECT COALESCE(SUM(LENGTH(proof)), 0), COUNT(*) FROM proofs").fetchone()
        self._reads = trio.CapacityLimiter(1)

    @classmethod
    def open(cls, data_dir: str | Path, **bounds: int) -> "ProofShelf":
        """The shelf kept in `data_dir` (made if missing)."""
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        return cls(Path(data_dir) / DB_FILE, **bounds)

    def put(self, proof: bytes) -> bytes:
        """Keep `proof` (committed when this returns); its digest (what the claim names)."""
        digest = hashlib.sha256(proof).digest()
        if self.db.execute("INSERT OR IGNORE INTO proofs (digest, proof) VALUES (?, ?)", (digest, proof)).rowcount:
            self._size += len(proof)
            self._count += 1
        while (self._size > self.max_bytes or self._count > self.max_count) and self._count > 1:
            n, size = self.db.execute("SELECT n, LENGTH(proof) FROM proofs ORDER BY n LIMIT 1").fetchone()
            self.db.execute("DELETE FROM proofs WHERE n = ?", (n,))
            self._size -= size
            self._count -= 1
        return digest

    def get(self, digest: bytes) -> bytes | None:
        row = self.db.execute("SELECT proof FROM proofs WHERE digest = ?", (digest,)).fetchone()
        return None if row is None else bytes(row[0])

    def close(self) -> None:
        self.db.close()

    def serve_on(self, network: Network) -> None:
        network.set_request_handler(PROOF_PROTOCOL, self._on_request)

    async def _on_request(self, peer_id: str, body: Any) -> dict:
        m = expect_map(body, "proof request")
        digest = field(m, "digest", bytes, max_len=DIGEST_LEN)
        return {"proof": await trio.to_thread.run_sync(self.get, digest, limiter=self._reads)}


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
