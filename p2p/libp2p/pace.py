"""Each peer's requests served at a bounded rate: a token bucket per peer, paid for by waiting.

Quotas bound what a peer can make us hold; they do not bound the CPU its requests cost us. A request
refused at once still costs its decryption, decoding and the refusal's encoding and encryption — about
what the sender pays to make it — so one flooding connection could keep half of a small volunteer's
CPU busy refusing. A peer's requests instead take a token each from a bucket of `burst` tokens that
refills at `rate` a second; a request that finds none waits for its token in the session's reader,
which then reads nothing more from that peer: its frames stay in yamux's receive window and the
kernel's buffers, and its sender stops when they are full. A peer over the rate gets slower answers,
never errors; one that keeps flooding past the window has its stream reset by its own side's yamux.
Big frames take a token per `BYTES_PER_TOKEN`, charged from the frame's header before its body is
read whenever the frame cannot be a reply (nothing of ours awaits one from that peer): frames of
junk cost us their rate in bytes too, not the 16 MiB each that reading and decoding them took. A
frame that would wait more than `max_wait` ends the session as a protocol violation (an honest peer
waits at most its requests in flight, 64, over the rate): a peer sending junk gets its connection
closed after the header, and its bucket's debt (up to `MAX_DEBT_S` of refill) keeps it so.

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
BYTES_PER_TOKEN = 16 * 1024  # a request takes one token more for each this many bytes of its frame
MAX_DEBT_S = 60.0  # the longest a peer's bucket can owe, in seconds of refill
MAX_WAIT_S = 4.0  # a frame that would wait longer ends the session (py-libp2p senders give up at 5 s)


class RequestPace:
    def __init__(self, rate: float, burst: float, clock: Callable[[], float], *, max_wait: float = MAX_WAIT_S,
                 max_tracked: int = 4096):
        if rate <= 0 or burst < 1:
            raise ValueError("a request pace needs a positive rate and a burst of at least one request")
        self.rate, self.burst, self.clock, self.max_wait, self.max_tracked = rate, burst, clock, max_wait, max_tracked
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # peer -> (tokens, when)
        self.delayed = 0  # requests that waited for their token

    def delay(self, peer_id: str, size: int = 0) -> float:
        """Take the tokens of one request of `peer_id` whose frame is `size` bytes: the seconds to wait
        before reading on (0: now).

        The bucket may go below zero: the wait is what brings it back to zero, so requests that arrive
        together are served `1/rate` apart, and a 16 MiB frame waits for 1,024 tokens (the sender of a
        stream of them gives up before we read the next one)."""
        now = self.clock()
        tokens, when = self._buckets.pop(peer_id, (self.burst, now))
        cost = 1 + size // BYTES_PER_TOKEN
        tokens = max(-self.rate * MAX_DEBT_S, min(self.burst, tokens + (now - when) * self.rate) - cost)
        self._buckets[peer_id] = (tokens, now)
        if len(self._buckets) > self.max_tracked:
            self._buckets.popitem(last=False)
        if tokens >= 0:
            return 0.0
        self.delayed += 1
        return -tokens / self.rate
