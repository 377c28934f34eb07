"""Multiaddrs as this backend takes them: full addresses end in /p2p/<peer id>; a circuit address
`<relay addr>/p2p/<relay id>/p2p-circuit/p2p/<peer id>` names the peer reached through that relay.

Which IPs a peer may be made to dial (`may_dial_local`, `may_dial`; a whole address: `may_dial_addr`):
an address a stranger names or a connection arrives from must not aim our dials at this host, its
link, or (unless we live in one ourselves) a private network behind us; `DialVerdicts` remembers
`may_dial_addr`'s verdicts while our own IPs stay the same. `announce_order`: our own
addresses in the order others should try them; `expand_unspecified`: a listener on 0.0.0.0 or :: as
the addresses of this host's interfaces (`interface_ips`).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Iterable

import multiaddr
import psutil

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


_NEVER_DIALLED = [ipaddress.ip_network(n) for n in ("0.0.0.0/8", "240.0.0.0/4")]
_PRIVATE = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                                               "100.64.0.0/10", "fc00::/7")]  # RFC 1918, CGNAT, ULA


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _private(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return any(address in net for net in _PRIVATE if net.version == address.version)


def may_dial_local(ip: str, ours: Iterable[str]) -> bool:
    """Whether `ip` is not this host or its link: loopback, unspecified (0.0.0.0/8, ::), link-local
    (169.254.169.254 included), multicast and 240/4 never are, loopback only while every IP of ours
    (`ours`: those we listen on) is loopback too (a swarm on one machine: tests, a local demo)."""
    address = _ip(ip)
    if address is None:
        return False
    if address.is_loopback:
        mine = [_ip(o) for o in ours]
        return bool(mine) and all(m is not None and m.is_loopback for m in mine)
    return not (address.is_unspecified or address.is_link_local or address.is_multicast
                or any(address in net for net in _NEVER_DIALLED if net.version == address.version))


def may_dial(ip: str, ours: Iterable[str]) -> bool:
    """`may_dial_local`, and a private or CGNAT IP only when one of `ours` (the IPs we listen on or are
    seen at) is private too: a peer on a LAN, or in a lab, dials its neighbours; a public one is never
    aimed at the networks behind it."""
    mine = list(ours)
    if not may_dial_local(ip, mine):
        return False
    address = _ip(ip)
    assert address is not None
    return not _private(address) or any(m is not None and _private(m) for m in map(_ip, mine))


def routable(ip: str) -> bool:
    """Whether `ip` is reachable across the internet: none of this host's, its link's, or a private
    or CGNAT range's (those first in a list of addresses to dial from elsewhere)."""
    address = _ip(ip)
    return address is not None and may_dial_local(ip, []) and not _private(address)


def may_dial_addr(addr: str, ours: Iterable[str]) -> bool:
    """`may_dial` for the IP of a full address a stranger named (a circuit address: its relay's); one
    of any other shape names no IP to judge and is not dialled."""
    try:
        circuit = split_circuit(addr)
    except PeerUnreachable:
        return False
    endpoint = tcp_endpoint(addr if circuit is None else circuit[0])
    return endpoint is not None and may_dial(endpoint[0], ours)


class DialVerdicts:
    """`may_dial_addr` remembered per address while `ours` stays the same (the verdict is a function of
    both): parsing a multiaddr costs about 0.1 ms, and lookups hear of the same peers again and again.
    At most `max_addrs` are remembered; past that the memory starts afresh."""

    def __init__(self, max_addrs: int = 4096):
        self.max_addrs = max_addrs
        self._ours: frozenset[str] = frozenset()
        self._verdicts: dict[str, bool] = {}

    def may_dial(self, addr: str, ours: Iterable[str]) -> bool:
        mine = frozenset(ours)
        if mine != self._ours:
            self._ours, self._verdicts = mine, {}
        verdict = self._verdicts.get(addr)
        if verdict is None:
            if len(self._verdicts) >= self.max_addrs:
                self._verdicts.clear()
            verdict = self._verdicts[addr] = may_dial_addr(addr, mine)
        return verdict


def interface_ips() -> list[str]:
    """This host's IPs, from its network interfaces (link-local ones, which need a scope, left out)."""
    found = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6) and "%" not in a.address:
                address = _ip(a.address)
                if address is not None and not address.is_link_local:
                    found.append(str(address))
    return found


def expand_unspecified(addr: str, ips: Iterable[str]) -> list[str]:
    """`addr` (ours, plain TCP) listening on an unspecified IP (0.0.0.0, ::) as one address for each
    of `ips` of that IP version — the internet-routable ones first, then a LAN's, then this host's —
    since no peer can dial 0.0.0.0; any other address as it is."""
    endpoint = tcp_endpoint(addr)
    address = _ip(endpoint[0]) if endpoint is not None else None
    if endpoint is None or address is None or not address.is_unspecified:
        return [addr]
    tail = addr.split("/tcp/", 1)[1]
    same = [ip for ip in dict.fromkeys(ips) if (a := _ip(ip)) is not None and a.version == address.version]
    rank = {ip: 0 if routable(ip) else 2 if ipaddress.ip_address(ip).is_loopback else 1 for ip in same}
    proto = "ip4" if address.version == 4 else "ip6"
    return [f"/{proto}/{ip}/tcp/{tail}" for ip in sorted(same, key=lambda ip: rank[ip])]


def announce_order(direct: list[str], circuits: list[str]) -> list[str]:
    """Our addresses in the order a peer elsewhere should try them: direct ones (`direct`, plain TCP)
    reachable across the internet, then those through relays (behind NAT the ones that work from
    anywhere), then the other direct ones (a LAN's, this host's: for peers there); never an unspecified
    IP (0.0.0.0, ::), which no peer dials."""
    plain = [(a, e[0]) for a in direct if (e := tcp_endpoint(a)) is not None]
    return [*(a for a, ip in plain if routable(ip)), *circuits,
            *(a for a, ip in plain if not routable(ip) and not ipaddress.ip_address(ip).is_unspecified)]


def tcp_endpoint(addr: str) -> tuple[str, int] | None:
    """(ip, port) of a plain /ip4|ip6/<ip>/tcp/<port>[/p2p/<id>] address; None for anything else."""
    try:
        ma = multiaddr.Multiaddr(addr)
        parts = [(p.name, ma.value_for_protocol(p.code)) for p in ma.protocols()]
    except Exception:  # multiaddr raises several unrelated types on bad input
        return None
    if parts and parts[-1][0] == "p2p":
        parts = parts[:-1]
    if len(parts) != 2 or parts[0][0] not in ("ip4", "ip6") or parts[1][0] != "tcp":
        return None
    address = _ip(str(parts[0][1]))
    try:
        port = int(parts[1][1])
    except ValueError:
        return None
    if address is None or not 0 < port < 65536:
        return None
    return str(address), port
