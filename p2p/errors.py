"""Errors the overlay raises. Every failure a caller can meet has its own type and a clear message."""


class P2PError(Exception):
    """Base of every overlay error."""


class FrameError(P2PError):
    """A frame on the wire is malformed: too large, truncated, not msgpack, or of the wrong shape."""


class FrameTooLarge(FrameError):
    """A length prefix announced more bytes than the protocol allows; the body is never read."""


class StreamClosed(P2PError):
    """The other side closed or reset the stream."""


class RequestTimeout(P2PError, TimeoutError):
    """No answer arrived before the request's deadline."""


class PeerUnreachable(P2PError):
    """No connection to the peer could be made (dial failed, peer gone, or partitioned)."""


class ProtocolNotSupported(P2PError):
    """The remote peer does not serve the protocol that was asked for."""


class SwarmKeyMismatch(P2PError):
    """The other peer could not prove it holds this swarm's key (wrong key or none)."""


class RemoteError(P2PError):
    """The remote handler failed; carries its error type and message so the caller sees why."""

    def __init__(self, protocol: str, kind: str, message: str):
        super().__init__(f"{protocol}: remote {kind}: {message}")
        self.protocol = protocol
        self.kind = kind
        self.message = message


class BadRequest(P2PError):
    """Raised by a handler to refuse a request; reaches the caller as a RemoteError of kind BadRequest."""
