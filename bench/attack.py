"""The attack bench (issue #13): `python -m bench.attack [--quick] [--json] [--smollm2]`.

On loopback it starts a victim, `potluck serve --blocks 0:N --api` (a tiny random-weight Llama by
default, SmolLM2-135M-Instruct with `--smollm2`), and an honest user's peer, `potluck serve
--bootstrap VICTIM --api`, that generates through the victim's blocks all along (a thread posting
/v1/completions). The honest user is a contributor, as a user of an open network is: before the
attacks its peer served every block to the victim's own user (the victim's peer, serving nothing
then, generating through it), so its work reached the victim and it has standing there
(credits.standing) worth `standing_generations` of its generations — a busy victim lets it owe that
much more than a newcomer (credits.admission). New users without standing are `announcement_squatting`'s
`new_user_*` figures. Then this process attacks the victim, one attack at a time, each bounded in
count and time (bench/hostile.py holds what the hostile tests send too):

    object_bomb            16 MiB frames of empty arrays
    malformed_frames       a corpus of broken frames, each on a fresh raw session
    dht_store_flood        one identity storing many records
    credit_chain_flood     one author signing many entries without receipts
    kv_cache_hog           idle sessions opened by a key without credit
    unpaid_compute         steps without receipts; fresh keys that sign but never hold credit
    push_ssrf              steps whose push names a next hop that is not an announced server
    slowloris              many raw TCP sockets that never say anything
    request_flood          many well-formed DHT requests
    gossip_flood           one author publishing many signed messages
    presence_sybils        many fresh identities, one presence note each
    nested_json            deeply nested JSON bodies to the victim's HTTP API
    announcement_squatting many subkeys on the model's announcement record (one key; Sybil keys announcing
                           dead addresses), then new users' clients generating among the fakes

For each: the victim's RSS before, peak and after (VmRSS, sampled every 50 ms) and `rss_growth_mb`
(peak - before), `alive`, the honest client's success and median latency just before and during the
attack (`latency_ratio`) with its failures by API error code, what the attacker obtained as the victim reports it (records and entries
it holds, tokens computed, cache bytes, sockets it holds, messages it forwarded) with the defences'
bounds, and `goals_met`: RSS growth ≤ 64 MB, alive, honest success 100 %, latency ≤ 2× before,
obtained ≤ bound; and `honest_user`: its standing at the victim, how it was earned, what it consumed
there. `--json` prints one JSON object; without it, a table.

`--malloc-arena-max N` starts the victim with MALLOC_ARENA_MAX=N, and `--only NAME` runs some
attacks alone (the request-flood RSS measurements of the issue use both).

An attacker runs on a machine of its own: on one with two CPUs or more this process (the attacker)
runs on the last CPU and the victim and the honest user's peer on the others, during the baselines
and the attacks alike (`isolated` in the report), so `latency_ratio` measures the victim's defences,
not CPU time the attacker's own work takes from it. `--no-isolate` shares every CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import httpx
import torch
import trio

from bench.hostile import (malformed_frames, object_bomb_frame, open_idle_sockets, open_msg, raw_session,
                           signed_gossip)
from credits import CreditPolicy, Ledger, ReceiptSigner
from credits.allowance import IngestLimits
from credits.ledger import GFLOP
from credits.replication import HEADS, Replicator
from dht import protocol as kad
from dht.node import DHTConfig, DHTNode
from dht.records import SignedValue, StoreLimits
from dht.vivaldi import Coord
from p2p import framing
from p2p.errors import FrameError, P2PError, RemoteError
from p2p.gossip import PUSH as GOSSIP_PUSH
from p2p.gossip import Gossip, GossipQuotas
from p2p.identity import Identity, public_key_from_peer_id
from p2p.libp2p import InboundLimits, Libp2pNetwork
from pipeline import protocol as proto
from pipeline.announce import ServerInfo, announce_key
from pipeline.billing import ClientBilling
from pipeline.client import ClientConfig, DistributedModel
from pipeline.config import ModelConfig
from pipeline.errors import GenerationFailed, InsufficientCredit, Refused
from pipeline.identity import model_id as model_id_of
from pipeline.loading import ModelFolder
from pipeline.pricing import ModelPricing
from pipeline.server import ServerConfig, StrangerCaps
from potluck import control
from potluck.localswarm import PeerProcess, start_all, wait_until
from potluck.peer import MAX_PRESENCE_SEEN, PRESENCE_TOPIC

MiB = 1 << 20
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
RSS_GOAL_MB = 64.0
LATENCY_GOAL = 2.0
HONEST_MAX_TOKENS = 8
HONEST_TOKENS = 16 + HONEST_MAX_TOKENS  # at most, one honest generation's tokens through the victim's blocks
ALLOWANCE_TOKENS = 40  # the swarm's debt limit, in tokens through the victim's blocks


@dataclass(frozen=True)
class Sizes:
    seconds: float  # each attack's time bound (the slowloris outlasts the upgrade timeout whatever this is)
    baseline_s: float  # honest generations measured just before each attack
    bombs: int
    corpus_rounds: int
    dht_records: int
    squat_subkeys: int
    sybil_announcements: int
    chain_entries: int
    hog_sessions: int
    unpaid_keys: int
    pushes: int
    sockets: int
    requests: int
    gossip_messages: int
    sybil_notes: int
    json_requests: int
    standing_generations: int  # the honest user's standing at the victim: worth this many of its generations


QUICK = Sizes(seconds=2.0, baseline_s=1.0, bombs=1, corpus_rounds=1, dht_records=400, squat_subkeys=16,
              sybil_announcements=60, chain_entries=200, hog_sessions=48, unpaid_keys=2, pushes=8, sockets=120,
              requests=3000, gossip_messages=300, sybil_notes=320, json_requests=12,
              standing_generations=600)
FULL = Sizes(seconds=15.0, baseline_s=4.0, bombs=6, corpus_rounds=4, dht_records=3000, squat_subkeys=100,
             sybil_announcements=1200, chain_entries=1000, hog_sessions=300, unpaid_keys=4, pushes=100,
             sockets=1000, requests=200_000, gossip_messages=3000, sybil_notes=3000, json_requests=200,
             standing_generations=4000)


# --- what runs beside the attacks: the RSS sampler and the honest client ----------------------------


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        return None
    return None


class RssSampler(threading.Thread):
    """VmRSS of one process every `interval` seconds, kept as (time, bytes)."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            rss = rss_bytes(self.pid)
            if rss is not None:
                self.samples.append((time.monotonic(), rss))
            time.sleep(self.interval)

    def now(self) -> int:
        rss = rss_bytes(self.pid)
        return rss if rss is not None else self.samples[-1][1]

    def peak(self, t0: float, t1: float) -> int:
        return max((rss for t, rss in self.samples if t0 <= t <= t1), default=0)


