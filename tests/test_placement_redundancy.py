"""--blocks auto keeps 2 replicas of every block where memory allows: the least-replicated blocks are
raised first, throughput second (pipeline/routing.py `choose_span`, `rebalance_span`)."""

from pipeline.announce import ServerInfo
from pipeline.routing import choose_span, rebalance_span, replicas

N = 6


def srv(pid: str, a: int, b: int, tps: float = 100.0, state: str = "online") -> ServerInfo:
    return ServerInfo(peer_id=pid, start=a, end=b, decode_tps=tps, prefill_tps=tps * 10, cache_tokens=1000, state=state)


def test_replicas_count_online_servers_per_block():
    servers = [srv("a", 0, 4), srv("b", 2, 6), srv("c", 0, 6, state="offline")]
    assert replicas(servers, N) == [1, 1, 2, 2, 1, 1]
    assert replicas(servers, N, exclude={"b"}) == [1, 1, 1, 1, 0, 0]


def test_the_one_replica_block_wins_over_throughput():
    # block 5 has one fast replica (more throughput than blocks 0..4 with three slow ones each):
    # the throughput rule would place a new server on the slow blocks, the replica rule on block 5
    servers = [srv(f"slow{i}", 0, 5, tps=10.0) for i in range(3)] + [srv("fast", 5, 6, tps=1000.0)]
    assert replicas(servers, N) == [3, 3, 3, 3, 3, 1]
    assert choose_span(servers, N, 1) == (5, 6)
    assert choose_span(servers, N, 2) == (4, 6)


def test_every_block_gets_one_replica_before_any_gets_two():
    # memory for every block once: six one-block servers joining one after another, each choosing
    # on what those before it announce
    servers: list[ServerInfo] = []
    for i in range(N):
        a, b = choose_span(servers, N, 1)
        servers.append(srv(f"s{i}", a, b, tps=1000.0 if a == 0 else 10.0))
        assert max(replicas(servers, N)) == 1
    assert replicas(servers, N) == [1] * N
    # windows of two: each block once, then the second replicas — the fast blocks' too
    servers = []
    for i in range(N):
        a, b = choose_span(servers, N, 2)
        servers.append(srv(f"t{i}", a, b, tps=1000.0 if a == 0 else 10.0))
        reps = replicas(servers, N)
        assert max(reps) - min(reps) <= 1, reps
    assert replicas(servers, N) == [2] * N


def test_the_window_with_more_scarce_blocks_wins():
    servers = [srv("a", 0, 1), srv("b", 1, 4), srv("c", 1, 4), srv("d", 4, 6)]
    assert replicas(servers, N) == [1, 2, 2, 2, 1, 1]
    assert choose_span(servers, N, 3) == (3, 6)  # two one-replica blocks beat one


def test_above_two_replicas_throughput_decides():
    servers = [srv("a", 0, 6, tps=10.0), srv("b", 0, 6, tps=10.0), srv("c", 0, 3, tps=500.0), srv("d", 3, 6)]
    assert replicas(servers, N) == [3, 3, 3, 3, 3, 3]
    assert choose_span(servers, N, 3) == (3, 6)


def test_rebalance_moves_a_spare_replica_to_a_lacking_block_and_never_away_from_one():
    others = [srv("a", 0, 3), srv("b", 0, 3), srv("c", 3, 6)]
    # me makes blocks 0..2 a third replica while 3..5 have one: move there
    assert rebalance_span(others, srv("me", 0, 3), N, threshold=0.75) == (3, 6)
    # me is the second replica of 3..5: staying is at least as good as anywhere
    assert rebalance_span(others, srv("me", 3, 6), N, threshold=0.75) is None
    # a sole replica never moves away from its blocks, even to double others
    assert rebalance_span([srv("a", 0, 3)], srv("me", 3, 6), N, threshold=0.75) is None


def test_rebalance_still_evens_throughput_once_replicas_are_full():
    others = [srv("a", 0, 6), srv("b", 0, 6), srv("c", 0, 3, tps=1000.0)]
    me = srv("me", 0, 3, tps=1000.0)
    assert rebalance_span(others, me, N, threshold=0.75) == (3, 6)
    assert rebalance_span(others, srv("me", 3, 6, tps=1000.0), N, threshold=0.75) is None


def test_rebalance_doubles_a_fast_single_replica_even_at_some_throughput():
    # blocks 3..5 have one fast replica, 0..2 three slow ones: moving lowers the minimum throughput
    # (30 → 20 tokens/s) but gives every block a second replica
    others = [srv("a", 0, 3, tps=10.0), srv("b", 0, 3, tps=10.0), srv("c", 3, 6, tps=1000.0)]
    assert rebalance_span(others, srv("me", 0, 3, tps=10.0), N, threshold=0.75) == (3, 6)


def test_rebalance_runs_for_missing_replicas_even_when_throughput_is_even():
    others = [srv("a", 0, 3, tps=50.0), srv("b", 0, 3, tps=50.0), srv("c", 3, 6, tps=100.0)]
    me = srv("me", 0, 3, tps=1.0)  # swarm quality 100/101: balanced by throughput
    assert rebalance_span(others, me, N, threshold=0.75) == (3, 6)
