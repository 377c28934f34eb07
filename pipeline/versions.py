"""Model versions: a new model id announced as superseding an old one, and which version serves a family.

A model's id is a hash of its weights (pipeline/identity.py), so a new version is a new id. The servers
of the new version say what it replaces: their announcements carry `supersedes: <old id>`
(pipeline/announce.py; signed by each server as the owner of its entry under the new id's record, so
only those who serve the new id can claim it). `Lineage` reads those claims: a successor counts for an
old id when servers this peer vouches for claim so (`vouched`: with standing in its view, or reached by
it — the caller says which), each such server one vote per old id; the successor most of them name wins
a conflict, and claims are taken strongest first, a claim that would close a cycle with stronger ones
dropped (so a weaker claim cannot cancel a stronger one).

What it is used for:
- a family's versions share its demand: requests for the old id are served by whichever version is
  complete, and the newest version is wanted for its predecessors' requests too
  (pipeline/modelchoice.py `wanted_by_version`), so a volunteer that holds the new weights moves over
  while the new version is short of servers;
- a request for any version of a family goes to the newest complete one, else to what was asked
  (`serving`): clients keep being served while the new version fills up. A user's peer generates with
  the versions it holds the folders of (potluck/generation.py `choose_version`: the first complete one in
  `preference` order among them).

A claim costs a stranger nothing and is not free to believe: the newest version of a family is wanted
for all of the family's requests, so a believed claim steers volunteers to it. Hence only vouched servers'
claims count: a fresh key announcing `supersedes` moves nobody's demand. A version serves requests only
once it is complete (every block announced), and the id is checked against the weights by whoever loads them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, NamedTuple


class Claim(NamedTuple):
    """One server's announcement under `new` saying it supersedes `old`."""

    server: str  # the peer id of the announcing server
    new: str
    old: str


@dataclass(frozen=True)
class Lineage:
    """Old id → the id that supersedes it (one successor each, no cycles)."""

    successor: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_claims(cls, claims: Iterable[Claim], vouched: Callable[[str], bool]) -> "Lineage":
        """The lineage the claims of `vouched` servers make (see the module docstring); a server naming
        two successors of one old id is not counted for it."""
        named: dict[tuple[str, str], set[str]] = {}  # (server, old) → the successors it names
        for claim in claims:
            if claim.new != claim.old and vouched(claim.server):
                named.setdefault((claim.server, claim.old), set()).add(claim.new)
        votes: Counter[tuple[str, str]] = Counter()  # (old, new) → distinct servers claiming it
        for (_, old), successors in named.items():
            if len(successors) == 1:
                (new,) = successors
                votes[(old, new)] += 1
        successor: dict[str, str] = {}
        for old, new in sorted(votes, key=lambda edge: (-votes[edge], edge)):
            if old in successor:
                continue  # a stronger claim named its successor
            seen, walk = {old}, new
            while walk in successor and walk not in seen:  # would this edge close a cycle?
                seen.add(walk)
                walk = successor[walk]
            if walk not in seen:
                successor[old] = new
        return cls(successor)

    def newer(self, model_id: str) -> list[str]:
        """The versions that supersede `model_id`, nearest first."""
        out, walk = [], self.successor.get(model_id)
        while walk is not None and walk not in out and walk != model_id:
            out.append(walk)
            walk = self.successor.get(walk)
        return out

    def older(self, model_id: str) -> list[str]:
        """The versions `model_id` supersedes (transitively), nearest first."""
        predecessors: dict[str, list[str]] = {}
        for old, new in self.successor.items():
            predecessors.setdefault(new, []).append(old)
        out: list[str] = []
        frontier = sorted(predecessors.get(model_id, []))
        while frontier:
            old = frontier.pop(0)
            if old not in out and old != model_id:
                out.append(old)
                frontier += sorted(predecessors.get(old, []))
        return out

    def preference(self, requested: str) -> list[str]:
        """The versions a request for `requested` may go to, in order: the newest of its line from
        `requested` on first, down to `requested`, then the older ones, nearest first."""
        return [*reversed(self.newer(requested)), requested, *self.older(requested)]

    def serving(self, requested: str, complete: Callable[[str], bool]) -> str:
        """The version a request for `requested` goes to: the first complete one in `preference` order,
        else `requested` itself."""
        return next((model_id for model_id in self.preference(requested) if complete(model_id)), requested)
