"""Signed step results and checkable dispute proofs (pipeline/proofs.py, pipeline/disputes.py): a server's
signature covers what it returned and the inputs it ran on; a dispute's proof is re-run by peers that
hold the span; a dispute without a valid proof counts nothing, and dispute spam costs the accuser."""

from types import SimpleNamespace

import msgpack
import pytest
import torch
import trio

from bench.spotcheck import RateLiar
from credits import IngestLimits, ReceiptSigner, StandingView
from p2p.identity import Identity, public_key_from_peer_id
from pipeline.client import TokenEvent
from pipeline.disputes import DisputeJudge, ServedBlocks
from pipeline.limiter import PriorityLimiter
from pipeline.loading import ModelFolder, load_span
from pipeline.proofs import (
    BadSignedStep, DisputeClaim, DisputeProof, InputChain, InvalidProof, ProvenLog, check_signed, is_claim, result_digests,
    sign_step, tensor_digest,
)
from pipeline.proofshelf import ProofShelf
from pipeline.server import BlockServer
from pipeline.protocol import pack_hidden, unpack_hidden
from pipeline.spotcheck import SpotCheckConfig
from testkit.billing import add_client, add_server, make_ledger
from testkit.swarms import swarm

PROMPT = [5, 17, 42, 8, 99, 3]
SEED = b"s" * 16
SESSION = b"i" * 16


@pytest.fixture(scope="module")
def llama(llama):
    path, mid, local = llama
    return path, mid, local, ModelFolder(path).config


@pytest.fixture(scope="module")
def span(llama):
    return load_span(llama[0], 0, 2, dtype="float32", device="cpu")


class CountingBlocks(ServedBlocks):
    """`ServedBlocks` of a stand-in server holding `span`; counts replays (what a judge's work costs)."""

    def __init__(self, span, model_id):
        super().__init__(SimpleNamespace(span=span, model_id=model_id, dtype_name="float32", limiter=PriorityLimiter(1)))
        self.replays = 0

    async def replay(self, start, end, steps):
        self.replays += 1
        return await super().replay(start, end, steps)


def serve(span, server: Identity, mid: str, steps, *, lie_at: int | None = None) -> ProvenLog:
    """Run `steps` [(pos, inputs)] as a server session would (its InputChain, signed results; step
    `lie_at` perturbed before signing), checked and kept by a client's ProvenLog."""
    cache, chain, log = span.new_cache(64), InputChain(SESSION), ProvenLog(SESSION)
    for i, (pos, inputs) in enumerate(steps):
        out = span.forward(inputs, cache, pos)
        if i == lie_at:
            out = out + 0.05 * out.abs().mean()
        digest = chain.add(pos, [inputs.shape[1]], tensor_digest(inputs))
        wire = sign_step(server, model=mid, start=0, end=2, dtype="float32", session=SESSION, step=i, pos=pos,
                         chunks=[inputs.shape[1]], input_digest=digest, **signed_outputs(out), seed=SEED).to_wire()
        record = check_signed(wire, server=server.public_key, model=mid, start=0, end=2, dtype="float32",
                              session=SESSION, step=i, seed=SEED, outputs=out)
        log.accept(record, pos, [inputs.shape[1]], inputs, out)
    return log


def signed_outputs(out: torch.Tensor) -> dict:
    output_digest, output_fingerprint = result_digests(out, SEED)
    return {"output_digest": output_digest, "output_fingerprint": output_fingerprint}


def inputs(n: int, seed: int) -> torch.Tensor:
    return torch.randn(1, n, 64, generator=torch.Generator().manual_seed(seed))


HISTORY = [(0, inputs(6, 1)), (6, inputs(1, 2)), (7, inputs(1, 3)), (6, inputs(1, 4)), (7, inputs(1, 5))]  # a rewind


