"""Billed peers in a `testkit.swarms` swarm: each has a credit ledger that prices the tiny model, servers
bill through ServerBilling, clients pay through ClientBilling (optionally spot-checking)."""

from __future__ import annotations

from credits import CreditPolicy, Ledger, Receipt, ReceiptSigner, StandingView, new_session_id
from credits.ledger import GFLOP
from credits.replication import Replicator
from p2p.gossip import Gossip
from pipeline.billing import ClientBilling, ServerBilling
from pipeline.client import ClientConfig, DistributedModel
from pipeline.disputes import DisputeJudge, ServedBlocks
from pipeline.pricing import ModelPricing
from pipeline.proofshelf import ProofShelf
from pipeline.server import BlockServer, ServerConfig
from testkit.swarms import FIXED_TP

# A private swarm's policy: open swarms grant nothing (CreditPolicy's default), but these tests want
# clients that can pay busy servers without first serving.
POLICY = CreditPolicy(starting_grant=1000 * GFLOP, debt_limit=0)


def make_ledger(identity, data_dir, mid, cfg, policy=POLICY) -> Ledger:
    pricing = ModelPricing()
    pricing.register(mid, cfg)  # every verifier must be able to price the tiny model's receipts
    return Ledger.open(identity, data_dir, pricing=pricing, policy=policy)


async def billed_peer(s, *, client_mode: bool, mid, cfg, data_dir=None, policy=POLICY, replicate=False,
                      policy_fn=None):
    peer = await s._peer(client_mode=client_mode)
    ident = peer.network.identity
    led = make_ledger(ident, data_dir, mid, cfg, policy_fn(ident) if policy_fn else policy)
    await led.claim_starting_grant()
    peer.ledger = led
    if replicate:
        gossip = Gossip(peer.network, ident)
        peer.replicator = Replicator(led, peer.network, gossip, exchange_interval=0.3, request_timeout=2.0)
        await peer.nursery.start(gossip.run)
        await peer.nursery.start(peer.replicator.run)
    return peer


async def add_server(s, a, b, *, mid, cfg, server_cls=BlockServer, billing_kw=None, **kw):
    peer = await billed_peer(s, client_mode=False, mid=mid, cfg=cfg, **kw)
    conf = ServerConfig(throughput=FIXED_TP, announce_period=5.0)
    # max_age=0: the server's view of standing follows every change of its ledger at once (a test
    # gives a client standing and expects the next decision to see it)
    billing_kw = {"standing": StandingView(peer.ledger, max_age=0), **(billing_kw or {})}
    peer.server = server_cls(peer.network, peer.dht, s.folder, a, b, config=conf, model_id=mid,
                             billing=ServerBilling(peer.ledger, **billing_kw))
    await peer.nursery.start(peer.server.run)
    peer.judge = DisputeJudge(peer.ledger, ServedBlocks(peer.server), network=peer.network)  # tests call judge_pending()
    s.servers.append(peer)
    return peer


async def add_client(s, *, mid, cfg, billing_cls=ClientBilling, spot_check=None, inline_proof_bytes=None, **kw):
    """`inline_proof_bytes`: dispute proofs larger than this go on the client's `ProofShelf`, served to verifiers."""
    peer = await billed_peer(s, client_mode=True, mid=mid, cfg=cfg, **kw)
    s.clients.append(peer)
    billing = billing_cls(peer.ledger)
    if inline_proof_bytes is not None:
        billing.shelf, billing.inline_proof_bytes = ProofShelf(), inline_proof_bytes
        billing.shelf.serve_on(peer.network)
    conf = ClientConfig(billing=billing, spot_check=spot_check, step_timeout=10.0)
    model = await DistributedModel.from_pretrained(s.folder, peer.network, peer.dht, model_id=mid, config=conf)
    return peer, model


def latest_receipts(ledger: Ledger, author: bytes, kind: str) -> dict[tuple, Receipt]:
    """(server, client, session) → the highest-counter receipt in `author`'s `kind` entries."""
    import msgpack

    out: dict[tuple, Receipt] = {}
    for e in ledger.store.entries(author):
        if e.kind == kind:
            r = Receipt.from_list(msgpack.unpackb(e.body, raw=False)[0])
            key = (r.server, r.client, r.session)
            if key not in out or out[key].counter < r.counter:
                out[key] = r
    return out


async def give_standing(client: Ledger, server: Ledger, *, model: str, start: int, end: int, tokens: int) -> int:
    """`client`'s peer did `tokens` of work for `server`'s (through blocks [start, end) of `model`): the
    server's key signs the receipt, the client's chain earns it, the server's ledger takes that chain.
    Returns the FLOPs: `client`'s standing in `server`'s view rises by that much."""
    signer = ReceiptSigner(server.identity, server=client.me, model=model, start=start, end=end,
                           pricing=server.pricing, session=new_session_id())
    receipt = signer.sign(tokens)
    await client.record_earn(receipt)
    result = await server.ingest(client.store.range_wire(client.me, 1, client.heads[client.me][0]))
    assert result.error is None, result.error
    return receipt.flops
