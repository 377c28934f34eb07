"""Credit logs without the network: entries, receipts, the kind rules, attacks, forks, balances."""

import random

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from credits import (
    CreditPolicy, ForkProof, InvalidEntry, InvalidForkProof, InvalidReceipt, Ledger, LogEntry,
    Receipt, ReceiptSigner, ReceiptTracker, Store, linear_pricing,
)
from credits.allowance import IngestLimits
from credits.entry import MAX_BODY, ZERO_HASH
from p2p.identity import Identity

PRICING = linear_pricing({"m": 1000, "big": 7_000_000})
POLICY = CreditPolicy(starting_grant=1_000_000, debt_limit=50_000)


def ident(n: int) -> Identity:
    return Identity(bytes([n]) * 32)


def ledger(n: int, path=None, **kw) -> Ledger:
    return Ledger(ident(n), Store(path, durable=path is not None), pricing=PRICING, policy=kw.pop("policy", POLICY), **kw)


def chain(identity: Identity, bodies: list[tuple[str, bytes]], start_ts: int = 1000) -> list[LogEntry]:
    out, prev = [], ZERO_HASH
    for i, (kind, body) in enumerate(bodies, start=1):
        e = LogEntry.create(identity, i, prev, start_ts + i, kind, body)
        out.append(e)
        prev = e.hash
    return out


def grant_body(identity: Identity, amount: int = 1_000_000) -> bytes:
    return msgpack.packb([identity.public_key, amount, "starting grant"])


def receipt_body(r: Receipt) -> bytes:
    return msgpack.packb([r.to_list()])


def sign(client: Identity, server: Identity, *, tokens=10, counter=1, session=b"s" * 16, flops=None, model="m",
         start=0, end=3) -> Receipt:
    flops = PRICING(model, start, end, tokens) if flops is None else flops
    return Receipt.sign(client, server=server.public_key, model=model, start=start, end=end, tokens=tokens,
                        flops=flops, session=session, counter=counter)


def nothing_of(led: Ledger, author: Identity) -> bool:
    a = author.public_key
    return led.store.head(a)[0] == 0 and not led.store.entries(a) and a not in led.heads


# --- entries ------------------------------------------------------------------------------------------


def test_entry_encoding_is_canonical_and_round_trips():
    a = ident(1)
    e = LogEntry.create(a, 1, ZERO_HASH, 12345, "grant", grant_body(a))
    d = LogEntry.decode(e.encode())
    assert d == e and d.hash == e.hash and d.encode() == e.encode()
    d.verify()
    assert e.header[0] == 0x97  # a fixed-order msgpack list of 7, not JSON or a map
    assert msgpack.unpackb(e.header)[0] == "potluck/credit-entry/1"
    # The hash covers every field: change any one and it moves.
    for changed in (LogEntry.create(a, 1, ZERO_HASH, 12346, "grant", grant_body(a)),
                    LogEntry.create(a, 1, ZERO_HASH, 12345, "grant", grant_body(a, 5))):
        assert changed.hash != e.hash


@pytest.mark.parametrize("bad, why", [
    (b"", "not valid msgpack"),
    (msgpack.packb({"a": 1}), "not valid msgpack"),  # maps are refused outright
    (msgpack.packb([1, 2, 3]), "list of 7"),
    (msgpack.packb([b"x" * 31, 1, ZERO_HASH, 0, "grant", b"", b"s" * 64]), "author"),
    (msgpack.packb([b"x" * 32, 0, ZERO_HASH, 0, "grant", b"", b"s" * 64]), "seq"),
    (msgpack.packb([b"x" * 32, True, ZERO_HASH, 0, "grant", b"", b"s" * 64]), "seq"),
    (msgpack.packb([b"x" * 32, 2, ZERO_HASH, 0, "grant", b"", b"s" * 64]), "zero prev"),
    (msgpack.packb([b"x" * 32, 1, b"\1" * 32, 0, "grant", b"", b"s" * 64]), "all-zero prev"),
    (msgpack.packb([b"x" * 32, 1, ZERO_HASH, -1, "grant", b"", b"s" * 64]), "timestamp"),
    (msgpack.packb([b"x" * 32, 1, ZERO_HASH, 0, "mint", b"", b"s" * 64]), "kind"),
    (msgpack.packb([b"x" * 32, 1, ZERO_HASH, 0, "grant", "text", b"s" * 64]), "body"),
    (msgpack.packb([b"x" * 32, 1, ZERO_HASH, 0, "grant", b"", b"s" * 63]), "signature"),
    (msgpack.packb([b"x" * 32, 1, ZERO_HASH, 0, "grant", b"", b"s" * 64]) + b"\0", "trailing"),
    (b"\x00" * (MAX_BODY + 1000), "exceeds"),
])
def test_decoder_refuses_malformed_entries_with_a_reason(bad, why):
    with pytest.raises(InvalidEntry, match=why):
        LogEntry.decode(bad)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_fuzz_decoder_random_bytes(data):
    try:
        LogEntry.decode(data)
    except InvalidEntry:
        pass


