"""SQLite storage of verified chains: this peer's own, and every other peer's as far as verified.

One database file (`credits.sqlite` in the data dir), WAL mode, `synchronous=FULL`: a commit has
reached the disk (the WAL is fsynced) before `commit()` returns, so whatever the caller acknowledges
after a commit survives SIGKILL and power loss. Every change is one transaction that moves the
chain tables and their derived tables (heads, transfers, grants) together, so a crash leaves either
all of an append (or of a pulled range) or none of it — never a broken chain.

The store itself is synchronous and checks only chain *structure* as a last line of defence (seq
continuity, prev-hash links, inside the write transaction). Signatures and the rules of each kind are
checked by `credits.ledger.Ledger`, which is the only writer. Threading: the connection is made
with `check_same_thread=False`; the Ledger guarantees one caller at a time (a trio CapacityLimiter of
1 around every call, whether it runs inline or in a worker thread).
"""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Collection, Iterator

from .entry import ZERO_HASH, LogEntry
from .errors import InvalidEntry

DB_FILE = "credits.sqlite"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    author BLOB NOT NULL, seq INTEGER NOT NULL, hash BLOB NOT NULL, kind TEXT NOT NULL,
    ts INTEGER NOT NULL, wire BLOB NOT NULL,
    PRIMARY KEY (author, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS heads (
    author BLOB PRIMARY KEY, seq INTEGER NOT NULL, hash BLOB NOT NULL, ts INTEGER NOT NULL) WITHOUT ROWID;
-- one row per earn entry: the receipt it carries (server = the entry's author)
CREATE TABLE IF NOT EXISTS transfers (
    server BLOB NOT NULL, client BLOB NOT NULL, session BLOB NOT NULL, counter INTEGER NOT NULL,
    seq INTEGER NOT NULL, flops INTEGER NOT NULL, model TEXT NOT NULL,
    PRIMARY KEY (server, client, session, counter)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS transfers_client ON transfers (client);
-- one row per spend entry (the client's own record; not part of the balance fold)
CREATE TABLE IF NOT EXISTS spends (
    client BLOB NOT NULL, server BLOB NOT NULL, session BLOB NOT NULL, counter INTEGER NOT NULL,
    seq INTEGER NOT NULL, flops INTEGER NOT NULL,
    PRIMARY KEY (client, server, session, counter)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS grants (
    author BLOB NOT NULL, seq INTEGER NOT NULL, recipient BLOB NOT NULL, amount INTEGER NOT NULL,
    PRIMARY KEY (author, seq)) WITHOUT ROWID;
-- the lowest-seq fork proof known per author
CREATE TABLE IF NOT EXISTS forks (author BLOB PRIMARY KEY, seq INTEGER NOT NULL, proof BLOB NOT NULL) WITHOUT ROWID;
-- this peer's own verdicts on disputes (seq: of the dispute in the accuser's chain; 0: a check of its
-- own with no entry): lie=1, the accused is a proven liar; lie=0, the accusation was false; lie=-1, this
-- peer could not judge it (it does not hold the span). Not replicated: each peer judges for itself.
CREATE TABLE IF NOT EXISTS verdicts (
    accuser BLOB NOT NULL, seq INTEGER NOT NULL, accused BLOB NOT NULL, lie INTEGER NOT NULL,
    PRIMARY KEY (accuser, seq, accused)) WITHOUT ROWID;
"""


class Store:
    def __init__(self, path: str | Path | None = None, *, durable: bool = True):
        """`path`: a data dir (the file is DB_FILE in it), a file path ending in .sqlite, or None for
        an in-memory database (simulations, benchmarks). `durable=False` skips fsync (tests only)."""
        if path is None:
            target = ":memory:"
        else:
            p = Path(path)
            if p.suffix not in (".sqlite", ".db"):
                p.mkdir(parents=True, exist_ok=True)
                p = p / DB_FILE
            else:
                p.parent.mkdir(parents=True, exist_ok=True)
            target = str(p)
        self.path = None if path is None else Path(target)
        self.db = sqlite3.connect(target, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={'FULL' if durable else 'OFF'}")
        self.db.execute("PRAGMA foreign_keys=OFF")
        self.db.executescript(_SCHEMA)
        row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif row[0] != str(SCHEMA_VERSION):
            raise RuntimeError(f"{target}: credit store schema {row[0]}, this version reads {SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT (durable on return), or ROLLBACK on any exception."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # --- reads ------------------------------------------------------------------------------------

    def head(self, author: bytes) -> tuple[int, bytes, int]:
        """(seq, hash, timestamp) of the last stored entry of `author`; (0, zeros, 0) if none."""
        row = self.db.execute("SELECT seq, hash, ts FROM heads WHERE author=?", (author,)).fetchone()
        return (row[0], row[1], row[2]) if row else (0, ZERO_HASH, 0)

    def heads(self) -> dict[bytes, tuple[int, bytes]]:
        return {a: (s, h) for a, s, h in self.db.execute("SELECT author, seq, hash FROM heads")}

    def get(self, author: bytes, seq: int) -> LogEntry | None:
        row = self.db.execute("SELECT wire FROM entries WHERE author=? AND seq=?", (author, seq)).fetchone()
        return LogEntry.decode(row[0]) if row else None

    def hash_at(self, author: bytes, seq: int) -> bytes | None:
        row = self.db.execute("SELECT hash FROM entries WHERE author=? AND seq=?", (author, seq)).fetchone()
        return row[0] if row else None

    def range_wire(self, author: bytes, first: int, last: int) -> list[bytes]:
        """Encoded entries of `author` with first <= seq <= last, in order."""
        return [r[0] for r in self.db.execute(
            "SELECT wire FROM entries WHERE author=? AND seq BETWEEN ? AND ? ORDER BY seq", (author, first, last))]

    def entries(self, author: bytes, first: int = 1, last: int | None = None) -> list[LogEntry]:
        return [LogEntry.decode(w) for w in self.range_wire(author, first, last if last is not None else 2**62)]

    def entries_of_kind(self, kind: str) -> list[LogEntry]:
        """Every stored entry of one kind, any author (e.g. disputes, for reliability views)."""
        return [LogEntry.decode(r[0]) for r in self.db.execute("SELECT wire FROM entries WHERE kind=?", (kind,))]

    def recent(self, limit: int = 20) -> list[LogEntry]:
        return [LogEntry.decode(r[0]) for r in self.db.execute(
            "SELECT wire FROM entries ORDER BY ts DESC, seq DESC LIMIT ?", (limit,))]

    def last_counter(self, server: bytes, client: bytes, session: bytes) -> tuple[int, int]:
        """(counter, flops) of the newest receipt of (client, session) in `server`'s chain; (0, 0) if none."""
        row = self.db.execute(
            "SELECT counter, flops FROM transfers WHERE server=? AND client=? AND session=? ORDER BY counter DESC LIMIT 1",
            (server, client, session)).fetchone()
        return (row[0], row[1]) if row else (0, 0)

    def last_spend_counter(self, client: bytes, server: bytes, session: bytes) -> int:
        row = self.db.execute("SELECT MAX(counter) FROM spends WHERE client=? AND server=? AND session=?",
                              (client, server, session)).fetchone()
        return row[0] or 0

    def fork(self, author: bytes) -> tuple[int, bytes] | None:
        row = self.db.execute("SELECT seq, proof FROM forks WHERE author=?", (author,)).fetchone()
        return (row[0], row[1]) if row else None

    def forks(self) -> dict[bytes, tuple[int, bytes]]:
        return {a: (s, p) for a, s, p in self.db.execute("SELECT author, seq, proof FROM forks")}

    def counted_transfers(self) -> list[tuple[bytes, bytes, int]]:
        """(server, client, flops) of the receipts that count: per (server, client, session) the one with
        the highest counter, among earn entries below the server's fork point (if it forked)."""
        return self.db.execute("""
            WITH t AS (SELECT tr.* FROM transfers tr LEFT JOIN forks f ON f.author = tr.server
                       WHERE f.seq IS NULL OR tr.seq < f.seq),
                 best AS (SELECT server, client, session, MAX(counter) AS counter FROM t GROUP BY server, client, session)
            SELECT t.server, t.client, t.flops FROM t JOIN best USING (server, client, session, counter)
        """).fetchall()

    def counted_transfers_to(self, clients: Collection[bytes]) -> list[tuple[bytes, bytes, int]]:
        """`counted_transfers` of receipts signed by `clients` only (read through the client index)."""
        out: list[tuple[bytes, bytes, int]] = []
        keys = list(clients)
        for i in range(0, len(keys), 500):  # below SQLite's limit on bound parameters
            chunk = keys[i:i + 500]
            out += self.db.execute(f"""
                WITH t AS (SELECT tr.* FROM transfers tr LEFT JOIN forks f ON f.author = tr.server
                           WHERE tr.client IN ({",".join("?" * len(chunk))}) AND (f.seq IS NULL OR tr.seq < f.seq)),
                     best AS (SELECT server, client, session, MAX(counter) AS counter FROM t
                              GROUP BY server, client, session)
                SELECT t.server, t.client, t.flops FROM t JOIN best USING (server, client, session, counter)
            """, chunk).fetchall()
        return out

    def counted_grants(self) -> list[tuple[bytes, bytes, int]]:
        """(author, recipient, amount) of grants below the author's fork point (if it forked)."""
        return self.db.execute("""
            SELECT g.author, g.recipient, g.amount FROM grants g LEFT JOIN forks f ON f.author = g.author
            WHERE f.seq IS NULL OR g.seq < f.seq
        """).fetchall()

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    def verdicts(self) -> list[tuple[bytes, int, bytes, bool]]:
        """(accuser, seq, accused, lie) of every verdict this peer reached."""
        return [(a, s, x, bool(lie)) for a, s, x, lie in self.db.execute(
            "SELECT accuser, seq, accused, lie FROM verdicts WHERE lie >= 0")]

    def unjudged_disputes(self, me: bytes, limit: int) -> list[LogEntry]:
        """Up to `limit` dispute entries by others with no verdict here yet, leaving out every accuser
        already found making a false accusation (its disputes are never verified again)."""
        return [LogEntry.decode(r[0]) for r in self.db.execute("""
            SELECT e.wire FROM entries e LEFT JOIN verdicts v ON v.accuser = e.author AND v.seq = e.seq
            WHERE e.kind = 'dispute' AND e.author != ? AND v.seq IS NULL
              AND e.author NOT IN (SELECT accuser FROM verdicts WHERE lie = 0)
            ORDER BY e.author, e.seq LIMIT ?""", (me, limit))]

    # --- writes (inside `transaction()`) ----------------------------------------------------------

    def insert_entry(self, entry: LogEntry, *, head: tuple[int, bytes] | None = None, update_head: bool = True) -> None:
        """Append `entry` to its author's chain. The caller has verified it; this re-checks the link
        against `head` (the caller's view of the current head inside this transaction) or the stored
        head. With `update_head=False` the caller must `set_head` before committing."""
        seq, head_hash = head if head is not None else self.head(entry.author)[:2]
        if entry.seq != seq + 1 or entry.prev != head_hash:
            raise InvalidEntry(f"entry {entry.seq} does not extend the stored chain (head {seq})")
        self.db.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?)",
                        (entry.author, entry.seq, entry.hash, entry.kind, entry.timestamp, entry.encode()))
        if update_head:
            self.set_head(entry.author, entry.seq, entry.hash, entry.timestamp)

    def set_head(self, author: bytes, seq: int, hash_: bytes, ts: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO heads VALUES (?, ?, ?, ?)", (author, seq, hash_, ts))

    def insert_transfer(self, server: bytes, client: bytes, session: bytes, counter: int, seq: int, flops: int,
                        model: str) -> None:
        self.db.execute("INSERT INTO transfers VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (server, client, session, counter, seq, flops, model))

    def insert_spend(self, client: bytes, server: bytes, session: bytes, counter: int, seq: int, flops: int) -> None:
        self.db.execute("INSERT INTO spends VALUES (?, ?, ?, ?, ?, ?)", (client, server, session, counter, seq, flops))

    def insert_grant(self, author: bytes, seq: int, recipient: bytes, amount: int) -> None:
        self.db.execute("INSERT INTO grants VALUES (?, ?, ?, ?)", (author, seq, recipient, amount))

    def put_verdict(self, accuser: bytes, seq: int, accused: bytes, lie: bool | None) -> None:
        """`lie` None: this peer could not judge the dispute (it is not offered again)."""
        self.db.execute("INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?)",
                        (accuser, seq, accused, -1 if lie is None else int(lie)))

    def put_fork(self, author: bytes, seq: int, proof: bytes) -> bool:
        """Keep the lowest-seq proof per author; True if this one was new or lower."""
        old = self.fork(author)
        if old is not None and old[0] <= seq:
            return False
        self.db.execute("INSERT OR REPLACE INTO forks VALUES (?, ?, ?)", (author, seq, proof))
        return True
