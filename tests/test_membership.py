"""Membership (p2p/membership.py) in the simulator: who is alive, over lossy links and through crashes."""

import trio

from p2p.membership import Membership
from p2p.sim import SimWorld


async def _mesh(world: SimWorld, n: int, nursery: trio.Nursery) -> list[Membership]:
    """`n` peers, each bootstrapped from the first, running until the nursery is cancelled."""
    nodes = [world.add_node() for _ in range(n)]
    members = [Membership(node) for node in nodes]
    for m in members:
        await nursery.start(m.run)
    for m in members[1:]:
        await m.bootstrap([nodes[0].addr])
    return members


def _alive_pairs(members: list[Membership]) -> int:
    """(observer, peer) pairs where the observer holds the peer alive."""
    return sum(len(m.alive_peers()) for m in members)


async def _full_mesh(members: list[Membership], within: float) -> None:
    full = len(members) * (len(members) - 1)
    with trio.fail_after(within):
        while _alive_pairs(members) < full:
            await trio.sleep(0.5)


async def test_peers_keep_seeing_each_other_over_links_that_lose_messages(autojump_clock):
    """Every link loses 15 % of messages (a ping fails about one time in four): a slow or lost ping is not a
    dead peer, and a peer wrongly declared dead loses its connection and waits out a backoff. Two missed pings
    in a row made that happen every few seconds on each link."""
    async with SimWorld.open(loss=0.15, seed=7) as world:
        async with trio.open_nursery() as nursery:
            members = await _mesh(world, 4, nursery)
            await _full_mesh(members, 60)
            full = len(members) * (len(members) - 1)
            samples = []
            for _ in range(300):
                await trio.sleep(2)
                samples.append(_alive_pairs(members) / full)
            visible = sum(samples) / len(samples)
            print(f"15 % message loss: {visible:.1%} of (observer, peer) samples alive over 600 s")
            assert visible >= 0.94, samples
            nursery.cancel_scope.cancel()


async def test_a_crashed_peer_is_declared_dead_within_seconds_and_found_again_on_restart(autojump_clock):
    async with SimWorld.open(seed=3) as world:
        async with trio.open_nursery() as nursery:
            members = await _mesh(world, 3, nursery)
            await _full_mesh(members, 30)
            victim = members[2].network.peer_id
            world.crash(victim)
            crashed_at = trio.current_time()
            with trio.fail_after(10):
                while any(victim in {p.peer_id for p in m.alive_peers()} for m in members[:2]):
                    await trio.sleep(0.1)
            print(f"crash noticed by both others after {trio.current_time() - crashed_at:.1f} s")
            assert trio.current_time() - crashed_at >= 2  # not before a few pings went unanswered
            world.restart(victim)
            await _full_mesh(members, 30)  # redialled with backoff (at most 15 s apart)
            nursery.cancel_scope.cancel()
