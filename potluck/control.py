"""The running peer's local control socket: `potluck status` and friends read the peer through it.

A Unix socket in the data dir (mode 0600, so only the peer's owner can use it), one framed msgpack
request and one framed reply per connection.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any, Awaitable, Callable

import trio

from p2p import framing
from p2p.errors import P2PError

from .openai_schema import ApiError

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
MAX_CONTROL_FRAME = 4 * 1024 * 1024

Command = Callable[[dict], Awaitable[Any]]


class PeerNotRunning(Exception):
    pass


async def serve(path: Path, commands: dict[str, Command], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    path.unlink(missing_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    try:
        task_status.started()
        await trio.serve_listeners(lambda s: _handle(s, commands), [listener])
    finally:
        path.unlink(missing_ok=True)


async def _handle(stream: trio.SocketStream, commands: dict[str, Command]) -> None:
    reader = framing.ExactReader(stream.receive_some)
    try:
        with trio.fail_after(30):  # for the request only: a command (a generation) may take longer
            request = framing.expect_map(await framing.read_frame(reader.read_exactly, MAX_CONTROL_FRAME))
        name = framing.field(request, "cmd", str, max_len=64)
        command = commands.get(name)
        if command is None:
            reply = {"error": f"unknown command {name!r}; known: {sorted(commands)}"}
        else:
            try:
                reply = {"ok": await command(request)}
            except Exception as e:  # a failed command fails its caller, never the peer
                if not isinstance(e, (P2PError, ValueError, RuntimeError, ApiError)):  # those say what went wrong
                    log.exception("control command %r failed", name)
                reply = {"error": str(e) or type(e).__name__}
        await stream.send_all(framing.frame(reply, MAX_CONTROL_FRAME))
    except (P2PError, trio.BrokenResourceError, trio.TooSlowError) as e:
        log.debug("control connection dropped: %s", e)
    finally:
        await stream.aclose()


async def call(data_dir: Path, cmd: str, **args: Any) -> Any:
    """Send one command to the peer running with `data_dir`; raises PeerNotRunning if there is none."""
    path = Path(data_dir) / SOCKET_NAME
    try:
        stream = await trio.open_unix_socket(str(path))
    except OSError:
        raise PeerNotRunning(
            f"no potluck peer is running with data dir {data_dir} (start one with `potluck serve --data-dir {data_dir}`)"
        ) from None
    async with stream:
        await stream.send_all(framing.frame({"cmd": cmd, **args}, MAX_CONTROL_FRAME))
        reader = framing.ExactReader(stream.receive_some)
        reply = framing.expect_map(await framing.read_frame(reader.read_exactly, MAX_CONTROL_FRAME))
    if "error" in reply:
        raise RuntimeError(reply["error"])
    return reply["ok"]
