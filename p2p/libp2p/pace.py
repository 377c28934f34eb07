"""Each peer's requests served at a bounded rate: a token bucket per peer, paid for by waiting.

Quotas bound what a peer can make us hold; they do not bound the CPU its requests cost us. A request
refused at once still costs its decryption, decoding and the refusal's encoding and encryption — about
what the sender pays to make it — so one flooding connection could keep half of a small volunteer's
CPU busy refusing. A peer's requests instead take a token each from a bucket of `burst` tokens that
refills at `rate` a second; a request that finds none waits for its token in the session's reader,
which then reads nothing more from that peer: its frames stay in yamux's receive window and the
kernel's buffers, and its sender stops when they are full. A peer over the rate gets slower answers,
never errors; one that keeps flooding past the window has its stream reset by its own side's yamux.

Honest peers send control traffic (DHT, gossip, membership, credit sync: tens a second at most); the
pipeline's steps are streams, not requests, and are not paced here. A peer with `max_inflight_out`
requests outstanding waits at most that many tokens' time. Buckets are kept per peer id across
reconnections (a fresh connection is not a fresh bucket), for the `max_tracked` most recent peers.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

DEFAULT_RATE = 100.0  # requests a second, per peer
DEFAULT_BURST = 200


class RequestPace:
    def __init__(self, rate: float, burst: float, clock: Callable[[], float], *, max_tracked: int = 4096):
        if rate <= 0 or burst < 1:
            raise ValueError("a request pace needs a positive rate and a burst of at least one request")
        self.rate, self.burst, self.clock, self.max_tracked = rate, burst, clock, max_tracked
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # peer -> (tokens, when)
        self.delayed = 0  # requests that waited for their token

    def delay(self, peer_id: str) -> float:
        """Take a token for one request of `peer_id`: the seconds to wait before serving it (0: now).

        The bucket may go below zero: the wait is what brings it back to zero, so requests that arrive
        together are served `1/rate` apart."""
        now = self.clock()
        tokens, when = self._buckets.pop(peer_id, (self.burst, now))
        tokens = min(self.burst, tokens + (now - when) * self.rate) - 1
        self._buckets[peer_id] = (tokens, now)
        if len(self._buckets) > self.max_tracked:
            self._buckets.popitem(last=False)
        if tokens >= 0:
            return 0.0
        self.delayed += 1
        return -tokens / self.rate