@dataclass
class Generation:
    started: float
    latency: float
    ok: bool
    error: str | None = None  # the API's error code (or the HTTP error's type) when not ok


def api_error_code(reply: httpx.Response) -> str | None:
    """The error code of an API error reply (the OpenAI shape), if it has one."""
    try:
        body = reply.json()
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return error.get("code") if isinstance(error, dict) else None


class HonestClient(threading.Thread):
    """A user generating through the swarm without pause: one completion after another on its peer's API."""

    def __init__(self, api_url: str, body: dict, timeout: float = 60.0):
        super().__init__(daemon=True)
        self.api_url, self.body, self.timeout = api_url, body, timeout
        self.done: list[Generation] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.api_url, timeout=self.timeout) as http:
            while not self.stopped.is_set():
                started = time.monotonic()
                error = None
                try:
                    reply = http.post("/v1/completions", json=self.body)
                    ok = reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] > 0
                    if not ok:
                        error = f"{reply.status_code} {api_error_code(reply)}"
                except httpx.HTTPError as e:
                    ok, error = False, type(e).__name__
                self.done.append(Generation(started, time.monotonic() - started, ok, error))

    def window(self, t0: float, t1: float, *, overlapping: bool = False) -> dict:
        """The generations started in [t0, t1) (or, `overlapping`, under way at some time in it): how
        many, the fraction that succeeded, their median latency."""
        gens = [g for g in list(self.done)
                if (g.started < t1 and g.started + g.latency > t0 if overlapping else t0 <= g.started < t1)]
        ok = [g.latency for g in gens if g.ok]
        errors: dict[str, int] = {}
        for g in gens:
            if g.error is not None:
                errors[g.error] = errors.get(g.error, 0) + 1
        return {"generations": len(gens), "success": len(ok) / len(gens) if gens else None,
                "median_latency_ms": round(statistics.median(ok) * 1000, 1) if ok else None,
                **({"errors": errors} if errors else {})}


# --- the victim, as the attacks see it --------------------------------------------------------------


@dataclass
class Target:
    peer: PeerProcess
    api_url: str
    folder: Path
    model_id: str
    config: ModelConfig
    pricing: ModelPricing
    policy: CreditPolicy
    cache_budget: int
    honest_max_length: int
    sizes: Sizes

    @property
    def peer_id(self) -> str:
        assert self.peer.peer_id is not None
        return self.peer.peer_id

    @property
    def addr(self) -> str:
        return self.peer.addr

    @property
    def port(self) -> int:
        return int(self.addr.split("/tcp/")[1].split("/")[0])

    @property
    def pid(self) -> int:
        assert self.peer.proc is not None
        return self.peer.proc.pid

    @property
    def blocks(self) -> int:
        return self.config.num_layers

    def alive(self) -> bool:
        assert self.peer.proc is not None
        return self.peer.proc.poll() is None

    async def call(self, cmd: str) -> Any:
        return await self.call_with(cmd)

    async def call_with(self, cmd: str, **args: Any) -> Any:
        with trio.fail_after(30):
            return await control.call(self.peer.data_dir, cmd, **args)

    def kv_bytes_per_token(self) -> int:
        return 2 * self.blocks * self.config.kv_size * 4  # K and V, float32

    def hidden(self, tokens: int) -> dict:
        return proto.pack_hidden(torch.randn(1, tokens, self.config.hidden_size))


@dataclass
class Outcome:
    """What one attack obtained, as the victim reports it, and the defences' bound on each figure."""

    obtained: dict[str, float | int]
    bounds: dict[str, float | int] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)


Attack = Callable[[Target], Awaitable[Outcome]]


@asynccontextmanager
async def stranger(target: Target, identity: Identity | None = None) -> AsyncIterator[Libp2pNetwork]:
    """A fresh peer connected to the victim."""
    async with Libp2pNetwork.open(identity or Identity.generate(), LOOPBACK) as net:
        await net.connect(target.addr, timeout=10)
        yield net


async def ask(stream, msg: dict) -> dict:
    await stream.send(msg)
    with trio.fail_after(10):
        return await stream.receive()


async def in_parallel(n: int, each: Callable[[int], Awaitable[None]], count: int) -> None:
    """`each(i)` for i in range(count), `n` at a time."""
    items = iter(range(count))

    async def worker() -> None:
        for i in items:
            await each(i)

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(worker)


# --- the attacks ------------------------------------------------------------------------------------


async def _send_raw(net: Libp2pNetwork, target: Target, frame: bytes) -> tuple[bool, bool]:
    """Write `frame` on a fresh raw session; (whether the victim answered, whether it closed the connection)."""
    await net.disconnect(target.peer_id)  # a fresh connection for each frame: the last one may be closing
    await net.connect(target.addr, timeout=10)
    session = await raw_session(net, target.peer_id)
    with trio.move_on_after(10):
        try:
            await session.raw.write(frame)
        except Exception:  # noqa: BLE001 - a victim that refuses a frame from its header resets the stream
            pass
    answered = False
    with trio.move_on_after(10):
        try:
            await framing.read_frame(session.reader.read_exactly)
            answered = True
        except (P2PError, FrameError):
            pass
    with trio.move_on_after(10):  # a loaded victim may take seconds to get to the close
        while target.peer_id in net.connected_peers():
            await trio.sleep(0.02)
    return answered, target.peer_id not in net.connected_peers()


