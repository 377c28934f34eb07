"""Credits: signed append-only logs, client-signed receipts, gossip replication, balances.

Public API (see each module): `LogEntry`, `ForkProof` (entry); `Store` (store); `Receipt`,
`ReceiptSigner`, `ReceiptTracker`, `Pricing`, `linear_pricing` (receipts); `Ledger`, `CreditPolicy`,
`Balance`, `credits`, `GFLOP` (ledger); `Replicator` (replication).
"""

from .entry import ForkProof, LogEntry, SignedHeader
from .errors import CreditError, CreditRefused, InvalidEntry, InvalidForkProof, InvalidReceipt
from .ledger import GFLOP, Balance, CreditPolicy, IngestResult, Ledger, credits
from .receipts import Pricing, Receipt, ReceiptSigner, ReceiptTracker, linear_pricing, new_session_id
from .store import Store

__all__ = [
    "LogEntry", "ForkProof", "SignedHeader", "CreditError", "CreditRefused", "InvalidEntry", "InvalidForkProof",
    "InvalidReceipt", "GFLOP", "Balance", "CreditPolicy", "IngestResult", "Ledger", "credits", "Pricing", "Receipt",
    "ReceiptSigner", "ReceiptTracker", "linear_pricing", "new_session_id", "Store",
]
