"""DistributedModel: the user's side of the swarm — embeddings, final norm and LM head here, blocks remote
(or in this process, where the peer serves them itself).

    model = await DistributedModel.from_pretrained(folder, network, dht)   # local_server=: our own BlockServer
    result = await model.generate("Hello", max_new_tokens=20)                  # Generation
    async for event in model.stream(messages_or_prompt, temperature=0.7, seed=1):
        print(event.text, end="")                  # TokenEvent ..., then Finished(text, generation)

- `model.model_config` is the architecture (pipeline/config.py), `model.client_config` this
  client's `ClientConfig`.
- A session (`InferenceSession`) asks the `SequenceManager` (pipeline/routing.py) for a route
  covering all blocks, opens one session per hop (`Hop`, pipeline/hop.py) and sends each step's
  hidden states through them (client-driven, or with server-to-server forwarding: `ClientConfig.push`,
  along each run of consecutive remote hops). From the moment its route is chosen until they close,
  its hops count as this client's load on their servers (`SequenceManager.hold`): concurrent
  sessions spread over replicas.
- Our own blocks: given the peer's own server (`local_server`), routes may use it like any server,
  preferred where it is at least as fast (pipeline/routing.py), and its hops are `LocalHop`s: steps
  are calls in this process, with no stream, no serialisation and no receipts; they fault, refuse,
  recover and replay as a remote hop does, but are never spot-checked (nobody checks us against
  ourselves) — our server may check remote hops, though. Without it, routes leave our peer out.
- Fault tolerance: the session keeps, per block boundary, the inputs of every step it completed
  (in their original chunks). When a hop faults (stream closed, timeout, error reply other than a
  refusal, malformed or non-finite output), its server is banned for a while, a new route for that
  hop's blocks is built from the others, the history is replayed there — chunk by chunk in one
  message, so the rebuilt KV cache is bit-identical — and the step goes on. Greedy output is the
  same as an undisturbed run. A broken stream, or a step that timed out on a server reached only
  through relays, may be the transport's doing (the relay a NATed server is reached through died or
  hangs): before any ban, the client reaches that server again at its announced addresses (a hung
  connection dropped first) and replays there (once per server and session). A session the server ended is no fault
  the first time: displaced by another client (Displaced) or expired (SessionExpired: idle, a move),
  it is re-routed and replayed
  without a ban, on other servers where a route is left (a replay there is paid for again; our own
  server replays free); a server that ends a session's hop a second time is banned (else it could
  bill the replays over and over). A route open or rebuild that is cancelled or refused closes the
  hops it opened.
- Refusals (pipeline/errors.py: too long, cache full, no credit, no receipt, wrong model, busy) are
  not faults: no ban. A server that refuses to open a session is left out of that route only and
  another is tried where one could accept; when none is left, or the refusal is about the client
  (its receipts), the typed `Refused` is raised at once.
- Credits: `ClientConfig.billing = ClientBilling(ledger)` (pipeline/billing.py) signs, with every
  step, a cumulative receipt for the tokens the server says it has served so far ("served" in each
  "out"), never more than the client counts it sent that server (a server claiming more faults,
  pipeline/hop.py `OverstatedServed`); in push mode each push-list entry carries its hop's receipt. "close" carries the final
  receipt, and the latest receipt per hop is recorded as a *spend* when the hop is closed or
  abandoned; a generation's spends are its `Generation.paid` (what this one generation cost). A server
  whose "opened" asks a rate above what the client believes its tier is worth is refused for the
  route (`RateRefused`, server-specific: another is tried, nobody is banned).
- Spot checks: `ClientConfig.spot_check` (pipeline/spotcheck.py; which steps: pipeline/checkpolicy.py,
  by default every step of a server new to this client, then fewer as it earns trust) re-runs
  steps on a second server before their output is used; a liar (confirmed by a third server) is
  distrusted, disputed on the client's chain, replaced, and the step re-run.
- Speculative decoding (`ClientConfig.speculative`, on by default; `speculative=` per generation,
  pipeline/speculative.py): each decode pass sends the last token and k drafted ones as ONE step,
  keeps the drafts the model agrees with plus its own next token (`verify`: the same tokens plain
  decoding gives, greedy or seeded), and `InferenceSession.keep` forgets the rest: the next step
  starts there, servers roll their caches back by its `pos`, the history replayed after a fault and
  the spot checker's records hold only kept positions, and the rejected drafts are credited back in
  the next receipt (pipeline/protocol.py `refunded_tokens`).
- Signed results: every remote hop's "out" carries the server's signature over the step's result
  (pipeline/proofs.py); the client checks it as the reply arrives and, once the step's inputs are
  known, that it covers them (`RemoteHop.accept`). A result that is not what the server signed is a
  fault (`BadSignedStep`): the hop is replaced like a broken stream; in push mode a hop that signed
  other inputs than the client saw is run directly instead.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Collection, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncGenerator, cast

import torch
import trio

from credits import Receipt
from p2p.errors import FrameError, P2PError, StreamClosed
from p2p.network import Network

from . import protocol as proto
from .announce import ServerInfo
from .billing import ClientBilling
from .directory import SwarmDirectory
from .errors import SERVER_SPECIFIC, GenerationFailed, RateRefused, ReceiptRequired, Refused
from .flops import tier_flops_per_token
from .hop import Hop, LocalHop, LocalServer, OverstatedServed, RemoteHop, StepRecord, connect_announced
from .loading import ModelFolder, load_head, resolve_dtype
from .model import ModelHead
from .proofs import BadSignedStep
from .protocol import InferenceError, pack_hidden
from .routing import NoRoute, RouteHop, SequenceManager
from .sampling import Sampler, SamplingParams, find_stop, safe_prefix_len
from .speculative import SpeculationStats, SpeculativeConfig, verify
from .spotcheck import SpotCheckConfig, SpotChecker

log = logging.getLogger(__name__)


class WrongOutput(P2PError):
    """A spot check showed that a server's outputs were wrong (confirmed by a third server)."""


