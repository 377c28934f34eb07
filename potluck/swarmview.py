"""A model's swarm as one peer sees it: which blocks are served, by how many servers, how fast.

Built from the DHT's announcements (`pipeline.announce.ServerInfo`); shown by `/v1/models`,
`/api/status`, the dashboard and `potluck status`.
"""

from __future__ import annotations

from typing import Iterable


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


def coverage_view(servers: Iterable, num_blocks: int) -> dict:
    """Per-block replicas and summed decode throughput of the online servers, the gaps, the servers."""
    replicas = [0] * num_blocks
    tps = [0.0] * num_blocks
    room = [0] * num_blocks  # the most cache tokens one server of each block has free
    listed = []
    for s in servers:
        if not s.online:
            continue
        for i in range(max(0, s.start), min(num_blocks, s.end)):
            replicas[i] += 1
            tps[i] += s.decode_tps
            room[i] = max(room[i], s.cache_tokens)
        listed.append({"peer_id": s.peer_id, "start": s.start, "end": s.end, "decode_tps": round(s.decode_tps, 2),
                       "prefill_tps": round(s.prefill_tps, 2), "cache_tokens": s.cache_tokens,
                       "clusters": dict(s.clusters), "addr": s.addr})
    missing = missing_ranges(replicas)
    return {
        "num_blocks": num_blocks,
        "covered_blocks": sum(1 for r in replicas if r),
        "complete": not missing,
        "missing": missing,
        "replicas": replicas,
        "throughput": [round(t, 2) for t in tps],  # tokens/s through each block, summed over its servers
        # the longest request (prompt + new tokens) the best route can hold now, as the servers announced
        # their free KV cache; None while some block has no server
        "max_request_tokens": min(room) if room and not missing else None,
        "servers": sorted(listed, key=lambda d: (d["start"], d["end"], d["peer_id"])),
    }
