"""`potluck serve` refuses bad addresses before it starts: exit 2 and one line saying what to do."""

from __future__ import annotations

import socket
import subprocess

import pytest

from potluck.localswarm import POTLUCK

pytestmark = pytest.mark.slow  # starts real peer processes


def serve(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*POTLUCK, "serve", "--data-dir", str(tmp_path / "second"), *args],
                          capture_output=True, text=True, timeout=60)


def only_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr  # one line, no traceback
    return lines[0]


def test_listen_port_of_a_running_peer_exits_2(spawn, tmp_path):
    first = spawn()
    port = first.addr.split("/tcp/")[1].split("/")[0]
    proc = serve(tmp_path, "--listen", f"/ip4/127.0.0.1/tcp/{port}")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    line = only_line(proc)
    assert "already in use" in line and f"127.0.0.1:{port}" in line and "another port" in line
    assert "listening on" not in proc.stdout
    assert first.proc.poll() is None  # the first peer is untouched


def test_api_port_in_use_exits_2(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = serve(tmp_path, "--api", f"127.0.0.1:{port}")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "--api 127.0.0.1:%d is already in use" % port in only_line(proc)


@pytest.mark.parametrize("bad", ["127.0.0.1:4001", "/ip4/127.0.0.1/tcp/4001", "/ip4/127.0.0.1/tcp/4001/p2p/notapeer"])
def test_malformed_bootstrap_exits_2(tmp_path, bad):
    proc = serve(tmp_path, "--bootstrap", bad)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    line = only_line(proc)
    assert f"--bootstrap {bad!r}" in line and "/p2p/PEER_ID" in line


def test_malformed_listen_exits_2(tmp_path):
    proc = serve(tmp_path, "--listen", "0.0.0.0:4001")
    assert proc.returncode == 2 and "--listen '0.0.0.0:4001' is not a multiaddr" in only_line(proc)
