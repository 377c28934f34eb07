"""The address book: where to dial each peer, bounded, with py-libp2p's peerstore kept within the same bound.

`Libp2pNetwork` dials a peer at the address it was given (`add_address`, `connect`) and keeps that
address to dial it again (`addr_of`). py-libp2p adds every dialled address to its peerstore and
never forgets a peer there; its own cap (1000 peers) evicts entries without addresses first, our own
key pair among them (identify then fails). Anyone who can make us dial (a gossiped or announced
address) could grow either without bound. So:

- a dial that fails drops what it added to the peerstore: the peer's entry (nothing of it is needed:
  every dial passes its address) unless the peer is connected or dialled by another task. The book
  keeps the address (a later request dials it again, and meets the same error);
- past `max_peers`, peers we are not connected to are forgotten, in the book and in the peerstore:
  peers we never held a session with first (oldest noted first), then those we heard from least
  recently. Connected peers, peers being dialled and ourselves are never forgotten.
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator

from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStore


class AddressBook:
    def __init__(self, swarm: Swarm, max_peers: int = 4096):
        if max_peers < 1:
            raise ValueError("an address book holds at least one peer")
        assert isinstance(swarm.peerstore, PeerStore)  # typed as the interface; we use its peer map
        self.swarm = swarm
        self.peerstore: PeerStore = swarm.peerstore
        self.max_peers = max_peers
        self._addrs: OrderedDict[str, str] = OrderedDict()  # peer id → full address, oldest noted first
        self._heard: dict[str, float] = {}  # peers of the book we held a session with → when (monotonic)
        self._dialing: dict[str, int] = {}
        # Ours decides what is forgotten: py-libp2p's own eviction would take our key pair first.
        self.peerstore.max_peers = sys.maxsize

    def __len__(self) -> int:
        return len(self._addrs)

    def addr_of(self, peer_id: str) -> str | None:
        return self._addrs.get(peer_id)

    def add(self, peer_id: str, addr: str) -> None:
        self._addrs[peer_id] = addr
        self._addrs.move_to_end(peer_id)
        self.prune()

    def add_if_missing(self, peer_id: str, addr: str) -> None:
        """Note `addr` unless the book has an address for the peer."""
        if peer_id not in self._addrs:
            self.add(peer_id, addr)

    def heard(self, peer_id: str) -> None:
        """A session with the peer began or ended: it is not forgotten before peers heard from longer ago."""
        if peer_id in self._addrs:
            self._heard[peer_id] = time.monotonic()

    @contextmanager
    def dialing(self, peer_id: str) -> Iterator[None]:
        """Around a dial of `peer_id`: if it fails and the peer is not connected (nor dialled by
        another task), its peerstore entry is dropped."""
        self._dialing[peer_id] = self._dialing.get(peer_id, 0) + 1
        try:
            yield
        except BaseException:
            self._release(peer_id)
            if peer_id not in self._dialing and not self._connected(peer_id):
                self._forget_in_peerstore(ID.from_base58(peer_id))
            raise
        else:
            self._release(peer_id)
        finally:
            self.prune()

    def _release(self, peer_id: str) -> None:
        self._dialing[peer_id] -= 1
        if not self._dialing[peer_id]:
            del self._dialing[peer_id]

    def _connected(self, peer_id: str) -> bool:
        return bool(self.swarm.get_connections(ID.from_base58(peer_id)))

    def _keep(self, peer_id: str) -> bool:
        return peer_id in self._dialing or self._connected(peer_id)

    def _rank(self, peer_id: str) -> tuple[bool, bool, float]:
        """Who is forgotten first (lowest): peers not in the book, never heard from, heard from longest ago."""
        return peer_id in self._addrs, peer_id in self._heard, self._heard.get(peer_id, 0.0)

    def prune(self) -> None:
        """Forget peers over `max_peers` (an eighth more at once, so that a flood prunes rarely)."""
        slack = self.max_peers // 8
        if len(self._addrs) > self.max_peers:
            # sorted() is stable: among peers never heard from, the oldest noted goes first
            victims = sorted((p for p in self._addrs if not self._keep(p)), key=self._rank)
            for peer_id in victims[: len(self._addrs) - self.max_peers + slack]:
                del self._addrs[peer_id]
                self._heard.pop(peer_id, None)
                self._forget_in_peerstore(ID.from_base58(peer_id))
        store = self.peerstore.peer_data_map
        if len(store) > self.max_peers:
            own = self.swarm.get_peer_id()
            held = sorted((pid for pid in store if pid != own and not self._keep(pid.to_base58())),
                          key=lambda pid: self._rank(pid.to_base58()))
            for pid in held[: len(store) - self.max_peers + slack]:
                self._forget_in_peerstore(pid)

    def _forget_in_peerstore(self, pid: ID) -> None:
        if pid != self.swarm.get_peer_id() and self.peerstore.has_peer(pid):
            self.peerstore.clear_peerdata(pid)
