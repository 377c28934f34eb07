"""Load-aware routing (issues #15, #17): servers announce the sessions they hold, routes count the
wait a loaded server adds (`block_time`: per-token time grows past what it batches for free), and a
client counts its own open sessions per server, so concurrent requests spread over replicas."""


import pytest
import trio

from dht.records import InvalidRecord
from pipeline.announce import MAX_ANNOUNCED_SESSIONS, ServerInfo
from pipeline.hop import RemoteHop
from pipeline.routing import RouteHop, SequenceManager, block_time, find_route
from testkit.swarms import swarm

PROMPT = [5, 17, 42, 8, 99, 3]
# what the servers announce: tokens/s of a CPU, so a session more costs more than the sim's RTT differences
CPU_TP = {"decode_tps": 50.0, "prefill_tps": 500.0}


def srv(pid, a, b, tps=100.0, *, batch_tps=None, batch=1, sessions=0):
    return ServerInfo(peer_id=pid, start=a, end=b, decode_tps=tps, prefill_tps=tps * 10, cache_tokens=10_000,
                      batch_decode_tps=batch_tps, batch_size=batch, sessions=sessions)


def peers(route):
    return [h.peer_id for h in route]


def test_block_time_grows_with_load_past_what_batching_gives_for_free():
    # no batching: every session waits for the others' steps
    assert block_time(100.0, None, 1, 0) == pytest.approx(0.01)
    assert block_time(100.0, None, 1, 3) == pytest.approx(0.04)
    # batches of up to 8 at 400 tokens/s: a full batch takes 8 / 400 s, one step alone 1 / 100 s
    times = [block_time(100.0, 400.0, 8, k) for k in range(12)]
    assert times[0] == pytest.approx(0.01) and times[7] == pytest.approx(0.02)
    assert all(a < b for a, b in zip(times, times[1:]))  # every session more is a longer wait
    assert times[11] == pytest.approx(12 / 400)  # past a full batch the sessions share its capacity
    # a claim of batches faster than their steps alone is not believed: 8 sessions cost 8 alone at best
    assert block_time(100.0, 1e9, 8, 7) == pytest.approx(0.01)
    assert block_time(100.0, 1e9, 8, 15) == pytest.approx(16 / 800)


def test_a_new_route_goes_to_the_idle_replica_and_with_equal_load_to_the_faster():
    assert peers(find_route([srv("a", 0, 4, sessions=3), srv("b", 0, 4)], 0, 4)) == ["b"]
    assert peers(find_route([srv("a", 0, 4), srv("b", 0, 4, sessions=3)], 0, 4)) == ["a"]
    assert peers(find_route([srv("a", 0, 4, 100.0, sessions=2), srv("b", 0, 4, 150.0, sessions=2)], 0, 4)) == ["b"]
    assert peers(find_route([srv("a", 0, 4, 150.0), srv("b", 0, 4, 100.0)], 0, 4)) == ["a"]
    # a loaded server that batches well still beats a slower idle one, until its batches are full
    fast = dict(tps=100.0, batch_tps=400.0, batch=8)
    assert peers(find_route([srv("a", 0, 4, **fast, sessions=3), srv("b", 0, 4, 60.0)], 0, 4)) == ["a"]
    assert peers(find_route([srv("a", 0, 4, **fast, sessions=12), srv("b", 0, 4, 60.0)], 0, 4)) == ["b"]
    # servers that batch for free: the less loaded one still wins (`session_spread`)
    free = dict(tps=100.0, batch_tps=800.0, batch=8)
    assert peers(find_route([srv("a", 0, 4, **free, sessions=1), srv("b", 0, 4, **free)], 0, 4)) == ["b"]
    # the load of one replica per span moves the route around it span by span
    spans = [srv("a1", 0, 2, sessions=4), srv("b1", 0, 2), srv("a2", 2, 4), srv("b2", 2, 4, sessions=4)]
    assert peers(find_route(spans, 0, 4)) == ["b1", "a2"]


