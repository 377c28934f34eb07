"""Shared attestations (pipeline/attestations.py): signed, bounded, counted only from signers with
standing here, capped per signer and in all, and never past a mismatch of our own."""

import msgpack
import pytest
import trio

from p2p.gossip import Gossip
from p2p.identity import Identity
from p2p.sim import SimWorld
from pipeline.attestations import MAX_BYTES, TOPIC, Attestation, AttestationBook, InvalidAttestation
from pipeline.checkpolicy import AdaptivePolicy

MODEL = "m" * 64
SERVER = Identity.generate().peer_id


def book(me: Identity, standing: dict) -> AttestationBook:
    async def standings():
        return standing

    return AttestationBook(me, standings, lambda: 1000.0)


def attest(signer: Identity, steps: int = 16, t: float = 1.0, server: str = SERVER) -> Attestation:
    return Attestation.signed(signer, server, MODEL, 0, 2, steps, t)


def steps_to_leave_probation(policy: AdaptivePolicy, server: str = SERVER) -> int:
    """Steps of `server` our own checks must verify before it is checked at random (not every step)."""
    n = 0
    while policy.probability(server) >= 1.0:
        policy.verified(server, 1)
        n += 1
    return n


def test_attestation_round_trip_and_forgeries_refused():
    signer, other = Identity.generate(), Identity.generate()
    att = attest(signer)
    assert Attestation.decode(att.encode()) == att
    body, sig = att.encode()
    fields = msgpack.unpackb(body)
    inflated = msgpack.packb([*fields[:4], 10_000, *fields[5:]])
    stolen = msgpack.packb([*fields[:5], other.peer_id, fields[6]])
    forged = [
        [inflated, sig],  # more steps than were signed
        [stolen, sig],  # someone else's name on it
        [body, other.sign(body)],  # signed by another key
        [body, sig[:-1] + bytes([sig[-1] ^ 1])],
        [body + b"\x00" * MAX_BYTES, sig],  # oversized
        [body],
        {"body": body, "sig": sig},
        [b"\xc1", sig],  # not msgpack
        [msgpack.packb(fields[:6]), sig],
        [msgpack.packb([*fields[:4], "16", *fields[5:]]), sig],
        [msgpack.packb([*fields[:6], 1]), sig],  # time not a float
        [msgpack.packb([*fields[:2], 2, 2, *fields[4:]]), sig],  # empty span
        [msgpack.packb([*fields[:4], 0, *fields[5:]]), sig],  # no steps
    ]
    for wire in forged:
        with pytest.raises(InvalidAttestation):
            Attestation.decode(wire)
    with pytest.raises(InvalidAttestation):  # a server cannot vouch for itself
        selfish = Identity.generate()
        Attestation.decode(Attestation.signed(selfish, selfish.peer_id, MODEL, 0, 2, 16, 1.0).encode())


async def test_attestations_from_signers_with_standing_shorten_probation():
    me, a, b, c = (Identity.generate() for _ in range(4))
    alone = AdaptivePolicy(trust_after=64)
    assert steps_to_leave_probation(alone) == 64
    standing = {x.public_key: 10 for x in (a, b, c)}
    mine = book(me, standing)
    assert await mine.hear(attest(a, steps=1000))  # capped per signer
    assert mine.steps(MODEL, SERVER) == mine.max_per_signer == 16
    assert await mine.hear(attest(b, steps=10)) and await mine.hear(attest(b, steps=10, t=2.0))
    assert mine.steps(MODEL, SERVER) == 32
    policy = AdaptivePolicy(trust_after=64, vouches=mine.vouches(MODEL))
    assert steps_to_leave_probation(policy) == 32  # half of probation skipped ...
    assert await mine.hear(attest(c))
    assert steps_to_leave_probation(AdaptivePolicy(trust_after=64, vouches=mine.vouches(MODEL))) == 32  # ... never more
    assert mine.steps("other model", SERVER) == 0
    # a replayed (or older) attestation adds nothing
    assert not await mine.hear(attest(a, steps=16)) and mine.stats["stale"] == 1


async def test_attestations_from_signers_without_standing_change_nothing():
    me, friend = Identity.generate(), Identity.generate()
    sybils = [Identity.generate() for _ in range(20)]
    mine = book(me, {friend.public_key: 1})
    for s in sybils:
        assert not await mine.hear(attest(s, steps=16))
    assert mine.stats["no_standing"] == 20 and mine.steps(MODEL, SERVER) == 0
    policy = AdaptivePolicy(trust_after=64, vouches=mine.vouches(MODEL))
    assert steps_to_leave_probation(policy) == 64
    # standing counts when read, too: a signer that lost it stops counting
    standing = {friend.public_key: 1}
    mine = book(me, standing)
    assert await mine.hear(attest(friend))
    assert mine.steps(MODEL, SERVER) == 16
    standing.clear()
    assert await mine.hear(attest(sybils[0])) is False  # (any arrival refreshes the view)
    assert mine.steps(MODEL, SERVER) == 0