async def object_bomb(target: Target) -> Outcome:
    frame = object_bomb_frame()
    sent = kept = 0
    async with stranger(target) as net:
        with trio.move_on_after(target.sizes.seconds * 3):
            for _ in range(target.sizes.bombs):
                _, closed = await _send_raw(net, target, frame)
                sent += 1
                kept += not closed
    return Outcome({"frames_sent": sent, "connections_kept": kept}, {"connections_kept": 0})


async def malformed(target: Target) -> Outcome:
    corpus = malformed_frames()
    sent = answered = closed = 0
    async with stranger(target) as net:
        with trio.move_on_after(target.sizes.seconds * 5):
            for _ in range(target.sizes.corpus_rounds):
                for frame in corpus.values():
                    said, gone = await _send_raw(net, target, frame)
                    sent, answered, closed = sent + 1, answered + said, closed + gone
    return Outcome({"frames_sent": sent, "answered": answered, "connections_closed": closed},
                   notes={"corpus": sorted(corpus)})


def _kad_info() -> dict:
    return kad.encode_info(Coord(), [], None)


async def _store(net: Libp2pNetwork, target: Target, key: str, entries: list[SignedValue]) -> int:
    reply = await net.request(target.peer_id, kad.PROTOCOL, {"op": "store", "i": _kad_info(), "k": key,
                                                              "e": [e.wire() for e in entries]}, timeout=10)
    return sum(1 for ok in framing.field(framing.expect_map(reply), "ok", list) if ok is True)


async def dht_store_flood(target: Target) -> Outcome:
    identity = Identity.generate()
    stored = sent = 0
    async with stranger(target, identity) as net:
        async def one(i: int) -> None:
            nonlocal stored, sent
            key = f"bench-flood/{i}"
            entry = SignedValue.create(identity, key, {"pad": b"x" * 512}, net.now() + 3600)
            took = await _store(net, target, key, [entry])  # (not `stored += await`: that reads `stored` first)
            stored, sent = stored + took, sent + 1

        with trio.move_on_after(target.sizes.seconds):
            await in_parallel(16, one, target.sizes.dht_records)
    return Outcome({"records_sent": sent, "records_stored": stored}, {"records_stored": StoreLimits().owner_values})


@asynccontextmanager
async def user_client(target: Target, identity: Identity, ledger: Ledger) -> AsyncIterator[DistributedModel]:
    """A user's client with its own key: its DHT bootstrapped from the victim, no spot checks, 10 s steps."""
    async with stranger(target, identity) as net, trio.open_nursery() as nursery:
        dht = DHTNode(net, bootstrap=[target.addr], client_mode=True, config=DHTConfig(request_timeout=5.0))
        await nursery.start(dht.run)
        yield await DistributedModel.from_pretrained(
            target.folder, net, dht, model_id=target.model_id,
            config=ClientConfig(billing=ClientBilling(ledger), spot_check=None, step_timeout=10.0))
        nursery.cancel_scope.cancel()


async def fresh_client(target: Target, *, cold: bool, generations: int = 3) -> dict:
    """A new user's client (a fresh key, its DHT bootstrapped from the victim) generating a few short
    completions; `cold`: it has read the announcements but holds no connection to any server, so it
    must find the live one among whatever else is announced. Success, latency, first contacts that
    failed (dials spent on dead addresses) and servers banned (faults)."""
    identity = Identity.generate()
    ledger = Ledger.open(identity, None, pricing=target.pricing, policy=target.policy)
    prompt = [random.randrange(3, target.config.vocab_size) for _ in range(4)]
    latencies: list[float] = []
    failures: list[str] = []
    try:
        async with user_client(target, identity, ledger) as model:
            announced = len(await model.sequence.refresh(force=True))
            if cold:
                for peer in model.network.connected_peers():
                    await model.network.disconnect(peer)
            for _ in range(generations):  # 4 + 4 tokens each: within a new key's debt allowance
                t0 = trio.current_time()
                try:
                    await model.generate(prompt, max_new_tokens=4, stop_token_ids=[])
                    latencies.append(trio.current_time() - t0)
                except (GenerationFailed, Refused) as e:
                    failures.append(type(e).__name__)
    finally:
        ledger.store.close()
    return {"generations": generations, "succeeded": len(latencies), "failures": failures,
            "median_latency_ms": round(statistics.median(latencies) * 1000, 1) if latencies else None,
            "announcements_read": announced, "dials_failed": model.sequence.dials_failed,
            "servers_banned": len(model.sequence.banned())}


