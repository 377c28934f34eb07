"""Hardware tiers and precision in prices (pipeline/tiers.py, pipeline/pricing.py): the tier a measured
speed places a server in, the quarantine after a change of tier, receipts that carry a rate and are
verified at it, the one rate a session is priced at (stated at open, refused by a client that does not
believe it: re-routed, never banned), what a client believes of an announced tier and of the speed it saw
(pushed steps too), `--prefer cheap|fast`, and a priced generation between real processes where the
client's debit is the server's credit."""

from __future__ import annotations

import json

import msgpack
import pytest

from credits import RATE_UNIT, InvalidReceipt, Ledger, Receipt, ReceiptTracker, Store
from dht.records import InvalidRecord
from p2p.identity import Identity
from pipeline.announce import ServerInfo
from pipeline.billing import ClientBilling, ServerBilling
from pipeline.errors import SERVER_SPECIFIC, RateRefused, ReceiptRequired
from pipeline.flops import span_flops, tier_flops_per_token
from pipeline.pricing import DEFAULT_MODEL_CONFIG, DEFAULT_MODEL_ID, POLICIES, ModelPricing
from pipeline.protocol import InferenceError
from pipeline.routing import OBSERVED_SLACK, SequenceManager, find_route
from pipeline.tiers import MAX_MILLI, MIN_MILLI, RECORD_NAME, TIERS, TierRecord, settle_tier, tier_milli, tier_multiplier, tier_of

TIERED = POLICIES["tiered"]
SESSION = b"s" * 16


def _receipt(client: Identity, server: Identity, *, rate: int = RATE_UNIT, tokens: int = 10, counter: int = 1,
             pricing: ModelPricing | None = None) -> Receipt:
    pricing = pricing or ModelPricing(TIERED)
    return Receipt.sign(client, server=server.public_key, model=DEFAULT_MODEL_ID, start=0, end=2, tokens=tokens,
                        flops=pricing(DEFAULT_MODEL_ID, 0, 2, tokens, rate), session=SESSION, counter=counter,
                        rate=rate)


# --- the tier table ---------------------------------------------------------------------------------------


def test_the_tier_of_a_measured_speed_and_its_multiplier():
    for tier in TIERS:  # at each anchor: that tier, at its multiplier
        assert tier_of(tier.flops_per_s).name == tier.name
        assert tier_multiplier(tier.flops_per_s) == pytest.approx(tier.multiplier)
    assert [t.multiplier for t in TIERS][0] == 0.05 and TIERS[-1].multiplier == 8.0
    # below the first anchor and above the last: clamped
    assert tier_of(1e6).name == "edge" and tier_milli(1e6) == MIN_MILLI == 50
    assert tier_of(1e18).name == "datacenter" and tier_milli(1e18) == MAX_MILLI == 8000
    # between anchors: the tier reached so far, a multiplier interpolated on a log scale of FLOP/s
    assert tier_of(1e12).name == "cpu"
    assert tier_multiplier(1e12) == pytest.approx((0.25 * 1.0) ** 0.5)  # halfway (log) from 1e11 to 1e13
    speeds = [10 ** (9 + k / 4) for k in range(24)]
    multipliers = [tier_multiplier(f) for f in speeds]
    assert multipliers == sorted(multipliers) and len(set(multipliers)) > 15  # monotonic, and not a step


def test_a_change_of_tier_is_quarantined_at_the_lower_tier(tmp_path):
    cpu, datacenter = 1e11, 2e14
    first = settle_tier(tmp_path, cpu, now=1000.0, quarantine_s=100.0)
    assert (first.tier, first.announced_milli(1000.0)) == ("cpu", 250)
    assert json.loads((tmp_path / RECORD_NAME).read_text())["tier"] == "cpu"  # kept in the state dir

    # the same identity on data-center hardware: priced as the old cpu until the quarantine ends
    moved = settle_tier(tmp_path, datacenter, now=2000.0, quarantine_s=100.0)
    assert moved.tier == "datacenter" and moved.milli == 8000
    assert moved.announced_milli(2000.0) == 250 and moved.announced_milli(2099.0) == 250
    assert moved.announced_milli(2100.0) == 8000
    # a restart during the quarantine does not end it
    again = settle_tier(tmp_path, datacenter, now=2050.0, quarantine_s=100.0)
    assert again.announced_milli(2050.0) == 250 and again.quarantine_until == 2100.0
    # after it, a restart on the same hardware is priced at its tier with no quarantine
    after = settle_tier(tmp_path, datacenter, now=3000.0, quarantine_s=100.0)
    assert after.announced_milli(3000.0) == 8000 and after.quarantine_until <= 3000.0

    # moving down is priced at the new (lower) tier at once: min(old, new)
    down = settle_tier(tmp_path, cpu, now=4000.0, quarantine_s=100.0)
    assert down.announced_milli(4000.0) == 250

    # measurement noise within a tier changes the multiplier, not the quarantine
    noisy = settle_tier(tmp_path, cpu * 1.5, now=5000.0, quarantine_s=100.0)
    assert noisy.tier == "cpu" and noisy.announced_milli(5000.0) == tier_milli(cpu * 1.5) > 250