async def test_proof_of_an_honest_step_replays_as_a_false_accusation(llama, span):
    _, mid, _, _ = llama
    server = Identity.generate()
    log = serve(span, server, mid, HISTORY)
    assert [s.pos for s in log.steps] == [0, 6, 7]  # the rewind dropped what followed position 6
    proof = DisputeProof.decode(log.proof(2).encode(), server.public_key, 64)
    assert proof.record.valid() and proof.inputs_match()
    blocks = CountingBlocks(span, mid)
    judge = DisputeJudge(make_ledger(Identity.generate(), None, mid, llama[3]), blocks)
    assert await judge.judge(server.public_key, proof.encode()) is False
    assert blocks.replays == 1
    # inputs other than those the server signed for are caught by hashing alone
    steps = list(proof.steps)
    steps[1] = (6, (1,), steps[1][2] + 1.0)
    assert not DisputeProof(proof.record, steps).inputs_match()
    assert await judge.judge(server.public_key, DisputeProof(proof.record, steps).encode()) is False
    assert blocks.replays == 1 and judge.stats["bad_inputs"] == 1


async def test_proof_of_a_signed_lie_is_proven_at_a_third_party(llama, span):
    _, mid, _, cfg = llama
    liar = Identity.generate()
    log = serve(span, liar, mid, HISTORY, lie_at=4)
    blocks = CountingBlocks(span, mid)
    judge = DisputeJudge(make_ledger(Identity.generate(), None, mid, cfg), blocks)
    assert await judge.judge(liar.public_key, log.proof(2).encode()) is True
    # a peer that does not hold the span cannot tell: the dispute counts nothing there
    assert await DisputeJudge(judge.ledger, None).judge(liar.public_key, log.proof(2).encode()) is None


def test_client_refuses_results_that_are_not_what_was_signed(llama, span):
    _, mid, _, _ = llama
    server = Identity.generate()
    out = span.forward(inputs(3, 7), span.new_cache(8), 0)
    record = sign_step(server, model=mid, start=0, end=2, dtype="float32", session=SESSION, step=1, pos=0,
                       chunks=[3], input_digest=b"d" * 32, **signed_outputs(out), seed=SEED)
    want = dict(server=server.public_key, model=mid, start=0, end=2, dtype="float32", session=SESSION, step=1,
                seed=SEED, outputs=out)
    check_signed(record.to_wire(), **want)
    for bad in [dict(outputs=out + 1e-2), dict(step=2), dict(seed=b"t" * 16), dict(server=Identity.generate().public_key)]:
        with pytest.raises(BadSignedStep):
            check_signed(record.to_wire(), **{**want, **bad})
    with pytest.raises(BadSignedStep):
        check_signed(None, **want)  # a server that does not sign
    # the signed input digest must be that of the inputs the client sent
    with pytest.raises(BadSignedStep):
        ProvenLog(SESSION).accept(record, 0, [3], inputs(3, 7), out)


def test_proof_decoding_is_bounded_and_typed(llama, span):
    _, mid, _, _ = llama
    server = Identity.generate()
    good = serve(span, server, mid, HISTORY[:2]).proof(1)
    wire = msgpack.unpackb(good.encode(), raw=False)
    assert DisputeProof.decode(good.encode(), server.public_key, 64).record == good.record

    def encoded(**change):
        obj = [wire[0], list(wire[1]), [list(s) for s in wire[2]]]
        for path, value in change.items():
            if path == "version":
                obj[0] = value
            elif path.startswith("record"):
                obj[1][int(path[6:])] = value
            elif path == "steps":
                obj[2] = value
            elif path == "first_input":
                obj[2][0][2] = value
        return msgpack.packb(obj, use_bin_type=True)

    hostile = [
        None, "text", b"", b"\xc1", b"x" * (13 * 1024), msgpack.packb({"a": 1}), msgpack.packb([1, 2, 3]),
        encoded(version="potluck/dispute-proof/0"), encoded(record0=7), encoded(record1=-1),
        encoded(record3="float16"), encoded(record4=b"short"), encoded(record7=[]), encoded(record7=[0]),
        encoded(record7=[True]), encoded(record11=b"\0" * 8), encoded(record12=b"\0" * 3), encoded(steps=[]),
        encoded(steps="steps"), encoded(steps=[[0, [6], b"\0" * 7]]), encoded(first_input=b"\0" * 10),
        encoded(steps=[[0, [1] * 5000, b""]]), msgpack.packb([wire[0], wire[1], [[0, [6], b""]] * 2000]),
        encoded(steps=wire[2][:1]),  # the last step is not the signed one
    ]
    for data in hostile:
        with pytest.raises(InvalidProof):
            DisputeProof.decode(data, server.public_key, 64)
    with pytest.raises(InvalidProof):  # inputs of another hidden size than the verifier's model
        DisputeProof.decode(good.encode(), server.public_key, 32)


