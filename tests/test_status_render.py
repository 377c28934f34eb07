"""`potluck status` rendering: a readable table from the status a peer returns (no peer needed)."""

from rich.console import Console

from potluck.status import render_status
from potluck.swarmview import coverage_view


class Info:
    def __init__(self, peer_id, start, end):
        self.peer_id, self.start, self.end, self.online = peer_id, start, end, True
        self.decode_tps, self.prefill_tps, self.cache_tokens, self.addrs = 300.0, 900.0, 12000, ()
        self.clusters = {"1": "12D3KooWHeLxnfQRGkwYNgrMAwb3MPD14ScT7rcmVCfg1mg9vYqp"}


def pid(i: int) -> str:
    return "12D3KooW" + "x" * 36 + f"Peer{i:04d}"  # 52 characters, like a real id


def render(status: dict, *, width: int = 80, wide: bool = False) -> str:
    console = Console(record=True, width=width, color_system=None)
    render_status(status, console, wide=wide)
    out = console.export_text()
    if not wide:
        too_long = [line for line in out.splitlines() if len(line.rstrip()) > width]
        assert not too_long, too_long
    return out


BASE = {"peer_id": pid(0), "region": "lab-a", "addrs": ["/ip4/127.0.0.1/tcp/4001/p2p/" + pid(0)],
        "dht": {"clusters": {"0": "", "1": "12D3KooWHeLxnfQRGkwYNgrMAwb3MPD14ScT7rcmVCfg1mg9vYqp"}}, "api": None,
        "server": None, "last_generation": None,
        "peers": [{"peer_id": pid(1), "addr": "/ip4/127.0.0.1/tcp/4002/p2p/" + pid(1), "region": "lab-b",
                   "rtt_ms": 8.8, "alive": True},
                  {"peer_id": pid(2), "addr": None, "region": "", "rtt_ms": None, "alive": False}]}

SERVING = {**BASE, "api": "http://127.0.0.1:8000",
           "server": {"model_id": "2c49f44b91f1f918", "start": 0, "end": 10, "sessions": 1, "sessions_opened": 7,
                      "tokens": 812, "throughput": {"decode_tps": 316.2}, "cache_tokens_left": 120000},
           "models": [{"name": "SmolLM2-135M-Instruct", "model_id": "2c49f44b91f1f918", "num_blocks": 30,
                       "coverage": coverage_view([Info(pid(0), 0, 10), Info(pid(1), 10, 20),
                                                  Info(pid(3), 12, 20)], 30)}],
           "last_generation": {"route": [{"peer_id": pid(0), "start": 0, "end": 10}], "tokens": 12,
                               "tokens_per_s": 9.3},
           "credits": {"balance": 1000.0, "earned": 12.5, "spent": 3.25,
                       "unit": "GFLOP-credits (1 credit = 1e9 FLOPs)"}}


def test_server_with_coverage_route_and_credits():
    out = render(SERVING)
    for text in ("serving blocks 0:10 of SmolLM2-135M-Instruct", "1 open session(s)", "316 tok/s per block",
                 "HTTP API http://127.0.0.1:8000/v1", "known peers (1 alive of 2)", "10:20",
                 "20/30 blocks covered, missing 20:30",
                 "1" * 12 + "2" * 8 + "·" * 10, "…1mg9vYqp", "last request 12 tokens, 9.3 tok/s",
                 "route 0:10 …" + pid(0)[-8:], "credits balance 1,000.0, earned 12.5, spent 3.2"):
        assert text in out, (text, out)
    assert "L1 …1mg9vYqp" in out and "L0" not in out
    assert pid(1) not in out and "…" + pid(1)[-8:] in out  # short ids at 80 columns
    assert "/tcp/4002" not in out  # peers' addresses only with --wide


def test_wide_shows_full_ids_and_addresses():
    out = render(SERVING, width=200, wide=True)
    assert pid(1) in out and "/ip4/127.0.0.1/tcp/4002/p2p/" + pid(1) in out


def test_a_peer_with_many_servers_stays_within_80_columns():
    servers = [Info(pid(i), 3 * i, 3 * i + 3) for i in range(10)]
    status = {**SERVING, "peers": [{"peer_id": pid(i), "addr": None, "region": "eu-west-2", "rtt_ms": 123.4,
                                    "alive": True} for i in range(10)],
              "models": [{**SERVING["models"][0], "coverage": coverage_view(servers, 30)}]}
    out = render(status)
    assert "30/30 blocks covered, complete" in out and "27:30" in out


def test_client_peer_without_model_or_server():
    out = render(BASE)
    assert "serving no blocks" in out and "no model seen yet" in out and "known peers" in out


def test_reachability_is_shown_once_known():
    assert "dialable" not in render({**BASE, "reachability": {"status": "unknown"}})
    assert "dialable (public)" in render({**BASE, "reachability": {"status": "public"}})
    assert "not dialable (behind NAT)" in render({**BASE, "reachability": {"status": "private"}})