async def announcement_squatting(target: Target) -> Outcome:
    """One key storing many subkeys of the model's announcement record, then many fresh keys each
    announcing a fake server of every block, with more throughput than the victim's, at an address
    where nothing listens; then new users' clients generate (one connected to the victim, one cold).
    The fakes expire soon after the attack (they are the last thing this bench does to the record)."""
    key = announce_key(target.model_id)
    sizes = target.sizes

    def fake(identity: Identity, now: float) -> dict:
        return ServerInfo(identity.peer_id, 0, target.blocks, 1e6, 1e7, 1 << 20, t=now,
                          addrs=(f"/ip4/127.0.0.1/tcp/1/p2p/{identity.peer_id}",), num_blocks=target.blocks,
                          model_name=target.folder.name).to_value()

    baseline = await fresh_client(target, cold=False)
    one = Identity.generate()
    by_one = by_sybils = sybils_sent = 0
    async with stranger(target, one) as net:
        with trio.move_on_after(sizes.seconds):
            for i in range(sizes.squat_subkeys):
                now = net.now()
                entry = SignedValue.create(one, key, fake(one, now), now + sizes.seconds + 60, suffix=f"s{i}" if i else "")
                by_one += await _store(net, target, key, [entry])

            async def sybil(i: int) -> None:
                nonlocal by_sybils, sybils_sent
                identity, now = Identity.generate(), net.now()
                entry = SignedValue.create(identity, key, fake(identity, now), now + sizes.seconds + 60)
                took = await _store(net, target, key, [entry])
                by_sybils, sybils_sent = by_sybils + took, sybils_sent + 1

            await in_parallel(8, sybil, sizes.sybil_announcements)
    held = await target.call_with("dht_get", key=key)  # the victim's own store answers first
    connected = await fresh_client(target, cold=False)
    cold = await fresh_client(target, cold=True)
    failed = sum(c["generations"] - c["succeeded"] for c in (connected, cold))
    return Outcome({"subkeys_one_identity": by_one, "sybil_announcements_sent": sybils_sent,
                    "sybil_stores_accepted": by_sybils, "record_entries": len(held),
                    "victims_own_announcement_evicted": int(target.peer_id not in held),
                    "new_user_generations_failed": failed,
                    "new_user_dials_failed": connected["dials_failed"] + cold["dials_failed"]},
                   {"subkeys_one_identity": 1, "record_entries": StoreLimits().max_subkeys,  # one: bare peer id
                    # a full record takes a new owner's entry in place of the newest of an owner holding
                    # the most: with one entry per Sybil, another Sybil's, never one held before the flood
                    "victims_own_announcement_evicted": 0,
                    "new_user_generations_failed": 0},
                   {"max_subkeys": StoreLimits().max_subkeys,
                    "new_user_before": baseline, "new_user_connected": connected, "new_user_cold": cold})


async def credit_chain_flood(target: Target) -> Outcome:
    identity = Identity.generate()
    ledger = Ledger.open(identity, None, pricing=target.pricing, policy=target.policy)
    accused = Identity.generate().public_key  # nobody: the flood is about the entries, not whom they smear
    limits = IngestLimits()
    try:
        async with stranger(target, identity) as net, trio.open_nursery() as nursery:
            gossip = Gossip(net, identity)
            await nursery.start(gossip.run)
            await nursery.start(Replicator(ledger, net, gossip).run)
            started = trio.current_time()
            signed = 0
            with trio.move_on_after(target.sizes.seconds):
                for _ in range(target.sizes.chain_entries):
                    await ledger.record_dispute(accused, "bench flood", b"x" * 1024)
                    signed += 1
                    await trio.sleep(0)
            await trio.sleep(1.0)  # what the victim pulls after the last one
            reply = framing.expect_map(await net.request(target.peer_id, HEADS, {"full": True, "h": [], "x": []},
                                                         timeout=10))
            held = max((h[1] for h in framing.field(reply, "h", list) if h[0] == ledger.me), default=0)
            hours = (trio.current_time() - started) / 3600
            nursery.cancel_scope.cancel()
    finally:
        ledger.store.close()
    return Outcome({"entries_signed": signed, "entries_held": held},
                   {"entries_held": limits.burst_entries + math.ceil(limits.entries_per_hour * hours)})


async def kv_cache_hog(target: Target) -> Outcome:
    """Sessions opened by a key the victim knows no credit of, held open and idle."""
    config = ServerConfig()
    streams = []
    opened = refused = streams_refused = 0
    held_peak = 0
    async with stranger(target) as net:
        with trio.move_on_after(target.sizes.seconds):
            for _ in range(target.sizes.hog_sessions):
                try:
                    stream = await net.open_stream(target.peer_id, proto.INFERENCE)
                except RemoteError as e:
                    if e.kind != "Overloaded":
                        raise
                    streams_refused += 1  # the p2p layer's cap on one peer's open streams
                    continue
                # what "open" reserves whatever the max_length, and no longer than a share may be
                longest = min(target.config.max_position_embeddings, config.initial_cache_tokens)
                reply = await ask(stream, open_msg(target.model_id, 0, target.blocks, max_length=longest))
                if reply["t"] == "opened":
                    opened += 1
                    streams.append(stream)
                else:
                    refused += 1
                    await stream.aclose()
            while True:  # hold them
                held_peak = max(held_peak, (await target.call("status"))["server"]["cache_used_bytes"])
                await trio.sleep(0.2)
        held_peak = max(held_peak, (await target.call("status"))["server"]["cache_used_bytes"])
        for stream in streams:
            await stream.aclose()
    honest = 2 * target.honest_max_length * target.kv_bytes_per_token()  # the honest client's sessions
    return Outcome({"sessions_opened": opened, "sessions_refused": refused, "streams_refused": streams_refused,
                    "cache_bytes_held": held_peak},
                   {"sessions_opened": int(config.cache_share * config.max_sessions),
                    "cache_bytes_held": StrangerCaps.of(replace(config, cache_budget_bytes=target.cache_budget),
                                                        target.kv_bytes_per_token()).per_client + honest},
                   {"cache_budget_bytes": target.cache_budget})


