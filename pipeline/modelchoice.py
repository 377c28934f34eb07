"""Which model a volunteer serves: the one whose demand is highest relative to its coverage.

A volunteer given several candidate models (`potluck serve --model A --model B --blocks auto`) reads,
for each, the swarm's servers (pipeline/announce.py) and the demand peers gossip (pipeline/demand.py),
and serves the candidate that needs it most:

    need(m) = family_demand(m) / copies(m),    copies(m) = Σ over online servers (end − start) / num_blocks

(blocks × replicas, in whole copies of the model; 0 copies with demand is an infinite need). The
highest need wins, ties to the higher demand, then the id. A candidate nobody asks for (demand 0) is never
chosen: `choose_model` answers None and the volunteer waits for demand rather than load it.
Picking the least covered per request, one volunteer at a time, is water-filling: it raises the
worst coverage-per-demand as far as one volunteer can (bench/placement.py measures it against the
best split).

`family_demand` (pipeline/versions.py): a new version inherits the demand of the versions it
supersedes, so while it is short of servers a volunteer with its weights moves to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

from .announce import ServerInfo
from .versions import Lineage


def copies(servers: Iterable[ServerInfo], num_blocks: int) -> float:
    """The swarm's coverage of a model in whole copies: online servers' blocks over the model's."""
    return sum(min(s.end, num_blocks) - max(s.start, 0) for s in servers if s.online) / max(1, num_blocks)


@dataclass(frozen=True)
class Candidate:
    model_id: str
    copies: float  # the swarm's coverage of it now (`copies`)


def need(candidate: Candidate, demand: Mapping[str, int], lineage: Lineage = Lineage()) -> float:
    """Requests per copy of the model; inf for a model asked for that nobody serves, 0 for one nobody asks for."""
    wanted = lineage.family_demand(candidate.model_id, demand)
    if wanted <= 0:
        return 0.0
    return math.inf if candidate.copies <= 0 else wanted / candidate.copies


def choose_model(candidates: Iterable[Candidate], demand: Mapping[str, int],
                 lineage: Lineage = Lineage()) -> str | None:
    """The candidate to serve (see the module docstring); None when nobody asks for any of them."""
    scored = [(need(c, demand, lineage), lineage.family_demand(c.model_id, demand), c.model_id) for c in candidates]
    wanted = [s for s in scored if s[0] > 0]
    if not wanted:
        return None
    return min(wanted, key=lambda s: (-s[0], -s[1], s[2]))[2]