_VALID = LogEntry.create(ident(9), 3, b"\7" * 32, 99, "dispute", msgpack.packb([b"\1" * 32, "lied", b""])).encode()
_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**63, max_value=2**64 - 1),
                     st.floats(allow_nan=True), st.binary(max_size=80), st.text(max_size=20))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_scalars, st.lists(_scalars, max_size=3)), min_size=0, max_size=9))
def test_fuzz_decoder_structured_lists(fields):
    try:
        e = LogEntry.decode(msgpack.packb(fields, use_bin_type=True))
    except InvalidEntry:
        return
    assert isinstance(e, LogEntry)
    with pytest.raises(InvalidEntry):
        e.verify()  # whatever parses, a random signature never verifies


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=0, max_value=len(_VALID) - 1), st.integers(min_value=1, max_value=255))
def test_fuzz_decoder_bit_flips_never_pass_verification(pos, xor):
    data = bytearray(_VALID)
    data[pos] ^= xor
    try:
        e = LogEntry.decode(bytes(data))
    except InvalidEntry:
        return
    with pytest.raises(InvalidEntry):
        e.verify()


# --- attacks on a chain, each rejected and nothing stored --------------------------------------------


async def test_forged_signature_is_rejected_and_nothing_stored():
    victim, forger, x = ident(1), ident(2), ledger(3)
    good = chain(victim, [("grant", grant_body(victim))])[0]
    forged = LogEntry(good.author, 1, ZERO_HASH, good.timestamp, "grant", grant_body(victim, 999), good.signature)
    by_other = LogEntry.create(forger, 1, ZERO_HASH, 1, "grant", grant_body(victim))
    stolen = LogEntry(victim.public_key, 1, ZERO_HASH, 1, "grant", grant_body(victim), by_other.signature)
    for bad in (forged, stolen):
        result = await x.ingest([bad.encode()])
        assert result.stored == 0 and "bad signature" in result.error
    assert nothing_of(x, victim) and x.store.count() == 0
    assert (await x.ingest([good.encode()])).stored == 1


async def test_broken_prev_hash_gap_and_time_travel_are_rejected():
    a, x = ident(1), ledger(3)
    c = chain(a, [("grant", grant_body(a))] + [("dispute", msgpack.packb([b"\5" * 32, "r", b""]))] * 3)
    broken = LogEntry.create(a, 3, b"\xee" * 32, c[2].timestamp, "dispute", msgpack.packb([b"\5" * 32, "x", b""]))
    result = await x.ingest([c[0].encode(), c[1].encode(), broken.encode()])
    assert result.stored == 2 and "prev hash" in result.error
    assert x.store.head(a.public_key)[0] == 2 and x.store.get(a.public_key, 3) is None
    result = await x.ingest([c[3].encode()])  # gap: 4 after 2
    assert result.stored == 0 and "gap" in result.error
    older = LogEntry.create(a, 3, c[1].hash, 0, "dispute", msgpack.packb([b"\5" * 32, "x", b""]))
    assert "older" in (await x.ingest([older.encode()])).error
    assert x.verify_chain(a.public_key) == 2


