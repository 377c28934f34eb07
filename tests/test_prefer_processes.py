"""`--prefer fast` and `--prefer cheap` on real processes (issue #17): two `potluck serve` servers of all of
SmolLM2's blocks on this machine, one of them throttled to a tenth of a core by a cgroup from its first
instruction (tests/testkit/throttle.py), so its own start-up measurement places it slower and, under
`--pricing tiered`, at a lower tier multiplier. A user peer preferring fast routes through the other;
one preferring cheap through the throttled one."""

from __future__ import annotations

import pytest

from potluck.localswarm import POTLUCK, PeerProcess, wait_until

THROTTLE = 0.1  # of one core
REQUESTS = 3  # each one routed on its own


def _knows(user: PeerProcess, servers: set[str]) -> bool:
    models = user.call("status", models=True).get("models") or []
    return {s["peer_id"] for m in models for s in (m.get("coverage") or {}).get("servers", [])} >= servers


def _route(user: PeerProcess, prompt: str) -> list[str]:
    """The peers an answer of `user` went through, asked again until the user has taken up the model."""
    def generated() -> dict | None:
        try:
            return user.call("generate", prompt=prompt, max_tokens=3, timeout=240)
        except RuntimeError:
            return None  # the peer has not taken up the model yet (no route is tried before it has)

    result = wait_until(generated, 240, 2, message=f"a generation at {user.data_dir.name}")
    assert result["tokens"] == 3
    return [hop["peer_id"] for hop in result["route"]]


def _sessions_opened(*servers: PeerProcess) -> dict[str, int]:
    """Sessions each server has opened, by its data dir's name."""
    return {p.data_dir.name: p.call("status")["server"]["sessions_opened"] for p in servers}


@pytest.mark.slow
def test_prefer_fast_routes_through_the_faster_server_and_cheap_through_the_throttled_one(smollm2_data, tmp_path):
    from testkit.throttle import cpu_throttled

    common = ["--model", str(smollm2_data[1]), "--threads", "1", "--pricing", "tiered"]
    procs: list[PeerProcess] = []
    with cpu_throttled(THROTTLE) as cgroup:
        try:
            fast = PeerProcess(tmp_path / "fast", *common, "--blocks", "0:30").start(timeout=120)
            procs.append(fast)
            # one after the other: the fast one measures its throughput while nothing else loads
            wait_until(lambda: fast.call("status")["server"]["start"] is not None, 120, message="the fast server loaded")
            slow = PeerProcess(tmp_path / "slow", *common, "--blocks", "0:30", "--bootstrap", fast.addr,
                               command=cgroup.wrap(POTLUCK))
            procs.append(slow.start(timeout=300))
            wait_until(lambda: slow.call("status", timeout=60)["server"]["start"] is not None, 300, 2,
                       message="the throttled server loaded")
            assert cgroup.throttled_periods() > 0  # the throttle held it back

            announced = {p.peer_id: p.call("status")["server"] for p in (fast, slow)}
            fast_says, slow_says = announced[fast.peer_id], announced[slow.peer_id]
            print({name: {**said["throughput"], "tier": said["tier"]}
                   for name, said in (("fast", fast_says), ("slow", slow_says))})
            # a tenth of a core against a whole one (shared with the rest of the machine): well apart
            assert 2 * slow_says["throughput"]["decode_tps"] < fast_says["throughput"]["decode_tps"]
            assert 2 * slow_says["throughput"]["prefill_tps"] < fast_says["throughput"]["prefill_tps"]
            assert slow_says["tier"]["milli"] < fast_says["tier"]["milli"]  # a lower price multiplier

            users = {}
            for prefer in ("fast", "cheap"):
                # checks at every step: the first request opens a checker session at the server its route
                # did not take, so the user has reached both (routing believes only servers it reached)
                users[prefer] = PeerProcess(tmp_path / f"user-{prefer}", *common, "--prefer", prefer,
                                            "--spot-check-fraction", "1", "--bootstrap", fast.addr).start(timeout=120)
                procs.append(users[prefer])
            for user in users.values():
                wait_until(lambda: _knows(user, set(announced)), 120, 1, message="the user to hear both servers")

            routes: dict[str, list[list[str]]] = {}
            for prefer, user in users.items():
                before = _sessions_opened(fast, slow)
                _route(user, "1, 2, 3,")  # the first: the route may go to either, the check reaches the other
                after = _sessions_opened(fast, slow)
                assert all(after[peer] > before[peer] for peer in after), (before, after)
                routes[prefer] = [_route(user, f"{i}, {i + 1}, {i + 2},") for i in range(REQUESTS)]
            print(routes)
            assert routes["fast"] == [[fast.peer_id]] * REQUESTS
            assert routes["cheap"] == [[slow.peer_id]] * REQUESTS
        finally:
            for p in procs:
                p.close()
