"""The ledger: the rules of each entry kind, verified ingestion, and balances as a fold over chains.

Units: amounts are integer FLOPs inside; people see GFLOP-credits (1 credit = 1 GFLOP = 1e9 FLOPs,
`credits()` converts).

Kinds and bodies (each body is the msgpack of a fixed-order list, decoded strictly):
- `grant`  [recipient(32 B), amount(FLOPs), note(str)] — the only source of credits. Two sorts:
    * the *starting grant*: an identity's first entry (seq 1) may grant itself at most
      `policy.starting_grant`;
    * a *swarm grant*: an author listed in `policy.grant_authorities` may grant anyone at most
      `policy.max_authority_grant` per entry (private swarms fund their members this way).
- `earn`   [receipt] — a server's claim, carrying the receipt its client signed. The receipt's server
  must be the author, its FLOPs must be what the pricing function says, and per (client, session)
  its counter must rise strictly along the author's chain.
- `spend`  [receipt] — the client's own record of the same receipt (client = author). Kept for
  audits and `potluck credits`; it does not move balances (see below).
- `dispute` [accused(32 B), reason(str), evidence(bytes)] — a signed accusation from a spot check;
  its evidence is a proof (pipeline/proofs.py: the accused's signed step result and the inputs it
  ran on) that any peer holding the span can re-run. It moves no balance (below).
- `fork`   [fork proof] — the author records a fork proof it checked (it is also stored and spread
  on its own, see `ForkProof`).

Balances, as each peer sees them (a fold over the chains it has verified):
    balance(P) = grants to P + earned(P) − spent(P)
where earned(S) sums, over S's earn entries, the FLOPs of the highest-counter receipt per
(client, session), and spent(C) sums the same receipts by client — a client's debit is derived from
the *servers'* earn entries carrying its signature, so it cannot dodge a debt by not recording
spends. Every receipt adds to one peer what it takes from another, so the total over all peers is
exactly the sum of grants: conserved, and the same at every peer holding the same chains.

Disputes and verdicts. A dispute is a claim; it counts nothing until this peer has judged it
itself (pipeline/disputes.py re-runs the proof on blocks it holds) and kept a *verdict* in its own
store (`record_verdict`, never replicated). A proven liar, a peer whose accusation was false and a
forked author have reliability 0 in this peer's view (`reliability_sync`): routing avoids them and
`credits.standing` counts their work at nothing — a liar's earnings are forfeited where decisions are
made, not rewritten in the shared fold. A client's own referee-backed spot check is a verdict in its
own view. Once an accuser is found making a false accusation, its disputes are never verified again
(`unjudged_disputes` leaves them out), so dispute spam costs the verifier one check per accuser and
the accused nothing.

Ingestion bounds what one author adds without work behind it: grants, disputes and forks are paid
for from a per-author allowance (`credits.allowance.IngestLimits`); earn and spend entries, which
carry a receipt, are not.

Forks: a forked author's chain counts only below its lowest known fork seq (the prefix every peer
agrees on), is not replicated further, and its balance is *frozen*: it no longer counts in its
favour (`effective = min(raw, 0)`), while its debts still stand. `Ledger.forks` exposes the proofs
for routing.

Sybil caveat: identities are free, and receipts for work never done move balances just as well
as real ones: two keys one person controls can sign each other any amount (conservation still holds
— the total is the grants — but the balance is farmed). So balances are the shared record, not
what decisions read: servers admit, queue and share their cache by *standing*, each peer's own view
of the verified work that reached it (`credits.standing`, `credits.admission`), which a farm does
not raise. And nothing is minted by default: `starting_grant` is 0 in open swarms (a newcomer is
served by idle servers and, when they are busy, within each server's debt allowance); a private
swarm may set a starting grant or fund its members through grant authorities.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

import msgpack
import trio

from p2p.identity import Identity, peer_id_from_public_key

from .allowance import BACKED_KINDS, Allowances, IngestLimits
from .entry import KEY_LEN, MAX_INT, ZERO_HASH, ForkProof, LogEntry
from .errors import InvalidEntry, InvalidForkProof, InvalidReceipt
from .receipts import Pricing, Receipt
from .store import Store

log = logging.getLogger(__name__)
T = TypeVar("T")

GFLOP = 10**9
MAX_NOTE = 200
MAX_EVIDENCE = 12 * 1024


UNIT = "GFLOP-credits (1 credit = 1e9 FLOPs of compute, earned by serving)"


def credits(flops: int) -> float:
    """FLOPs → GFLOP-credits, for people."""
    return flops / GFLOP


@dataclass(frozen=True)
class CreditPolicy:
    """Swarm-wide credit rules. Every peer of a swarm must use the same policy, or their balances differ."""

    starting_grant: int = 0  # identities are free: an open swarm mints nothing (a private one may)
    grant_authorities: frozenset[bytes] = frozenset()
    max_authority_grant: int = 10**9 * GFLOP
    # A newcomer's allowance at a busy server (credits.admission): 10k GFLOP-credits, ~37k tokens
    # through all blocks of the 135M default model, ~700 of a 7B one: a few short generations.
    debt_limit: int = 10_000 * GFLOP

    def __post_init__(self) -> None:
        if not 0 <= self.starting_grant <= MAX_INT or not 0 <= self.max_authority_grant <= MAX_INT:
            raise ValueError("grants are non-negative FLOP counts below 2**63")
        if self.debt_limit < 0:
            raise ValueError("debt_limit is a non-negative FLOP count")


@dataclass
class Balance:
    key: bytes
    granted: int = 0
    earned: int = 0
    spent: int = 0
    frozen: bool = False

    @property
    def raw(self) -> int:
        return self.granted + self.earned - self.spent

    @property
    def effective(self) -> int:
        """What counts for this peer: a frozen (forked) author's credit does not count in its favour."""
        return min(self.raw, 0) if self.frozen else self.raw

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.key)

    def as_dict(self) -> dict:
        return {"peer_id": self.peer_id, "balance": credits(self.effective), "raw": credits(self.raw),
                "granted": credits(self.granted), "earned": credits(self.earned), "spent": credits(self.spent),
                "frozen": self.frozen, "unit": "GFLOP-credits"}