def test_a_damaged_tier_record_quarantines_at_the_lowest_tier(tmp_path):
    (tmp_path / RECORD_NAME).write_text('{"tier": "datacenter", "milli": "lots"')  # an edit gone wrong
    record = settle_tier(tmp_path, 2e14, now=10.0, quarantine_s=60.0)
    assert record.announced_milli(10.0) == MIN_MILLI and record.announced_milli(70.0) == 8000
    (tmp_path / RECORD_NAME).write_text(json.dumps({"tier": "datacenter", "milli": 10**9, "floor_milli": 8000,
                                                     "quarantine_until": 0}))
    assert settle_tier(tmp_path, 2e14, now=10.0, quarantine_s=60.0).announced_milli(10.0) == MIN_MILLI
    # no state dir: no history under the identity, nothing to quarantine
    assert settle_tier(None, 2e14, now=10.0).announced_milli(10.0) == 8000


# --- prices and receipts ------------------------------------------------------------------------------------


def test_the_tiered_policy_weights_tier_and_precision_and_flops_stays_pure():
    flops = POLICIES["flops"]
    assert flops.rate(8000, "float32") == flops.rate(50, "int8") == RATE_UNIT  # the default: pure FLOPs
    assert TIERED.rate(1000, "float32") == 1000 and TIERED.rate(8000, "float32") == 8000
    assert TIERED.rate(1000, "bfloat16") == TIERED.rate(1000, "float16") == 900
    assert TIERED.rate(1000, "int8") == 600 and TIERED.rate(1000, "float64") == 600  # unlisted: the lowest
    assert (TIERED.min_rate, TIERED.max_rate) == (30, 8000)
    base = span_flops(DEFAULT_MODEL_CONFIG, 0, 2, 10)
    tiered = ModelPricing(TIERED)
    assert tiered(DEFAULT_MODEL_ID, 0, 2, 10) == base  # a receipt without a rate is pure FLOPs
    assert tiered(DEFAULT_MODEL_ID, 0, 2, 10, 8000) == base * 8
    assert tiered(DEFAULT_MODEL_ID, 0, 2, 10, 900) == base * 900 // 1000
    for rate in (29, 8001):
        with pytest.raises(ValueError):
            tiered(DEFAULT_MODEL_ID, 0, 2, 10, rate)
    with pytest.raises(ValueError):  # a pure-FLOPs swarm prices nothing at another rate
        ModelPricing()(DEFAULT_MODEL_ID, 0, 2, 10, 900)


def test_a_receipt_carries_its_rate_signed_and_is_verified_at_it():
    client, server = Identity.generate(), Identity.generate()
    plain = _receipt(client, server)
    assert len(plain.to_list()) == 10  # the unit rate encodes as receipts always did
    assert msgpack.unpackb(plain.message)[0] == "potluck/receipt/1" and len(msgpack.unpackb(plain.message)) == 10
    rated = _receipt(client, server, rate=250)
    assert len(rated.to_list()) == 11 and Receipt.from_list(rated.to_list()) == rated
    rated.verify(ModelPricing(TIERED))
    with pytest.raises(InvalidReceipt):  # a pure-FLOPs swarm refuses a rated receipt
        rated.verify(ModelPricing())
    forged = rated.to_list()
    forged[10] = 8000  # the server raises the rate (and the FLOPs to match): the client never signed it
    forged[6] = ModelPricing(TIERED)(DEFAULT_MODEL_ID, 0, 2, 10, 8000)
    with pytest.raises(InvalidReceipt, match="not signed"):
        Receipt.from_list(forged).verify(ModelPricing(TIERED))
    with pytest.raises(InvalidReceipt):  # one encoding per receipt: the unit rate is never written out
        Receipt.from_list(plain.to_list() + [RATE_UNIT])
    for bad in (0, -1, True, 1.5, "250", 10**9):
        with pytest.raises(InvalidReceipt):
            Receipt.from_list(plain.to_list() + [bad])


