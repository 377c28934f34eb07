"""The one interface every protocol above p2p/ is written against.

Two backends implement it: `p2p.libp2p` (real sockets: TCP + Noise + yamux) and `p2p.sim`
(in memory, under trio's virtual clock). Protocol code must use only what is here — and
`trio.current_time()` / `Network.now()` for time — so that it runs unchanged on both.

Messages are msgpack-able objects (dict, list, str, bytes, int, float, bool, None). Both backends
send them as length-prefixed msgpack frames (`p2p.framing`) and decode them strictly on receipt, so
a handler always sees a fresh, decoded object and must still check its fields (`framing.field`).

Two ways to talk:
- request/response: `request(peer, protocol, body)` → reply body. The remote handler's exception
  arrives as `RemoteError` (with its type name and message, cut to `MAX_REMOTE_ERROR_LEN`
  characters); no answer before the deadline is `RequestTimeout`. Backends multiplex requests over
  long-lived streams: no stream per request.
- long-lived streams: `open_stream(peer, protocol)` → `Stream` with `send`/`receive` of whole
  messages, for sessions that exchange many messages in order (inference steps, range pulls).

Protocol ids are versioned: `/potluck/NAME/MAJOR.MINOR.PATCH`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from .identity import Identity

RequestHandler = Callable[[str, Any], Awaitable[Any]]
"""`async def handler(peer_id, body) -> reply`. Raise `BadRequest` (or any exception) to refuse."""

StreamHandler = Callable[["Stream"], Awaitable[None]]
"""`async def handler(stream)`: owns the inbound stream until it returns (the stream is then closed)."""

ConnectionListener = Callable[[str, bool], None]
"""`listener(peer_id, connected)`: called synchronously when a connection opens (True) or closes (False)."""

DEFAULT_REQUEST_TIMEOUT = 10.0
MAX_REMOTE_ERROR_LEN = 2000
"""A remote handler's error message reaches the caller cut to this many characters (both backends;
the libp2p backend also refuses longer ones on the wire)."""


def protocol_id(name: str, version: str = "1.0.0") -> str:
    return f"/potluck/{name}/{version}"


@dataclass(frozen=True)
class PeerAddress:
    peer_id: str
    addr: str  # full multiaddr, ending in /p2p/<peer_id>


class Stream(ABC):
    """An ordered, reliable, bidirectional message stream to one peer for one protocol."""

    peer_id: str
    protocol: str

    @abstractmethod
    async def send(self, message: Any) -> None:
        """Send one message. Raises StreamClosed if the stream is gone, FrameTooLarge if it is too big."""

    @abstractmethod
    async def receive(self) -> Any:
        """Next message. Raises StreamClosed at the end, FrameError on a malformed frame."""

    @abstractmethod
    async def aclose(self) -> None:
        """Close both directions; the other side's `receive` then raises StreamClosed."""

    async def __aenter__(self) -> "Stream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Network(ABC):
    """A peer's view of the overlay: its identity, its connections, and the protocols it serves."""

    identity: Identity

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    # --- addresses and connections ---------------------------------------------------------------

    @abstractmethod
    def listen_addrs(self) -> list[str]:
        """Full multiaddrs (with /p2p/<id>) other peers can dial."""

    def announce_addrs(self) -> list[str]:
        """`listen_addrs()` in the order a peer elsewhere should try them (what a server announces);
        backends with nothing to order keep theirs."""
        return self.listen_addrs()

    def may_dial(self, addr: str) -> bool:
        """Whether we may dial `addr`, a full address a stranger named (a server's announcement);
        backends a stranger cannot aim at anything else (the simulator) allow every one."""
        return True

    @abstractmethod
    async def connect(self, addr: str, timeout: float = 5.0) -> str:
        """Dial `addr` (a full multiaddr) and return the remote peer id. Raises PeerUnreachable,
        SwarmKeyMismatch (private swarms), or RequestTimeout."""

    @abstractmethod
    async def disconnect(self, peer_id: str) -> None: ...

    @abstractmethod
    def connected_peers(self) -> list[str]: ...

    def relayed(self, peer_id: str) -> bool:
        """Whether we reach the peer only through relays (a third party, whose hang is not the peer's
        fault); backends without relays never do."""
        return False

    @abstractmethod
    def add_address(self, peer_id: str, addr: str) -> None:
        """Remember where a peer can be dialled; `request`/`open_stream` dial from this book."""

    @abstractmethod
    def address_of(self, peer_id: str) -> str | None: ...

    @abstractmethod
    def add_connection_listener(self, listener: ConnectionListener) -> None: ...

    # --- protocols -------------------------------------------------------------------------------

    @abstractmethod
    def set_request_handler(self, protocol: str, handler: RequestHandler) -> None: ...

    @abstractmethod
    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None: ...

    @abstractmethod
    async def request(self, peer_id: str, protocol: str, body: Any, timeout: float = DEFAULT_REQUEST_TIMEOUT) -> Any:
        """Send `body` to `peer_id`'s handler for `protocol`, return its reply. Dials if needed."""

    @abstractmethod
    async def open_stream(self, peer_id: str, protocol: str) -> Stream:
        """Open a long-lived stream. Dials if needed. Raises ProtocolNotSupported if refused."""

    def observed_addrs(self) -> list[tuple[str, int]]:
        """Our addresses as other peers observe them, each with how many peers report it, most reported
        first; empty on backends that do not learn them."""
        return []

    def reachability(self) -> dict:
        """Whether other peers can dial us: {"status": "public" | "private" | "unknown", ...}; always
        unknown on backends that do not check."""
        return {"status": "unknown"}

    # --- time ------------------------------------------------------------------------------------

    @abstractmethod
    def now(self) -> float:
        """Wall-clock seconds since the epoch (virtual in the simulator); use for expiry times on records."""