@dataclass
class IngestResult:
    stored: int = 0
    fork: ForkProof | None = None  # a NEW fork proof found while ingesting
    error: str | None = None  # why ingestion stopped early (entries before it are stored)
    frozen: bool = False  # the author is forked: nothing at or past the fork point is taken
    throttled: bool = False  # stopped at an entry the author's allowance cannot pay for (see credits.allowance)


def _decode_body(body: bytes, n: int, kind: str) -> list:
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, max_ext_len=0, max_map_len=0,
                              max_array_len=16, max_str_len=4096, max_bin_len=MAX_EVIDENCE)
    except Exception as e:  # any msgpack defect
        raise InvalidEntry(f"{kind} body is not valid msgpack: {type(e).__name__}") from None
    if not isinstance(obj, list) or len(obj) != n:
        raise InvalidEntry(f"a {kind} body is a list of {n} fields")
    return obj


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


class Ledger:
    """One peer's ledger: its own chain, others' verified chains, fork proofs, balances.

    Every database call of the async API goes through `_call`: with an on-disk store (`offload=True`,
    the default for one) it runs in a worker thread under a CapacityLimiter(1) — a durable commit waits
    for an fsync, which must not stall the trio loop, and one limiter makes the single connection
    single-user.
    With an in-memory store (simulations) calls run inline: they are bounded (one append, or one
    range of at most `MAX_RANGE` entries) and take well under a millisecond or so each, and staying
    on the loop keeps the virtual clock honest (a thread would let `MockClock` jump while it works).
    The `*_sync` methods and `verify_chain` are the blocking API, for benchmarks, tests and tools
    that own the thread.
    """

    def __init__(self, identity: Identity, store: Store, *, pricing: Pricing, policy: CreditPolicy | None = None,
                 clock: Callable[[], float] = time.time, offload: bool | None = None,
                 ingest_limits: IngestLimits | None = None):
        self.identity = identity
        self.me = identity.public_key
        self.store = store
        self.pricing = pricing
        self.policy = policy or CreditPolicy()
        self.clock = clock
        self.offload = store.path is not None if offload is None else offload
        self.allowances = Allowances(ingest_limits or IngestLimits(), clock)
        self._limiter = trio.CapacityLimiter(1)
        # In-memory mirrors (updated after each commit) so replication can read them without the DB.
        self.heads: dict[bytes, tuple[int, bytes]] = store.heads()
        self.forks: dict[bytes, ForkProof] = {a: ForkProof.decode(p) for a, (s, p) in store.forks().items()}
        self.version = 0  # bumps on every change; caches key on it
        # author -> `version` at which its head or fork state last changed here (replication sends
        # only what changed since it last talked to a peer, as Scuttlebutt skips unchanged feeds)
        self.changed: dict[bytes, int] = dict.fromkeys(self.heads, 0)
        self._balances: tuple[int, dict[bytes, Balance]] | None = None
        self._reliability: tuple[int, dict[bytes, float]] | None = None
        self.on_append: list[Callable[[LogEntry], None]] = []  # own new entries (replication announces them)
        self.on_fork: list[Callable[[ForkProof], None]] = []  # new or lower fork proofs

    @classmethod
    def open(cls, identity: Identity, data_dir: Any = None, **kw: Any) -> "Ledger":
        """A ledger on `data_dir`/credits.sqlite (None: in memory)."""
        return cls(identity, Store(data_dir), **kw)

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.offload:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        await trio.lowlevel.checkpoint()
        return fn(*args)

    async def read(self, fn: Callable[[], T]) -> T:
        """Run a blocking read of the store (`fn`, e.g. a view's recomputation) the way every ledger call runs."""
        result: T = await self._call(fn)
        return result

    # --- own chain ---------------------------------------------------------------------------------

    async def append(self, kind: str, body: bytes) -> LogEntry:
        """Sign and durably append an entry to this peer's chain; returns once it is committed."""
        entry = await self._call(self.append_sync, kind, body)
        for listener in self.on_append:
            listener(entry)
        return entry

    def append_sync(self, kind: str, body: bytes) -> LogEntry:
        """Blocking `append` (benchmarks, the crash test child, single-threaded tools)."""
        with self.store.transaction():
            seq, prev, ts = self.store.head(self.me)
            timestamp = max(int(self.clock() * 1000), ts)
            entry = LogEntry.create(self.identity, seq + 1, prev, timestamp, kind, body)
            new_fork = self._apply(entry)
            self.store.insert_entry(entry)
        self._committed(entry.author, entry.seq, entry.hash, new_fork)
        return entry

    async def claim_starting_grant(self) -> LogEntry | None:
        """Append the starting grant if this chain is empty (and the policy grants anything)."""
        if self.heads.get(self.me, (0,))[0] > 0 or self.policy.starting_grant <= 0:
            return None
        return await self.append("grant", _pack([self.me, self.policy.starting_grant, "starting grant"]))

    async def grant(self, recipient: bytes, amount: int, note: str = "") -> LogEntry:
        """A swarm grant (only for authors in `policy.grant_authorities`)."""
        return await self.append("grant", _pack([recipient, amount, note]))

    async def record_earn(self, receipt: Receipt) -> LogEntry:
        """Server side: append the client's (latest) receipt as an earn entry. Raises InvalidReceipt."""
        return await self.append("earn", _pack([receipt.to_list()]))

    async def record_spend(self, receipt: Receipt) -> LogEntry:
        """Client side: record a receipt this peer signed."""
        return await self.append("spend", _pack([receipt.to_list()]))

    async def record_dispute(self, accused: bytes, reason: str, evidence: bytes = b"") -> LogEntry:
        return await self.append("dispute", _pack([accused, reason, evidence]))

    async def record_fork(self, proof: ForkProof) -> LogEntry:
        return await self.append("fork", _pack([proof.to_list()]))

    # --- others' chains ----------------------------------------------------------------------------

    async def read_ranges(self, ranges: list[tuple[bytes, int, int]], max_bytes: int) -> list[list[bytes]]:
        """Encoded stored entries of each (author, first, last) range, in seq order, at most `max_bytes`
        in all: what replication serves to a peer's pull."""
        return await self._call(self._read_ranges_sync, ranges, max_bytes)

    def _read_ranges_sync(self, ranges: list[tuple[bytes, int, int]], max_bytes: int) -> list[list[bytes]]:
        out, size = [], 0
        for author, first, last in ranges:
            wires = []
            for wire in self.store.range_wire(author, first, last):
                size += len(wire)
                if size > max_bytes:
                    break
                wires.append(wire)
            out.append(wires)
        return out

    async def ingest(self, wires: list[bytes]) -> IngestResult:
        """Verify and store a pulled range of one author's entries (encoded, in seq order), in one
        transaction. Stops at the first bad entry, keeping the good prefix; reports a new fork."""
        return (await self.ingest_ranges([wires]))[0]

    async def ingest_ranges(self, ranges: list[list[bytes]]) -> list[IngestResult]:
        """`ingest` for several ranges (one pull reply, any authors) in ONE durable transaction."""
        results = await self._call(self.ingest_ranges_sync, ranges)
        for result in results:
            if result.fork is not None:
                for listener in self.on_fork:
                    listener(result.fork)
        return results

    def ingest_sync(self, wires: list[bytes]) -> IngestResult:
        return self.ingest_ranges_sync([wires])[0]

    def ingest_ranges_sync(self, ranges: list[list[bytes]]) -> list[IngestResult]:
        results = [IngestResult() for _ in ranges]
        changed: list[tuple[bytes, int | None, bytes | None, bool]] = []
        if any(ranges):
            with self.store.transaction():
                for wires, result in zip(ranges, results):
                    done = self._ingest_range(wires, result)
                    if done is not None:
                        changed.append(done)
        for author, seq, hash_, fork in changed:
            self._committed(author, seq, hash_, fork)
        return results

    def _ingest_range(self, wires: list[bytes], result: IngestResult) -> tuple | None:
        """One range, inside the caller's transaction; returns what changed (for `_committed`) or None."""
        entries: list[tuple[LogEntry, int]] = []  # with its wire size
        for w in wires:
            try:
                entries.append((LogEntry.decode(w), len(w)))
            except InvalidEntry as e:
                result.error = str(e)
                break
        if not entries:
            return None
        author = entries[0][0].author
        if author == self.me:
            result.error = "peers do not write this peer's own chain"
            return None
        new_fork = False
        seq, head_hash, head_ts = self.store.head(author)
        stored_any = False
        for entry, size in entries:
            try:
                if entry.author != author:
                    raise InvalidEntry("a range holds entries of one author")
                fork = self.forks.get(author)
                if fork is not None and entry.seq >= fork.seq:
                    result.frozen = True
                    break
                if entry.seq <= seq:
                    stored = head_hash if entry.seq == seq else self.store.hash_at(author, entry.seq)
                    if stored == entry.hash:
                        continue
                    entry.verify()
                    ours = self.store.get(author, entry.seq)
                    assert ours is not None  # the chain holds every seq up to its head
                    proof = ForkProof.of(ours.signed_header(), entry.signed_header())
                    if self._put_fork(proof):
                        result.fork, new_fork = proof, True
                    result.frozen = True
                    break
                if entry.seq != seq + 1:
                    raise InvalidEntry(f"entry {entry.seq} leaves a gap after {seq}")
                if entry.prev != head_hash:
                    raise InvalidEntry(f"entry {entry.seq} does not link to entry {seq} (prev hash mismatch)")
                if entry.timestamp < head_ts:
                    raise InvalidEntry(f"entry {entry.seq} is older than entry {seq}")
                if not self._allowed(entry, size):
                    result.throttled = True
                    break
                entry.verify()
                new_fork = self._apply(entry) or new_fork
                self.store.insert_entry(entry, head=(seq, head_hash), update_head=False)
                seq, head_hash, head_ts = entry.seq, entry.hash, entry.timestamp
                result.stored += 1
                stored_any = True
            except (InvalidEntry, InvalidForkProof) as e:
                result.error = str(e)
                break
        if stored_any:
            self.store.set_head(author, seq, head_hash, head_ts)
        if stored_any or new_fork:
            return (author, seq if stored_any else None, head_hash if stored_any else None, new_fork)
        return None

    def _allowed(self, entry: LogEntry, size: int) -> bool:
        """Whether `entry` may be stored now: receipt-backed entries and grant authorities always may;
        others are paid for from the author's allowance (an entry refused later stays paid for)."""
        if entry.kind in BACKED_KINDS or entry.author in self.policy.grant_authorities:
            return True
        return self.allowances.take(entry.author, size)

    def throttled(self, author: bytes) -> bool:
        """True while `author` has spent its allowance of entries without a receipt (replication waits)."""
        return self.allowances.spent(author)

    async def add_fork_proof(self, proof: ForkProof) -> bool:
        """Check and keep a fork proof heard from a peer; True if it was new (or lower) here."""
        proof.check()
        new = await self._call(self._add_fork_sync, proof)
        if new:
            for listener in self.on_fork:
                listener(proof)
        return new

    def _add_fork_sync(self, proof: ForkProof) -> bool:
        with self.store.transaction():
            new = self._put_fork(proof)
        if new:
            self._committed(proof.author, None, None, True)
        return new

    def _put_fork(self, proof: ForkProof) -> bool:
        if self.store.put_fork(proof.author, proof.seq, proof.encode()):
            self.forks[proof.author] = proof
            return True
        return False

    def _committed(self, author: bytes, seq: int | None, hash_: bytes | None, fork: bool) -> None:
        self.version += 1
        if seq is not None:
            assert hash_ is not None  # a new head comes with its hash
            self.heads[author] = (seq, hash_)
        self.changed[author] = self.version

    # --- the rules of each kind --------------------------------------------------------------------

    def _apply(self, entry: LogEntry) -> bool:
        """Check `entry`'s body against its kind's rules and write its derived rows (inside the
        caller's transaction). Raises InvalidEntry before writing anything. True if it added a fork proof."""
        kind, author = entry.kind, entry.author
        if kind == "grant":
            recipient, amount, note = _decode_body(entry.body, 3, kind)
            if not isinstance(recipient, bytes) or len(recipient) != KEY_LEN:
                raise InvalidEntry("grant recipient must be a 32-byte public key")
            if type(amount) is not int or not 1 <= amount <= MAX_INT:
                raise InvalidEntry("grant amount must be a positive integer (FLOPs)")
            if not isinstance(note, str) or len(note) > MAX_NOTE:
                raise InvalidEntry(f"grant note must be a string of at most {MAX_NOTE} characters")
            if author in self.policy.grant_authorities:
                if amount > self.policy.max_authority_grant:
                    raise InvalidEntry(f"grant of {credits(amount)} credits exceeds the swarm limit")
            elif recipient != author:
                raise InvalidEntry("only the swarm's grant authorities may grant credits to others")
            elif entry.seq != 1:
                raise InvalidEntry("the starting grant must be the first entry of a chain")
            elif amount > self.policy.starting_grant:
                raise InvalidEntry(f"starting grant of {credits(amount)} credits exceeds this swarm's "
                                   f"{credits(self.policy.starting_grant)}")
            self.store.insert_grant(author, entry.seq, recipient, amount)
            return False
        if kind in ("earn", "spend"):
            (obj,) = _decode_body(entry.body, 1, kind)
            receipt = Receipt.from_list(obj)
            if kind == "earn":
                if receipt.server != author:
                    raise InvalidReceipt("an earn entry must carry a receipt for its own author")
                last_counter, last_flops = self.store.last_counter(author, receipt.client, receipt.session)
                if receipt.counter <= last_counter:
                    raise InvalidReceipt(f"replayed receipt: counter {receipt.counter} after {last_counter} "
                                         "in this (client, session)")
                if receipt.flops < last_flops:
                    raise InvalidReceipt("receipts are cumulative: FLOPs cannot go down")
            else:
                if receipt.client != author:
                    raise InvalidReceipt("a spend entry must carry a receipt its author signed")
                last = self.store.last_spend_counter(author, receipt.server, receipt.session)
                if receipt.counter <= last:
                    raise InvalidReceipt(f"replayed receipt: counter {receipt.counter} after {last}")
            receipt.verify(self.pricing)
            if kind == "earn":
                self.store.insert_transfer(author, receipt.client, receipt.session, receipt.counter, entry.seq,
                                           receipt.flops, receipt.model)
            else:
                self.store.insert_spend(author, receipt.server, receipt.session, receipt.counter, entry.seq,
                                        receipt.flops)
            return False
        if kind == "dispute":
            accused, reason, evidence = _decode_body(entry.body, 3, kind)
            if not isinstance(accused, bytes) or len(accused) != KEY_LEN or accused == author:
                raise InvalidEntry("dispute must accuse another peer's 32-byte public key")
            if not isinstance(reason, str) or not 0 < len(reason) <= MAX_NOTE:
                raise InvalidEntry(f"dispute reason must be a string of 1 to {MAX_NOTE} characters")
            if not isinstance(evidence, bytes):
                raise InvalidEntry("dispute evidence must be bytes")
            return False
        if kind == "fork":
            (obj,) = _decode_body(entry.body, 1, kind)
            try:
                proof = ForkProof.from_list(obj)
                proof.check()
            except InvalidForkProof as e:
                raise InvalidEntry(f"fork entry: {e}") from None
            return self._put_fork(proof)
        raise InvalidEntry(f"unknown kind {kind!r}")  # LogEntry.decode already refuses these

    # --- balances ----------------------------------------------------------------------------------

    async def balances(self) -> dict[bytes, Balance]:
        """Every known peer's balance, as this peer sees it (cached until the next change)."""
        cached = self._balances
        if cached is not None and cached[0] == self.version:
            return cached[1]
        return await self._call(self.balances_sync)

    def balances_sync(self) -> dict[bytes, Balance]:
        version = self.version
        out: dict[bytes, Balance] = {}

        def get(key: bytes) -> Balance:
            b = out.get(key)
            if b is None:
                b = out[key] = Balance(key, frozen=key in self.forks)
            return b

        for _author, recipient, amount in self.store.counted_grants():
            get(recipient).granted += amount
        for server, client, flops in self.store.counted_transfers():
            # Every receipt counts at its face value, to both sides: the total stays conserved, and the
            # fold is the same at every peer holding the same chains (disputes do not enter it).
            get(server).earned += flops
            get(client).spent += flops
        for author in self.forks:
            get(author)
        self._balances = (version, out)
        return out

    def reliability_sync(self) -> dict[bytes, float]:
        """public key → 0.0 for every peer this peer found lying (a dispute it verified, or its own
        referee-backed check), making a false accusation, or forking; absent keys are 1.0."""
        if self._reliability is None or self._reliability[0] != self.version:
            version = self.version
            liars, false_accusers = self.verdicts_sync()
            self._reliability = (version, dict.fromkeys(liars | false_accusers | set(self.forks), 0.0))
        return self._reliability[1]

    async def reliability(self) -> dict[bytes, float]:
        """`reliability_sync`, through the ledger's worker."""
        return await self._call(self.reliability_sync)

    # --- verdicts on disputes (this peer's own; see the module docstring) -------------------------

    def verdicts_sync(self) -> tuple[set[bytes], set[bytes]]:
        """(proven liars, false accusers) by this peer's own verdicts."""
        liars: set[bytes] = set()
        false_accusers: set[bytes] = set()
        for accuser, _seq, accused, lie in self.store.verdicts():
            (liars if lie else false_accusers).add(accused if lie else accuser)
        return liars, false_accusers

    async def record_verdict(self, accuser: bytes, seq: int, accused: bytes, lie: bool | None) -> None:
        """Keep this peer's verdict on dispute `seq` of `accuser` (0: its own check, no entry): `lie`
        True, `accused` lied; False, the accusation was false; None, this peer cannot judge it."""
        await self._call(self._record_verdict_sync, accuser, seq, accused, lie)

    def _record_verdict_sync(self, accuser: bytes, seq: int, accused: bytes, lie: bool | None) -> None:
        with self.store.transaction():
            self.store.put_verdict(accuser, seq, accused, lie)
        if lie is not None:
            self.version += 1  # reliability and standing views recompute; no chain changed

    async def unjudged_disputes(self, limit: int = 64) -> list[tuple[LogEntry, bytes, bytes]]:
        """Disputes by others this peer has no verdict on, from accusers not yet caught making a false
        accusation: (entry, accused key, evidence)."""
        entries = await self._call(self.store.unjudged_disputes, self.me, limit)
        out = []
        for entry in entries:
            accused, _reason, evidence = _decode_body(entry.body, 3, "dispute")  # checked on ingest
            out.append((entry, accused, evidence))
        return out

    async def balance(self, key: bytes) -> Balance:
        return (await self.balances()).get(key) or Balance(key, frozen=key in self.forks)

    def is_frozen(self, key: bytes) -> bool:
        return key in self.forks

    # --- checks ------------------------------------------------------------------------------------

    def verify_chain(self, author: bytes) -> int:
        """Re-verify a stored chain from seq 1 (signatures, links, continuity); returns its length.
        Raises InvalidEntry at the first defect (which would mean a corrupted database)."""
        prev, prev_ts, n = ZERO_HASH, 0, 0
        for entry in self.store.entries(author):
            n += 1
            if entry.seq != n or entry.prev != prev or entry.timestamp < prev_ts:
                raise InvalidEntry(f"stored chain of {peer_id_from_public_key(author)} breaks at seq {n}")
            entry.verify()
            prev, prev_ts = entry.hash, entry.timestamp
        if n != self.store.head(author)[0]:
            raise InvalidEntry("stored head does not match the stored chain")
        return n

    async def summary(self, recent: int = 10, standings: Mapping[bytes, int] | None = None,
                      seen_by: Mapping[bytes, int] | None = None) -> dict:
        """What `potluck credits` and `GET /api/credits` show. Per peer: its balance in the shared fold,
        what this peer earned from it and spent with it (the receipts between the two), and with
        `standings` (`credits.standing`) its standing in this peer's view (this peer's own: None).
        `seen_by` (`StandingView.seen_by_sync`): this peer's standing in the views of peers it served,
        summarised as "my_standing"."""
        balances = await self.balances()
        latest = await self._call(self.store.recent, recent)
        between = await self._call(self._between_sync)
        mine = balances.get(self.me) or Balance(self.me)
        out = {
            "peer_id": self.identity.peer_id,
            "unit": UNIT,
            "balance": credits(mine.effective), "earned": credits(mine.earned), "spent": credits(mine.spent),
            "granted": credits(mine.granted), "frozen": mine.frozen,
            "chain_length": self.heads.get(self.me, (0,))[0],
            "recent": [{"peer_id": e.author_id, "seq": e.seq, "kind": e.kind, "timestamp_ms": e.timestamp}
                       for e in latest],
            "peers": sorted((self._peer_row(b, standings, between) for b in balances.values()),
                            key=lambda d: -d["balance"]),
            "forked": [peer_id_from_public_key(a) for a in self.forks],
            "total": credits(sum(b.raw for b in balances.values())),
        }
        if seen_by is not None:
            values = sorted(seen_by.values())
            out["my_standing"] = {
                "peers": len(values),  # the peers this one served (the most served, at most a few dozen)
                **({"min": credits(values[0]), "median": credits(values[len(values) // 2]),
                    "max": credits(values[-1])} if values else {"min": None, "median": None, "max": None}),
            }
        return out

    def _between_sync(self) -> dict[bytes, tuple[int, int]]:
        """peer → (what this peer earned from it, what this peer spent with it): the worth of the
        counted receipts between the two, as in the balance fold."""
        reliability = self.reliability_sync()
        out: dict[bytes, tuple[int, int]] = {}
        for server, client, flops in self.store.counted_transfers():
            if (server == self.me) == (client == self.me):
                continue  # not between this peer and another
            worth = int(flops * reliability.get(server, 1.0))
            other = client if server == self.me else server
            earned, spent = out.get(other, (0, 0))
            out[other] = (earned + worth, spent) if server == self.me else (earned, spent + worth)
        return out

    def _peer_row(self, balance: Balance, standings: Mapping[bytes, int] | None,
                  between: Mapping[bytes, tuple[int, int]]) -> dict:
        row = balance.as_dict()
        earned_from, spent_with = between.get(balance.key, (0, 0))
        row["earned_from"], row["spent_with"] = credits(earned_from), credits(spent_with)
        if standings is not None:
            row["standing"] = None if balance.key == self.me else credits(standings.get(balance.key, 0))
        return row
