"""Errors of the credit layer. Each says what was wrong, so a peer can log it and move on."""

from __future__ import annotations


class CreditError(Exception):
    """Base of every credit-layer error."""


class InvalidEntry(CreditError):
    """An entry is malformed, badly signed, or does not follow the rules of its kind or its chain."""


class InvalidReceipt(InvalidEntry):
    """A receipt is malformed, not signed by its client, priced wrongly, or replayed."""


class InvalidForkProof(CreditError):
    """A fork proof does not prove a fork (same entry twice, different authors or seqs, bad signatures)."""


class CreditRefused(CreditError):
    """A server refuses to serve a client that is past the debt limit (and the server is busy)."""