async def test_forged_record_counts_nothing_without_compute(llama, span):
    _, mid, _, cfg = llama
    honest, forger = Identity.generate(), Identity.generate()
    log = serve(span, forger, mid, HISTORY, lie_at=4)  # a "lie" signed by the forger's key, not the server's
    blocks = CountingBlocks(span, mid)
    judge = DisputeJudge(make_ledger(Identity.generate(), None, mid, cfg), blocks)
    assert await judge.judge(honest.public_key, log.proof(2).encode()) is False
    assert blocks.replays == 0 and judge.stats["forged"] == 1


async def test_a_thousand_false_disputes_change_nothing_and_cost_one_replay(llama, span):
    _, mid, _, cfg = llama
    honest, spammer, forger, verifier = (Identity.generate() for _ in range(4))
    limits = IngestLimits(burst_entries=1 << 20, burst_bytes=1 << 40)
    led = {who: make_ledger(who, None, mid, cfg) for who in (honest, spammer, forger, verifier)}
    for who in (honest, verifier):  # the verifier and the server judge with generous allowances
        led[who].allowances.limits = limits
        led[who].allowances._buckets.clear()
    for ledger in led.values():
        await ledger.claim_starting_grant()
    # the honest server served the verifier (standing in its view); the spammers served someone too,
    # which made an accuser "credible" when disputes used to cut what the accused earned
    for server in (honest, spammer, forger):
        await led[server].record_earn(ReceiptSigner(verifier, server=server.public_key, model=mid, start=0, end=2,
                                                    pricing=led[server].pricing).sign(6))
    # 500 disputes with the honest server's own signed records (true results, false claims), then
    # 500 with records forged under the spammer's key; a second spammer files forged ones only
    truth = serve(span, honest, mid, HISTORY)
    forged = serve(span, spammer, mid, HISTORY, lie_at=4)
    for i in range(1000):
        proof = truth.proof(i % 3) if i < 500 else forged.proof(2)
        led[spammer].append_sync("dispute", msgpack.packb([honest.public_key, f"lie {i}", proof.encode()]))
        if i < 100:
            led[forger].append_sync("dispute", msgpack.packb([honest.public_key, "lie", forged.proof(2).encode()]))

    async def sync(into, *authors):
        for a in authors:
            wires = led[a].store.range_wire(a.public_key, 1, 10**6)
            assert (await led[into].ingest(wires)).stored == len(wires)

    await sync(verifier, honest)
    view = StandingView(led[verifier])
    before = (await led[verifier].balance(honest.public_key), view.standings_sync()[honest.public_key])
    assert before[1] > 0
    await sync(verifier, spammer, forger)
    await sync(honest, spammer, forger, verifier)
    for who in (verifier, honest):
        blocks = CountingBlocks(span, mid)
        judge = DisputeJudge(led[who], blocks)
        while await judge.judge_pending():
            pass
        assert blocks.replays == 1  # the first spammer's first dispute; the forger's cost none
        assert judge.stats["false"] == 2 and judge.stats["forged"] == 1
        assert await led[who].unjudged_disputes() == []  # the rest are never looked at again
        rel = await led[who].reliability()
        assert honest.public_key not in rel and rel[spammer.public_key] == rel[forger.public_key] == 0.0
    assert await led[verifier].balance(honest.public_key) == before[0]
    assert view.standings_sync()[honest.public_key] == before[1]
    # what the server itself announces
    assert (await led[honest].reliability()).get(honest.public_key, 1.0) == 1.0


class SigningLiar(RateLiar):
    """From its fourth step on, adds noise to what it computed and signs that as its result."""

    honest_steps = 3


