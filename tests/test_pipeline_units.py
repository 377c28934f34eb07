"""Routing (Dijkstra over block boundaries), placement, sampling, announcement parsing: no network."""

import pytest
import torch

from dht.records import InvalidRecord, SignedValue
from p2p.identity import Identity
from pipeline.announce import AnnouncementValidator, ServerInfo
from pipeline.routing import NoRoute, choose_span, coverage, find_route, swarm_quality
from pipeline.sampling import Sampler, SamplingParams, find_stop, safe_prefix_len


def srv(pid, a, b, tps=100.0, cache=1000, state="online"):
    return ServerInfo(peer_id=pid, start=a, end=b, decode_tps=tps, prefill_tps=tps * 10, cache_tokens=cache, state=state)


def spans(route):
    return [(h.peer_id, h.start, h.end) for h in route]


def test_route_prefers_fewer_hops_and_faster_servers():
    servers = [srv("a", 0, 4), srv("b", 0, 2), srv("c", 2, 4)]
    assert spans(find_route(servers, 0, 4)) == [("a", 0, 4)]  # one RTT instead of two
    slow = [srv("a", 0, 4, tps=1.0), srv("b", 0, 2), srv("c", 2, 4)]
    assert spans(find_route(slow, 0, 4)) == [("b", 0, 2), ("c", 2, 4)]
    # RTT matters: a far server loses to two near ones
    rtt = {"a": 1.0, "b": 0.01, "c": 0.01}.get
    assert spans(find_route(servers, 0, 4, rtt=rtt)) == [("b", 0, 2), ("c", 2, 4)]


def test_route_cuts_spans_bans_and_penalises_full_caches():
    servers = [srv("a", 0, 3), srv("b", 1, 4)]
    route = spans(find_route(servers, 0, 4))
    assert route in ([("a", 0, 3), ("b", 3, 4)], [("a", 0, 1), ("b", 1, 4)])
    # a sub-route for a failed hop stays inside it
    assert spans(find_route(servers, 1, 3, exclude={"a"})) == [("b", 1, 3)]
    with pytest.raises(NoRoute, match="block 0"):
        find_route(servers, 0, 4, exclude={"a"})
    with pytest.raises(NoRoute):
        find_route([srv("a", 0, 2), srv("b", 3, 4)], 0, 4)
    assert not [h for h in find_route([srv("a", 0, 4, state="offline"), srv("b", 0, 4)], 0, 4) if h.peer_id == "a"]
    full = [srv("a", 0, 4, cache=10), srv("b", 0, 4, tps=10.0, cache=10_000)]
    assert spans(find_route(full, 0, 4, need_cache_tokens=100)) == [("b", 0, 4)]
    assert spans(find_route(full, 0, 4, need_cache_tokens=5)) == [("a", 0, 4)]


def test_placement_fills_the_least_covered_window():
    servers = [srv("a", 0, 4), srv("b", 0, 2)]
    assert coverage(servers, 6) == [200, 200, 100, 100, 0, 0]
    assert choose_span(servers, 6, 2) == (4, 6)
    assert choose_span(servers, 6, 3) == (3, 6)
    assert choose_span([], 6, 10) == (0, 6)
    assert swarm_quality(servers, 6) == 0.0
    assert swarm_quality([srv("a", 0, 6), srv("b", 0, 3)], 6) == 0.5


def test_sampling():
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0, 1.0])
    assert Sampler(SamplingParams())(logits) == 1  # greedy
    draws = lambda p: {Sampler(SamplingParams(seed=s, **{"temperature": 1.0, **p}))(logits) for s in range(60)}  # noqa: E731
    assert draws({"top_k": 2}) == {1, 2}
    assert draws({"top_p": 0.5}) == {1}  # the top token alone already holds >= half the mass
    assert len(draws({"temperature": 10.0})) >= 4
    a = [Sampler(SamplingParams(temperature=1.0, seed=3))(logits) for _ in range(1)]
    s = Sampler(SamplingParams(temperature=1.0, seed=3))
    assert [s(logits)] == a
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    assert find_stop("hello world", ["wor", "lo"]) == 3
    assert find_stop("hello", ["x"]) is None
    assert safe_prefix_len("hello wo", ["world"]) == 6  # "wo" may become "world"
    assert safe_prefix_len("caf\ufffd", []) == 3


def test_announcement_parsing_and_validator():
    me = Identity(b"\x07" * 32)
    good = srv(me.peer_id, 2, 5).to_value()
    info = ServerInfo.from_value(me.peer_id, good, num_blocks=30)
    assert (info.start, info.end, info.online) == (2, 5, True)
    for bad in [{**good, "start": 7}, {**good, "end": 31}, {**good, "decode_tps": float("nan")},
                {**good, "decode_tps": 0}, {**good, "state": "zombie"}, {**good, "cache_tokens": -1},
                {**good, "start": True}, {**good, "v": 2}, "nope", {**good, "clusters": {"1": 5}}]:
        with pytest.raises(InvalidRecord):
            ServerInfo.from_value(me.peer_id, bad, num_blocks=30)
    v = AnnouncementValidator()
    online = SignedValue.create(me, "pipeline/m", {**good, "t": 10.0}, 1000.0)
    offline = SignedValue.create(me, "pipeline/m", {**good, "t": 20.0, "state": "offline"}, 500.0)
    v.validate(online)
    assert v.select(online, offline) is offline and v.select(offline, online) is offline
    with pytest.raises(InvalidRecord):
        v.validate(SignedValue.create(me, "pipeline/m", {"v": 1}, 1000.0))
