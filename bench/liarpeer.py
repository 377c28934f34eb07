"""`potluck serve` whose block server lies: a peer process for the spot-check benchmark's process runs.

    python -m bench.liarpeer --lie-rate 0.05 [--lie-seed 1] [--honest-steps 0] [--announce-tps 1e6] \
        --data-dir D --model M --blocks 0:2 ...        # the rest as `potluck serve` takes it

The server is `bench.spotcheck.RateLiar` (a lie: 5 % of the mean magnitude added to every element of
a step's output, on each step with probability `--lie-rate`); `--announce-tps` replaces the measured
decode throughput it announces (prefill ×10), so that a benchmark can make routes prefer it or avoid
it. For each step it serves it writes `STEP <session> <n>` to stderr (the peer's log), and
`LIE <session> <n>` for the first lie of a session: what the benchmark reads to count steps to
detection.
"""

from __future__ import annotations

import argparse
import sys

import potluck.cli
import potluck.peer
from bench.spotcheck import RateLiar


def liar_class(rate: float, seed: int, honest_steps: int, announce_tps: float | None) -> type[RateLiar]:
    class ProcessLiar(RateLiar):
        def __init__(self, *a, **kw):
            super().__init__(*a, seed=seed, **kw)
            self.rate, self.honest_steps = rate, honest_steps

        async def _load(self, start: int, end: int) -> None:
            await super()._load(start, end)
            if announce_tps is not None:
                self.throughput = {"decode_tps": announce_tps, "prefill_tps": 10 * announce_tps}

        async def _step(self, session, m, *, pushed):
            lied_before = session.id in self.first_lie
            reply = await super()._step(session, m, pushed=pushed)
            if reply is not None:
                sid = session.id.hex()
                if not lied_before and session.id in self.first_lie:
                    print(f"LIE {sid} {self.first_lie[session.id]}", file=sys.stderr, flush=True)
                print(f"STEP {sid} {session.steps}", file=sys.stderr, flush=True)
            return reply

    return ProcessLiar


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--lie-rate", type=float, required=True)
    parser.add_argument("--lie-seed", type=int, default=0)
    parser.add_argument("--honest-steps", type=int, default=0)
    parser.add_argument("--announce-tps", type=float, default=None)
    args, rest = parser.parse_known_args(argv)
    setattr(potluck.peer, "BlockServer", liar_class(args.lie_rate, args.lie_seed, args.honest_steps, args.announce_tps))
    return potluck.cli.main(rest)


if __name__ == "__main__":
    sys.exit(main())