@dataclass
class ClientConfig:
    step_timeout: float = 30.0
    open_timeout: float = 10.0
    # the first open of a server never reached: a real one answers in milliseconds, a Sybil that accepts
    # the stream and stays mute would cost `open_timeout` each (its second chance gets the full timeout)
    first_open_timeout: float = 3.0
    dial_timeout: float = 3.0  # a first contact's dial: an announced address may be dead
    probe_width: int = 32  # never-contacted servers dialled at once while routing
    max_recoveries: int = 8  # per step (failed first contacts do not count while other servers remain)
    push: bool = True  # server-to-server forwarding of activations (runs of two or more remote hops)
    # how long a pushed hop's output may lag the previous hop's (beyond twice the time that one took)
    # before the client runs the rest of the step itself and stops pushing for the session: a server
    # that cannot reach the next one (NAT, a dead address) says nothing, and waiting out step_timeout
    # on every step would stall the generation
    push_grace: float = 2.0
    billing: ClientBilling | None = None  # receipts, spends, disputes
    spot_check: SpotCheckConfig | None = field(default_factory=SpotCheckConfig)  # None: no checks
    speculative: SpeculativeConfig | None = field(default_factory=SpeculativeConfig)  # None: one token a pass
    prefer: str = "fast"  # routes: "fast", "green" (servers' grid signals weigh in, pipeline/grid.py) or "cheap" (prices)


HopSpan = tuple[str, int, int]  # (peer id, first block, end block) of one hop


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    text: str  # text this token adds (may be "" while a multi-byte char or a possible stop string is pending)
    index: int
    route: list[HopSpan] = field(default_factory=list)  # the hops that computed this token


@dataclass(frozen=True)
class PartialAnswer:
    """The start of an answer a generation wrote before it stopped: its tokens, and how many characters of
    their text it showed. `DistributedModel.stream(..., continuing=)` goes on from there."""

    token_ids: tuple[int, ...] = ()
    shown: int = 0


@dataclass(frozen=True)
class Generation:
    """What a generation produced and how it went: `generate` returns it, `stream` ends with it."""

    token_ids: list[int]
    text: str  # the decoded tokens, cut before a stop string
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    route: list[HopSpan] = field(default_factory=list)  # the route at the end
    servers: list[HopSpan] = field(default_factory=list)  # every hop opened, replacements included
    steps: int = 0
    recoveries: int = 0
    push_fallbacks: int = 0
    spot_checks: dict | None = None  # the spot checker's counts, when it ran
    paid: list[Receipt] = field(default_factory=list)  # the receipts recorded as this generation's spends
    ttft_s: float = 0.0
    wall_s: float = 0.0
    decode_s: float = 0.0
    tokens_per_s: float = 0.0  # decode speed, after the first token
    compute_s: float = 0.0  # the servers' compute time, as they report it
    network_s: float = 0.0  # step wall time less compute
    speculation: SpeculationStats | None = None  # the decode passes, when drafting was on

    @property
    def spent_flops(self) -> int:
        return sum(r.flops for r in self.paid)


@dataclass(frozen=True)
class Finished:
    """A stream's last event: the text held back until the end (a possible stop string's start, half a
    character; "" when none was) and the whole `Generation`."""

    text: str
    generation: Generation


@dataclass
class SessionStats:
    """What one session did, summed as it runs; a generation's `Generation` is built from it."""

    steps: int = 0
    compute_s: float = 0.0  # servers' compute, as they reported it
    step_wall_s: float = 0.0  # wall time of the steps, seen from here
    recoveries: int = 0
    push_fallbacks: int = 0
    servers: list[tuple[str, int, int]] = field(default_factory=list)  # every route hop used, in order
    paid: list[Receipt] = field(default_factory=list)  # the spends this client signed for its sessions
    spot_checks: dict | None = None  # the checker's counters, once the session closed


