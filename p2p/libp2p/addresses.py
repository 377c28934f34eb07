"""Multiaddrs as this backend takes them: full addresses end in /p2p/<peer id>; a circuit address
`<relay addr>/p2p/<relay id>/p2p-circuit/p2p/<peer id>` names the peer reached through that relay."""

from __future__ import annotations

import multiaddr

from ..errors import PeerUnreachable

CIRCUIT = "/p2p-circuit"


def split_circuit(addr: str) -> tuple[str, str | None] | None:
    """(relay address with /p2p/<relay id>, target id or None) for a circuit address, None otherwise.

    `/ip4/1.2.3.4/tcp/4001/p2p/RELAY/p2p-circuit/p2p/TARGET` → ("/ip4/…/p2p/RELAY", "TARGET")."""
    if CIRCUIT not in addr:
        return None
    relay, _, rest = addr.partition(CIRCUIT)
    if CIRCUIT in rest or "/p2p/" not in relay:
        raise PeerUnreachable(f"circuit address {addr[:200]!r} must be <relay addr>/p2p/<relay id>/p2p-circuit/p2p/<peer id>")
    if rest in ("", "/"):
        return relay, None
    if not rest.startswith("/p2p/") or "/" in rest[len("/p2p/"):]:
        raise PeerUnreachable(f"circuit address {addr[:200]!r} must end in /p2p-circuit/p2p/<peer id>")
    return relay, rest[len("/p2p/"):]


def circuit_addr(relay_addr: str, peer_id: str) -> str:
    return f"{relay_addr}{CIRCUIT}/p2p/{peer_id}"


def full_addr(addr: str, peer_id: str | None = None) -> str:
    """`addr` ending in /p2p/<peer id> (appended when missing). For a circuit address the peer is the
    last /p2p/. Raises PeerUnreachable when `addr` is no multiaddr, or names a peer other than `peer_id`."""
    try:
        ma = multiaddr.Multiaddr(addr)
    except Exception as e:
        raise PeerUnreachable(f"not a multiaddr: {addr[:120]!r} ({e})") from None
    circuit = split_circuit(str(ma))
    if circuit is not None:
        found = circuit[1]
        addr = str(ma).rstrip("/")
    else:
        try:
            found = ma.value_for_protocol("p2p")
        except Exception:
            found = None
    if not found:
        if peer_id is None:
            raise PeerUnreachable(f"address {addr} lacks /p2p/<peer id>")
        return f"{addr}/p2p/{peer_id}"
    if peer_id is not None and found != peer_id:
        raise PeerUnreachable(f"address {addr} names peer {found}, not {peer_id}")
    return addr