class UnsignedLiar(BlockServer):
    """Changes its outputs after signing them."""

    async def _step(self, session, m, *, pushed):
        reply = await super()._step(session, m, pushed=pushed)
        if reply is not None and session.steps > 2:
            h = unpack_hidden(reply["h"], dtype="float32", hidden_size=self.mf.config.hidden_size)
            reply["h"] = pack_hidden(h * 1.01)
        return reply


FAST = {"decode_tps": 100000.0, "prefill_tps": 1e6}


async def add_fast(s, server_cls, **kw):
    """A server of blocks [0, 2) that announces itself as the fastest: routes go through it first."""
    peer = await add_server(s, 0, 2, server_cls=server_cls, **kw)
    peer.server.throughput = dict(FAST)
    await peer.server.announce()
    return peer


async def sees(model, n: int) -> None:
    """Wait until the client sees all `n` servers, the fast one with its throughput."""
    with trio.fail_after(20):
        while True:
            servers = await model.sequence.refresh(force=True)
            if len(servers) == n and max(x.decode_tps for x in servers) == FAST["decode_tps"]:
                return
            await trio.sleep(0.1)


@pytest.mark.parametrize("push", [False, True], ids=["direct", "push"])
async def test_a_result_that_differs_from_its_signature_is_a_fault_at_once(llama, push):
    """With push too: the badly signed reply is the hop's own fault, not a push to fall back from."""
    path, mid, local, cfg = llama
    want = local.generate_greedy(PROMPT, 6)
    with trio.fail_after(90):
        async with swarm("sim", path, [], model_id=mid) as s:
            liar = await add_fast(s, UnsignedLiar, mid=mid, cfg=cfg)
            await add_server(s, 0, 2, mid=mid, cfg=cfg)
            await add_server(s, 2, 4, mid=mid, cfg=cfg)
            client, model = await add_client(s, mid=mid, cfg=cfg, spot_check=None)  # no spot checks at all
            await sees(model, 3)
            model.sequence.rtt = lambda peer_id: 0.0 if peer_id == liar.network.peer_id else 0.05  # the liar is nearest
            model.client_config.push = push
            g = await model.generate(PROMPT, max_new_tokens=6, stop_token_ids=[])
            assert g.token_ids == want  # the output that was not the signed one was never used
            assert g.servers[0][0] == liar.network.peer_id  # it was routed through first
            assert liar.network.peer_id in model.sequence.banned() and g.recoveries >= 1
            assert g.push_fallbacks == 0


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "fetched"])
async def test_a_caught_liar_is_proven_at_another_server_and_its_standing_there_drops_to_zero(llama, inline):
    """The client files the proof in its dispute entry, or (too large for one: here any) a claim whose
    proof the verifier fetches from the client's shelf."""
    path, mid, local, cfg = llama
    with trio.fail_after(120):
        async with swarm("sim", path, [], model_id=mid) as s:
            liar = await add_fast(s, SigningLiar, mid=mid, cfg=cfg, replicate=True)
            honest = [await add_server(s, a, b, mid=mid, cfg=cfg, replicate=True) for a, b in [(0, 2), (0, 2), (2, 4)]]
            verifier = await add_server(s, 0, 2, mid=mid, cfg=cfg, replicate=True)
            # the liar and an honest server once served the verifier: both have standing in its view
            for p in (liar, honest[0]):
                await p.ledger.record_earn(ReceiptSigner(verifier.network.identity, server=p.ledger.me, model=mid,
                                                         start=0, end=2, pricing=p.ledger.pricing).sign(4))
            client, model = await add_client(s, mid=mid, cfg=cfg, replicate=True, inline_proof_bytes=None if inline else 0,
                                             spot_check=SpotCheckConfig(fraction=1.0, seed=3))
            await sees(model, 5)
            # the simulator's latencies would otherwise decide between servers: the liar is the nearest
            model.sequence.rtt = lambda peer_id: 0.0 if peer_id == liar.network.peer_id else 0.05
            events = [ev async for ev in model.stream(PROMPT, max_new_tokens=8, stop_token_ids=[])]
            assert [ev.token_id for ev in events if isinstance(ev, TokenEvent)] == local.generate_greedy(PROMPT, 8)
            assert events[-1].generation.servers[0][0] == liar.network.peer_id
            assert liar.network.peer_id in model.sequence.distrusted
            assert model.client_config.billing.stats["disputes"] == 1
            liar_key = public_key_from_peer_id(liar.network.peer_id)
            view = StandingView(verifier.ledger)
            with trio.fail_after(30):  # the dispute and the earn entries replicate to the verifier
                while not (await verifier.ledger.unjudged_disputes()
                           and {liar_key, honest[0].ledger.me} <= view.standings_sync().keys()):
                    await trio.sleep(0.1)
            honest_before = view.standings_sync()[honest[0].ledger.me]
            while await verifier.judge.judge_pending():
                pass
            assert verifier.judge.stats["lies"] == 1 and verifier.judge.stats["replays"] == 1
            evidence = msgpack.unpackb(next(e for e in client.ledger.store.entries(client.ledger.me)
                                            if e.kind == "dispute").body, raw=False)[2]
            assert is_claim(evidence) is not inline
            assert (await verifier.ledger.reliability()) == {liar_key: 0.0}
            table = view.standings_sync()
            assert liar_key not in table  # its work is forfeited in the verifier's view
            assert table[honest[0].ledger.me] == honest_before
            # the shared fold is untouched: the same chains without any verdict give the same balances
            stranger = make_ledger(Identity.generate(), None, mid, cfg)
            chains = [verifier.ledger.store.range_wire(a, 1, 10**6) for a in verifier.ledger.heads]
            folded = {k: b.raw for k, b in verifier.ledger.balances_sync().items()}  # the same moment
            for wires in chains:
                assert (await stranger.ingest(wires)).stored == len(wires)
            assert {k: b.raw for k, b in (await stranger.balances()).items()} == folded