class InferenceSession:
    """A generation's path through the swarm: route, open hops, history for replay. Use `async with`."""

    def __init__(self, model: "DistributedModel", max_length: int, prefer: str | None = None):
        """`prefer`: the routing preference ("fast" / "green" / "cheap"; None: the client config's)."""
        self.model = model
        self.max_length = max_length
        self.prefer = prefer or model.client_config.prefer
        self.hops: list[Hop] = []
        self.position = 0
        self.chunks: list[int] = []  # tokens per completed step
        self.history: dict[int, list[torch.Tensor]] = {}  # block boundary → inputs of completed steps
        self._step_id = 0
        self._expired_by: set[str] = set()  # servers that ended a session of ours (expired, displaced): forgiven once
        # remote servers that ended (expired, displaced) a hop of this session: its rebuilds go elsewhere
        # where a route is left (the replay there would be paid for again)
        self._ended_by: set[str] = set()
        self._held: set[Hop] = set()  # route hops counted in the sequence manager's `held` until closed
        self._reconnected: set[str] = set()  # servers whose broken stream we re-opened once, without a ban
        self._push = model.client_config.push  # off for the rest of the session once a push went missing
        cfg = model.client_config
        self.checker = (SpotChecker(self, cfg.spot_check, routes=model.sequence, dtype=model.dtype,
                                    model_id=model.model_id, billing=cfg.billing, step_timeout=cfg.step_timeout)
                        if cfg.spot_check is not None and cfg.spot_check.enabled else None)
        self.stats = SessionStats()

    @property
    def route(self) -> list[tuple[str, int, int]]:
        return [(h.peer_id, h.start, h.end) for h in self.hops]

    async def __aenter__(self) -> "InferenceSession":
        n = self.model.model_config.num_layers
        self.hops = await self._open_route(0, n)
        return self

    async def __aexit__(self, *exc: object) -> None:
        hops, self.hops = self.hops, []
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for h in hops:
                    nursery.start_soon(self.close_hop, h)
                if self.checker is not None:
                    nursery.start_soon(self.checker.aclose)
        if self.checker is not None:
            self.stats.spot_checks = dict(self.checker.stats)

    def _receipt(self, hop: RemoteHop, info: dict | None = None) -> list | None:
        """The receipt to send to `hop` now (with billing), else None; with a step's `info["pos"]`, the
        rejected drafts that step rolls back are not paid for (`RemoteHop.billed_before`)."""
        billing = self.model.client_config.billing
        if billing is None:
            return None
        served = hop.billed_before(info["pos"]) if info and "pos" in info else hop.served
        info = {**(info or {}), "start": hop.start, "end": hop.end, "served": served, "model": self.model.model_id}
        return billing.receipt(hop.peer_id, hop.session_id, info)

    async def open_hop(self, route_hop: RouteHop, addrs: Sequence[str], timeout: float | None = None) -> Hop:
        """A session with `route_hop`'s server (which announced `addrs`) for its blocks, for this session's
        model, length and dtype (in this process when that server is our own), within `timeout` (None:
        `open_timeout`)."""
        m = self.model
        if m.local_server is not None and route_hop.peer_id == m.network.peer_id:
            return await LocalHop.open(m.local_server, route_hop, model_id=m.model_id, max_length=self.max_length,
                                       dtype=m.dtype_name)
        hop = await RemoteHop.open(m.network, route_hop, addrs, model_id=m.model_id, max_length=self.max_length,
                                   dtype=m.dtype_name, timeout=m.client_config.open_timeout if timeout is None else timeout)
        billing = m.client_config.billing
        if billing is not None and hop.rate is not None:
            try:
                billing.agree(hop.peer_id, hop.session_id, hop.rate, m.dtype_name)
            except RateRefused:  # too dear for us: nothing was computed, so nothing is owed
                await hop.close()
                raise
        return hop

    async def close_hop(self, hop: Hop, polite: bool = True, pay: bool = True) -> None:
        """Close a hop (with the final receipt unless `pay` is False) and record what we signed for it
        as a spend."""
        if hop in self._held:
            self._held.discard(hop)
            self.model.sequence.release([hop.peer_id])
        if hop.closed:
            return
        if isinstance(hop, LocalHop):  # nothing signed: serving ourselves is free
            hop.close()
            return
        billing = self.model.client_config.billing
        receipt = None
        if polite and pay and billing is not None:
            try:
                receipt = self._receipt(hop)
            except Exception as e:  # noqa: BLE001 - never keep a hop open over a receipt
                log.info("could not sign the final receipt for %s: %s", hop, e)
        await hop.close(polite, receipt)
        if billing is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(10.0):
                spend = await billing.closed(hop.peer_id, hop.session_id)
                if spend is not None:
                    self.stats.paid.append(spend)

    async def _open_route(self, start: int, end: int, avoid: Collection[str] = ()) -> list[Hop]:
        """Route [start, end) and open every hop. A server that faults is banned and the route built
        again; one that refuses is left out of this route only (no ban); when no route is left after
        refusals, the most useful refusal is raised (see `_telling`). Servers never reached are dialled
        first (`_probe`) and opened with `first_open_timeout`; one that cannot be reached or opened is
        left out a while (not a fault: an announcement, or a connection, is no proof that anything serves)."""
        seq = self.model.sequence
        last: BaseException | None = None
        retried: set[str] = set()
        refusals: dict[str, Refused] = {}  # peer → its refusal, for this route only
        faults = 0
        second_chance = False  # servers left out after a failed first contact, opened once more (full timeout)
        while faults <= self.model.client_config.max_recoveries:
            if not second_chance:
                await self._probe(start, end)
            try:
                route = await seq.route(start, end, need_cache_tokens=self.max_length, exclude=refusals.keys() | avoid,
                                        prefer=self.prefer)
            except NoRoute as e:
                if refusals:
                    raise _telling(list(refusals.values()))  # its cause (the server's reply) stays
                if not second_chance and seq.forgive_unreachable(start, end):
                    # a short first dial that failed is no proof nothing listens (a loaded or just
                    # restarted server): rather one more open than no answer at all
                    second_chance = True
                    continue
                raise GenerationFailed(str(e) + (f"; last error: {last}" if last else "")) from last if last is not None else e
            hops: list[Hop] = []
            seq.hold(r.peer_id for r in route)  # before any await: concurrent sessions routing now see it
            try:
                try:
                    for r in route:
                        info = seq.server(r.peer_id)
                        first = r.peer_id not in seq.reached and not second_chance
                        timeout = self.model.client_config.first_open_timeout if first else None
                        hops.append(hop := await self.open_hop(r, info.addrs if info else (), timeout))
                        self._held.add(hop)
                        seq.note_reached(r.peer_id)
                except BaseException as e:  # the route's sessions count no more, and those opened close
                    self._held.difference_update(hops)
                    seq.release(r.peer_id for r in route)
                    if not isinstance(e, (Refused, P2PError, trio.TooSlowError)):  # (those are closed below)
                        with trio.CancelScope(shield=True):
                            for h in hops:
                                await self.close_hop(h)
                    raise
                self.stats.servers.extend(self.route_of(hops))
                return hops
            except Refused as e:
                for h in hops:
                    await self.close_hop(h)
                if not isinstance(e, SERVER_SPECIFIC):
                    raise
                refusals[route[len(hops)].peer_id] = e
            except (P2PError, trio.TooSlowError) as e:
                last = e
                bad = route[len(hops)].peer_id
                for h in hops:
                    await self.close_hop(h)
                if isinstance(e, StreamClosed) and bad not in retried:
                    # A stream closed as it opened is most often a connection being replaced (a new
                    # peer's first dial racing the server's); one more try before banning the server.
                    retried.add(bad)
                    continue
                if bad not in seq.reached:
                    seq.note_contact(bad, False)
                    continue
                faults += 1
                seq.ban(bad, f"could not open a session: {e}")
        raise GenerationFailed(f"could not open a route through blocks [{start}, {end})"
                               + (f"; last error: {last}" if last else ""))

    async def _probe(self, start: int, end: int) -> None:
        """Dial never-contacted servers of [start, end), `probe_width` at a time with a short timeout,
        until every block there has a server we reached (or none is left to try)."""
        seq, network, cfg = self.model.sequence, self.model.network, self.model.client_config
        await seq.refresh()
        seq.note_connected(network.connected_peers())
        while batch := seq.to_probe(start, end, cfg.probe_width):
            async with trio.open_nursery() as nursery:
                for info in batch:
                    nursery.start_soon(self._dial, info)

    async def _dial(self, info: ServerInfo) -> None:
        """A first contact with `info`'s server at the addresses it announced, in turn, each within
        `dial_timeout` (at most `MAX_ANNOUNCED_ADDRS` of them); the outcome goes to routing, once."""
        ok = await connect_announced(self.model.network, info.peer_id, info.addrs,
                                     each=self.model.client_config.dial_timeout)
        self.model.sequence.note_contact(info.peer_id, ok)

    @staticmethod
    def route_of(hops: list[Hop]) -> list[tuple[str, int, int]]:
        return [(h.peer_id, h.start, h.end) for h in hops]

    def _step_msg(self, hop: RemoteHop, step_id: int, pos: int, h: torch.Tensor, chunks: list[int] | None = None) -> dict:
        msg = {"t": "step", "id": step_id, "pos": pos, "h": pack_hidden(h)}
        if chunks is not None and len(chunks) > 1:
            msg["chunks"] = chunks
        receipt = self._receipt(hop, {"id": step_id, "pos": pos, "tokens": h.shape[1]})
        if receipt is not None:
            msg["receipt"] = receipt  # covers every token this server has served so far
        return msg

    async def run_hop(self, hop: Hop, h: torch.Tensor, pos: int, chunks: list[int] | None = None) -> torch.Tensor:
        """One step (or a replay of several, `chunks`) through `hop`; its outputs."""
        if isinstance(hop, LocalHop):  # our own compute: no timeout, no RTT
            out, compute_s = await hop.run(h, pos, chunks)
            self.stats.compute_s += compute_s
            return out
        t0 = trio.current_time()
        n = h.shape[1]
        with trio.fail_after(self.model.client_config.step_timeout):
            for retry in (False, True):
                self._step_id += 1
                step_id = self._step_id
                hop.note_sent(step_id, pos, n)
                await hop.send_step(self._step_msg(hop, step_id, pos, h, chunks))
                try:
                    out, compute_s = await hop.receive_out(step_id, n, self.model.model_config.hidden_size,
                                                           self.model.dtype_name)
                    break
                except ReceiptRequired as e:  # after a push fallback: had it computed the push we left?
                    if retry or e.limit is None or not hop.reconcile(e.limit, step_id, pos, n):
                        raise
        hop.accept(step_id, pos, chunks or [h.shape[1]], h, out)
        self.stats.compute_s += compute_s
        wall = trio.current_time() - t0
        self.model.sequence.observe_rtt(hop.peer_id, max(0.0, wall - compute_s))
        self.model.sequence.observe_speed(hop.peer_id, h.shape[1], hop.end - hop.start, compute_s, wall)
        return out

    async def _run_route_hop(self, hop: Hop, h: torch.Tensor, pos: int, chunks: list[int] | None = None) -> torch.Tensor:
        """`run_hop` for a hop of the route: the step is also kept for spot checks (of remote hops)."""
        t0 = trio.current_time()
        out = await self.run_hop(hop, h, pos, chunks)
        if self.checker is not None and isinstance(hop, RemoteHop):
            self.checker.record(hop, StepRecord(pos, h, tuple(chunks or [h.shape[1]]), out), trio.current_time() - t0)
        return out

    async def _recover(self, index: int, err: BaseException) -> None:
        """Replace hop `index` by a fresh route for its blocks and replay the history there."""
        bad = self.hops[index]
        seq = self.model.sequence
        log.info("hop %s failed (%s: %s); recovering blocks [%d, %d)", bad, type(err).__name__, err, bad.start, bad.end)
        self.stats.recoveries += 1
        if self.checker is not None:
            await self.checker.forget(bad)
        liar = isinstance(err, WrongOutput)
        network = self.model.network
        # a step that timed out through relays only: perhaps the relay hangs, not the server
        relay_hung = isinstance(bad, RemoteHop) and isinstance(err, trio.TooSlowError) and network.relayed(bad.peer_id)
        await self.close_hop(bad, polite=liar, pay=not liar)  # a liar is not paid for the step it lied on
        fault = True
        if relay_hung and bad.peer_id not in self._reconnected:
            with trio.move_on_after(self.model.client_config.dial_timeout):
                await network.disconnect(bad.peer_id)  # so that reaching it again dials anew, not the hung circuit
        if isinstance(bad, RemoteHop) and (isinstance(err, StreamClosed) or relay_hung):  # its transport died?
            try:
                if await self._reconnect(index, bad):
                    return
            except Refused as e:
                if not isinstance(e, SERVER_SPECIFIC):
                    raise
                # reached again: the connection broke, not the server, which has no room for us now
                fault = False
                self._ended_by.add(bad.peer_id)
        kind = err.kind if isinstance(err, InferenceError) else None
        # ended by its server (displaced for room, expired while idle or moving): no fault once per server
        # and session; a server ending it again would make us pay its replays over and over
        ended = kind in (proto.DISPLACED, proto.SESSION_EXPIRED)
        if fault and (not ended or bad.peer_id in self._expired_by):
            seq.ban(bad.peer_id, f"{type(err).__name__}: {err}")
        if ended:
            self._expired_by.add(bad.peer_id)
        if kind in (proto.DISPLACED, proto.SESSION_EXPIRED) and isinstance(bad, RemoteHop):  # ours replays free
            self._ended_by.add(bad.peer_id)
        for _ in range(self.model.client_config.max_recoveries + 1):
            try:
                new = await self._reroute(bad.start, bad.end)
            except Refused:
                raise
            except GenerationFailed as g:  # no route is left: say what broke the old one
                raise GenerationFailed(f"{g} (after {bad}: {type(err).__name__}: {err})") from err
            hop = None
            try:
                if self.position:
                    history = dict(self.history)
                    for hop in new:
                        inputs = torch.cat(history[hop.start], dim=1)
                        out = await self._run_route_hop(hop, inputs, 0, self.chunks)
                        history[hop.end] = list(out.split(self.chunks, dim=1))
                    for hop in new[:-1]:  # new inner boundaries; the outer ones are unchanged
                        self.history[hop.end] = history[hop.end]
            except (P2PError, trio.TooSlowError) as e:
                assert hop is not None  # only replaying through a hop raises
                seq.ban(hop.peer_id, f"replay failed: {type(e).__name__}: {e}")
                for h in new:
                    await self.close_hop(h, polite=False)
                continue
            except BaseException:  # cancelled or refused: not in self.hops yet, so closed (and released) here
                with trio.CancelScope(shield=True):
                    for h in new:
                        await self.close_hop(h)
                raise
            self.hops[index:index + 1] = new
            return
        raise GenerationFailed(f"could not rebuild blocks [{bad.start}, {bad.end}) on other servers")

    async def _reconnect(self, index: int, bad: RemoteHop) -> bool:
        """Replace hop `index` (`bad`, whose stream broke, or whose step timed out through a relay) by a
        fresh session with the same server, reached again at the addresses it announced (each dial within
        `dial_timeout`), and replay the history there: a server whose connection died or hangs (e.g. the
        relay it was reached through) but which is still reachable at another of its addresses is no
        faulty server. Once per server and session: a server
        breaking its streams again would make us pay its replays over and over. Whether it worked (if
        not, the caller bans the server and re-routes as for any fault); a server-specific refusal of the
        new session is raised (the server was reached: no fault)."""
        if bad.peer_id in self._reconnected:
            return False
        self._reconnected.add(bad.peer_id)
        seq, network, cfg = self.model.sequence, self.model.network, self.model.client_config
        info = seq.server(bad.peer_id)
        addrs = info.addrs if info is not None else ()
        if addrs and bad.peer_id not in network.connected_peers() and not await connect_announced(
                network, bad.peer_id, addrs, each=cfg.dial_timeout):
            log.info("%s: its server is reachable at none of its announced addresses", bad)
            return False
        seq.hold([bad.peer_id])
        hop: Hop | None = None
        try:
            hop = await self.open_hop(RouteHop(bad.peer_id, bad.start, bad.end), addrs)
            self._held.add(hop)
            if self.position:
                await self._run_route_hop(hop, torch.cat(self.history[hop.start], dim=1), 0, self.chunks)
        except (P2PError, trio.TooSlowError) as e:  # the caller bans it for the broken stream
            log.info("%s: a new session with its server failed too: %s: %s", bad, type(e).__name__, e)
            await self._drop_reconnect(bad.peer_id, hop)
            return False
        except BaseException:  # cancelled or refused
            with trio.CancelScope(shield=True):
                await self._drop_reconnect(bad.peer_id, hop)
            raise
        log.info("%s: reached its server again; session replayed there", bad)
        self.hops[index] = hop
        return True

    async def _drop_reconnect(self, peer_id: str, hop: Hop | None) -> None:
        """Undo a failed `_reconnect`: close its session (releasing its hold), or release the hold alone."""
        if hop is None:
            self.model.sequence.release([peer_id])
        else:
            await self.close_hop(hop, polite=False)

    async def _reroute(self, start: int, end: int) -> list[Hop]:
        """`_open_route` for a hop's blocks, leaving out (`avoid`) the servers that ended a hop of this
        session; with them when no other route is left (a paid replay rather than none)."""
        if self._ended_by:
            try:
                return await self._open_route(start, end, avoid=self._ended_by)
            except Refused as e:
                if not isinstance(e, SERVER_SPECIFIC):
                    raise
            except GenerationFailed:
                pass
        return await self._open_route(start, end)

    def keep(self, length: int) -> None:
        """Forget the positions from `length` on, inside the last step (the rejected drafts of a
        speculative pass): the next step starts at `length` and the servers roll their caches back to
        it; the history replayed after a failure holds only what was kept."""
        drop = self.position - length
        if drop <= 0:
            return
        if not self.chunks or drop >= self.chunks[-1]:
            raise ValueError(f"can only roll back inside the last step ({self.position} → {length})")
        self.chunks[-1] -= drop
        for inputs in self.history.values():
            inputs[-1] = inputs[-1][:, :self.chunks[-1]]
        self.position = length

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [1, n, hidden_size] (embeddings of new tokens) → output of the last block."""
        n = hidden.shape[1]
        pos = self.position
        if n == 0:
            return hidden
        if pos + n > self.max_length:
            raise ValueError(f"{pos + n} tokens exceed this session's max_length of {self.max_length}")
        hidden = hidden.to(self.model.dtype).contiguous()
        t0 = trio.current_time()
        inputs: dict[int, torch.Tensor] = {}
        i, h = 0, hidden
        recoveries = 0
        push_runs = self._push_runs() if self._push else {}
        while i < len(self.hops):
            hop = self.hops[i]
            run = push_runs.pop(hop, None)  # pushed once a step; what the push missed runs client-driven
            if run is not None:
                done, h, fault = await self._push_step(run, h, pos, inputs)
                for k in range(i, i + done):  # spot checks of the pushed outputs, in route order
                    liar = await self._spot_check(self.hops[k])
                    if liar is not None:
                        recoveries += 1
                        h = inputs[self.hops[k].start]
                        for j in range(k, len(self.hops)):
                            inputs.pop(self.hops[j].start, None)
                        await self._recover(k, WrongOutput(f"spot check: {liar} returned wrong outputs"))
                        done, fault = k - i, None
                        break
                i += done
                if fault is not None:
                    recoveries += 1
                    if recoveries > self.model.client_config.max_recoveries:
                        raise GenerationFailed(f"step at position {pos} failed {recoveries} times; last: {fault}") from fault
                    await self._recover(i, fault)
                continue
            try:
                out = await self._run_route_hop(hop, h, pos)
                liar = await self._spot_check(hop)
                if liar is not None:
                    raise WrongOutput(f"spot check: {liar[-8:]} returned wrong outputs for blocks [{hop.start}, {hop.end})")
            except Refused:  # not a fault: nothing to recover from
                raise
            except (P2PError, trio.TooSlowError, GenerationFailed) as e:
                recoveries += 1
                if recoveries > self.model.client_config.max_recoveries:
                    raise GenerationFailed(f"step at position {pos} failed {recoveries} times; last: {e}") from e
                await self._recover(i, e)
                continue
            inputs[hop.start] = h
            h = out
            i += 1
        for start, x in inputs.items():
            self.history.setdefault(start, []).append(x)
        self.chunks.append(n)
        self.position += n
        self.stats.steps += 1
        self.stats.step_wall_s += trio.current_time() - t0
        return h

    async def _spot_check(self, hop: Hop) -> str | None:
        """Maybe (as the check policy says for its server) check `hop`'s unverified steps; the hop's peer id
        if it lied (the caller replaces it), else None (a lying checker is dealt with inside)."""
        if self.checker is None or isinstance(hop, LocalHop) or not self.checker.selected(hop):
            return None
        liar = await self.checker.check(hop)
        return liar if liar == hop.peer_id else None

    def _push_runs(self) -> dict[Hop, list[RemoteHop]]:
        """The route's runs of two or more consecutive remote hops, by their first hop: what a step pushes."""
        runs: dict[Hop, list[RemoteHop]] = {}
        run: list[RemoteHop] = []
        for hop in [*self.hops, None]:
            if isinstance(hop, RemoteHop):
                run.append(hop)
                continue
            if len(run) > 1:
                runs[run[0]] = run
            run = []
        return runs

    async def _push_step(self, hops: list[RemoteHop], hidden: torch.Tensor, pos: int,
                         inputs: dict[int, torch.Tensor]) -> tuple[int, torch.Tensor, Exception | None]:
        """Send the step to the first of `hops` with the rest as its push list; collect every hop's output.
        Returns (how many hops gave an output, the input of the next, and the fault of that next hop when its
        own reply proved it at fault) for the client-driven loop. A push that did not get through (a broken
        stream, a reply for another step, inputs other than the client saw) is no proof against the hop:
        the rest runs client-driven. A reply the hop signed badly or whose "served" overstates what it was
        sent is its own doing: recovered from as the fault it is, as in a client-driven step (the hop's
        next receipt would otherwise be refused as unpaid work). So is no output at all from the first hop
        within the step timeout (a push has nothing to do with it; re-sending the step would wait again)."""
        self._step_id += 1
        step_id = self._step_id
        outs: list[tuple[torch.Tensor, float] | None] = [None] * len(hops)
        arrived = [0.0] * len(hops)  # seconds from sending the step to each hop's output: a bound on its compute
        cfg = self.model.client_config
        n = hidden.shape[1]
        for hp in hops:
            hp.note_sent(step_id, pos, n)
        msg = self._step_msg(hops[0], step_id, pos, hidden)
        msg["push"] = []
        for hp in hops[1:]:
            entry = {"peer": hp.peer_id, "session": hp.session_id}
            receipt = self._receipt(hp, {"id": step_id, "pos": pos, "tokens": n})
            if receipt is not None:
                entry["receipt"] = receipt  # the servers forward it untouched
            msg["push"].append(entry)
        failed = False
        refusal: Refused | None = None
        faults: dict[int, Exception] = {}
        came = [trio.Event() for _ in hops]

        async def collect(k: int, nursery: trio.Nursery) -> None:
            nonlocal failed, refusal
            try:
                due = math.inf  # the first hop: within the step timeout around the whole step
                if k:  # pushed: due soon after the hop before it (whose failure cancels this wait)
                    await came[k - 1].wait()
                    due = cfg.push_grace + 2 * arrived[k - 1]
                with trio.move_on_after(due):
                    outs[k] = await hops[k].receive_out(step_id, n, self.model.model_config.hidden_size,
                                                        self.model.dtype_name)
                if outs[k] is None:
                    log.info("push step: no output from %s in time; no more pushes this session", hops[k])
                    self._push = False
                    failed = True
                    nursery.cancel_scope.cancel()
                    return
                arrived[k] = trio.current_time() - sent_at
                came[k].set()
            except ReceiptRequired as e:
                if e.limit is not None and hops[k].reconcile(e.limit, step_id, pos, n):
                    failed = True  # it computed an earlier push we left: run it with a fresh receipt
                else:
                    refusal = e
                nursery.cancel_scope.cancel()
            except Refused as e:  # raised below, once the other hops' receives are cancelled
                refusal = e
                nursery.cancel_scope.cancel()
            except (OverstatedServed, BadSignedStep) as e:
                faults[k] = e
                nursery.cancel_scope.cancel()
            except (P2PError, FrameError) as e:
                log.info("push step: hop %s failed: %s", hops[k], e)
                failed = True
                nursery.cancel_scope.cancel()

        sent_at = trio.current_time()
        with trio.move_on_after(cfg.step_timeout) as step_scope:
            try:
                await hops[0].send_step(msg)
            except P2PError:
                failed = True
            if not failed:
                async with trio.open_nursery() as nursery:
                    for k in range(len(hops)):
                        nursery.start_soon(collect, k, nursery)
        if step_scope.cancelled_caught and outs[0] is None and not failed:
            faults[0] = trio.TooSlowError(f"no output in {cfg.step_timeout:g} s")
        if refusal is not None:
            raise refusal
        h = hidden
        for k, hop in enumerate(hops):
            got = outs[k]
            if got is None:
                if k in faults:
                    return k, h, faults[k]
                self.stats.push_fallbacks += 1
                return k, h, None
            out, c = got
            try:
                hop.accept(step_id, pos, (n,), h, out)
            except BadSignedStep as e:  # e.g. a push that carried other inputs than the client saw: run it directly
                log.info("push step: hop %s signed other inputs: %s", hop, e)
                self.stats.push_fallbacks += 1
                return k, h, None
            inputs[hop.start] = h
            if self.checker is not None:
                self.checker.record(hop, StepRecord(pos, h, (n,), out))
            h = out
            self.stats.compute_s += c
            self.model.sequence.observe_speed(hop.peer_id, n, hop.end - hop.start, c, arrived[k])
        return len(hops), h, None


