"""The session handshake: wire version, and proof of the swarm key in private swarms.

Why our own gate and not libp2p pnet: py-libp2p 0.8.1's pnet hangs about 30 s on a key mismatch
(and more than 40 s when the listener has no key) before failing, and uses Salsa20 with an 8-byte
nonce, so it does not interoperate with the go/js/rust pnet (XSalsa20). Instead, the first exchange
on every session is a challenge/response:

    dialer → {"t": "hello", "v": version, "n": nonce_d, "k": has_key}
    listener → {"t": "hello", "v": version, "n": nonce_l, "k": has_key, "p": proof_l}
               (or {"t": "refuse", "e": kind, "m": why})
    dialer → {"t": "proof", "p": proof_d, "o": where_dialer_sees_listener}
    listener → {"t": "welcome", "o": where_listener_sees_dialer} (or refuse)

with proofs HMAC-SHA256(key, label ‖ role ‖ nonce_dialer ‖ nonce_listener ‖ id_dialer ‖ id_listener).
The peer ids are the ones Noise authenticated for this connection, so a proof cannot be relayed to a
third peer, and the fresh nonces stop replays. A peer that fails, or does not finish within the gate
timeout, is disconnected before anything else is served to it; the dialer's `connect` raises
`SwarmKeyMismatch` with what to do. The key protects membership, not secrecy of the traffic from
members; Noise still encrypts everything on the wire.

"o" is where a side sees the other: the far end of its connection as a plain /ip4|ip6/…/tcp/…
multiaddr (behind NAT, the NAT's public side), none over a relay. It is how members of a private
swarm, which run no identify, learn the addresses they are observed at (hole punching needs them);
each side uses the other's only once the handshake admitted it (`Admission`). The dialer says what it
dialed too, as identify tells both sides, so a listener behind a 1:1 NAT or a forwarded port learns
its public address (reachability checks dial it there). An older peer sends no "o" (nothing is
learned) and ignores ours; an "o" that is no plain TCP address is ignored, one of the wrong type or
over `MAX_ADDR_LEN` breaks the handshake like any malformed field.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from typing import Any, Protocol

import trio
from libp2p.abc import IHost

from .. import framing
from ..errors import FrameError, PeerUnreachable, RequestTimeout, StreamClosed, SwarmKeyMismatch
from ..framing import ExactReader, expect_map, field
from ..network import MAX_REMOTE_ERROR_LEN
from . import io
from .addresses import tcp_endpoint


class GatedHost(Protocol):
    """What every part of this backend needs of `Libp2pNetwork` (each part's own Protocol adds the rest):
    who we are, the libp2p host, and which peers passed this gate."""

    @property
    def peer_id(self) -> str: ...

    @property
    def host(self) -> IHost: ...

    def admitted(self, peer_id: str) -> bool:
        """Whether the peer holds a session with us (it passed the gate)."""

log = logging.getLogger(__name__)

WIRE_VERSION = 1
NONCE_SIZE = 32
_PROOF_LABEL = b"potluck swarm key proof v1\x00"
MAX_ADDR_LEN = 100  # an observed address: /ip6/<39 characters>/tcp/65535 is 55


@dataclass(frozen=True)
class Admission:
    """A handshake that ended in a welcome, and what the peer said in it: where it sees us (a plain
    /ip4|ip6/…/tcp/… address); None over a relay, from an older peer, or when it said no such address."""

    observed_addr: str | None


def plain_addr(remote: tuple[str, int] | None) -> str | None:
    """A socket's far end (host, port) as a plain /ip4|ip6/<ip>/tcp/<port> multiaddr; None when there is
    none, or it is no such address (an IPv6 one with a zone)."""
    if remote is None:
        return None
    host, port = remote[0], remote[1]
    if host.lower().startswith("::ffff:"):
        host = host[7:]
    addr = f"/ip6/{host}/tcp/{port}" if ":" in host else f"/ip4/{host}/tcp/{port}"
    return addr if tcp_endpoint(addr) is not None else None


def _observed_addr(msg: dict, peer_id: str) -> str | None:
    """The "o" of a proof or welcome, in its plain form; None when absent or not a plain TCP address."""
    addr = field(msg, "o", str, max_len=MAX_ADDR_LEN, optional=True)
    endpoint = tcp_endpoint(addr) if addr is not None else None
    if addr is not None and endpoint is None:
        log.info("%s says it sees us at %r, no plain TCP address: ignored", peer_id, addr)
    return plain_addr(endpoint)


def proof(key: bytes, role: bytes, nonce_d: bytes, nonce_l: bytes, dialer: str, listener: str) -> bytes:
    msg = b"".join([_PROOF_LABEL, role, b"\x00", nonce_d, nonce_l, dialer.encode(), b"\x00", listener.encode()])
    return hmac.new(key, msg, hashlib.sha256).digest()


def _mismatch_message(peer_id: str, ours: bool, theirs: bool) -> str:
    if ours and theirs:
        return (f"peer {peer_id} is in a different private swarm: the swarm keys differ. "
                "Start this peer with the same swarm key file as that swarm's members (--swarm-key FILE).")
    if ours:
        return (f"peer {peer_id} is not in a private swarm (it has no swarm key) but this peer has one. "
                "Give both peers the same swarm key file (--swarm-key FILE), or neither.")
    return (f"peer {peer_id} belongs to a private swarm and this peer has no swarm key. "
            "Start this peer with that swarm's key file (--swarm-key FILE).")


def _raise_refusal(peer_id: str, msg: dict) -> None:
    kind = field(msg, "e", str, max_len=100)
    message = field(msg, "m", str, max_len=MAX_REMOTE_ERROR_LEN)
    if kind == "SwarmKeyMismatch":
        raise SwarmKeyMismatch(message)
    raise PeerUnreachable(f"peer {peer_id} refused the connection: {kind}: {message}")


async def _listener_says(reader: ExactReader, peer_id: str, want: str, what: str, timeout: float) -> dict:
    """The listener's next handshake message, of type `want`; its refusal is raised as what it says."""
    msg = expect_map(await io.read_frame(reader, io.MAX_OPENING_FRAME, timeout), what)
    kind = field(msg, "t", str, max_len=16)
    if kind == "refuse":
        _raise_refusal(peer_id, msg)
    if kind != want:
        raise FrameError(f"expected {want}, got {kind!r}")
    return msg


async def handshake_as_dialer(raw: Any, reader: ExactReader, *, own_id: str, peer_id: str, key: bytes | None,
                              timeout: float, seen_at: str | None) -> Admission:
    """Run the dialer's side on a fresh stream to `peer_id`, telling it we see it at `seen_at` (what we
    dialed; None over a relay); returns once the listener welcomed us. Raises SwarmKeyMismatch,
    RequestTimeout or PeerUnreachable."""
    nonce_d = secrets.token_bytes(NONCE_SIZE)
    try:
        with trio.fail_after(timeout):
            await io.write(raw, framing.frame({"t": "hello", "v": WIRE_VERSION, "n": nonce_d, "k": key is not None}))
            reply = await _listener_says(reader, peer_id, "hello", "hello reply", timeout)
            nonce_l = field(reply, "n", bytes, max_len=NONCE_SIZE)
            theirs = field(reply, "k", bool)
            if len(nonce_l) != NONCE_SIZE:
                raise FrameError("hello nonce has the wrong size")
            if theirs != (key is not None):
                raise SwarmKeyMismatch(_mismatch_message(peer_id, key is not None, theirs))
            proof_d = None
            if key is not None:
                proof_l = field(reply, "p", bytes, max_len=64)
                if not hmac.compare_digest(proof_l, proof(key, b"listener", nonce_d, nonce_l, own_id, peer_id)):
                    raise SwarmKeyMismatch(_mismatch_message(peer_id, True, True))
                proof_d = proof(key, b"dialer", nonce_d, nonce_l, own_id, peer_id)
            await io.write(raw, framing.frame({"t": "proof", "p": proof_d, "o": seen_at}))
            welcome = await _listener_says(reader, peer_id, "welcome", "handshake result", timeout)
            return Admission(_observed_addr(welcome, peer_id))
    except trio.TooSlowError:
        if key is not None:
            raise SwarmKeyMismatch(
                f"peer {peer_id} did not complete the swarm key handshake within {timeout:g} s; "
                "it may not be a potluck peer of this private swarm") from None
        raise RequestTimeout(f"peer {peer_id} did not complete the handshake within {timeout:g} s") from None
    except FrameError as e:
        raise PeerUnreachable(f"peer {peer_id} broke the handshake: {e}") from None
    except StreamClosed as e:
        if key is not None:
            raise SwarmKeyMismatch(
                f"peer {peer_id} closed the connection during the swarm key handshake ({e}); "
                "the swarm keys probably differ: use the swarm's key file (--swarm-key FILE)") from None
        raise PeerUnreachable(f"peer {peer_id} closed the connection during the handshake: {e}") from None


async def handshake_as_listener(raw: Any, reader: ExactReader, hello: dict, *, own_id: str, peer_id: str,
                                key: bytes | None, timeout: float, seen_at: str | None) -> Admission | None:
    """Answer the dialer `peer_id`'s `hello`, telling it we see it at `seen_at` (None over a relay); the
    admission once we welcomed it, None once we refused it (and told it why). Raises FrameError on a
    malformed frame and StreamClosed when the stream ends; the caller bounds the whole exchange by the
    gate timeout."""
    version = field(hello, "v", int)
    nonce_d = field(hello, "n", bytes, max_len=NONCE_SIZE)
    theirs = field(hello, "k", bool)
    if len(nonce_d) != NONCE_SIZE:
        raise FrameError("hello nonce has the wrong size")
    if version != WIRE_VERSION:
        await io.write(raw, framing.frame({"t": "refuse", "e": "VersionMismatch",
                                           "m": f"this peer speaks wire version {WIRE_VERSION}, not {version}"}))
        return None
    if theirs != (key is not None):
        # Say only what the dialer needs to fix its configuration: nothing about us or our swarm.
        await io.write(raw, framing.frame({"t": "refuse", "e": "SwarmKeyMismatch",
                                           "m": _mismatch_message(own_id, theirs, key is not None)}))
        log.info("refused %s: swarm key %s", peer_id, "missing" if key else "unexpected")
        return None
    nonce_l = secrets.token_bytes(NONCE_SIZE)
    proof_l = proof(key, b"listener", nonce_d, nonce_l, peer_id, own_id) if key is not None else None
    await io.write(raw, framing.frame({"t": "hello", "v": WIRE_VERSION, "n": nonce_l, "k": key is not None, "p": proof_l}))
    answer = expect_map(await io.read_frame(reader, io.MAX_OPENING_FRAME, timeout), "proof")
    if field(answer, "t", str, max_len=16) != "proof":
        raise FrameError("expected the swarm key proof")
    if key is not None:
        proof_d = field(answer, "p", bytes, max_len=64)
        if not hmac.compare_digest(proof_d, proof(key, b"dialer", nonce_d, nonce_l, peer_id, own_id)):
            await io.write(raw, framing.frame({"t": "refuse", "e": "SwarmKeyMismatch",
                                               "m": _mismatch_message(own_id, True, True)}))
            log.info("refused %s: wrong swarm key proof", peer_id)
            return None
    admission = Admission(_observed_addr(answer, peer_id))  # read only once the proof holds
    await io.write(raw, framing.frame({"t": "welcome", "o": seen_at}))
    return admission
