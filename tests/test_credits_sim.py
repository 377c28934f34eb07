"""Credit replication on the simulator: balances converge and are conserved; forks spread; 1,000 peers."""

import random
import time

import msgpack
import pytest
import trio

from credits import CreditPolicy, IngestLimits, Ledger, LogEntry, ReceiptSigner, Store, linear_pricing
from credits.replication import Replicator
from p2p.errors import P2PError
from p2p.gossip import Gossip
from p2p.identity import Identity
from p2p.sim import SimWorld

pytestmark = pytest.mark.slow  # about 45 s

PRICING = linear_pricing(lambda model: 1_000_000)
POLICY = CreditPolicy(starting_grant=10**12)


class CreditSwarm:
    """`n` simulated peers, each with gossip, an in-memory ledger and a replicator."""

    def __init__(self, world: SimWorld, n: int, *, dials: int = 4, seed: int = 0, exchange_interval: float = 3.0,
                 pull_interval: float = 1.0, announce: bool = True, ingest_limits: IngestLimits | None = None):
        self.world = world
        self.rng = random.Random(seed)
        self.nodes = [world.add_node() for _ in range(n)]
        self.ledgers = [Ledger(node.identity, Store(None), pricing=PRICING, policy=POLICY, clock=node.now,
                               ingest_limits=ingest_limits) for node in self.nodes]
        self.gossips = [Gossip(node, node.identity, rng=random.Random(seed + i), pull_interval=pull_interval)
                        for i, node in enumerate(self.nodes)]
        self.reps = [Replicator(led, node, g, exchange_interval=exchange_interval, announce=announce,
                                rng=random.Random(seed * 7 + i))
                     for i, (led, node, g) in enumerate(zip(self.ledgers, self.nodes, self.gossips))]
        self.links = {(i, j) for i in range(n) for j in self.rng.sample(range(n), dials) if i != j}
        self.signers: dict[tuple[int, int, int], ReceiptSigner] = {}

    async def start(self, nursery: trio.Nursery) -> None:
        await self.connect()
        for g, r in zip(self.gossips, self.reps):
            await nursery.start(g.run)
            await nursery.start(r.run)

    async def connect(self, only: set[int] | None = None) -> None:
        async def dial(i, j):
            for _ in range(20):
                if self.nodes[j].peer_id in self.nodes[i].connected_peers():
                    return
                try:
                    await self.nodes[i].connect(self.nodes[j].addr, timeout=2.0)
                except P2PError:
                    await trio.sleep(1.0)

        async with trio.open_nursery() as nursery:
            for i, j in self.links:
                if self.nodes[i].up and self.nodes[j].up and (only is None or i in only or j in only):
                    nursery.start_soon(dial, i, j)

    async def pay(self, server: int, client: int, session: int = 0, tokens: int = 10) -> None:
        """One step of work: the client signs a cumulative receipt, the server earns, the client records."""
        key = (server, client, session)
        if key not in self.signers:
            self.signers[key] = ReceiptSigner(self.nodes[client].identity, server=self.ledgers[server].me,
                                              model="m", start=0, end=1 + (server % 7), pricing=PRICING)
        signer = self.signers[key]
        receipt = signer.sign(signer.tokens + tokens)
        await self.ledgers[server].record_earn(receipt)
        await self.ledgers[client].record_spend(receipt)

    async def views(self, indexes=None) -> list[dict]:
        return [{k: (b.raw, b.frozen) for k, b in (await self.ledgers[i].balances()).items()}
                for i in (indexes if indexes is not None else range(len(self.nodes)))]

    async def wait_converged(self, limit: float, indexes=None, poll: float = 0.5, authors=None) -> float:
        """Virtual seconds until every peer (in `indexes`) holds the same heads (of `authors`) and forks."""
        indexes = list(indexes if indexes is not None else range(len(self.nodes)))
        start = trio.current_time()

        def spread() -> int:
            leds = [self.ledgers[i] for i in indexes]
            best: dict[bytes, tuple[int, bytes]] = {}
            forks: set[bytes] = set()
            for led in leds:
                forks.update(led.forks)
                for a, h in led.heads.items():
                    if authors is not None and a not in authors:
                        continue
                    if a not in best or h[0] > best[a][0]:
                        best[a] = h
            return sum(1 for led in leds for a, h in best.items() if a not in forks and led.heads.get(a) != h) + \
                sum(1 for led in leds if set(led.forks) != forks)

        with trio.move_on_after(limit):
            while spread():
                await trio.sleep(poll)
        assert spread() == 0, f"{spread()} heads still missing after {limit} s"
        return trio.current_time() - start