def test_a_sessions_rate_cannot_change_under_a_cumulative_receipt():
    client, server = Identity.generate(), Identity.generate()
    tracker = ReceiptTracker(server=server.public_key, client=client.public_key, model=DEFAULT_MODEL_ID, start=0,
                             end=2, session=SESSION, pricing=ModelPricing(TIERED))
    tracker.accept(_receipt(client, server, rate=250, tokens=5), served_tokens=5)
    with pytest.raises(InvalidReceipt, match="rate"):  # would reprice the 5 tokens already signed for
        tracker.accept(_receipt(client, server, rate=50, tokens=10, counter=2), served_tokens=10)
    tracker.accept(_receipt(client, server, rate=250, tokens=10, counter=2), served_tokens=10)


async def test_a_server_states_one_rate_per_session_and_accepts_no_other():
    server, client = Identity.generate(), Identity.generate()
    billing = ServerBilling(Ledger(server, Store(None), pricing=ModelPricing(TIERED)))
    billing.set_tier(1000, "bfloat16")
    assert billing.rate == 900
    account = await billing.open(client.peer_id, session=SESSION, model=DEFAULT_MODEL_ID, start=0, end=2, idle=True)
    assert account is not None and account.rate == 900  # what "opened" states
    for rate in (1000, TIERED.rate(MIN_MILLI, "bfloat16")):  # more, or the lowest tier's floor: both refused
        with pytest.raises(InferenceError) as refused:
            account.check(_receipt(client, server, rate=rate, tokens=4).to_list(), 4)
        assert refused.value.kind == "BadReceipt"
    account.check(_receipt(client, server, rate=900, tokens=4).to_list(), 4)
    assert account.tracker.latest is not None and account.tracker.latest.rate == 900
    billing.set_tier(250, "bfloat16")  # e.g. a quarantine began: new sessions only
    other = await billing.open(client.peer_id, session=b"t" * 16, model=DEFAULT_MODEL_ID, start=0, end=2, idle=True)
    assert other is not None and other.rate == 225 and account.rate == 900
    assert billing.stats["bad_receipts"] == 2


def test_a_client_signs_at_the_stated_rate_only_up_to_the_tier_it_believes():
    client, server = Identity.generate(), Identity.generate()
    billing = ClientBilling(Ledger(client, Store(None), pricing=ModelPricing(TIERED)))
    assert billing.rate(server.peer_id, "float32") == 50  # no belief: the lowest tier, at the session's precision
    billing.tier_source = lambda peer: 1000
    info = {"model": DEFAULT_MODEL_ID, "start": 0, "end": 2, "served": 0, "tokens": 4}
    for asked in (2700, TIERED.min_rate - 1, 0):  # dearer than believed, or no rate the policy prices
        with pytest.raises(RateRefused) as refused:
            billing.agree(server.peer_id, SESSION, asked, "bfloat16")
        assert isinstance(refused.value, SERVER_SPECIFIC) and refused.value.peer_id == server.peer_id
    assert billing.receipt(server.peer_id, SESSION, info) is None  # no rate agreed: nothing signed
    billing.agree(server.peer_id, SESSION, 450, "bfloat16")  # cheaper than believed (e.g. quarantined): its rate
    assert Receipt.from_list(billing.receipt(server.peer_id, SESSION, info)).rate == 450


# --- announcements, belief, routing ---------------------------------------------------------------------------


def _info(peer: str, *, prefill_tps: float, tier_milli_: int | None, decode_tps: float = 1000.0,
          dtype: str = "float32", start: int = 0, end: int = 4) -> ServerInfo:
    return ServerInfo(peer_id=peer, start=start, end=end, decode_tps=decode_tps, prefill_tps=prefill_tps,
                      cache_tokens=10**6, dtype=dtype, tier="cpu" if tier_milli_ else None, tier_milli=tier_milli_,
                      flops_per_s=1e11 if tier_milli_ else None)


