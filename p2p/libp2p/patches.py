"""Workarounds for py-libp2p 0.8.1 defects, applied to the process by `apply()`.

`Libp2pNetwork.open()` calls `apply()` before it starts a host; importing this package changes
nothing in libp2p. They change module globals and Swarm methods, so they hold for every libp2p host
of the process once applied; applying them again does nothing.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any

import trio

import libp2p.network.swarm as _libp2p_swarm
import libp2p.stream_muxer.yamux.yamux as _yamux
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH as _NOISE_MAX_PLAINTEXT

_applied = False

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


async def _handle_inbound_until_closed(self: Any, read_write_closer: Any, maddr: Any, failure_event: Any) -> None:
    upgraded, done = [], trio.Event()
    _upgraded_inbound.set((upgraded, done))  # the handler task below starts with a copy of this context

    async def handle() -> None:
        await _handle_inbound(self, read_write_closer, maddr, failure_event)
        nursery.cancel_scope.cancel()  # it returned on its own: failed upgrade, or the swarm stopped

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle)
        await done.wait()  # the upgrade (Noise + yamux) is bounded by libp2p's own timeout
        await upgraded[0].event_closed.wait()
        nursery.cancel_scope.cancel()


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
    _libp2p_swarm.Swarm.upgrade_inbound_raw_conn = _upgrade_inbound_noted
    _libp2p_swarm.Swarm._do_handle_inbound_connection = _handle_inbound_until_closed