async def test_small_swarm_balances_equal_everywhere_and_conserved(autojump_clock):
    async with SimWorld.open(seed=3, loss=0.1) as world, trio.open_nursery() as nursery:
        swarm = CreditSwarm(world, 12, dials=3, seed=3)
        await swarm.start(nursery)
        for led in swarm.ledgers:
            await led.claim_starting_grant()
        rng = random.Random(3)
        for _ in range(60):
            s, c = rng.sample(range(12), 2)
            await swarm.pay(s, c, session=rng.randrange(2), tokens=rng.randint(1, 50))
            await trio.sleep(rng.uniform(0, 0.3))
        await swarm.wait_converged(limit=60)
        views = await swarm.views()
        assert all(v == views[0] for v in views)
        assert sum(raw for raw, _ in views[0].values()) == 12 * POLICY.starting_grant
        assert len(views[0]) == 12
        # Every client's debit on every peer equals what the servers' earn entries say.
        totals = await swarm.ledgers[5].balances()
        assert sum(b.earned for b in totals.values()) == sum(b.spent for b in totals.values()) > 0
        assert sum(r.stats["rejected"] for r in swarm.reps) == 0
        nursery.cancel_scope.cancel()


async def test_a_fork_is_proved_spread_and_frozen_everywhere(autojump_clock):
    async with SimWorld.open(seed=4, loss=0.05) as world, trio.open_nursery() as nursery:
        swarm = CreditSwarm(world, 16, dials=3, seed=4)
        await swarm.start(nursery)
        for led in swarm.ledgers:
            await led.claim_starting_grant()
        await swarm.pay(0, 1, tokens=100)  # the cheat (0) earns, then signs two versions of seq 3
        await swarm.wait_converged(limit=30)
        cheat = swarm.ledgers[0]
        seq, prev, ts = cheat.store.head(cheat.me)
        two = [LogEntry.create(cheat.identity, seq + 1, prev, ts + 1, "dispute", msgpack.packb([swarm.ledgers[k].me, why, b""]))
               for k, why in ((2, "one story"), (3, "another story"))]
        # Each version goes to a different half of the swarm, straight into their stores (as if told privately).
        for i in range(1, 16):
            await swarm.ledgers[i].ingest([two[i % 2].encode()])
        await swarm.wait_converged(limit=60, indexes=range(1, 16))
        for led in swarm.ledgers[1:]:
            assert led.is_frozen(cheat.me) and led.forks[cheat.me].seq == seq + 1
        views = await swarm.views(range(1, 16))
        assert all(v == views[0] for v in views)
        assert views[0][cheat.me] == (POLICY.starting_grant + swarm.signers[(0, 1, 0)].latest.flops, True)
        eff = await swarm.ledgers[5].balance(cheat.me)
        assert eff.effective == 0
        # A frozen cheat's further entries go nowhere.
        await cheat.append("dispute", msgpack.packb([swarm.ledgers[2].me, "more", b""]))
        await trio.sleep(20)
        assert all(led.heads[cheat.me][0] == seq + 1 for led in swarm.ledgers[1:])
        nursery.cancel_scope.cancel()


async def test_late_joiner_and_a_partition_catch_up(autojump_clock):
    async with SimWorld.open(seed=5) as world, trio.open_nursery() as nursery:
        swarm = CreditSwarm(world, 10, dials=3, seed=5)
        await swarm.start(nursery)
        for led in swarm.ledgers:
            await led.claim_starting_grant()
        await swarm.wait_converged(limit=30)
        world.partition([n.peer_id for n in swarm.nodes[:4]])
        for k in range(20):
            await swarm.pay(k % 4, (k + 1) % 4)          # inside the minority
            await swarm.pay(4 + k % 6, 4 + (k + 2) % 6)  # inside the majority
        await trio.sleep(5)
        assert swarm.ledgers[0].heads.get(swarm.ledgers[5].me, (0,))[0] == 1
        world.heal()
        await swarm.connect()
        await swarm.wait_converged(limit=60)
        views = await swarm.views()
        assert all(v == views[0] for v in views)
        nursery.cancel_scope.cancel()


async def test_thousand_peers_with_loss_and_churn_converge_on_the_same_balances(autojump_clock):
    """1,000 peers, 5 % loss, 20 crashes and restarts while 40 of them trade. Entries travel by
    anti-entropy alone here (no per-entry gossip push), which is what repairs loss and churn."""
    wall = time.perf_counter()
    n, traders = 1000, 40
    async with SimWorld.open(seed=11, loss=0.05) as world, trio.open_nursery() as nursery:
        swarm = CreditSwarm(world, n, dials=3, seed=11, exchange_interval=3.0, pull_interval=10.0, announce=False)
        await swarm.start(nursery)
        rng = random.Random(11)
        for i in range(traders):
            await swarm.ledgers[i].claim_starting_grant()
        down: list[int] = []
        for step in range(80):
            s, c = rng.sample(range(traders), 2)
            if swarm.nodes[s].up and swarm.nodes[c].up:
                await swarm.pay(s, c, session=rng.randrange(2), tokens=rng.randint(1, 30))
            if step % 4 == 0:  # churn: crash a random peer, bring an earlier one back
                victim = rng.randrange(n)
                world.crash(swarm.nodes[victim].peer_id)
                down.append(victim)
                if len(down) > 5:
                    back = down.pop(0)
                    world.restart(swarm.nodes[back].peer_id)
                    nursery.start_soon(swarm.connect, {back})
            await trio.sleep(0.5)
        for back in down:
            world.restart(swarm.nodes[back].peer_id)
        await swarm.connect(set(down))
        took = await swarm.wait_converged(limit=120, poll=2.0)
        views = await swarm.views()
        assert all(v == views[0] for v in views)
        assert sum(raw for raw, _ in views[0].values()) == traders * POLICY.starting_grant
        entries = sum(h[0] for h in swarm.ledgers[0].heads.values())
        print(f"\n1000 peers: {entries} entries converged {took:.1f} virtual s after the last trade; "
              f"wall {time.perf_counter() - wall:.1f} s")
        nursery.cancel_scope.cancel()
    assert time.perf_counter() - wall < 120