async def test_claims_of_large_proofs_are_checked_before_any_fetch(llama, span):
    """A proof too large for an entry travels as a claim; the verifier checks the claim's signature
    before fetching anything, and an accuser that does not serve its proof gets no verdict."""
    _, mid, _, cfg = llama
    honest, liar = Identity.generate(), Identity.generate()
    proof = serve(span, liar, mid, HISTORY, lie_at=4).proof(2)
    blocks = CountingBlocks(span, mid)
    judge = DisputeJudge(make_ledger(Identity.generate(), None, mid, cfg), blocks)  # no network: nothing fetched
    claim = DisputeClaim(proof.record, ProofShelf().put(proof.encode()), len(proof.encode())).encode()
    assert is_claim(claim) and not is_claim(proof.encode())
    assert await judge.judge(honest.public_key, claim, accuser="12D3KooWAccuser") is False  # not the server's
    assert judge.stats["forged"] == 1
    assert await judge.judge(liar.public_key, claim, accuser="12D3KooWAccuser") is None  # signed, but not served
    assert judge.stats["unfetched"] == 1 and blocks.replays == 0
    good = DisputeClaim.decode(claim, liar.public_key)
    for bad in [msgpack.packb(["potluck/dispute-claim/1", proof.record.to_wire(), b"short", 10]),
                msgpack.packb(["potluck/dispute-claim/1", proof.record.to_wire(), good.digest, 0]),
                msgpack.packb(["potluck/dispute-claim/1", proof.record.to_wire(), good.digest, 1 << 40]),
                msgpack.packb(["potluck/dispute-claim/1", [1, 2], good.digest, 10]), b"\x94\xc1", b"x" * 20000]:
        with pytest.raises(InvalidProof):
            DisputeClaim.decode(bad, liar.public_key)


def test_the_proof_shelf_is_bounded():
    shelf = ProofShelf(max_bytes=100)
    first = shelf.put(b"a" * 60)
    second = shelf.put(b"b" * 60)
    assert shelf.get(first) is None and shelf.get(second) == b"b" * 60