async def test_replayed_receipts_count_once_and_are_refused():
    server, client, other = ident(1), ident(2), ident(4)
    s = ledger(1)
    await s.claim_starting_grant()
    r1, r2 = sign(client, server, tokens=10, counter=1), sign(client, server, tokens=25, counter=2)
    await s.record_earn(r1)
    await s.record_earn(r2)
    for replay in (r1, r2):  # the same receipt again, or an older one
        with pytest.raises(InvalidReceipt, match="replayed"):
            await s.record_earn(replay)
    assert s.store.head(server.public_key)[0] == 3
    # Cumulative: only the highest counter of (client, session, server) counts.
    assert (await s.balance(server.public_key)).earned == PRICING("m", 0, 3, 25)
    assert (await s.balance(client.public_key)).spent == PRICING("m", 0, 3, 25)
    # Another server cannot claim a receipt made out to someone else.
    o = ledger(4)
    with pytest.raises(InvalidReceipt, match="own author"):
        await o.record_earn(r2)
    # A hand-built chain that replays a receipt is refused by every verifier at that entry.
    bad = chain(server, [("grant", grant_body(server)), ("earn", receipt_body(r2)), ("earn", receipt_body(r1))])
    x = ledger(3)
    result = await x.ingest([e.encode() for e in bad])
    assert result.stored == 2 and "replayed" in result.error
    assert (await x.balance(client.public_key)).spent == PRICING("m", 0, 3, 25)
    assert other.public_key not in await x.balances()


async def test_inflated_or_unpriced_or_forged_receipts_are_refused():
    server, client = ident(1), ident(2)
    inflated = sign(client, server, tokens=10, flops=PRICING("m", 0, 3, 10) * 2)  # the client signed it, still wrong
    with pytest.raises(InvalidReceipt, match="cost"):
        inflated.verify(PRICING)
    unknown = sign(client, server, model="nope", flops=5)
    with pytest.raises(InvalidReceipt, match="cannot price"):
        unknown.verify(PRICING)
    real = sign(client, server, tokens=10)
    forged = Receipt(real.server, real.client, real.model, real.start, real.end, 11, PRICING("m", 0, 3, 11),
                     real.session, real.counter, real.signature)  # tokens bumped after signing
    with pytest.raises(InvalidReceipt, match="not signed"):
        forged.verify(PRICING)
    for bad in (inflated, unknown, forged):
        c = chain(server, [("grant", grant_body(server)), ("earn", receipt_body(bad))])
        x = ledger(3)
        result = await x.ingest([e.encode() for e in c])
        assert result.stored == 1 and result.error
        assert not x.store.db.execute("SELECT COUNT(*) FROM transfers").fetchone()[0]
        s = ledger(1)
        with pytest.raises(InvalidReceipt):
            await s.record_earn(bad)
        assert s.store.count() == 0


async def test_receipt_tracker_bounds_the_servers_risk():
    server, client = ident(1), ident(2)
    signer = ReceiptSigner(client, server=server.public_key, model="m", start=2, end=5, pricing=PRICING)
    tracker = ReceiptTracker(server=server.public_key, client=client.public_key, model="m", start=2, end=5,
                             session=signer.session, pricing=PRICING)
    tracker.require(0)
    r1 = signer.sign(7)
    with pytest.raises(InvalidReceipt, match="only 5"):
        tracker.accept(r1, served_tokens=5)  # claims more than was served
    tracker.accept(r1, served_tokens=7)
    tracker.require(7)
    with pytest.raises(InvalidReceipt, match="not signed for 1"):
        tracker.require(8)  # the client stopped signing: the server stops serving
    with pytest.raises(InvalidReceipt, match="not newer"):
        tracker.accept(r1, served_tokens=7)
    other = ReceiptSigner(client, server=server.public_key, model="m", start=2, end=5, pricing=PRICING)
    with pytest.raises(InvalidReceipt, match="another"):
        tracker.accept(other.sign(8), served_tokens=8)
    tracker.accept(signer.sign(9), served_tokens=9)
    assert tracker.covered_tokens == 9 and tracker.latest.counter == 2


# --- grants ---------------------------------------------------------------------------------------------