async def test_one_authors_flood_of_disputes_is_not_replicated_but_earning_is(autojump_clock):
    limits = IngestLimits(burst_entries=16, burst_bytes=128 * 1024, entries_per_hour=6, bytes_per_hour=32 * 1024)
    async with SimWorld.open(seed=8) as world, trio.open_nursery() as nursery:
        swarm = CreditSwarm(world, 6, dials=3, seed=8, ingest_limits=limits)
        await swarm.start(nursery)
        for led in swarm.ledgers:
            await led.claim_starting_grant()
        await swarm.wait_converged(limit=30)
        flooder = swarm.ledgers[0]
        for _ in range(200):  # 12 KiB of evidence each
            await flooder.append("dispute", msgpack.packb([swarm.ledgers[1].me, "lies", b"x" * 12 * 1024]))
        for k in range(60):  # meanwhile the others trade as usual
            await swarm.pay(1 + k % 5, 1 + (k + 1) % 5)
        await trio.sleep(30)
        await swarm.wait_converged(limit=30, indexes=range(1, 6), authors=[led.me for led in swarm.ledgers[1:]])
        for led in swarm.ledgers[1:]:
            held = led.heads[flooder.me][0]
            assert 1 < held <= 1 + 10, held  # its grant and what 128 KiB pays for, of 201 entries
            assert led.throttled(flooder.me)
        views = await swarm.views(range(1, 6))
        assert all({k: v for k, v in view.items() if k != flooder.me} ==
                   {k: v for k, v in views[0].items() if k != flooder.me} for view in views)
        nursery.cancel_scope.cancel()


async def test_hostile_peer_gets_nothing_stored(autojump_clock):
    """A peer that answers pulls with forged, malformed or oversized replies, sends bad head vectors
    and gossips entries in someone else's name: nothing of it is stored, nothing crashes."""
    from credits.replication import HEADS, RANGE, TOPIC_ENTRY
    from p2p.errors import RemoteError

    async with SimWorld.open(seed=6) as world, trio.open_nursery() as nursery:
        swarm = CreditSwarm(world, 3, dials=2, seed=6)
        evil_node = world.add_node()
        evil_gossip = Gossip(evil_node, evil_node.identity)
        await swarm.start(nursery)
        await nursery.start(evil_gossip.run)
        victim = swarm.ledgers[0]
        honest = swarm.ledgers[1]
        await honest.claim_starting_grant()
        await swarm.wait_converged(limit=20)
        # Someone else's chain, with its first entry re-signed by the evil peer: a forgery.
        stranger = Ledger(Identity.generate(), Store(None), pricing=PRICING, policy=POLICY)
        await stranger.claim_starting_grant()
        good = stranger.store.entries(stranger.me)[0]
        forged = LogEntry(good.author, 1, good.prev, good.timestamp, good.kind, good.body, evil_node.identity.sign(good.header))

        async def evil_heads(peer, body):
            return {"h": [[stranger.me, 1, forged.hash]], "x": [[b"junk"]]}

        replies = iter([{"e": [[forged.encode()]]}, {"e": [[b"\xc1" * 10]]}, {"e": "nope"},
                        {"e": [[forged.encode()] * 500]}])

        async def evil_range(peer, body):
            return next(replies, {"e": [[]]})

        evil_node.set_request_handler(HEADS, evil_heads)
        evil_node.set_request_handler(RANGE, evil_range)
        await evil_node.connect(swarm.nodes[0].addr)
        for _ in range(4):
            await swarm.reps[0].exchange(evil_node.peer_id)
        # Gossip an entry in the stranger's name: the validator refuses it, so it is not even forwarded.
        await evil_gossip.publish(TOPIC_ENTRY, good.encode())
        # Malformed requests to the honest peer's handlers are refused with a reason.
        for proto, body in ((RANGE, {"r": [[b"x", 1, 2]]}), (RANGE, {"r": [[stranger.me, 1, 10**6]]}),
                            (HEADS, {"full": True, "h": [[1, 2, 3]], "x": []}), (HEADS, "nope")):
            with pytest.raises(RemoteError):
                await evil_node.request(swarm.nodes[0].peer_id, proto, body)
        await trio.sleep(10)
        assert stranger.me not in victim.heads and victim.store.get(stranger.me, 1) is None
        assert victim.heads[honest.me][0] == 1 and not victim.forks
        assert swarm.reps[0].stats["rejected"] >= 1
        assert swarm.gossips[0].stats.rejected >= 1 and swarm.gossips[0].stats.accepted == swarm.gossips[2].stats.accepted
        nursery.cancel_scope.cancel()

