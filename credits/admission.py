"""Admission: how much a busy server lets a client owe it, from the server's own view of the client.

The shared balance fold (`credits.ledger`) is what a Sybil farms: receipts between its own keys
credit one of them without bound. So a server decides on its own view instead (`credits.standing`):

    owed(C)      = spent(C) − granted(C)          what C's receipts, as this server holds them, say it
                                                  consumed beyond the grants it was given (negative
                                                  while some of its grants are unspent)
    allowance(C) = policy.debt_limit + standing(C) a newcomer's allowance plus C's work that reached
                                                  this server (directly, or through a peer that
                                                  served it)

and a busy server computes a step only while owed(C) + unsettled(C) ≤ allowance(C), where
unsettled(C) is what C's receipts held here are worth beyond the earn entries already appended.
What C *earned* in the fold does not count: earnings from its own Sybils reach no honest peer,
while real work it did reaches this server as standing. Grants count (a private swarm funds its
members through grant authorities). An idle server serves anyone (free when idle); a frozen
(forked) client only then.

What a server can lose to a client that never pays back is therefore at most its allowance:
`debt_limit` for a fresh key (a few short generations of the default model on a busy swarm), plus
what that client's work did for this server. Identities are free, so a crowd of fresh keys gets
`debt_limit` each — but only from busy servers' spare turns: the compute queue serves standing first
(`Position.standing` is the priority), so they wait behind everyone who contributed.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2p.identity import peer_id_from_public_key

from .errors import CreditRefused
from .ledger import Ledger, credits
from .standing import StandingView


@dataclass(frozen=True)
class Position:
    """A client as one server sees it: FLOPs throughout."""

    key: bytes
    standing: int  # its work that reached this server (credits.standing); the compute priority
    owed: int  # spent − granted (negative: grants left)
    allowance: int  # debt_limit + standing
    frozen: bool = False  # a fork proof is held: served only when idle

    def headroom(self, unsettled: int = 0) -> int:
        """How much more it may owe here, with `unsettled` FLOPs of receipts held beyond the ledger."""
        return self.allowance - self.owed - unsettled


class Admission:
    """One server's admission rule (see the module docstring): its ledger's balances for what a client
    consumed, its own `StandingView` for what the client gave."""

    def __init__(self, ledger: Ledger, view: StandingView | None = None):
        self.ledger = ledger
        self.view = view if view is not None else StandingView(ledger)

    async def position(self, client: bytes) -> Position:
        balance = await self.ledger.balance(client)
        standing = await self.view.standing(client)
        return Position(client, standing, balance.spent - balance.granted,
                        self.ledger.policy.debt_limit + standing, balance.frozen)

    async def admit(self, client: bytes, *, idle: bool) -> Position:
        """Before a server opens a session for `client`: its position, or CreditRefused when this
        server is busy and the client has no headroom left (or is frozen)."""
        position = await self.position(client)
        if not idle:
            self.check(position)
        return position

    def check(self, position: Position, unsettled: int = 0) -> None:
        """CreditRefused unless the client's `unsettled` receipts here (the step about to run included)
        fit its allowance."""
        peer_id = peer_id_from_public_key(position.key)
        if position.frozen:
            raise CreditRefused(f"peer {peer_id} signed two histories of its credit log (fork proof held); "
                                "this server serves it only when idle")
        if position.headroom(unsettled) < 0:
            raise CreditRefused(
                f"you owe {credits(position.owed + unsettled):,.0f} GFLOP-credits as this server sees it, and it "
                f"allows {credits(position.allowance):,.0f} (a newcomer's {credits(self.ledger.policy.debt_limit):,.0f}"
                f" plus your standing here, {credits(position.standing):,.0f}: work of yours that reached it); "
                "this server is busy and serves beyond that only when idle.")