def test_an_announcement_carries_its_tier_and_a_bad_one_is_refused():
    info = _info("a", prefill_tps=100.0, tier_milli_=250)
    back = ServerInfo.from_value("a", info.to_value())
    assert (back.tier, back.tier_milli, back.flops_per_s) == ("cpu", 250, 1e11)
    old = {k: v for k, v in info.to_value().items() if k not in ("tier", "tier_milli", "flops_per_s")}
    assert ServerInfo.from_value("a", old).tier_milli is None  # from before tiers: decodes without one
    for field, bad in (("tier", "quantum"), ("tier", 3), ("tier_milli", 8001), ("tier_milli", 49),
                       ("tier_milli", 2.5), ("flops_per_s", -1.0), ("flops_per_s", float("inf"))):
        with pytest.raises(InvalidRecord):
            ServerInfo.from_value("a", {**info.to_value(), field: bad})


def _manager(*servers: ServerInfo) -> SequenceManager:
    # what believed_tier and price read: announcements (no DHT is asked) and the model's FLOPs per token
    manager = SequenceManager(dht=None, model_id=DEFAULT_MODEL_ID, num_blocks=30)  # type: ignore[arg-type]
    manager.servers = list(servers)
    manager.block_flops = lambda block: tier_flops_per_token(DEFAULT_MODEL_CONFIG, block)
    return manager


def test_a_client_believes_a_tier_only_as_far_as_speeds_bear_it_out():
    per_token = tier_flops_per_token(DEFAULT_MODEL_CONFIG, 0)
    assert per_token == span_flops(DEFAULT_MODEL_CONFIG, 0, 1, 64) / 64  # what the server places itself by
    datacenter_tps = TIERS[-1].flops_per_s / per_token  # prefill tokens/s a data-center accelerator gets
    cpu_tps = TIERS[1].flops_per_s / per_token
    honest = _info("honest", prefill_tps=datacenter_tps, tier_milli_=8000)
    boaster = _info("boaster", prefill_tps=cpu_tps, tier_milli_=8000)  # cpu speed, datacenter price
    silent = _info("silent", prefill_tps=datacenter_tps, tier_milli_=None)
    manager = _manager(honest, boaster, silent)
    assert manager.believed_tier("honest") == 8000
    assert manager.believed_tier("boaster") == 250  # what its own announced speed is worth
    assert manager.believed_tier("silent") == MIN_MILLI
    assert manager.believed_tier("stranger") == MIN_MILLI

    # seen stepping within OBSERVED_SLACK of its announced speed (by the compute time it reports): believed
    blocks = 4
    manager.observe_speed("honest", 64, blocks, 64 * blocks / (datacenter_tps / (OBSERVED_SLACK / 2)), wall_s=5.0)
    assert manager.believed_tier("honest") == 8000
    manager.observe_speed("honest", 16, blocks, 1e3, wall_s=1e3)  # shorter than the start-up measurement: nothing
    assert manager.believed_tier("honest") == 8000
    # an overclaim: announced datacenter speed, seen at cpu speed: believed at most the tier of 4× that
    liar = _info("liar", prefill_tps=datacenter_tps, tier_milli_=8000)
    manager.servers.append(liar)
    manager.observe_speed("liar", 64, blocks, 64 * blocks / cpu_tps, wall_s=60.0)
    assert manager.believed_tier("liar") == tier_milli(TIERS[1].flops_per_s * OBSERVED_SLACK) < 1000
    # a reported compute time longer than the wall clock we saw (or none) counts the wall clock
    late = _info("late", prefill_tps=datacenter_tps, tier_milli_=8000)
    manager.servers.append(late)
    manager.observe_speed("late", 64, blocks, 1e9, wall_s=64 * blocks / cpu_tps)
    assert manager.believed_tier("late") == manager.believed_tier("liar")
    # the client has no config to price FLOPs by: no tier is believed
    manager.block_flops = None
    assert manager.believed_tier("honest") == MIN_MILLI