async def unpaid_compute(target: Target) -> Outcome:
    """1. steps with no receipt; 2. fresh keys that sign receipts but never hold credit, generating
    until refused, while a third key keeps a session open so that the victim is never idle (idle
    servers serve anyone free, by design)."""
    sizes = target.sizes
    unreceipted = 0
    async with stranger(target) as net:
        for _ in range(3):
            stream = await net.open_stream(target.peer_id, proto.INFERENCE)
            await ask(stream, open_msg(target.model_id, 0, target.blocks, max_length=16))
            reply = await ask(stream, {"t": "step", "id": 1, "pos": 0, "h": target.hidden(8)})
            unreceipted += 8 if reply["t"] == "out" else 0
            await stream.aclose()
    keys: list[Identity] = []
    tokens = [0]

    async def sybil(task_status=trio.TASK_STATUS_IGNORED) -> None:
        identity = Identity.generate()
        keys.append(identity)
        ledger = Ledger.open(identity, None, pricing=target.pricing, policy=target.policy)
        try:
            async with user_client(target, identity, ledger) as model:
                task_status.started()
                prompt = [random.randrange(3, target.config.vocab_size) for _ in range(8)]
                try:
                    while True:
                        g = await model.generate(prompt, max_new_tokens=16, stop_token_ids=[])
                        tokens[0] += len(prompt) + len(g.token_ids)
                except InsufficientCredit:
                    pass
        finally:
            ledger.store.close()

    async with stranger(target) as parker_net:
        parked = await parker_net.open_stream(target.peer_id, proto.INFERENCE)
        await ask(parked, open_msg(target.model_id, 0, target.blocks, max_length=8))
        # (the parked session is dropped after first_step_timeout: the Sybils are done before)
        with trio.move_on_after(min(sizes.seconds * 2, ServerConfig().first_step_timeout - 2)):
            async with trio.open_nursery() as nursery:
                for _ in range(sizes.unpaid_keys):
                    await nursery.start(sybil)
        await parked.aclose()
    owed: dict[str, float] = {}
    with trio.move_on_after(10):  # the victim settles each session when it ends
        while len(owed) < len(keys):
            rows = {row["peer_id"]: row for row in (await target.call("credits"))["peers"]}
            owed = {k.peer_id: rows[k.peer_id]["spent"] for k in keys if k.peer_id in rows}
            await trio.sleep(0.2)
    allowance = target.policy.debt_limit / GFLOP
    return Outcome({"unreceipted_tokens": unreceipted, "sybil_keys": len(keys), "sybil_tokens": tokens[0],
                    "max_owed_by_one_key_credits": max(owed.values(), default=0.0)},
                   {"unreceipted_tokens": 0, "max_owed_by_one_key_credits": allowance},
                   {"owed_credits": list(owed.values()), "debt_allowance_credits": allowance})


async def push_ssrf(target: Target) -> Outcome:
    """Steps whose push names a peer that is not an announced server of the next blocks: a member
    that serves nothing, and a stranger whose address is a plain TCP port."""
    dialled: list[str] = []
    connections = 0
    outs = refused = 0

    async def record(stream) -> None:
        dialled.append(stream.peer_id)
        await stream.aclose()

    async with stranger(target) as net, Libp2pNetwork.open(Identity.generate(), LOOPBACK) as bystander, \
            trio.open_nursery() as nursery:
        bystander.set_stream_handler(proto.PUSH, record)
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]

        async def accept(task_status=trio.TASK_STATUS_IGNORED) -> None:
            nonlocal connections
            async with listeners[0]:
                task_status.started()
                while True:
                    conn = await listeners[0].accept()
                    connections += 1
                    await conn.aclose()

        await nursery.start(accept)
        nobody = Identity.generate().peer_id
        named = {bystander.peer_id: bystander.listen_addrs()[0], nobody: f"/ip4/127.0.0.1/tcp/{port}/p2p/{nobody}"}
        stream = await net.open_stream(target.peer_id, proto.INFERENCE)
        opened = await ask(stream, open_msg(target.model_id, 0, target.blocks, max_length=8))
        signer = ReceiptSigner(net.identity, server=public_key_from_peer_id(target.peer_id), model=target.model_id,
                               start=0, end=target.blocks, pricing=target.pricing, session=opened["session"])
        with trio.move_on_after(target.sizes.seconds):
            for i in range(target.sizes.pushes):
                hop = sorted(named)[i % 2]
                reply = await ask(stream, {"t": "step", "id": i + 1, "pos": 0, "h": target.hidden(3), "addrs": named,
                                           "push": [{"peer": hop, "session": os.urandom(16)}],
                                           "receipt": signer.sign(3).to_list()})
                outs, refused = outs + (reply["t"] == "out"), refused + (reply.get("kind") == "PushRefused")
        await stream.aclose()
        await trio.sleep(0.3)
        nursery.cancel_scope.cancel()
    return Outcome({"pushes_asked": outs + refused, "pushes_refused": refused, "steps_computed": outs,
                    "connections_to_named_hosts": connections + len(dialled)},
                   {"connections_to_named_hosts": 0, "steps_computed": 0})