def test_a_strangers_load_counts_with_the_slowest_throughput():
    servers = [srv("known", 0, 4, 100.0, sessions=1), srv("stranger", 0, 4, 1000.0)]
    # a stranger's claimed speed wins nothing, so a reached server's load must be large to lose to it
    assert peers(find_route(servers, 0, 4, verified=lambda p: p == "known")) == ["known"]


def test_announced_sessions_are_bounded_and_typed():
    value = srv("p", 0, 4, sessions=7).to_value()
    assert ServerInfo.from_value("p", value).sessions == 7
    del value["sessions"]
    assert ServerInfo.from_value("p", value).sessions == 0  # an announcement from before loads were announced
    for bad in (-1, MAX_ANNOUNCED_SESSIONS + 1, 1.5, True, "3", None, [1]):
        with pytest.raises(InvalidRecord):
            ServerInfo.from_value("p", {**value, "sessions": bad})


class _Directory:
    """Enough of a SwarmDirectory for SequenceManager's bookkeeping (no lookups)."""

    class network:
        @staticmethod
        def now() -> float:
            return 0.0

    clusters: dict = {}

    def rtt_estimate(self, peer_id):
        return None


def test_the_load_is_what_the_server_announced_or_our_own_sessions_there_whichever_is_more():
    seq = SequenceManager(_Directory(), "m", 4)
    a = srv("a", 0, 4, sessions=2)
    assert seq.load(a) == 2
    seq.hold(["a", "a", "a"])
    assert seq.load(a) == 3  # our three may be newer than its announcement; never counted twice
    seq.release(["a", "a"])
    assert seq.load(a) == 2 and seq.held == {"a": 1}
    seq.release(["a", "a"])  # a release never counts below zero
    assert seq.held == {} and seq.load(srv("a", 0, 4)) == 0


async def _wait(pred, seconds=10.0):
    with trio.fail_after(seconds):
        while not pred():
            await trio.sleep(0.02)


async def test_a_real_server_announces_its_load_and_a_new_client_routes_around_it(llama):
    path, mid, local = llama
    want = local.generate_greedy(PROMPT, 6)
    with trio.fail_after(60):
        async with swarm("sim", path, [(0, 4), (0, 4)], model_id=mid, throughput=CPU_TP) as s:
            loaded, idle = s.servers
            # another user holds three sessions at one replica
            user = await s.client()
            info = loaded.server.info()
            hops = [await RemoteHop.open(user.network, RouteHop(loaded.network.peer_id, 0, 4), info.addrs, model_id=mid,
                                         max_length=32, dtype=user.dtype_name, timeout=10.0) for _ in range(3)]
            assert loaded.server.info().sessions == 3
            await loaded.server.announce()
            await idle.server.announce()
            model = await s.client(spot_check=None)  # a check would open a session at the other replica too
            g = await model.generate(PROMPT, max_new_tokens=6, stop_token_ids=[])
            assert g.token_ids == want
            assert [p for p, _, _ in g.route] == [idle.network.peer_id]
            assert loaded.server.stats["sessions_opened"] == 3 and idle.server.stats["sessions_opened"] == 1
            for hop in hops:
                await hop.close(True, None)
            await _wait(lambda: not loaded.server.sessions)
            await loaded.server.announce()
            # with the load gone the two are equal again: the next generations are spread by our own count
            # (among servers this client trusts: it has not opened the loaded one yet, as if it had)
            model.sequence.note_reached(loaded.network.peer_id)
            model.sequence.refresh_interval = 0.0
            again = [await model.inference_session(32).__aenter__() for _ in range(2)]
            try:
                assert sorted(s for sess in again for s, _, _ in sess.route) == sorted(
                    [loaded.network.peer_id, idle.network.peer_id])
            finally:
                for sess in again:
                    await sess.__aexit__(None, None, None)
            assert model.sequence.held == {}