def test_prefer_cheap_picks_the_cheaper_of_two_equal_servers_and_fast_the_faster():
    per_token = span_flops(DEFAULT_MODEL_CONFIG, 0, 1, 64) / 64
    tps = 1e13 / per_token  # consumer speed: both may claim up to 1×
    quarantined = _info("quarantined", prefill_tps=tps, tier_milli_=250)  # just moved here: the old tier's price
    settled = _info("settled", prefill_tps=tps, tier_milli_=1000)
    manager = _manager(quarantined, settled)
    for order in ([quarantined, settled], [settled, quarantined]):  # whichever comes first
        hops = find_route(order, 0, 4, price=manager.price)
        assert [h.peer_id for h in hops] == ["quarantined"]

    # faster and dearer against slower and cheaper: fast takes the speed, cheap the price
    fast = _info("fast", prefill_tps=1e14 / per_token, tier_milli_=3000, decode_tps=4000.0)
    slow = _info("slow", prefill_tps=1e11 / per_token, tier_milli_=250, decode_tps=500.0)
    manager = _manager(fast, slow)
    assert [h.peer_id for h in find_route([fast, slow], 0, 4)] == ["fast"]
    assert [h.peer_id for h in find_route([fast, slow], 0, 4, price=manager.price)] == ["slow"]
    # with a client ledger, routing prices what the receipts would carry (rate_of), precision included
    manager.rate_of = lambda peer, dtype: TIERED.rate(manager.believed_tier(peer), dtype)
    assert manager.price(fast) == 3.0 and manager.price(slow) == 0.25


# --- real processes -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_tiered_generation_between_processes_debits_the_client_what_it_credits_the_server(smollm2_data, tmp_path):
    """Two `potluck serve --pricing tiered` processes: a server of all SmolLM2's blocks, placed in a tier by
    its own start-up measurement, and a client. The client's spend is the server's earn, receipt for
    receipt, at a rate the server accepts and the tiered policy prices (not pure FLOPs)."""
    from potluck.localswarm import wait_until
    from testkit.processes import first_generation, server_and_client

    common = ["--model", str(smollm2_data[1]), "--threads", "1", "--pricing", "tiered"]  # the swarm's policy
    with server_and_client(tmp_path, common) as (server, client):
        status = server.call("status")["server"]
        tier, rate = status["tier"], status["billing"]["rate"]
        assert tier["name"] in [t.name for t in TIERS] and MIN_MILLI <= tier["milli"] <= MAX_MILLI
        assert rate == TIERED.rate(tier["milli"], "float32")
        assert json.loads((tmp_path / "server" / RECORD_NAME).read_text())["tier"] == tier["name"]
        first_generation(client, "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", 6)

        def agreed():
            theirs = {row["peer_id"]: row for row in server.call("credits")["peers"]}.get(client.peer_id)
            ours = {row["peer_id"]: row for row in client.call("credits")["peers"]}.get(client.peer_id)
            return theirs is not None and ours is not None and ours["spent"] == theirs["earned_from"] > 0

        wait_until(agreed, 60, 1, message="the client's debit to equal the server's credit")

    def receipts(name: str, kind: str) -> list[Receipt]:
        identity = Identity.load_or_create(tmp_path / name)
        ledger = Ledger.open(identity, tmp_path / name, pricing=ModelPricing(TIERED))
        try:
            return [Receipt.from_list(msgpack.unpackb(e.body)[0]) for e in ledger.store.entries_of_kind(kind)
                    if e.author == identity.public_key]
        finally:
            ledger.store.close()

    earned, spent = receipts("server", "earn"), receipts("client", "spend")
    assert earned and {r.signature for r in spent} <= {r.signature for r in earned}
    paid = max(spent, key=lambda r: r.counter)
    assert paid in earned and paid.rate != RATE_UNIT and paid.rate == rate  # the rate the server stated
    assert paid.flops == span_flops(DEFAULT_MODEL_CONFIG, 0, 30, paid.tokens) * paid.rate // RATE_UNIT
    print(f"\ntier {tier['name']} ({tier['flops_per_s']:.3g} FLOP/s): {paid.tokens} tokens at rate {paid.rate}, "
          f"{paid.flops / 1e9:.2f} GFLOP-credits earned = spent")


def test_potluck_status_shows_the_served_blocks_tier():
    from rich.console import Console

    from potluck.status import render_status

    console = Console(record=True, width=100, color_system=None)
    server = {"model_id": "2c49f44b91f1f918", "start": 0, "end": 30, "sessions": 0, "sessions_opened": 0,
              "tokens": 0, "throughput": {"decode_tps": 300.0}, "cache_tokens_left": 1000,
              "tier": {"name": "cpu", "milli": 250, "quarantine_until": 0.0, "flops_per_s": 1e11}}
    render_status({"peer_id": "12D3KooWHeLxnfQRGkwYNgrMAwb3MPD14ScT7rcmVCfg1mg9vYqp", "region": "", "addrs": [],
                   "dht": {"clusters": {}}, "api": None, "peers": [], "server": server, "last_generation": None},
                  console)
    assert "tier cpu (0.25×)" in console.export_text()


