"""A model's swarm as one peer sees it: which blocks are served, by how many servers, how fast.

Built from the DHT's announcements (`pipeline.announce.ServerInfo`); shown by `/v1/models`,
`/api/status`, the dashboard and `potluck status`. Anyone can sign an announcement of huge throughput
and cache at an address where nothing listens, or where it accepts connections and never answers, so
the capacity figures (throughput, the longest request) count only servers this peer has reached
(`reached`: its own, and those its client opened a session with); which blocks are served, and by
how many, is what the announcements say.
"""

from __future__ import annotations

from typing import Callable, Iterable


def missing_ranges(replicas: list[int]) -> list[list[int]]:
    """[[a, b), ...] of the blocks no online server covers."""
    out: list[list[int]] = []
    for i, r in enumerate(replicas):
        if r == 0:
            if out and out[-1][1] == i:
                out[-1][1] = i + 1
            else:
                out.append([i, i + 1])
    return out


def format_ranges(ranges: Iterable[Iterable[int]]) -> str:
    """[[20, 30], [5, 6]] → "20-29, 5" (inclusive block numbers, as people count them)."""
    parts = []
    for a, b in ranges:
        parts.append(str(a) if b - a == 1 else f"{a}-{b - 1}")
    return ", ".join(parts)


def coverage_view(servers: Iterable, num_blocks: int, reached: Callable[[str], bool] | None = None) -> dict:
    """Per-block replicas of the online servers, the gaps, the servers; summed decode throughput and
    free cache of those among them this peer has reached (a session opened, or its own — not a mere
    connection; None: believe every announcement, as `pipeline.routing.find_route` does)."""
    replicas = [0] * num_blocks
    tps = [0.0] * num_blocks
    room: list[int | None] = [None] * num_blocks  # the most cache tokens one reached server of each block has free
    listed = []
    for s in servers:
        if not s.online:
            continue
        known = reached is None or reached(s.peer_id)
        for i in range(max(0, s.start), min(num_blocks, s.end)):
            replicas[i] += 1
            if known:
                tps[i] += s.decode_tps
                room[i] = max(room[i] or 0, s.cache_tokens)
        listed.append({"peer_id": s.peer_id, "start": s.start, "end": s.end, "decode_tps": round(s.decode_tps, 2),
                       "prefill_tps": round(s.prefill_tps, 2), "cache_tokens": s.cache_tokens,
                       "clusters": dict(s.clusters), "addrs": list(s.addrs), "reached": known})
    missing = missing_ranges(replicas)
    fits = [r for r in room if r is not None]
    return {
        "num_blocks": num_blocks,
        "covered_blocks": sum(1 for r in replicas if r),
        "complete": not missing,
        "missing": missing,
        "replicas": replicas,
        "throughput": [round(t, 2) for t in tps],  # tokens/s through each block, summed over its reached servers
        # the longest request (prompt + new tokens) the best route can hold now, as the reached servers
        # announced their free KV cache; None while some block has no reached server (not known yet)
        "max_request_tokens": min(fits) if fits and len(fits) == num_blocks else None,
        "servers": sorted(listed, key=lambda d: (d["start"], d["end"], d["peer_id"])),
    }