def sockets_held(pid: int, port: int, remote_ip: str) -> set[str]:
    """The socket inodes of established TCP connections to `port` from `remote_ip` that process `pid`
    has accepted (a connection still in the listen backlog has no inode in its fd table)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    remote = "".join(f"{int(b):02X}" for b in reversed(remote_ip.split(".")))
    held = set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            local, rem, state, inode = parts[1], parts[2], parts[3], parts[9]
            if int(local.split(":")[1], 16) == port and rem.split(":")[0] == remote and state == "01" and inode in inodes:
                held.add(inode)
    return held


async def slowloris(target: Target) -> Outcome:
    """Sockets from one address that never say anything. The victim may hold a few while their
    upgrade is pending (`InboundLimits`), none longer than the upgrade timeout."""
    source = "127.0.0.2"
    limits = InboundLimits()
    first_seen: dict[str, float] = {}
    at_once = 0
    longest = 0.0
    sockets = await open_idle_sockets(target.port, target.sizes.sockets, source)
    try:
        with trio.move_on_after(max(target.sizes.seconds, limits.upgrade_timeout + 3)):
            while True:
                now = trio.current_time()
                held = sockets_held(target.pid, target.port, source)
                at_once = max(at_once, len(held))
                for inode in held:
                    longest = max(longest, now - first_seen.setdefault(inode, now))
                await trio.sleep(0.1)
    finally:
        for sock in sockets:
            sock.close()
    overdue = limits.upgrade_timeout + 1.0  # (sampled every 0.1 s, on a loaded machine)
    return Outcome({"sockets_opened": len(sockets), "held_by_victim_at_once": at_once,
                    "held_longest_s": round(longest, 2)},
                   {"held_longest_s": overdue},
                   {"max_unadmitted_per_ip": limits.max_unadmitted_per_ip})


async def request_flood(target: Target) -> Outcome:
    """Well-formed DHT requests (ping, find_node, find_value), 32 in flight, from one peer."""
    answered = failed = 0
    info = _kad_info()
    rng = random.Random(0)
    async with stranger(target) as net:
        async def one(i: int) -> None:
            nonlocal answered, failed
            op = ("ping", "find_node", "find_value")[i % 3]
            body: dict[str, Any] = {"op": op, "i": info}
            if op == "find_node":
                body |= {"t": rng.randbytes(32), "lv": 0, "cl": ""}
            elif op == "find_value":
                body |= {"k": f"bench-key/{i}", "lv": 0, "cl": ""}
            try:
                await net.request(target.peer_id, kad.PROTOCOL, body, timeout=10)
                answered += 1
            except P2PError:
                failed += 1

        with trio.move_on_after(target.sizes.seconds):
            await in_parallel(32, one, target.sizes.requests)
    paced = (await target.call("status"))["requests_paced"]
    return Outcome({"requests_answered": answered, "requests_failed": failed},
                   notes={"victim_requests_paced_so_far": paced})


async def gossip_flood(target: Target) -> Outcome:
    """One author publishes signed presence notes as fast as it can. What it obtains is what the
    victim relays: a listener connected to the victim alone (with no quota of its own) counts them."""
    flooder = Identity.generate()
    quotas = GossipQuotas()
    relayed: set[bytes] = set()
    published = 0
    unlimited = GossipQuotas(rate=1e9, burst=10**9, max_held=10**6, max_held_bytes=1 << 40, max_total_bytes=1 << 40)
    async with stranger(target, flooder) as net, stranger(target) as listener_net, trio.open_nursery() as nursery:
        gossip = Gossip(net, flooder)
        listener = Gossip(listener_net, listener_net.identity, quotas=unlimited)
        listener.subscribe(PRESENCE_TOPIC, lambda m: relayed.add(m.id) if m.author == flooder.peer_id else None)
        await nursery.start(gossip.run)
        await nursery.start(listener.run)
        started = trio.current_time()
        with trio.move_on_after(target.sizes.seconds):
            for i in range(target.sizes.gossip_messages):
                await gossip.publish(PRESENCE_TOPIC, {"addrs": [], "region": "", "n": i, "pad": b"x" * 1024})
                published += 1
                await trio.sleep(0)
        await trio.sleep(1.0)  # what is still on its way
        elapsed = trio.current_time() - started
        nursery.cancel_scope.cancel()
    return Outcome({"published": published, "relayed_by_victim": len(relayed)},
                   {"relayed_by_victim": quotas.burst + math.ceil(quotas.rate * elapsed)})


async def presence_sybils(target: Target) -> Outcome:
    """Fresh identities, one valid presence note each (within any per-author quota), through one
    connection: what the victim keeps per author must stay bounded."""
    sent = 0
    async with stranger(target) as net:
        async def one(i: int) -> None:
            nonlocal sent
            note = signed_gossip(Identity.generate(), PRESENCE_TOPIC, {"addrs": [], "region": ""}, seq=1, now=net.now())
            await net.request(target.peer_id, GOSSIP_PUSH, note, timeout=10)
            sent += 1

        # the count is what matters (more authors than the victim lists); time only bounds a stuck victim
        with trio.move_on_after(max(target.sizes.seconds * 3, 60)):
            await in_parallel(16, one, target.sizes.sybil_notes)
    listed = len((await target.call("status"))["presence_seen"])
    return Outcome({"notes_sent": sent, "presence_authors_listed": listed},
                   {"presence_authors_listed": MAX_PRESENCE_SEEN})


async def nested_json(target: Target) -> Outcome:
    bodies = [b"[" * 40 + b"]" * 40, b"[" * 100_000 + b"]" * 100_000,
              b'{"prompt":' * 50_000 + b"1" + b"}" * 50_000, b'{"model": "x", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"]
    statuses: dict[int, int] = {}

    def post_all() -> None:
        with httpx.Client(base_url=target.api_url, timeout=30) as http:
            deadline = time.monotonic() + target.sizes.seconds
            for i in range(target.sizes.json_requests):
                if time.monotonic() > deadline:
                    break
                code = http.post("/v1/completions", content=bodies[i % len(bodies)],
                                 headers={"content-type": "application/json"}).status_code
                statuses[code] = statuses.get(code, 0) + 1

    await trio.to_thread.run_sync(post_all)
    return Outcome({"requests": sum(statuses.values()), "answered_other_than_400": sum(
        n for code, n in statuses.items() if code != 400)}, {"answered_other_than_400": 0},
        {"statuses": {str(k): v for k, v in statuses.items()}})


ATTACKS: dict[str, Attack] = {
    "object_bomb": object_bomb,
    "malformed_frames": malformed,
    "dht_store_flood": dht_store_flood,
    "credit_chain_flood": credit_chain_flood,
    "kv_cache_hog": kv_cache_hog,
    "unpaid_compute": unpaid_compute,
    "push_ssrf": push_ssrf,
    "slowloris": slowloris,
    "request_flood": request_flood,
    "gossip_flood": gossip_flood,
    "presence_sybils": presence_sybils,
    "nested_json": nested_json,
    "announcement_squatting": announcement_squatting,  # last: its fakes stay in the record until they expire
}


# --- running them -----------------------------------------------------------------------------------


def run_attack(name: str, attack: Attack, target: Target, rss: RssSampler, honest: HonestClient) -> dict:
    sizes = target.sizes
    before_from = time.monotonic()
    time.sleep(sizes.baseline_s)
    rss_before = rss.now()
    started = time.monotonic()
    outcome = trio.run(attack, target)
    ended = time.monotonic()
    time.sleep(0.5)  # the honest generations started during the attack finish
    rss_after = rss.now()
    alive = target.alive()
    if alive:
        trio.run(target.call, "status")  # and still answers
    before, during = honest.window(before_from, started), honest.window(started, ended, overlapping=True)
    ratio = (during["median_latency_ms"] / before["median_latency_ms"]
             if during["median_latency_ms"] and before["median_latency_ms"] else None)
    peak = max(rss.peak(started, ended + 0.5), rss_before, rss_after)
    growth = (peak - rss_before) / MiB
    within = {figure: outcome.obtained[figure] <= bound for figure, bound in outcome.bounds.items()}
    return {
        "seconds": round(ended - started, 2),
        "rss_mb": {"before": round(rss_before / MiB, 1), "peak": round(peak / MiB, 1), "after": round(rss_after / MiB, 1)},
        "rss_growth_mb": round(growth, 1),
        "rss_retained_mb": round((rss_after - rss_before) / MiB, 1),
        "alive": alive,
        "honest_before": before,
        "honest_during": during,
        "honest_success": during["success"],
        "latency_ratio": round(ratio, 2) if ratio is not None else None,
        "attacker_obtained": outcome.obtained,
        "bounds": outcome.bounds,
        **({"notes": outcome.notes} if outcome.notes else {}),
        "goals_met": {
            "rss_growth": growth <= RSS_GOAL_MB,
            "alive": alive,
            "honest_success": during["success"] == 1.0,
            "latency": ratio is not None and ratio <= LATENCY_GOAL,
            "attacker_bounded": all(within.values()),
        },
    }


def credits_row(viewer: PeerProcess, of: PeerProcess) -> dict:
    """`of` as `viewer`'s ledger sees it (`potluck credits`: standing in its view, what it earned from `of`)."""
    rows = {row["peer_id"]: row for row in viewer.call("credits")["peers"]}
    return rows.get(of.peer_id, {})


