"""Grid signals on real processes: `potluck serve --grid-signal` refuses a bad file before it starts;
two servers of the same span with different signals, and a user's API request that prefers green
goes through the greener (the faster is within the green preference's bound)."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import httpx
import pytest

from pipeline.grid import GREEN_WEIGHT
from potluck.localswarm import POTLUCK, PeerProcess, start_all, wait_until

GREEN = {"load": 0.2, "carbon": 0.05, "renewable": 0.9}
DIRTY = {"load": 0.9, "carbon": 0.95, "renewable": 0.05}


def serve(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*POTLUCK, "serve", "--data-dir", str(tmp_path / "peer"), *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("contents", ["{", json.dumps({**GREEN, "timestamp": 1.0, "carbon": 1.5}),
                                      json.dumps({"load": 0.1}), None])
def test_bad_grid_signal_file_exits_2_naming_it(tmp_path, contents):
    path = tmp_path / "grid.json"
    if contents is not None:
        path.write_text(contents)
    proc = serve(tmp_path, "--blocks", "0:1", "--grid-signal", str(path))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(path) in lines[0], proc.stderr
    assert "listening on" not in proc.stdout


def test_grid_signal_without_blocks_exits_2(tmp_path):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({**GREEN, "timestamp": time.time()}))
    proc = serve(tmp_path, "--grid-signal", str(path))
    assert proc.returncode == 2 and "--blocks" in proc.stderr, (proc.stdout, proc.stderr)


class Refresher:
    """What an operator's script does: rewrite each grid signal file with a fresh timestamp, every second."""

    def __init__(self, files: dict) -> None:
        self.files = files
        self.stop = threading.Event()
        self.write()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def write(self) -> None:
        for path, signal in self.files.items():
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({**signal, "timestamp": time.time()}))
            tmp.replace(path)  # a reader never sees half a file

    def run(self) -> None:
        while not self.stop.wait(1.0):
            self.write()


@pytest.mark.slow
def test_api_request_preferring_green_goes_through_the_greener_server(smollm2_data, tmp_path):
    model_dir = smollm2_data[1]
    common = ["--model", str(model_dir), "--threads", "1"]
    files = {tmp_path / "green.json": GREEN, tmp_path / "dirty.json": DIRTY}
    refresher = Refresher(files)
    refresher.thread.start()
    procs: dict[str, PeerProcess] = {}
    try:
        # spot checks on (the default): the other server, opened as a checker, is one the user has reached,
        # so routes believe its announcement (pipeline/routing.py) and can follow the swapped signals to it
        procs["user"] = PeerProcess(tmp_path / "user", *common, "--api", "127.0.0.1:0").start(timeout=120)
        boot = ["--bootstrap", procs["user"].addr]
        for name in ("green", "dirty"):  # started together: each measures its speed under the same load
            procs[name] = PeerProcess(tmp_path / name, *common, *boot, "--blocks", "0:30",
                                      "--grid-signal", str(tmp_path / f"{name}.json"))
        start_all([procs["green"], procs["dirty"]], timeout=120)
        user = procs["user"]
        url = user.call("status")["api"]

        def servers() -> dict:
            models = user.call("status", models=True).get("models") or []
            listed = models[0]["coverage"]["servers"] if models and models[0].get("coverage") else []
            return {s["peer_id"]: s for s in listed}

        wait_until(lambda: len(servers()) == 2, 120, 1, message="the user's peer to see both servers")
        tps = {name: servers()[procs[name].peer_id]["decode_tps"] for name in ("green", "dirty")}
        body = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                "temperature": 0, "potluck": {"prefer": "green"}}

        def expected(greener: str, other: str) -> list[list[str]]:
            # The preference never costs more than GREEN_WEIGHT of speed: the greener server wins unless
            # the other measured (at its start, on this shared machine) more than that faster. Near the
            # bound the RTTs decide: either server is right there.
            ratio = tps[other] / tps[greener]
            names = [greener] if ratio < 1 + GREEN_WEIGHT - 0.05 else [other] if ratio > 1 + GREEN_WEIGHT + 0.05 \
                else [greener, other]
            return [[procs[name].peer_id] for name in names]

        def route(http: httpx.Client) -> list[str] | None:
            r = http.post("/v1/chat/completions", json=body)
            return [hop["peer_id"] for hop in r.json()["potluck"]["route"]] if r.status_code == 200 else None

        with httpx.Client(base_url=url, timeout=120) as http:
            first = wait_until(lambda: route(http), 90, 2, message="a generation through the swarm")
            assert first in expected("green", "dirty"), (tps, first)
            # the operators' signals swap: once the servers announced them again, the other server is greener
            refresher.files = {tmp_path / "green.json": DIRTY, tmp_path / "dirty.json": GREEN}
            refresher.write()
            wait_until(lambda: route(http) in expected("dirty", "green"), 120, 5,
                       message=f"the route to follow the swapped signals (decode tps {tps})")
    finally:
        refresher.stop.set()
        for p in procs.values():
            p.close()

