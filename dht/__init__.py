"""Kademlia with geographic clustering and signed records, written against p2p.Network.

Layers, each readable alone (imports only go down the list):
    ids.py        256-bit ids (sha256 of the peer id), XOR distance, optional identity puzzle
    records.py    signed key → {subkey → SignedValue} records, validators per namespace, local store
                  within StoreLimits (totals, a share per owner and per sending peer)
    vivaldi.py    2-D + height network coordinates from RTT samples
    clusters.py   Coral-style cluster levels by RTT, landmark election without a coordinator
    routing.py    k-buckets with least-recently-seen eviction that pings first
    protocol.py   /potluck/kad/1.0.0 messages and their strict decoders
    traversal.py  α-parallel iterative lookups, d disjoint paths, soft timeouts, liars' offers held back
    node.py       DHTNode: tables per level, handlers, get/store/find_peer, maintenance; the one gate
                  (`_may_dial`) every address a stranger gives passes before it is dialled or kept
"""

from .node import DHTConfig, DHTNode, ValueLookup
from .records import InvalidRecord, SignedValue, StoreLimits, StoreRefused, Validators

__all__ = ["DHTConfig", "DHTNode", "ValueLookup", "SignedValue", "InvalidRecord", "StoreLimits", "StoreRefused",
           "Validators"]
