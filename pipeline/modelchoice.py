"""Which model a volunteer serves: the one whose demand is highest relative to its coverage.

A volunteer given several candidate models (`potluck serve --model A --model B --blocks auto`) reads,
for each, the swarm's servers (pipeline/announce.py) and the demand peers gossip (pipeline/demand.py),
and serves the candidate that needs it most:

    need(m) = wanted(m) / copies(m),    copies(m) = Σ over online servers (end − start) / num_blocks

(blocks × replicas, in whole copies of the model; 0 copies with demand is an infinite need). The
highest need wins, ties to the more wanted, then the id. A candidate nobody asks for (wanted 0) is never
chosen: `choose_model` answers None and the volunteer waits for demand rather than load it.
Picking the least covered per request, one volunteer at a time, is water-filling: it raises the
worst coverage-per-demand as far as one volunteer can (bench/model_demand.py measures it against the
best split).

`wanted` counts versions (pipeline/versions.py, `wanted_by_version`): a request counts for the version
that serves it now (the newest complete one of its family), and also for its family's newest version,
the one the family moves to — in the lineage as this peer believes it, from the claims of servers it
vouches for only (versions.py), so a stranger's `supersedes` claim moves no demand. So while a new
version is short of servers, volunteers holding its weights go to it (and the old one keeps its servers
while it alone is complete); once the new one is complete, the old one's requests are its own and the
old version is wanted by nobody.

A server already serving moves (`move_to`) only when that lowers the larger need of the two models it
leaves and joins by a margin: the largest need in the swarm never rises, so moves cannot cycle, and it
never leaves a model it alone covers while the model is asked for (that need would be infinite).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from .announce import ServerInfo
from .versions import Lineage

MOVE_MARGIN = 0.1  # a move must lower the larger need of the two models by this fraction (no back and forth)


def copies(servers: Iterable[ServerInfo], num_blocks: int) -> float:
    """The swarm's coverage of a model in whole copies: online servers' blocks over the model's."""
    return sum(min(s.end, num_blocks) - max(s.start, 0) for s in servers if s.online) / max(1, num_blocks)


def complete(servers: Iterable[ServerInfo], num_blocks: int) -> bool:
    """Whether online servers announce every block of the model."""
    covered = [False] * num_blocks
    for s in servers:
        if s.online:
            for i in range(max(0, s.start), min(num_blocks, s.end)):
                covered[i] = True
    return num_blocks > 0 and all(covered)


def wanted_by_version(demand: Mapping[str, int], lineage: Lineage, is_complete: Callable[[str], bool]) -> dict[str, int]:
    """Requests each version should be served for: those it serves now, and its family's if it is the newest."""
    out: dict[str, int] = {}
    for requested, n in demand.items():
        serving = lineage.serving(requested, is_complete)
        newest = ([requested, *lineage.newer(requested)])[-1]
        for model_id in {serving, newest}:
            out[model_id] = out.get(model_id, 0) + n
    return out


@dataclass(frozen=True)
class Candidate:
    model_id: str
    copies: float  # the swarm's coverage of it now (`copies`)


def need(wanted: int, copies_: float) -> float:
    """Requests per copy of a model; inf for a model asked for that nobody serves, 0 for one nobody asks for."""
    if wanted <= 0:
        return 0.0
    return math.inf if copies_ <= 1e-12 else wanted / copies_


def choose_model(candidates: Iterable[Candidate], wanted: Mapping[str, int]) -> str | None:
    """The candidate to serve (see the module docstring); None when nobody asks for any of them."""
    scored = [(need(wanted.get(c.model_id, 0), c.copies), wanted.get(c.model_id, 0), c.model_id) for c in candidates]
    asked = [s for s in scored if s[0] > 0]
    if not asked:
        return None
    return min(asked, key=lambda s: (-s[0], -s[1], s[2]))[2]


def move_to(current: Candidate, ours: float, candidates: Iterable[Candidate], wanted: Mapping[str, int],
            share: Callable[[str], float], margin: float = MOVE_MARGIN) -> str | None:
    """Where a server of `current` (its copies counting our `ours`) should move, or None to stay:
    the candidate whose move lowers the larger need of the two models the most, if by `margin`.
    `share(m)`: the copies of m we would serve there."""
    best: tuple[float, str] | None = None
    for c in candidates:
        if c.model_id == current.model_id:
            continue
        before = max(need(wanted.get(current.model_id, 0), current.copies), need(wanted.get(c.model_id, 0), c.copies))
        after = max(need(wanted.get(current.model_id, 0), current.copies - ours),
                    need(wanted.get(c.model_id, 0), c.copies + share(c.model_id)))
        if after < before * (1 - margin) or (math.isinf(before) and not math.isinf(after)):
            if best is None or after < best[0]:
                best = (after, c.model_id)
    return best and best[1]