async def test_concurrent_generations_of_one_client_spread_over_the_replicas(llama):
    path, mid, local = llama
    want = local.generate_greedy(PROMPT, 8)
    with trio.fail_after(90):
        async with swarm("sim", path, [(0, 2), (2, 4), (0, 2), (2, 4)], model_id=mid, throughput=CPU_TP) as s:
            model = await s.client(spot_check=None)  # checks open sessions at the other replica too
            for p in s.servers:  # it has contacted them all (a peer up for a while has): none is a stranger
                await model.network.connect(p.server.info().addrs[0], timeout=5.0)
            got: list = []

            async def one() -> None:
                got.append((await model.generate(PROMPT, max_new_tokens=8, stop_token_ids=[])).token_ids)

            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(one)
            assert got == [want] * 4
            opened = [p.server.stats["sessions_opened"] for p in s.servers]
            assert opened == [2, 2, 2, 2], opened  # each replica of each span took its share
            assert model.sequence.held == {}  # every hop closed gave its count back


@pytest.mark.slow
def test_concurrent_api_requests_spread_over_replicas_of_real_server_processes(smollm2_data, tmp_path):
    """Four `potluck serve` processes of SmolLM2 (blocks 0:15 twice, 15:30 twice) and a user peer with
    `--api`: four requests at once through the HTTP API are served by both replicas of each span.
    The servers do not batch (`--max-batch 1`), so a session more at a server costs the others a whole
    step: the spread then outweighs the noise of loopback RTTs and throughputs measured on a busy
    machine (seen: 0.06 s to 0.38 s, 36 to 150 tokens/s), which batching's cheap extra sessions do not.
    Routing weighs a server only once it has opened a session with it (an announcement proves nothing),
    so a first request, spot-checked at every step, makes the user reach every replica first; without
    it the four spread only when all four routed before the first session opened (a race CI lost)."""
    import threading

    import httpx

    from potluck.localswarm import PeerProcess, wait_until

    common = ["--model", str(smollm2_data[1]), "--threads", "1", "--max-batch", "1"]
    procs: dict[str, PeerProcess] = {}
    try:
        procs["head-a"] = PeerProcess(tmp_path / "head-a", *common, "--blocks", "0:15").start(timeout=120)
        boot = ["--bootstrap", procs["head-a"].addr]
        # one after another: each measures its throughput while the others idle
        for name, blocks in (("head-b", "0:15"), ("tail-a", "15:30"), ("tail-b", "15:30")):
            procs[name] = PeerProcess(tmp_path / name, *common, *boot, "--blocks", blocks).start(timeout=120)
        procs["user"] = PeerProcess(tmp_path / "user", *common, *boot, "--api", "127.0.0.1:0",
                                    "--spot-check-fraction", "1").start(timeout=120)
        servers = ["head-a", "head-b", "tail-a", "tail-b"]
        url = procs["user"].call("status")["api"]

        def replicas():
            r = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
            return r and r[0]["potluck"]["replicas"] == [2] * 30

        wait_until(replicas, 120, 1, message="the user's peer to see all four servers")

        def ask(i: int) -> httpx.Response:
            return httpx.post(f"{url}/v1/chat/completions", timeout=300, json={
                "model": "SmolLM2-135M-Instruct", "max_tokens": 16, "temperature": 0,
                "messages": [{"role": "user", "content": f"Count from {i} to {i + 9}."}]})

        first = ask(0)
        assert first.status_code == 200, first.text
        # the checks of the first request opened sessions at the replicas its route did not take
        assert all(procs[n].call("status")["server"]["sessions_opened"] for n in servers)
        replies: list[httpx.Response] = []
        threads = [threading.Thread(target=lambda i=i: replies.append(ask(i))) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert [r.status_code for r in replies] == [200] * 4, [r.text for r in replies]
        routes = [[hop["peer_id"] for hop in r.json()["potluck"]["route"]] for r in replies]
        print(routes, {n: procs[n].call("status")["server"]["throughput"].get("decode_tps") for n in servers})
        used = {peer for route in routes for peer in route}
        assert used == {procs[n].peer_id for n in servers}, routes  # every replica served some of the four
    finally:
        for p in procs.values():
            p.close()
