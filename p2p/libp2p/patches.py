"""Workarounds for py-libp2p 0.8.1 defects, applied to the process by `apply()`.

`Libp2pNetwork.open()` calls `apply()` before it starts a host; importing this package changes
nothing in libp2p. They change module globals and Swarm methods, so they hold for every libp2p host
of the process once applied; applying them again does nothing.
"""

from __future__ import annotations

import contextvars
import logging
import weakref
from dataclasses import dataclass
from typing import Any

import trio

import libp2p.network.swarm as _libp2p_swarm
import libp2p.stream_muxer.yamux.yamux as _yamux
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH as _NOISE_MAX_PLAINTEXT

from . import io

_applied = False
log = logging.getLogger(__name__)

# The swarm's handler for an inbound connection, once the connection is up, waits for the whole
# swarm to stop ("keep the handler alive so the connection stays open"). So every inbound connection
# left a task behind after it closed, and held one of the swarm's 250 inbound slots (released when
# the handler returns) for the peer's lifetime: a long-running peer ended up refusing every new
# inbound connection. The replacement waits for that connection to close instead; the noted upgrade
# tells it which connection that is.
_upgraded_inbound: contextvars.ContextVar[tuple[list, trio.Event]] = contextvars.ContextVar("potluck_upgraded_inbound")
_upgrade_inbound = _libp2p_swarm.Swarm.upgrade_inbound_raw_conn
_handle_inbound = _libp2p_swarm.Swarm._do_handle_inbound_connection


async def _upgrade_inbound_noted(self: Any, raw_conn: Any, maddr: Any) -> Any:
    muxed = await _upgrade_inbound(self, raw_conn, maddr)
    noted = _upgraded_inbound.get(None)
    if noted is not None:
        noted[0].append(muxed)
        noted[1].set()
    return muxed


@dataclass(frozen=True)
class InboundLimits:
    """What a swarm grants an inbound TCP connection before its peer is admitted (accept → Noise +
    yamux upgrade → our gate): a stranger that opens sockets and says nothing, or upgrades and never
    passes the gate (slowloris), must not use up the swarm's 250 inbound slots."""

    upgrade_timeout: float = 5.0  # seconds from accept to a multiplexed connection (libp2p's own: 10)
    max_unadmitted_per_ip: int = 8  # connections from one IP address not admitted yet


class _UnadmittedByIp:
    """Counts the inbound connections from each remote IP whose peer is not admitted yet."""

    def __init__(self, limits: InboundLimits):
        self.limits = limits
        self.counts: dict[str, int] = {}
        self.admissions: weakref.WeakKeyDictionary[Any, trio.Event] = weakref.WeakKeyDictionary()

    def take(self, ip: str) -> bool:
        n = self.counts.get(ip, 0)
        if n >= self.limits.max_unadmitted_per_ip:
            return False
        self.counts[ip] = n + 1
        return True

    def give_back(self, ip: str) -> None:
        self.counts[ip] -= 1
        if not self.counts[ip]:
            del self.counts[ip]


_inbound_limits: weakref.WeakKeyDictionary[Any, _UnadmittedByIp] = weakref.WeakKeyDictionary()


def limit_inbound(swarm: Any, limits: InboundLimits) -> None:
    """Apply `limits` to the swarm's inbound TCP connections (once `apply()` has run)."""
    _inbound_limits[swarm] = _UnadmittedByIp(limits)


def admitted(swarm: Any, muxed_conn: Any) -> None:
    """The peer on this connection passed our gate: it no longer counts against its IP's limit."""
    unadmitted = _inbound_limits.get(swarm)
    if unadmitted is not None:
        event = unadmitted.admissions.get(muxed_conn)
        if event is not None:
            event.set()


def _remote_ip(read_write_closer: Any) -> str | None:
    address = read_write_closer.get_remote_address() if hasattr(read_write_closer, "get_remote_address") else None
    return address[0] if address else None


async def _handle_inbound_until_closed(self: Any, read_write_closer: Any, maddr: Any, failure_event: Any) -> None:
    unadmitted = _inbound_limits.get(self)
    ip = _remote_ip(read_write_closer) if unadmitted is not None else None
    if unadmitted is not None and ip is not None:
        if not unadmitted.take(ip):
            log.info("refused an inbound connection from %s: %d not admitted yet",
                     ip, unadmitted.limits.max_unadmitted_per_ip)
            await io.close(read_write_closer)
            return
    upgraded: list[Any] = []
    done = trio.Event()
    _upgraded_inbound.set((upgraded, done))  # the handler task below starts with a copy of this context

    async def handle() -> None:
        await _handle_inbound(self, read_write_closer, maddr, failure_event)
        nursery.cancel_scope.cancel()  # it returned on its own: failed upgrade, or the swarm stopped

    async def give_back_once_admitted(admission: trio.Event) -> None:
        nonlocal ip
        await admission.wait()
        if ip is not None and unadmitted is not None:
            unadmitted.give_back(ip)
            ip = None

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handle)
            with trio.move_on_after(unadmitted.limits.upgrade_timeout if unadmitted is not None else float("inf")):
                await done.wait()  # the upgrade (Noise + yamux); libp2p's own timeout bounds it too
            if not done.is_set():
                nursery.cancel_scope.cancel()
                await io.close(read_write_closer)
                return
            if unadmitted is not None and ip is not None:
                # Until the gate admits the peer (the network closes it after its gate timeout if not).
                admission = unadmitted.admissions[upgraded[0]] = trio.Event()
                nursery.start_soon(give_back_once_admitted, admission)
            await upgraded[0].event_closed.wait()
            nursery.cancel_scope.cancel()
    finally:
        if unadmitted is not None and ip is not None:
            unadmitted.give_back(ip)


def apply() -> None:
    """Apply every workaround below to this process, once."""
    global _applied
    if _applied:
        return
    _applied = True
    # Every dial waited the full 250 ms "happy eyeballs" head start even with a single address:
    # a connect on loopback took 252 ms, about 10 ms with a 5 ms head start.
    _libp2p_swarm._HAPPY_EYEBALLS_DELAY = 0.005
    # libp2p sets its loggers up at import; keep them quiet unless the application asks otherwise.
    for name in ("libp2p", "libp2p.network.auto_connector"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # yamux sends DATA frames of 64 KiB (12-byte header + 65524 bytes), one byte-run more than a Noise
    # message carries (65535 - 16 byte tag = 65519), so every full frame became two Noise messages: two
    # encryptions, two socket writes, two reads and decryptions on the other side. Sizing frames to one
    # Noise message is within the yamux spec (frames may be any size up to the window) and gave +25 %
    # bulk throughput (bench.hop). Only frames this process sends are affected.
    _yamux.MAX_MESSAGE_SIZE = _NOISE_MAX_PLAINTEXT
    # py-libp2p's yamux sends a WINDOW_UPDATE after every read by default ("release on read", a local
    # deviation it lets you switch off with PY_YAMUX_RELEASE_ON_READ=0). With it off, the receiver
    # batches credit like go-yamux (an update once half the window is consumed), which halves the frames
    # of a small request/response. Safe for us because every stream we own is drained continuously, so
    # the half-window threshold is always reached while a sender waits.
    _yamux._yamux_release_on_read = lambda: False
    _libp2p_swarm.Swarm.upgrade_inbound_raw_conn = _upgrade_inbound_noted  # type: ignore[method-assign]
    _libp2p_swarm.Swarm._do_handle_inbound_connection = _handle_inbound_until_closed  # type: ignore[method-assign]