async def test_grants_are_bounded_and_only_authorities_fund_others():
    a, b, boss = ident(1), ident(2), ident(7)
    policy = CreditPolicy(starting_grant=1000, grant_authorities=frozenset({boss.public_key}), max_authority_grant=10**6)
    x = ledger(3, policy=policy)
    too_much = chain(a, [("grant", grant_body(a, 1001))])
    assert "exceeds" in (await x.ingest([e.encode() for e in too_much])).error
    to_other = chain(a, [("grant", msgpack.packb([b.public_key, 10, ""]))])
    assert "authorities" in (await x.ingest([e.encode() for e in to_other])).error
    twice = chain(a, [("grant", grant_body(a, 1000)), ("grant", grant_body(a, 1000))])
    result = await x.ingest([e.encode() for e in twice])
    assert result.stored == 1 and "first entry" in result.error
    funded = chain(boss, [("grant", msgpack.packb([b.public_key, 10**6, "welcome"])),
                          ("grant", msgpack.packb([a.public_key, 5, ""]))])
    assert (await x.ingest([e.encode() for e in funded])).stored == 2
    bal = await x.balances()
    assert bal[a.public_key].raw == 1005 and bal[b.public_key].raw == 10**6
    assert sum(v.raw for v in bal.values()) == 1000 + 10**6 + 5


# --- forks -----------------------------------------------------------------------------------------------


async def test_fork_is_detected_proved_and_freezes_the_author():
    cheat, client, x, y = ident(1), ident(2), ledger(3), ledger(4)
    base = chain(cheat, [("grant", grant_body(cheat))])
    r = sign(client, cheat, tokens=50)
    earn = LogEntry.create(cheat, 2, base[0].hash, 2000, "earn", receipt_body(r))
    other = LogEntry.create(cheat, 2, base[0].hash, 2000, "dispute", msgpack.packb([client.public_key, "x", b""]))
    assert (await x.ingest([base[0].encode(), earn.encode()])).stored == 2
    bal = await x.balance(cheat.public_key)
    assert bal.raw == bal.effective == 1_000_000 + r.flops
    result = await x.ingest([other.encode()])
    proof = result.fork
    assert proof is not None and proof.seq == 2 and proof.author == cheat.public_key and result.stored == 0
    assert x.is_frozen(cheat.public_key)
    bal = await x.balance(cheat.public_key)
    # Counts only below the fork point, and nothing in its favour; the client's debt from seq 2 is void too.
    assert bal.frozen and bal.raw == 1_000_000 and bal.effective == 0
    assert (await x.balance(client.public_key)).spent == 0
    # Nothing past the fork point is taken any more.
    nxt = LogEntry.create(cheat, 3, earn.hash, 3000, "dispute", msgpack.packb([client.public_key, "y", b""]))
    assert (await x.ingest([nxt.encode()])).frozen and x.store.head(cheat.public_key)[0] == 2
    # The proof is transferable: a peer that saw only one branch checks it and freezes the author too.
    wire = ForkProof.decode(proof.encode())
    await y.ingest([base[0].encode(), other.encode()])
    assert await y.add_fork_proof(wire) and y.is_frozen(cheat.public_key)
    assert not await y.add_fork_proof(wire)  # known already
    assert await x.balances() == await y.balances()
    # A peer may record the proof in its own chain; verifiers check it there too.
    z = ledger(5)
    await z.record_fork(proof)
    zz = ledger(6)
    assert (await zz.ingest([e.encode() for e in z.store.entries(ident(5).public_key)])).stored == 1
    assert zz.is_frozen(cheat.public_key)


async def test_bad_fork_proofs_are_refused():
    a, b = ident(1), ident(2)
    e1 = LogEntry.create(a, 1, ZERO_HASH, 1, "grant", grant_body(a))
    e2 = LogEntry.create(a, 1, ZERO_HASH, 2, "grant", grant_body(a))
    eb = LogEntry.create(b, 1, ZERO_HASH, 2, "grant", grant_body(b))
    x = ledger(3)
    for bad in (ForkProof.of(e1.signed_header(), e1.signed_header()),
                ForkProof.of(e1.signed_header(), eb.signed_header())):
        with pytest.raises(InvalidForkProof):
            await x.add_fork_proof(bad)
    h = e2.signed_header()
    forged = ForkProof.from_list([e1.signed_header().to_list(), [*h.to_list()[:6], b"\1" * 64]])
    with pytest.raises(InvalidForkProof, match="not signed"):
        await x.add_fork_proof(forged)
    with pytest.raises(InvalidForkProof):
        ForkProof.decode(b"\x93\x01\x02\x03")
    assert not x.forks and not x.store.forks()
    await x.add_fork_proof(ForkProof.of(e1.signed_header(), e2.signed_header()))
    assert x.is_frozen(a.public_key)


# --- balances -------------------------------------------------------------------------------------------