def standing_of(viewer: PeerProcess, of: PeerProcess) -> float:
    return credits_row(viewer, of).get("standing") or 0.0


def earn_standing(root: Path, common: list[str], config: ModelConfig, target: float, per_generation: float,
                  prompt_tokens: int, timeout: float = 900.0) -> dict:
    """Before the attacks, the honest user contributes: its peer serves every block and the victim's own
    user generates through them (the victim's peer serves nothing yet), so the victim signs receipts for
    the honest user's work — its standing in the victim's view (credits.standing), at least `target`
    credits. Both peers stop; their data folders (identities, ledgers) stay for the bench's run."""
    started = time.monotonic()
    server = PeerProcess(root / "user", *common, "--blocks", f"0:{config.num_layers}")
    server.start(timeout=180)
    client = PeerProcess(root / "victim", *common, "--bootstrap", server.addr)
    try:
        start_all([client], timeout=180)
        rng = random.Random(0)
        prompt = [rng.randrange(3, config.vocab_size) for _ in range(prompt_tokens)]

        def generate() -> dict | None:
            try:
                return client.call("generate", prompt=prompt, max_tokens=1, timeout=120)
            except RuntimeError:
                return None  # no route learned yet

        first = wait_until(generate, 120, 1, message="the victim's first generation through the honest user")
        assert [hop["peer_id"] for hop in first["route"]] == [server.peer_id]
        generations, standing = 1, 0.0
        deadline = time.monotonic() + timeout
        while (standing := standing_of(client, server)) < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the honest user's standing at the victim reached {standing} of {target} credits")
            for _ in range(max(1, math.ceil((target - standing) / per_generation))):
                client.call("generate", prompt=prompt, max_tokens=1, timeout=120)
                generations += 1
    finally:
        client.close()
        server.close()
    return {"generations": generations, "prompt_tokens": prompt_tokens, "seconds": round(time.monotonic() - started, 1)}


def pin(pid: int, cpus: set[int]) -> None:
    """Run every thread of process `pid` on `cpus` (threads it starts later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass


def isolate(processes: list[PeerProcess]) -> dict | None:
    """The attacker (this process) on the last CPU, `processes` on the others; what was set, or None
    with fewer than two CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    attacker, rest = {cpus[-1]}, set(cpus[:-1])
    for proc in processes:
        assert proc.proc is not None  # started
        pin(proc.proc.pid, rest)
    pin(os.getpid(), attacker)
    return {"attacker_cpus": sorted(attacker), "victim_and_user_cpus": sorted(rest)}