@pytest.mark.slow
def test_prefer_cheap_between_processes_routes_through_the_quarantined_server(smollm2_data, tmp_path):
    """Two servers of all SmolLM2's blocks on this machine (the same tier); one of them moved here from
    other hardware under its identity and is still in quarantine at the lowest tier's price. A client
    started with `--prefer cheap` routes through it and pays it the lowest rate."""
    import time

    from potluck.localswarm import PeerProcess, wait_until

    common = ["--model", str(smollm2_data[1]), "--threads", "1", "--pricing", "tiered"]
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / RECORD_NAME).write_text(json.dumps(  # its record from before the move: quarantined, floor the lowest
        {"tier": "datacenter", "milli": 8000, "floor_milli": MIN_MILLI, "quarantine_until": time.time() + 3600}))
    settled = PeerProcess(tmp_path / "settled", *common, "--blocks", "0:30").start(timeout=120)
    procs = [settled]
    try:
        procs.append(PeerProcess(moved, *common, "--blocks", "0:30", "--bootstrap", settled.addr).start(timeout=120))
        quarantined = procs[1]
        for server in procs:
            wait_until(lambda: server.call("status")["server"]["start"] is not None, 120, message="the servers loaded")
        tiers = {p.peer_id: p.call("status")["server"]["tier"] for p in procs}
        assert tiers[quarantined.peer_id]["milli"] == MIN_MILLI < tiers[settled.peer_id]["milli"]
        client = PeerProcess(tmp_path / "client", *common, "--prefer", "cheap", "--bootstrap", settled.addr)
        procs.append(client.start(timeout=120))

        def knows_both():  # before its first route: a server it has reached would have the edge of a stranger
            models = client.call("status", models=True).get("models") or []
            return {s["peer_id"] for m in models for s in (m.get("coverage") or {}).get("servers", [])} >= set(tiers)

        wait_until(knows_both, 120, 1, message="the client to hear both servers")

        def generated():
            try:
                return client.call("generate", prompt="1, 2, 3, 4, 5,", max_tokens=3, timeout=120)
            except RuntimeError:
                return None  # the peer has not taken up the model yet (no route is tried before it has)

        result = wait_until(generated, 120, 2, message="a generation")
        assert [hop["peer_id"] for hop in result["route"]] == [quarantined.peer_id]
    finally:
        for p in procs:
            p.close()


# --- agreed rates in sessions (in process) ----------------------------------------------------------------------


class _OneReply:
    """A network whose one stream answers "open" with `reply` (what RemoteHop.open reads of a server)."""

    def __init__(self, reply: dict):
        self.reply = reply

    def address_of(self, peer_id: str) -> None:
        return None

    async def open_stream(self, peer_id: str, protocol: str) -> "_OneReply":
        return self

    async def send(self, msg: dict) -> None:
        pass

    async def receive(self) -> dict:
        return self.reply

    async def aclose(self) -> None:
        pass


async def test_the_rate_an_opened_reply_states_is_an_integer_in_bounds():
    from p2p.errors import FrameError
    from pipeline.hop import RemoteHop
    from pipeline.routing import RouteHop

    server = Identity.generate()
    opened = {"t": "opened", "session": SESSION, "start": 0, "end": 2, "max_length": 64, "cache_tokens_left": 64}

    async def open_with(**reply):
        return await RemoteHop.open(_OneReply({**opened, **reply}), RouteHop(server.peer_id, 0, 2), (),  # type: ignore[arg-type]
                                    model_id=DEFAULT_MODEL_ID, max_length=64, dtype="float32", timeout=5.0)

    assert (await open_with(rate=900)).rate == 900
    assert (await open_with()).rate is None  # a server that bills nothing states none
    for bad in (True, "900", 9.0, 0, -1, 10**6 + 1, 1 << 70):
        with pytest.raises(FrameError, match="rate"):
            await open_with(rate=bad)