def test_the_proof_shelf_is_bounded_in_count_too(tmp_path):
    shelf = ProofShelf.open(tmp_path, max_count=2)
    digests = [shelf.put(bytes([i]) * 10) for i in range(3)]
    assert shelf.get(digests[0]) is None and shelf.get(digests[2]) == b"\x02" * 10
    shelf.close()
    shelf = ProofShelf.open(tmp_path, max_count=2, max_bytes=25)  # the bounds hold for what was kept before
    shelf.put(b"x" * 10)
    assert [shelf.get(d) for d in digests] == [None, None, b"\x02" * 10]


async def test_a_proof_is_served_after_a_restart(tmp_path):
    """The accuser's shelf is in its data directory: a restarted accuser still serves the proof."""
    from p2p.sim import SimWorld
    from pipeline.proofshelf import fetch_proof

    proof = b"p" * 5000
    digest = ProofShelf.open(tmp_path).put(proof)  # then the process is gone, its shelf object with it
    async with SimWorld.open(seed=7) as world:
        accuser, verifier = world.add_node(), world.add_node()
        ProofShelf.open(tmp_path).serve_on(accuser)  # the restarted accuser
        await verifier.connect(accuser.addr, timeout=2.0)
        assert await fetch_proof(verifier, accuser.peer_id, digest, len(proof)) == proof
        assert await fetch_proof(verifier, accuser.peer_id, b"\x00" * 32, len(proof)) is None


async def test_cannot_judge_is_retried_a_bounded_number_of_times(llama, span):
    """A judge without the span records "cannot judge"; retries take the dispute up again (and decide it
    once the peer holds the span), at most `max_tries` times in all."""
    _, mid, _, cfg = llama
    liar, accuser, verifier = (Identity.generate() for _ in range(3))
    led = {who: make_ledger(who, None, mid, cfg) for who in (accuser, verifier)}
    for ledger in led.values():
        await ledger.claim_starting_grant()
    proof = serve(span, liar, mid, HISTORY, lie_at=4).proof(2)
    for i in range(2):
        led[accuser].append_sync("dispute", msgpack.packb([liar.public_key, f"lie {i}", proof.encode()]))
    wires = led[accuser].store.range_wire(accuser.public_key, 1, 10**6)
    assert (await led[verifier].ingest(wires)).stored == len(wires)
    judge = DisputeJudge(led[verifier], None, max_tries=3)
    assert await judge.judge_pending() == 2 and judge.stats["unjudged"] == 2
    assert await judge.judge_pending() == 0  # not again until a retry round ...
    assert await judge.judge_pending(retry=True) == 2 and judge.stats["unjudged"] == 4
    judge.blocks = CountingBlocks(span, mid)  # ... by which time this peer holds the span
    led[verifier].store.put_verdict(accuser.public_key, 3, liar.public_key, None)  # the second: a third failure
    assert await judge.judge_pending(retry=True) == 1 and judge.stats["lies"] == 1
    assert await judge.judge_pending(retry=True) == 0  # one decided, the other out of tries
    assert (await led[verifier].reliability())[liar.public_key] == 0.0


async def test_a_prompt_longer_than_an_inline_proof_is_signed_and_accepted(llama, tmp_path):
    """A step's signed fingerprint grows with its tokens (FINGERPRINT_DIMS float32 each): a 300-token
    prefill's is 19,200 bytes. Its bound was a dispute entry's evidence (12 KiB, 192 tokens), so every
    prompt longer than that was a "malformed signed step" and banned the server that computed it."""
    import json
    import shutil

    from pipeline.identity import model_id
    from pipeline.loading import load_local_model

    path = tmp_path / "long"
    shutil.copytree(llama[0], path)
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 512
    (path / "config.json").write_text(json.dumps(config))
    mid, local = model_id(path), load_local_model(path, device="cpu")
    prompt = [(7 * i + 3) % 100 + 1 for i in range(300)]
    want = local.generate_greedy(prompt, 3)
    with trio.fail_after(90):
        async with swarm("sim", path, [(0, 2), (2, 4)], model_id=mid) as s:
            model = await s.client(step_timeout=20.0)
            g = await model.generate(prompt, max_new_tokens=3, stop_token_ids=[])
            assert g.token_ids == want
            assert g.recoveries == 0 and not model.sequence.banned()
