"""Grid signals (pipeline/grid.py): parsing, freshness, announcements, and green routing's bound."""

import json
import logging
import math
import random

import pytest

from dht.records import InvalidRecord
from pipeline.announce import ServerInfo
from pipeline.grid import (GREEN_WEIGHT, MAX_FILE_BYTES, GridPreference, GridSignal, GridSignalError, GridSignalFile,
                           preference_weight, read_signal_file)
from pipeline.routing import RoutingConfig, find_route

NOW = 1_800_000_000.0
GREEN = GridSignal(load=0.1, carbon=0.05, renewable=0.95, timestamp=NOW - 10)
DIRTY = GridSignal(load=0.9, carbon=0.9, renewable=0.05, timestamp=NOW - 10)


def server(peer: str, tps: float, grid: GridSignal | None, start: int = 0, end: int = 4) -> ServerInfo:
    return ServerInfo(peer, start, end, decode_tps=tps, prefill_tps=tps, cache_tokens=1 << 20, grid=grid)


def route_of(servers: list[ServerInfo], prefer: str) -> list[str]:
    weight = preference_weight(prefer)
    grid = GridPreference(weight, NOW) if weight > 0 else None
    return [h.peer_id for h in find_route(servers, 0, 4, grid=grid)]


def test_equal_servers_greener_wins_only_when_preferred():
    for order in ([server("dirty", 100.0, DIRTY), server("green", 100.0, GREEN)],
                  [server("green", 100.0, GREEN), server("dirty", 100.0, DIRTY)]):
        assert route_of(order, "green") == ["green"]
    # weight off: the faster wins, however green the other
    assert route_of([server("fast", 110.0, DIRTY), server("green", 100.0, GREEN)], "fast") == ["fast"]
    assert route_of([server("fast", 110.0, DIRTY), server("green", 100.0, GREEN)], "green") == ["green"]


def test_default_weight_never_costs_more_than_its_fraction():
    greenest = GridSignal(0.0, 0.0, 1.0, NOW)
    dirtiest = GridSignal(1.0, 1.0, 0.0, NOW)
    # compute dominates (slow servers): a server more than 1 + GREEN_WEIGHT times faster always wins
    for ratio in (1.0 + GREEN_WEIGHT + 0.01, 1.5, 3.0):
        assert route_of([server("fast", ratio, dirtiest), server("green", 1.0, greenest)], "green") == ["fast"]
    assert route_of([server("fast", 1.0 + GREEN_WEIGHT - 0.02, dirtiest), server("green", 1.0, greenest)],
                    "green") == ["green"]


def test_green_route_within_bound_on_random_swarms():
    cfg = RoutingConfig()
    rng = random.Random(7)

    def cost(servers: list[ServerInfo], hops) -> float:
        by = {s.peer_id: s for s in servers}
        return sum(cfg.default_rtt + cfg.hop_overhead + (h.end - h.start) / by[h.peer_id].decode_tps for h in hops)

    greener = 0
    for trial in range(200):
        servers = []
        for i in range(rng.randint(2, 8)):
            a = rng.randrange(0, 8)
            b = rng.randint(a + 1, 8)
            signal = GridSignal(rng.random(), rng.random(), rng.random(), NOW) if rng.random() < 0.8 else None
            servers.append(server(f"s{i}", rng.uniform(0.5, 50.0), signal, a, b))
        servers += [server("head", 5.0, None, 0, 4), server("tail", 5.0, None, 4, 8)]
        fast = find_route(servers, 0, 8)
        green = find_route(servers, 0, 8, grid=GridPreference(GREEN_WEIGHT, NOW))
        assert cost(servers, green) <= (1 + GREEN_WEIGHT) * cost(servers, fast) + 1e-9
        greener += green != fast
    assert greener > 0  # the preference did choose other routes


@pytest.mark.parametrize("timestamp", [NOW - 91.0, NOW - 3600.0, NOW + 60.0])
def test_stale_or_future_signal_is_ignored(timestamp):
    liar = GridSignal(0.0, 0.0, 1.0, timestamp)
    honest = GridSignal(0.5, 0.5, 0.5, NOW - 1)
    assert route_of([server("stale", 100.0, liar), server("honest", 100.0, honest)], "green") == ["honest"]
    # the same signal, fresh, wins
    fresh = GridSignal(0.0, 0.0, 1.0, NOW)
    assert route_of([server("stale", 100.0, fresh), server("honest", 100.0, honest)], "green") == ["stale"]


def test_announcement_carries_the_signal_and_old_ones_decode():
    info = server("p", 10.0, GREEN)
    back = ServerInfo.from_value("p", info.to_value())
    assert back.grid == GREEN
    old = server("p", 10.0, None).to_value()
    del old["grid"]
    assert ServerInfo.from_value("p", old).grid is None
    for bad in ({"load": 2.0, "carbon": 0, "renewable": 0, "timestamp": 1}, {"load": True, "carbon": 0, "renewable": 0,
                "timestamp": 1}, {"load": 0, "carbon": 0, "renewable": 0}, [0, 0, 0, 0], "green",
                {"load": math.nan, "carbon": 0, "renewable": 0, "timestamp": 1}):
        value = info.to_value()
        value["grid"] = bad
        with pytest.raises(InvalidRecord):
            ServerInfo.from_value("p", value)


def test_preference_names():
    assert preference_weight("fast") == 0.0 and preference_weight("green") == GREEN_WEIGHT
    assert preference_weight("cheap") == 0.0  # prices instead of grid signals (pipeline/routing.py)
    with pytest.raises(ValueError):
        preference_weight("cheapest")


def test_signal_file_checked(tmp_path):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(GREEN.to_value()))
    assert read_signal_file(path) == GREEN
    for contents in (b"{", b"\xff\xfe", json.dumps({"load": 0.1}).encode(), json.dumps([1, 2]).encode(),
                     json.dumps({**GREEN.to_value(), "carbon": -0.1}).encode(), b" " * (MAX_FILE_BYTES + 1) + b"{}"):
        path.write_bytes(contents)
        with pytest.raises(GridSignalError):
            read_signal_file(path)
    with pytest.raises(GridSignalError):
        read_signal_file(tmp_path / "missing.json")


def test_signal_file_turned_bad_drops_the_signal(tmp_path, caplog):
    path = tmp_path / "grid.json"
    source = GridSignalFile(str(path), max_age=90.0)
    path.write_text(json.dumps(GREEN.to_value()))
    assert source.check() == GREEN
    assert source.current(NOW) == GREEN
    path.write_text("not json")
    with caplog.at_level(logging.WARNING, logger="pipeline.grid"):
        assert source.current(NOW) is None
    assert "grid signal dropped" in caplog.text
    path.write_text(json.dumps({**GREEN.to_value(), "timestamp": NOW - 200}))
    assert source.current(NOW) is None  # stale: not announced


def test_request_field_prefer_checked():
    from potluck.openai_schema import ApiError, ChatRequest

    body = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}
    assert ChatRequest.parse(body).prefer is None
    assert ChatRequest.parse({**body, "potluck": {"prefer": "green"}}).prefer == "green"
    assert ChatRequest.parse({**body, "potluck": {"prefer": "fast"}}).prefer == "fast"
    assert ChatRequest.parse({**body, "potluck": {"prefer": "cheap"}}).prefer == "cheap"
    for bad in ("cheapest", 1, ["green"], {"green": True}):
        with pytest.raises(ApiError) as e:
            ChatRequest.parse({**body, "potluck": {"prefer": bad}})
        assert e.value.status == 400
