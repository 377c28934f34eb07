"""Checks that refuse a `potluck serve` with a bad address before anything starts.

A peer that starts on a port another process holds, or that cannot reach the swarm it was told to
join, must not run on as if all were well: each check raises `StartupError` with one line saying
what to do, and the command exits 2. The listen check binds the port itself without
SO_REUSEPORT, which the libp2p listener sets (so a second listener would otherwise share the port).
"""

from __future__ import annotations

import errno
import socket

import multiaddr
from multiaddr.exceptions import Error as MultiaddrError

from p2p.identity import public_key_from_peer_id


class StartupError(ValueError):
    """A setting `potluck serve` cannot run with; the message says what to do instead."""


def check_port_free(host: str, port: int, what: str, fix: str) -> None:
    """Raise StartupError when `host:port` cannot be bound (in use, or not an address of this machine)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are not "in use"
        try:
            probe.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise StartupError(f"{what} {host}:{port} is already in use (another peer or program listens "
                                   f"there): {fix}") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise StartupError(f"{what} {host} is not an address of this machine: {fix}") from None
            raise StartupError(f"{what} {host}:{port} cannot be used ({e.strerror}): {fix}") from None


def check_listen(addr: str) -> None:
    """A --listen multiaddr: parses, and its TCP port (unless 0) is free."""
    try:
        parsed = multiaddr.Multiaddr(addr)
    except (MultiaddrError, ValueError, TypeError) as e:
        raise StartupError(f"--listen {addr!r} is not a multiaddr ({e}); e.g. /ip4/0.0.0.0/tcp/4001") from None
    names = [p.name for p in parsed.protocols()]
    if "tcp" not in names or not {"ip4", "ip6"} & set(names):
        raise StartupError(f"--listen {addr!r} needs an IP and a TCP port, e.g. /ip4/0.0.0.0/tcp/4001")
    host = parsed.value_for_protocol("ip4" if "ip4" in names else "ip6")
    check_port_free(host, int(parsed.value_for_protocol("tcp")), "--listen",
                    "choose another port, or stop the peer that runs there")


def check_peer_addr(addr: str, flag: str) -> None:
    """A --bootstrap/--relay multiaddr: parses and ends in /p2p/<a valid peer id>."""
    example = "/ip4/HOST/tcp/PORT/p2p/PEER_ID, as the peer prints it (\"listening on ...\")"
    try:
        parsed = multiaddr.Multiaddr(addr)
        peer_id = parsed.value_for_protocol("p2p")
    except (MultiaddrError, ValueError, TypeError):
        raise StartupError(f"{flag} {addr!r} is not a full multiaddr: give {example}") from None
    try:
        public_key_from_peer_id(peer_id)
    except ValueError:
        raise StartupError(f"{flag} {addr!r} has no valid peer id after /p2p/: give {example}") from None