def start_swarm(root: Path, args: argparse.Namespace,
                sizes: Sizes) -> tuple[PeerProcess, PeerProcess, Path, str, ModelConfig, int, dict]:
    from pipeline.convert import model_folder

    if args.smollm2:
        folder = model_folder(None, root / "victim", progress=False)
        cache_mb = 256
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from testkit.models import make_tiny

        folder = root / "tiny-llama"
        make_tiny("llama", folder)
        cache_mb = 16  # its share for a key without credit is then far below what --sessions could ask for
    mid = model_id_of(folder)
    config = ModelFolder(folder).config
    pricing = ModelPricing()
    pricing.register(mid, config)
    debt = pricing(mid, 0, config.num_layers, ALLOWANCE_TOKENS) / GFLOP
    env = {"MALLOC_ARENA_MAX": str(args.malloc_arena_max)} if args.malloc_arena_max else {}
    common = ["--model", str(folder), "--threads", "1", "--debt-limit", repr(debt), "--api", "127.0.0.1:0"]
    # a long prompt and one new token: much work per generation, little time
    prompt_tokens = min(config.max_position_embeddings - 1, 1024)
    earned = earn_standing(root, common, config, sizes.standing_generations * pricing(mid, 0, config.num_layers,
                                                                                      HONEST_TOKENS) / GFLOP,
                           pricing(mid, 0, config.num_layers, prompt_tokens) / GFLOP, prompt_tokens)
    victim = PeerProcess(root / "victim", *common, "--blocks", f"0:{config.num_layers}", "--cache-mb", str(cache_mb),
                         env=env)
    victim.start(timeout=180)
    user = PeerProcess(root / "user", *common, "--bootstrap", victim.addr)
    start_all([user], timeout=180)
    return victim, user, folder, mid, config, cache_mb * MiB, earned


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, a few seconds an attack (the test suite's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--smollm2", action="store_true", help="the victim serves SmolLM2-135M-Instruct (default: a tiny random Llama)")
    parser.add_argument("--only", action="append", choices=sorted(ATTACKS), help="run this attack (repeatable)")
    parser.add_argument("--malloc-arena-max", type=int, help="start the victim with MALLOC_ARENA_MAX=N")
    parser.add_argument("--seconds", type=float, help="each attack's time bound (overrides the mode's)")
    parser.add_argument("--no-isolate", action="store_true",
                        help="the attacker shares the victim's CPUs (default: a CPU of its own where there are two)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.smollm2:  # a generation takes seconds on a CPU: windows long enough to hold several
        sizes = replace(sizes, seconds=max(sizes.seconds, 8.0), baseline_s=max(sizes.baseline_s, 6.0))
    if args.seconds:
        sizes = replace(sizes, seconds=args.seconds)
    names = args.only or list(ATTACKS)
    with tempfile.TemporaryDirectory(prefix="potluck-attack-") as tmp:
        root = Path(tmp)
        victim, user, folder, mid, config, cache_budget, earned = start_swarm(root, args, sizes)
        rss = honest = None
        try:
            api = user.call("status")["api"]
            prompt: Any = "Name a primary color." if args.smollm2 else [5, 17, 42, 8, 99, 3]
            body = {"model": folder.name, "prompt": prompt, "max_tokens": HONEST_MAX_TOKENS, "temperature": 0}
            with httpx.Client(base_url=api, timeout=180) as http:
                wait_until(lambda: http.get("/v1/models").json()["data"][0]["potluck"]["covered_blocks"]
                           == config.num_layers, 120, 0.5, message="the user's peer to see the victim's blocks")
                http.post("/v1/completions", json=body).raise_for_status()  # loads the user's client half
            pricing = ModelPricing()
            pricing.register(mid, config)
            policy = CreditPolicy(debt_limit=round(pricing(mid, 0, config.num_layers, ALLOWANCE_TOKENS)))
            target = Target(victim, victim.call("status")["api"], folder, mid, config, pricing, policy, cache_budget,
                            honest_max_length=64 + HONEST_MAX_TOKENS, sizes=sizes)
            isolated = None if args.no_isolate else isolate([victim, user])
            rss = RssSampler(target.pid)
            rss.start()
            honest = HonestClient(api, body)
            honest.start()
            report: dict[str, Any] = {
                "mode": "quick" if args.quick else "full",
                "isolated": isolated,
                "victim": {"model": "SmolLM2-135M-Instruct" if args.smollm2 else "tiny random Llama",
                           "blocks": config.num_layers, "cache_mb": cache_budget // MiB,
                           "malloc_arena_max": args.malloc_arena_max,
                           "debt_allowance_credits": policy.debt_limit / GFLOP},
                "honest_user": {"standing_at_victim_credits": standing_of(victim, user),
                                "standing_worth_generations": sizes.standing_generations, "earned_by": earned},
                "goals": {"rss_growth_mb_max": RSS_GOAL_MB, "honest_success": 1.0, "latency_ratio_max": LATENCY_GOAL},
                "attacks": {},
            }
            for name in names:
                report["attacks"][name] = run_attack(name, ATTACKS[name], target, rss, honest)
                if not target.alive():
                    break
            report["victim"]["rss_mb_end"] = round(rss.now() / MiB, 1) if target.alive() else None
            if target.alive():  # what the honest user consumed at the victim, against its allowance there
                report["honest_user"]["consumed_at_victim_credits"] = credits_row(victim, user).get("earned_from")
            report["all_goals_met"] = all(all(a["goals_met"].values()) for a in report["attacks"].values())
        finally:
            if honest is not None:
                honest.stopped.set()
            if rss is not None:
                rss.stopped.set()
            user.close()
            victim.close()
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return 0


def print_table(report: dict) -> None:
    v = report["victim"]
    print(f"victim: {v['model']}, {v['blocks']} blocks, {v['cache_mb']} MiB cache, debt allowance "
          f"{v['debt_allowance_credits']:.4g} credits ({report['mode']} run)")
    iso = report["isolated"]
    print("attacker on CPU " + ",".join(map(str, iso["attacker_cpus"])) + ", victim and user on CPU "
          + ",".join(map(str, iso["victim_and_user_cpus"])) if iso else "attacker, victim and user share every CPU")
    h = report["honest_user"]
    print(f"honest user: standing {h['standing_at_victim_credits']:.4g} credits at the victim (earned serving its "
          f"user {h['earned_by']['generations']} generations), consumed {h.get('consumed_at_victim_credits')}")
    print(f"{'attack':<24}{'RSS before/peak/after MB':>26}{'alive':>7}{'honest':>8}{'lat×':>6}  goals  obtained (≤ bound)")
    for name, a in report["attacks"].items():
        r = a["rss_mb"]
        ok = "".join("✓" if met else "✗" for met in a["goals_met"].values())
        got = ", ".join(f"{k}={v}" + (f"≤{a['bounds'][k]}" if k in a["bounds"] else "")
                        for k, v in a["attacker_obtained"].items())
        success = "-" if a["honest_success"] is None else f"{a['honest_success']:.0%}"
        ratio = "-" if a["latency_ratio"] is None else f"{a['latency_ratio']:.2f}"
        print(f"{name:<24}{r['before']:>10.1f}/{r['peak']:.1f}/{r['after']:.1f}{'yes' if a['alive'] else 'NO':>7}"
              f"{success:>8}{ratio:>6}  {ok:<5}  {got}")
    print("goals: RSS growth, alive, honest success, latency, attacker bounded;",
          "all met" if report["all_goals_met"] else "NOT all met")


if __name__ == "__main__":
    raise SystemExit(main())
