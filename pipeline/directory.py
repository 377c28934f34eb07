"""What pipeline uses of the DHT: the `SwarmDirectory` seam (dht.node.DHTNode has it, structurally).

Servers store their announcements in it and clients read them (pipeline/announce.py); routing asks
it for RTT estimates and the network's clock; a server announces the DHT's cluster labels.
"""

from __future__ import annotations

from typing import Any, Protocol

from dht.records import SignedValue


class NetworkClock(Protocol):
    def now(self) -> float:
        """Wall-clock seconds, as the network stamps records (simulated time in the simulator)."""


class SwarmDirectory(Protocol):
    @property
    def network(self) -> NetworkClock: ...

    @property
    def clusters(self) -> dict[int, str]:
        """Our cluster label per level (level 0, the global one, is "")."""

    def rtt_estimate(self, peer_id: str) -> float | None:
        """Seconds to `peer_id` (measured or estimated), None when unknown."""

    async def get(self, key: str, *, quorum: int = 1) -> dict[str, SignedValue]:
        """The record under `key`: {subkey: newest verified entry}."""

    async def store(self, key: str, value: Any, *, ttl: float | None = None, republish: bool = True) -> int:
        """Sign `value` under our subkey and store it; how many peers accepted it."""