def _tiered(*peers) -> None:
    """Switch billed peers (tests/testkit/billing.py: pure FLOPs) to the tiered policy, as `--pricing tiered` would."""
    for p in peers:
        p.ledger.pricing.policy = TIERED
        for billing in (getattr(getattr(p, "server", None), "billing", None), getattr(p, "client_billing", None)):
            if billing is not None:
                billing.policy = TIERED


def _ask(server, milli: int) -> None:
    """`server` places itself at tier multiplier `milli` and prices its sessions from now on by it."""
    server.server.tier = TierRecord(tier_of(0).name, milli, milli)  # what it announces and re-prices by
    server.server.billing.set_tier(milli, server.server.dtype_name)


async def test_a_server_asking_more_than_believed_is_routed_around_and_never_banned(llama):
    """Two servers of the same blocks, one asking a data-center rate its announced speed does not bear
    out: the client opens it, refuses its rate (RateRefused), routes through the other at the rate that
    one stated, and bans nobody; when every server asks too much, the generation fails saying so."""
    import trio

    from pipeline.loading import ModelFolder
    from testkit.billing import add_client, add_server
    from testkit.swarms import swarm

    path, mid, local = llama
    cfg = ModelFolder(path).config
    prompt = [5, 17, 42, 8, 99, 3]
    with trio.fail_after(90):
        async with swarm("libp2p", path, [], model_id=mid) as s:
            dear = await add_server(s, 0, 4, mid=mid, cfg=cfg)
            fair = await add_server(s, 0, 4, mid=mid, cfg=cfg)
            client, model = await add_client(s, mid=mid, cfg=cfg)
            client.client_billing = model.client_config.billing
            _tiered(dear, fair, client)
            _ask(dear, 8000)
            _ask(fair, 3000)  # both dearer than their announced speed bears out: no route is left
            with pytest.raises(RateRefused, match="asks rate"):
                await model.generate(prompt, max_new_tokens=4, stop_token_ids=[])
            assert not model.sequence.banned()
            assert dear.server.stats["sessions_opened"] >= 1 and fair.server.stats["sessions_opened"] >= 1  # both opened

            _ask(fair, MIN_MILLI)  # the tiny model at the test's fixed speed: the lowest tier
            for _ in range(2):
                g = await model.generate(prompt, max_new_tokens=4, stop_token_ids=[])
                assert g.token_ids == local.generate_greedy(prompt, 4)
                assert {peer for peer, _, _ in g.servers} == {fair.network.peer_id}
                assert [r.rate for r in g.paid] == [TIERED.rate(MIN_MILLI, "float32")]
            assert not model.sequence.banned()
            assert dear.server.billing.stats["bad_receipts"] == 0  # refused at open: it never saw a receipt

            # a client signing at another rate than the one agreed (a bug): the server's refusal of the
            # step's receipt reaches the caller typed, and bans nobody
            billing = client.client_billing
            agree = billing.agree
            billing.agree = lambda peer, session, rate, dtype: agree(peer, session, rate - 1, dtype)
            with pytest.raises(ReceiptRequired) as refused:
                await model.generate(prompt, max_new_tokens=4, stop_token_ids=[])
            assert refused.value.kind == "BadReceipt" and refused.value.peer_id == fair.network.peer_id
            assert not model.sequence.banned()


async def test_pushed_steps_observe_the_servers_speed(llama, monkeypatch):
    """In push mode the client still times each server (by the compute time it reports, bounded by when
    its output arrived), so an overclaimed tier is refuted there too."""
    import trio

    from pipeline import routing
    from pipeline.loading import ModelFolder
    from testkit.billing import add_client, add_server
    from testkit.swarms import swarm

    monkeypatch.setattr(routing, "SPEED_CHECK_TOKENS", 8)  # the tiny model's context is shorter than the real check
    path, mid, local = llama
    cfg = ModelFolder(path).config
    with trio.fail_after(90):
        async with swarm("libp2p", path, [], model_id=mid) as s:
            first = await add_server(s, 0, 2, mid=mid, cfg=cfg)
            second = await add_server(s, 2, 4, mid=mid, cfg=cfg)
            client, model = await add_client(s, mid=mid, cfg=cfg)
            model.client_config.push = True
            g = await model.generate(list(range(1, 13)), max_new_tokens=2, stop_token_ids=[])
            assert g.push_fallbacks == 0  # every step went down the push chain
            assert set(model.sequence.speeds) == {first.network.peer_id, second.network.peer_id}
