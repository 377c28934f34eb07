"""`potluck status` rendering: a readable table from the status a peer returns (no peer needed)."""

from rich.console import Console

from potluck.status import render_status
from potluck.swarmview import coverage_view


class Info:
    def __init__(self, peer_id, start, end):
        self.peer_id, self.start, self.end, self.online = peer_id, start, end, True
        self.decode_tps, self.prefill_tps, self.cache_tokens, self.addr = 300.0, 900.0, 12000, None
        self.clusters = {"1": "12D3KooWHeLxnfQRGkwYNgrMAwb3MPD14ScT7rcmVCfg1mg9vYqp"}


def pid(i: int) -> str:
    return f"12D3KooWPeer{i}" + "x" * 38


def render(status: dict) -> str:
    console = Console(record=True, width=140, color_system=None)
    render_status(status, console)
    return console.export_text()


BASE = {"peer_id": pid(0), "region": "lab-a", "addrs": ["/ip4/127.0.0.1/tcp/4001/p2p/" + pid(0)],
        "dht": {"clusters": {"0": "", "1": "12D3KooWHeLxnfQRGkwYNgrMAwb3MPD14ScT7rcmVCfg1mg9vYqp"}}, "api": None,
        "server": None, "last_generation": None,
        "peers": [{"peer_id": pid(1), "addr": "/ip4/127.0.0.1/tcp/4002/p2p/" + pid(1), "region": "lab-b",
                   "rtt_ms": 8.8, "alive": True},
                  {"peer_id": pid(2), "addr": None, "region": "", "rtt_ms": None, "alive": False}]}


def test_server_with_coverage_route_and_credits():
    out = render({**BASE, "api": "http://127.0.0.1:8000",
                  "server": {"model_id": "2c49f44b91f1f918", "start": 0, "end": 10, "sessions": 1, "sessions_opened": 7,
                             "tokens": 812, "throughput": {"decode_tps": 316.2}, "cache_tokens_left": 120000},
                  "models": [{"name": "SmolLM2-135M-Instruct", "model_id": "2c49f44b91f1f918", "num_blocks": 30,
                              "coverage": coverage_view([Info(pid(0), 0, 10), Info(pid(1), 10, 20),
                                                         Info(pid(3), 12, 20)], 30)}],
                  "last_generation": {"route": [{"peer_id": pid(0), "start": 0, "end": 10}], "tokens": 12,
                                      "tokens_per_s": 9.3},
                  "credits": {"balance": 1000.0, "earned": 12.5, "spent": 3.25, "unit": "GFLOP-credits (1 credit = 1e9 FLOPs)"}})
    for text in ("serving blocks 0-9 of model 2c49f44b91f1: 1 open session(s)", "316 tok/s per block",
                 "HTTP API: http://127.0.0.1:8000/v1", "known peers (1 alive of 2)", "10-19",
                 "coverage of SmolLM2-135M-Instruct", "20/30 covered, missing blocks 20-29",
                 "1" * 12 + "2" * 8 + "·" * 10, "…1mg9vYqp", "last request 12 tokens, 9.3 tok/s",
                 "credits balance 1,000.0   earned 12.5   spent 3.2"):
        assert text in out, (text, out)
    assert "L1 …1mg9vYqp" in out and "L0" not in out


def test_client_peer_without_model_or_server():
    out = render(BASE)
    assert "serving no blocks" in out and "no model loaded yet" in out and "known peers" in out
