"""Local peer processes: run real `potluck serve` processes on this machine and read their state.

Used by the main job (`potluck.demo`) and by the tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

POTLUCK = [sys.executable, "-m", "potluck.cli"]


class PeerProcess:
    def __init__(self, data_dir: Path, *args: str, env: dict | None = None, command: list[str] | None = None):
        """`command`: what runs `serve` (default `python -m potluck.cli`; a benchmark may wrap it)."""
        self.command = command or POTLUCK
        self.data_dir = Path(data_dir)
        self.args = list(args)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.peer_id: str | None = None
        self.addrs: list[str] = []

    def start(self, timeout: float = 60.0) -> "PeerProcess":
        self.log_path = self.data_dir.with_suffix(".log")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        proc = self.proc = subprocess.Popen(
            [*self.command, "serve", "--data-dir", str(self.data_dir), *self.args],
            stdout=subprocess.PIPE, stderr=self._log, env=self.env,
        )
        assert proc.stdout is not None  # stdout=PIPE
        deadline = time.monotonic() + timeout
        self.addrs = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline().decode()
            if not line:
                raise RuntimeError(f"peer exited early (rc={proc.wait()}); log: {self.log_tail()}")
            if line.startswith("potluck peer "):
                self.peer_id = line.split()[2]
            elif line.startswith("listening on "):
                self.addrs.append(line.split()[2])
                return self
        raise TimeoutError(f"peer did not start in {timeout}s; log: {self.log_tail()}")

    @property
    def addr(self) -> str:
        return self.addrs[0]

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def call(self, cmd: str, timeout: float = 40.0, **args):
        """One control command (`potluck.control`), sent in-process over the peer's control socket."""
        import trio

        from potluck import control

        async def go():
            with trio.fail_after(timeout):
                return await control.call(self.data_dir, cmd, **args)
        return trio.run(go)

    def status(self) -> dict:
        """`potluck status --json`, through the CLI as a user runs it."""
        out = subprocess.run([*POTLUCK, "status", "--json", "--data-dir", str(self.data_dir)],
                             capture_output=True, text=True, timeout=30, env=self.env)
        if out.returncode != 0:
            raise RuntimeError(f"status failed: {out.stderr}")
        return json.loads(out.stdout)

    def alive_peers(self) -> set[str]:
        return {p["peer_id"] for p in self.status()["peers"] if p["alive"]}

    def kill(self) -> None:
        assert self.proc is not None, "start() first"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> float:
        """Send `sig`, wait for exit; returns seconds it took."""
        assert self.proc is not None, "start() first"
        start = time.monotonic()
        self.proc.send_signal(sig)
        self.proc.wait(timeout=timeout)
        return time.monotonic() - start

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc and self.proc.stdout:
            self.proc.stdout.close()
        if hasattr(self, "_log"):
            self._log.close()


def start_all(procs: list[PeerProcess], timeout: float = 60.0) -> None:
    """Start peers concurrently (each loads its model on its own); raises the first failure."""
    errors: list[BaseException] = []

    def start(p: PeerProcess) -> None:
        try:
            p.start(timeout=timeout)
        except BaseException as e:  # raised below, in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=start, args=(p,)) for p in procs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def wait_until(predicate, timeout: float, interval: float = 0.5, message: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}; last value: {last!r}")
