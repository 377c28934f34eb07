"""Credits: signed append-only logs, client-signed receipts, gossip replication, balances, standing.

Layers, each readable alone (imports only go down the list):
    errors.py       the credit layer's exceptions (InvalidEntry, InvalidReceipt, CreditRefused, …)
    entry.py        LogEntry: one signed entry of an author's log, its canonical encoding; ForkProof
    receipts.py     Receipt: what a client signs for a server's work, pricing, the client's signer
                    and the server's tracker
    store.py        Store: SQLite tables of verified chains and what is derived from them (durable)
    allowance.py    IngestLimits: how many entries without a receipt one author may add, over time
    ledger.py       Ledger: the rules of each entry kind, verified ingestion, balances as a fold
                    over chains; CreditPolicy
    standing.py     WorkGraph, StandingView: each peer's own view of another, the flow of verified work
                    that reached it (Sybil-bounded; balances stay the shared fold)
    admission.py    Admission, Position: how much a busy server lets a client owe it (a newcomer's
                    allowance plus the client's standing in the server's own view)
    replication.py  Replicator: gossip push, head-vector anti-entropy and range pulls between peers
"""

from .admission import Admission, Position
from .allowance import IngestLimits
from .entry import ForkProof, LogEntry, SignedHeader
from .errors import CreditError, CreditRefused, InvalidEntry, InvalidForkProof, InvalidReceipt
from .ledger import GFLOP, Balance, CreditPolicy, IngestResult, Ledger, credits
from .receipts import RATE_UNIT, Pricing, Receipt, ReceiptSigner, ReceiptTracker, linear_pricing, new_session_id
from .standing import StandingView, WorkGraph, standings
from .store import Store

__all__ = [
    "LogEntry", "ForkProof", "SignedHeader", "CreditError", "CreditRefused", "InvalidEntry", "InvalidForkProof",
    "InvalidReceipt", "GFLOP", "Balance", "CreditPolicy", "IngestLimits", "IngestResult", "Ledger", "credits",
    "RATE_UNIT", "Pricing", "Receipt", "ReceiptSigner", "ReceiptTracker", "linear_pricing", "new_session_id", "Store",
    "StandingView", "WorkGraph", "standings", "Admission", "Position",
]