def _telling(refusals: list[Refused]) -> Refused:
    """The refusal to raise when every server refused: the one offering the longest session (too
    long / cache full, so the caller learns the usable limit), else the last."""
    limited = [r for r in refusals if r.limit is not None]
    return max(limited, key=lambda r: r.limit or 0) if limited else refusals[-1]


class DistributedModel:
    """A model whose blocks run in the swarm; embeddings, final norm and LM head run here."""

    def __init__(self, folder: ModelFolder, head: ModelHead, network: Network, dht: SwarmDirectory, model_id: str, *,
                 tokenizer: Any = None, config: ClientConfig | None = None, local_server: LocalServer | None = None):
        """`local_server`: this peer's own BlockServer (on `network`), whose blocks then run in process."""
        self.folder = folder
        self.model_config = folder.config  # the architecture (pipeline/config.py)
        self.head = head
        self.network = network
        self.dht = dht
        self.model_id = model_id
        self.tokenizer = tokenizer
        self.client_config = config or ClientConfig()
        self.dtype = head.dtype
        self.dtype_name = proto.dtype_name(self.dtype)
        self.limiter = trio.CapacityLimiter(1)
        self.local_server = local_server
        self.sequence = SequenceManager(dht, model_id, self.model_config.num_layers, me=network.peer_id,
                                        local_blocks=local_server is not None)
        # the FLOPs the servers' tiers are checked against: the figure they place themselves by
        self.sequence.block_flops = functools.partial(tier_flops_per_token, self.model_config)
        billing = self.client_config.billing
        if billing is not None:
            billing.register_model(model_id, self.model_config)
            self.sequence.reliability_source = billing.reliability_by_peer
            billing.tier_source = self.sequence.believed_tier
            self.sequence.rate_of = billing.rate

    @classmethod
    async def from_pretrained(cls, model_folder: str | os.PathLike | ModelFolder, network: Network, dht: SwarmDirectory, *,
                              dtype: str = "float32", model_id: str | None = None, config: ClientConfig | None = None,
                              tokenizer: Any = "auto", local_server: LocalServer | None = None) -> "DistributedModel":
        """Load only embeddings / final norm / LM head (in a thread); the model id is computed from the
        folder unless given; the tokenizer comes from the folder when it has one (None otherwise)."""

        def load() -> tuple:
            mf = model_folder if isinstance(model_folder, ModelFolder) else ModelFolder(model_folder)
            head = load_head(mf, dtype=resolve_dtype(dtype), device="cpu")
            mid = model_id
            if mid is None:
                from .identity import model_id as compute_id

                mid = compute_id(mf)
            tok = tokenizer
            if tok == "auto":
                tok = None
                if any((mf.path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
                    from transformers import AutoTokenizer

                    tok = AutoTokenizer.from_pretrained(str(mf.path))
            return mf, head, mid, tok

        mf, head, mid, tok = await trio.to_thread.run_sync(load)
        return cls(mf, head, network, dht, mid, tokenizer=tok, config=config, local_server=local_server)

    # --- low level -------------------------------------------------------------------------------

    def inference_session(self, max_length: int, prefer: str | None = None) -> InferenceSession:
        return InferenceSession(self, max_length, prefer)

    async def embed(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
        if t.shape[1] <= 16:  # a table lookup of a few rows: cheaper than a thread hop
            return self.head.embed(t)
        return await trio.to_thread.run_sync(self.head.embed, t, limiter=self.limiter)

    async def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return await trio.to_thread.run_sync(self.head.logits, hidden, limiter=self.limiter)

    async def forward(self, input_ids: list[int] | torch.Tensor, *, chunk: int | None = None) -> torch.Tensor:
        """Logits [1, n, vocab] for a token sequence, through a fresh session (in steps of `chunk`)."""
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
        n = ids.numel()
        step = chunk or n
        outs = []
        async with self.inference_session(n) as session:
            for a in range(0, n, step):
                outs.append(await self.logits(await session.step(await self.embed(ids[a:a + step]))))
        return torch.cat(outs, dim=1)

    # --- text ------------------------------------------------------------------------------------

    def encode(self, prompt: str | list[int] | list[dict]) -> list[int]:
        """Token ids of a prompt: ids as they are, a string tokenized, a list of chat messages
        rendered with the tokenizer's chat template (with the assistant's turn opened)."""
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(cast("list[int]", prompt))
        if self.tokenizer is None:
            raise ValueError("this model folder has no tokenizer: pass token ids")
        if isinstance(prompt, list):
            ids = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return list(ids)
        return list(self.tokenizer(prompt)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _eos_ids(self) -> set[int]:
        eos = self.model_config.eos_token_id
        out = set([eos] if isinstance(eos, int) else (eos or []))
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            out.add(self.tokenizer.eos_token_id)
        return out

    async def stream(self, prompt: str | list[int] | list[dict], params: SamplingParams | None = None, *,
                     speculative: SpeculativeConfig | bool | None = None, prefer: str | None = None,
                     continuing: PartialAnswer | None = None,
                     **kw: Any) -> AsyncGenerator[TokenEvent | Finished, None]:
        """Generate token by token (`params`, or keyword fields of SamplingParams): a `TokenEvent` per
        token, then one `Finished` with the rest of the text and the `Generation`. The events' texts
        add up to the generation's text, whatever the finish reason. `speculative`: draft tokens and
        verify them several a pass (pipeline/speculative.py; the tokens are the same either way) —
        None: as `ClientConfig.speculative` says (on by default), False: off, True or a config: on.
        `prefer`: the route's preference, "fast", "green" or "cheap" (None: `ClientConfig.prefer`).
        `continuing`: the start of this answer, written by another generation that stopped (a failed
        swarm's): its tokens count toward max_new_tokens, the next is drawn at their index (a seeded
        sampler draws what the stopped generation would have), stop strings are looked for in the
        whole text, the events carry only text not shown yet, and the `Generation` holds every token."""
        params = params or SamplingParams(**kw)
        spec = (self.client_config.speculative if speculative is None else
                SpeculativeConfig() if speculative is True else speculative or None)
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        stops = set(params.stop_token_ids) if params.stop_token_ids is not None else self._eos_ids()
        sampler = Sampler(params)
        drafter = spec.drafter() if spec is not None else None
        draft_length = spec.draft_length() if spec is not None else None
        speculation = SpeculationStats() if spec is not None else None
        t0 = time.perf_counter()
        continuing = continuing or PartialAnswer()
        generated: list[int] = list(continuing.token_ids)
        first = len(generated)  # tokens of the answer generated before this stream
        shown = continuing.shown  # characters of the text the events (ours and the stopped ones') have carried
        finish_reason = "length"
        if first >= params.max_new_tokens:
            text = self.final_text(generated, params.stop)
            yield Finished(text[shown:], Generation(generated, text, finish_reason, len(ids)))
            return
        session = self.inference_session(len(ids) + params.max_new_tokens, prefer)
        async with session:
            # last position only
            logits = await self.logits((await session.step(await self.embed(ids + generated)))[:, -1:])
            ttft = time.perf_counter() - t0
            t_first = time.perf_counter()
            new = [sampler(logits[0, -1], first)]  # tokens chosen by the model, not yet shown
            done = False
            while not done:
                for tok in new:
                    i = len(generated)
                    if tok in stops:
                        finish_reason, done = "stop", True
                        break
                    generated.append(tok)
                    text = self.decode(generated)
                    cut = find_stop(text, params.stop) if params.stop else None
                    if cut is not None:
                        finish_reason, done = "stop", True
                        if cut > shown:
                            yield TokenEvent(tok, text[shown:cut], i, session.route)
                        shown = max(shown, cut)
                        break
                    upto = safe_prefix_len(text, params.stop)
                    delta = text[shown:upto] if upto > shown else ""
                    shown = max(shown, upto)
                    yield TokenEvent(tok, delta, i, session.route)
                    if len(generated) == params.max_new_tokens:
                        done = True
                        break
                if done:
                    break
                # one pass: the last token, and drafts of what may follow it (never past max_new_tokens)
                k = 0
                if drafter is not None and draft_length is not None:
                    k = min(draft_length.next_k(), params.max_new_tokens - len(generated) - 1)
                drafts = await drafter.draft(ids + generated, k) if drafter is not None and k > 0 else []
                pos = session.position
                t_pass = time.perf_counter()
                logits = await self.logits(await session.step(await self.embed([generated[-1], *drafts])))
                new = verify(sampler, logits[0], drafts, len(generated))
                session.keep(pos + len(new))  # the servers roll the rejected drafts back at the next step
                if speculation is not None and draft_length is not None:
                    draft_length.observe(len(drafts), len(new) - 1, time.perf_counter() - t_pass)
                    speculation.passes += 1
                    speculation.drafted += len(drafts)
                    speculation.accepted += len(new) - 1
                    speculation.tokens += len(new)
            wall = time.perf_counter() - t0
            decode_wall = time.perf_counter() - t_first
            route = session.route
        # After the sessions closed: what this client signed for them is known (`paid`).
        text = self.final_text(generated, params.stop)
        stats = session.stats
        yield Finished(text[shown:], Generation(
            generated, text, finish_reason, len(ids), route=route, servers=list(stats.servers),
            steps=stats.steps, recoveries=stats.recoveries, push_fallbacks=stats.push_fallbacks,
            spot_checks=stats.spot_checks, paid=list(stats.paid), ttft_s=ttft, wall_s=wall,
            decode_s=decode_wall,
            tokens_per_s=(len(generated) - first - 1) / decode_wall if len(generated) - first > 1 and decode_wall > 0
            else 0.0,
            compute_s=stats.compute_s, network_s=max(0.0, stats.step_wall_s - stats.compute_s),
            speculation=speculation))

    def final_text(self, token_ids: list[int], stop: list[str]) -> str:
        """The text of generated tokens, cut before the first stop string."""
        text = self.decode(token_ids)
        cut = find_stop(text, stop) if stop else None
        return text if cut is None else text[:cut]

    async def generate(self, prompt: str | list[int] | list[dict], params: SamplingParams | None = None, *,
                       speculative: SpeculativeConfig | bool | None = None, prefer: str | None = None,
                       **kw: Any) -> Generation:
        generation = None
        async with aclosing(self.stream(prompt, params, speculative=speculative, prefer=prefer, **kw)) as events:
            async for event in events:
                if isinstance(event, Finished):
                    generation = event.generation
        if generation is None:
            raise RuntimeError("the stream ended without its Finished event")
        return generation

    async def chat(self, messages: list[dict], params: SamplingParams | None = None, **kw: Any) -> Generation:
        return await self.generate(messages, params, **kw)
