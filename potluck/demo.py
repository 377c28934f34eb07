"""The main job: start a small local swarm on 127.0.0.1 and show it as one peer sees it.

Three `potluck serve` processes join through the first one; once every peer sees every other,
the first peer's `potluck status` is printed and the swarm is shut down.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from .localswarm import PeerProcess, wait_until
from .status import render_status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m potluck.demo", description=__doc__)
    parser.add_argument("--peers", type=int, default=3)
    args = parser.parse_args(argv)
    console = Console()
    with tempfile.TemporaryDirectory(prefix="potluck-demo-") as tmp:
        peers: list[PeerProcess] = []
        try:
            start = time.monotonic()
            for i in range(args.peers):
                boot = ["--bootstrap", peers[0].addr] if peers else []
                peer = PeerProcess(Path(tmp) / f"peer{i}", *boot, "--region", "local").start()
                peers.append(peer)
                console.print(f"started peer {i}: {peer.addr}")
            ids = {p.peer_id for p in peers}
            console.print("waiting for the peers to find each other ...")
            for p in peers:
                wait_until(lambda p=p: p.alive_peers() == ids - {p.peer_id}, 60, message="peers to see each other")
            console.print(f"swarm of {len(peers)} formed in {time.monotonic() - start:.1f} s; as peer 0 sees it:\n")
            render_status(peers[0].status(), console)
        finally:
            for p in peers:
                if p.proc and p.proc.poll() is None:
                    p.stop(signal.SIGINT)
                p.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
