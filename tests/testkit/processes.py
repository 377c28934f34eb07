"""What tests do to swarms of real `potluck serve` processes (`potluck.localswarm.PeerProcess`)."""

import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import msgpack

from credits import Receipt, Store, credits
from potluck.localswarm import PeerProcess, wait_until


def kill_the_serving_replica(user: PeerProcess, replicas: list[PeerProcess], *, after_s: float, poll_s: float,
                             timeout: float, **generate) -> tuple[dict, PeerProcess, PeerProcess]:
    """Start a generation at `user`, kill whichever of `replicas` serves it `after_s` seconds after its session
    shows, and return (the generation's result, the killed replica, the survivor)."""
    # an earlier generation's sessions close after it returns: the replica to kill is the one this one opens
    wait_until(lambda: all(p.call("status")["server"]["sessions"] == 0 for p in replicas), 30, poll_s,
               message="the replicas' earlier sessions closed")
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(result=user.call("generate", timeout=timeout, **generate)))
    worker.start()
    victim = wait_until(lambda: next((p for p in replicas if p.call("status")["server"]["sessions"] > 0), None),
                        60, poll_s, message="a replica serving the session")
    time.sleep(after_s)
    victim.kill()
    worker.join(timeout=timeout)
    assert not worker.is_alive(), "the generation did not finish after its server was killed"
    survivor = next(p for p in replicas if p is not victim)
    return box["result"], victim, survivor


def earned_per_session(data_dirs: list[Path], sessions: set[str]) -> dict[str, float]:
    """Session id (hex) → GFLOP-credits the servers' own ledgers (in `data_dirs`) record as earned for it: each
    earn entry holds the session's latest receipt; the highest counter is what the session earned."""
    latest: dict[str, Receipt] = {}
    for data_dir in data_dirs:
        store = Store(data_dir)  # a second connection to the running server's database
        try:
            earns = store.entries_of_kind("earn")
        finally:
            store.close()
        for entry in earns:
            r = Receipt.from_list(msgpack.unpackb(entry.body, raw=False)[0])
            key = r.session.hex()
            if key in sessions and (key not in latest or latest[key].counter < r.counter):
                latest[key] = r
    return {key: credits(r.flops) for key, r in latest.items()}


@contextmanager
def server_and_client(tmp_path: Path, common: list[str]) -> Iterator[tuple[PeerProcess, PeerProcess]]:
    """A `potluck serve` server of all 30 of SmolLM2's blocks, its model loaded, and a client bootstrapped
    from it, both with the swarm's `common` flags (the model among them); both closed after."""
    server = PeerProcess(tmp_path / "server", *common, "--blocks", "0:30").start(timeout=120)
    procs = [server]
    try:
        client = PeerProcess(tmp_path / "client", *common, "--bootstrap", server.addr).start(timeout=120)
        procs.append(client)
        wait_until(lambda: server.call("status")["server"]["start"] is not None, 120, message="the server loaded")
        yield server, client
    finally:
        for p in procs:
            p.close()


def first_generation(client: PeerProcess, prompt: str, max_tokens: int) -> dict:
    """The client's first generation, asked again until it has learned a route."""
    def generated() -> dict | None:
        try:
            return client.call("generate", prompt=prompt, max_tokens=max_tokens, timeout=120)
        except RuntimeError:
            return None  # the client has not learned a route yet

    return wait_until(generated, 120, 2, message="a first generation through the server")