async def test_balances_are_equal_everywhere_and_conserved():
    rng = random.Random(5)
    peers = [ledger(i) for i in range(1, 7)]
    for p in peers:
        await p.claim_starting_grant()
    signers = {}
    for _ in range(40):
        s, c = rng.sample(peers, 2)
        key = (s.me, c.me, rng.randrange(3))
        if key not in signers:
            signers[key] = ReceiptSigner(c.identity, server=s.me, model="m", start=0, end=rng.randint(1, 30),
                                         pricing=PRICING)
        signer = signers[key]
        r = signer.sign(signer.tokens + rng.randint(1, 40))
        await s.record_earn(r)
        if rng.random() < 0.7:  # some clients never record their spends: their debt stands anyway
            await c.record_spend(r)
    for viewer in peers:
        for author in peers:
            if author is not viewer:
                result = await viewer.ingest(author.store.range_wire(author.me, 1, 1000))
                assert result.error is None
    views = [await p.balances() for p in peers]
    assert all(v == views[0] for v in views)
    assert sum(b.raw for b in views[0].values()) == 6 * POLICY.starting_grant
    total_earned = sum(b.earned for b in views[0].values())
    assert total_earned == sum(b.spent for b in views[0].values()) > 0
    s0 = await peers[0].summary()
    assert s0["unit"].startswith("GFLOP") and s0["total"] == 6 * POLICY.starting_grant / 1e9


async def test_an_authors_entries_without_receipts_are_bounded_in_number_and_bytes():
    now = [1000.0]
    limits = IngestLimits(burst_entries=8, burst_bytes=64 * 1024, entries_per_hour=4, bytes_per_hour=24 * 1024)
    viewer = ledger(1, clock=lambda: now[0], ingest_limits=limits)
    spammer, accused = ident(2), ident(3)
    dispute = ("dispute", msgpack.packb([accused.public_key, "lied", b"x" * 12 * 1024]))
    wires = [e.encode() for e in chain(spammer, [("grant", grant_body(spammer))] + [dispute] * 40)]
    result = await viewer.ingest(wires)
    assert result.stored == 6 and result.throttled and result.error is None  # 64 KiB: the grant and 5 disputes
    assert viewer.heads[spammer.public_key][0] == 6 and viewer.throttled(spammer.public_key)
    now[0] += 3600  # an hour refills 4 entries and 24 KiB: two more disputes fit
    assert not viewer.throttled(spammer.public_key)
    result = await viewer.ingest(wires[6:])
    assert result.stored == 2 and result.throttled
    now[0] += 10 * 3600  # the burst is the most an author saves up
    assert (await viewer.ingest(wires[8:])).stored == 5
    # small entries run out by number
    chatty = ident(6)
    notes = [("dispute", msgpack.packb([accused.public_key, f"lied {i}", b""])) for i in range(20)]
    result = await viewer.ingest([e.encode() for e in chain(chatty, notes)])
    assert result.stored == 8 and result.throttled


async def test_earning_is_not_slowed_by_the_allowance():
    viewer = ledger(1, ingest_limits=IngestLimits(burst_entries=2, burst_bytes=32 * 1024, entries_per_hour=1,
                                                   bytes_per_hour=1024))
    server, client = ident(4), ident(5)
    earns = [("earn", receipt_body(sign(client, server, session=i.to_bytes(16, "big")))) for i in range(300)]
    result = await viewer.ingest([e.encode() for e in chain(server, [("grant", grant_body(server))] + earns)])
    assert result.stored == 301 and not result.throttled and result.error is None
    assert (await viewer.balance(server.public_key)).earned == 300 * PRICING("m", 0, 3, 10)


async def test_store_on_disk_survives_reopening(tmp_path):
    a = ledger(1, tmp_path)
    await a.claim_starting_grant()
    for i in range(5):
        await a.record_dispute(ident(2).public_key, f"reason {i}")
    b_chain = chain(ident(2), [("grant", grant_body(ident(2)))])
    await a.ingest([e.encode() for e in b_chain])
    a.store.close()
    again = ledger(1, tmp_path)
    assert again.heads[again.me][0] == 6 and again.verify_chain(again.me) == 6
    assert again.verify_chain(ident(2).public_key) == 1
    assert (await again.append("dispute", msgpack.packb([ident(2).public_key, "more", b""]))).seq == 7
    assert again.store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
