"""What a generation fails with: `GenerationFailed`, and the `Refused` family — a refusal is not a fault.

A server *refuses* a request it cannot or will not take (its cache is full, the session is too long,
the client has no credit or stopped paying, it serves another model, dtype or span, it is busy or
stopping, it will not forward to the next hop named) with a typed error kind on the wire
(pipeline/protocol.py). The client raises the matching `Refused` subclass, never bans a server for
it, tries another server where one could accept, and otherwise fails at once with it. Only *faults* (timeouts, broken streams, malformed or wrong outputs)
ban a server. `REFUSALS` maps each wire kind to its class; the server's kind is kept in `kind`.
"""

from __future__ import annotations


class GenerationFailed(RuntimeError):
    """The swarm could not complete a step after every retry (no route, or every route failed)."""


class Refused(GenerationFailed):
    """A server refused the request; `kind` is its wire error kind, `peer_id` the server."""

    def __init__(self, kind: str, message: str, *, peer_id: str | None = None, limit: int | None = None):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.peer_id = peer_id
        self.limit = limit


class TooLong(Refused):
    """The session is longer than the server takes; `limit`: the most tokens it would take."""


class CacheFull(Refused):
    """The server's KV cache cannot hold the session now; `limit`: the tokens it could hold."""


class InsufficientCredit(Refused):
    """The client owes the server its allowance (credits.admission) and the server is not idle."""


class ReceiptRequired(Refused):
    """The server wants a valid receipt for what it served before it computes more; `limit`: the tokens
    the receipts must cover (when the server said)."""


class WrongModel(Refused):
    """The server serves another model, dtype or span than the session asked for."""


class Busy(Refused):
    """The server holds as many sessions as it takes, or is stopping."""


class PushRefused(Refused):
    """A server would not forward a step to the next hop named: no current announcement (as the
    server reads the swarm) shows that peer serving the next blocks of the model."""


class RateRefused(Refused):
    """The client's own refusal at open: the server asks a rate for the session above what the client
    believes its tier is worth (pipeline/billing.py `ClientBilling.agree`); another server may be cheaper."""


REFUSALS: dict[str, type[Refused]] = {
    "BadMaxLength": TooLong,
    "MaxLengthExceeded": TooLong,
    "CacheFull": CacheFull,
    "CreditRefused": InsufficientCredit,
    "ReceiptRequired": ReceiptRequired,
    "BadReceipt": ReceiptRequired,
    "ModelMismatch": WrongModel,
    "DtypeMismatch": WrongModel,
    "SpanNotServed": WrongModel,
    "TooManySessions": Busy,
    "ServerStopping": Busy,
    "PushRefused": PushRefused,
}

# Refusals that depend on the server asked (its cache, its limits, its view of the client's standing,
# its load): another server may accept. The rest depend on the client (its receipts) and fail at once.
SERVER_SPECIFIC = (TooLong, CacheFull, InsufficientCredit, WrongModel, Busy, RateRefused)
