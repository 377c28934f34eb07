"""Kademlia with geographic clustering and signed records, written against p2p.Network."""