async def test_a_mismatch_of_our_own_resets_everything():
    me, friend = Identity.generate(), Identity.generate()
    mine = book(me, {friend.public_key: 1})
    assert await mine.hear(attest(friend))
    policy = AdaptivePolicy(trust_after=64, vouches=mine.vouches(MODEL))
    policy.verified(SERVER, 48)
    assert policy.trusted(SERVER)  # 48 of ours + 16 vouched
    policy.failed(SERVER)
    assert steps_to_leave_probation(policy) == 64  # attestations never count for it again


async def test_attestations_travel_by_gossip_and_forged_ones_stop(autojump_clock):
    """A client's verified steps reach another peer's book by gossip; a Sybil's (no standing) do not count,
    and a forged attestation is refused by the gossip validator (neither delivered nor forwarded)."""
    async with SimWorld.open(seed=5) as world, trio.open_nursery() as nursery:
        nodes = [world.add_node() for _ in range(4)]  # a checker, a viewer, a Sybil; a forger without a book
        gossips = [Gossip(n, n.identity) for n in nodes]
        checker, viewer, sybil = (book(n.identity, {}) for n in nodes[:3])
        viewer_standing = {nodes[0].identity.public_key: 5}
        viewer.standing = lambda: _value(viewer_standing)
        for g in gossips:
            await nursery.start(g.run)
        for i in range(4):
            for j in range(i + 1, 4):
                await nodes[i].connect(nodes[j].addr, timeout=2.0)
        for b, g in zip((checker, viewer, sybil), gossips):
            await nursery.start(b.run, g)
        checker.verified(SERVER, MODEL, 0, 2, 5)
        checker.verified(SERVER, MODEL, 0, 2, 3)
        caught = Identity.generate().peer_id
        checker.verified(caught, MODEL, 0, 2, 3)
        checker.failed(caught)  # a server our checks then caught: nothing of it is shared
        sybil.verified(SERVER, MODEL, 0, 2, 16)
        assert await checker.publish_pending(gossips[0]) == 1
        assert await sybil.publish_pending(gossips[2]) == 1
        body, sig = attest(nodes[3].identity, steps=16).encode()  # the checker's name on the forger's claim
        fields = msgpack.unpackb(body)
        await gossips[3].publish(TOPIC, [msgpack.packb([*fields[:5], nodes[0].identity.peer_id, fields[6]]), sig])
        await trio.sleep(5)
        assert viewer.steps(MODEL, SERVER) == 8  # the checker's, with standing here
        assert viewer.stats["accepted"] == 1 and viewer.stats["no_standing"] == 1
        assert gossips[1].stats.rejected == 1  # the forgery, by the topic's validator: never delivered
        nursery.cancel_scope.cancel()


async def _value(x):
    return x


async def test_passed_spot_checks_become_attestations(llama):
    """A client's passed checks reach its book, per server and span, as many steps as its policy verified."""
    from pipeline.loading import ModelFolder
    from pipeline.spotcheck import SpotCheckConfig
    from testkit.billing import add_client, add_server
    from testkit.swarms import swarm

    path, mid, _local = llama
    cfg = ModelFolder(path).config
    with trio.fail_after(90):
        async with swarm("sim", path, [], model_id=mid) as s:
            servers = [await add_server(s, a, b, mid=mid, cfg=cfg) for a, b in [(0, 2), (0, 2), (2, 4), (2, 4)]]
            client, model = await add_client(s, mid=mid, cfg=cfg)
            mine = book(client.network.identity, {})
            model.client_config.spot_check = SpotCheckConfig(attestations=mine)
            with trio.fail_after(20):
                while len(await model.sequence.refresh(force=True)) < len(servers):
                    await trio.sleep(0.1)
            g = await model.generate([5, 17, 42], max_new_tokens=4, stop_token_ids=[])
            policy = model.client_config.spot_check.policy
            pending = {(srv, (a, b)): steps for (srv, _m, a, b), steps in mine._pending.items()}
            assert {srv for srv, _span in pending} == {p for p, _, _ in g.route}
            for (srv, (a, b)), steps in pending.items():
                assert (srv, a, b) in g.route and steps == policy.records[srv].verified > 0
