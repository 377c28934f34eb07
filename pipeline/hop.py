"""The client's end of one session with one server for blocks [start, end): a `Hop`.

A `RemoteHop` is a stream to another peer: `RemoteHop.open` (first, when the peer is not connected,
`connect_announced`: the addresses its announcement lists, staggered) sends "open" and waits for "opened";
"opened" states the session's rate when the server bills (`rate`, what the receipts must carry);
`send_step` / `receive_out` carry one step (the reply is checked: its step id, token count,
finiteness, and the server's signature over the result, pipeline/proofs.py); once the step's inputs
are known (at once, or after a push collected every hop's output) `accept` checks the signed input
digest and keeps the step in the hop's signed history `log`, what a dispute proof is built from. A
bad signed result is a `BadSignedStep` (a FrameError: a fault, like a broken stream). The hop counts
the tokens of the steps it sent that the server answered, less the rolled-back drafts, by the server's
own rule (`counted`); "served" (what the client signs for) above that count is an `OverstatedServed`,
a fault too. A step sent on a stream the server closed raises the error reply it left there (why it
ended the session: SessionExpired) when there is one. `close` ends the session, with the final
receipt when there is one. A `LocalHop` is a session with this peer's own BlockServer (`LocalServer`), in process: `run` is a call, with no stream
and no serialisation, and nothing to sign for (serving ourselves is free). Either way a server's
refusal (a refusal kind, pipeline/errors.py) is raised as the typed `Refused` it maps to, with the
server's error as its cause; other errors stay `InferenceError`s (faults). A `StepRecord` is what
one completed step of a hop sent and got back (the spot checker keeps them, pipeline/spotcheck.py).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn, Protocol

import torch
import trio

from credits.receipts import MAX_RATE
from p2p.errors import FrameError, P2PError, StreamClosed
from p2p.identity import public_key_from_peer_id
from p2p.network import Network, Stream

from . import protocol as proto
from .errors import REFUSALS
from .model import CacheError
from .proofs import SEED_LEN, BadSignedStep, ProvenLog, SignedStep, check_signed
from .protocol import InferenceError, expect_reply, unpack_hidden
from .routing import RouteHop

log = logging.getLogger(__name__)


DIAL_STAGGER = 0.25
"""Seconds an announced address's dial has to itself before the next one starts too (RFC 8305's
connection attempt delay): a black hole first costs this, not a whole dial timeout."""


async def connect_announced(network: Network, peer_id: str, addrs: Sequence[str], *, each: float,
                            stagger: float = DIAL_STAGGER) -> bool:
    """Connect to `peer_id` at the addresses its announcement lists (`ServerInfo.addrs`, at most
    `MAX_ANNOUNCED_ADDRS`), only those our network may dial (`Network.may_dial`: a stranger's address
    must not aim us at this host or the networks behind it), Happy-Eyeballs style: in order, the next
    dial starting when the one before failed or after `stagger` seconds (`math.inf`: in turn, as
    bench/hop.py's baseline), each within `each` seconds;
    the first that reaches `peer_id` (a dial reaching another peer is a failure) wins and the others are
    cancelled. The winner is where the network dials the peer from now on (the others stay out of the
    address book). Whether one did."""
    allowed = []
    for addr in addrs:
        if network.may_dial(addr):
            allowed.append(addr)
        else:
            log.debug("not dialling %s at %s: an address we may not dial", peer_id[-8:], addr[:80])
    won: list[str] = []
    async with trio.open_nursery() as nursery:
        for addr in allowed:
            failed = trio.Event()
            nursery.start_soon(_dial_one, network, peer_id, addr, each, failed, won, nursery.cancel_scope)
            with trio.move_on_after(stagger):
                await failed.wait()
    if not won:
        return False
    network.add_address(peer_id, won[0])
    return True


async def _dial_one(network: Network, peer_id: str, addr: str, timeout: float, failed: trio.Event,
                    won: list[str], race: trio.CancelScope) -> None:
    """One dial of `connect_announced`'s race: `failed` is set unless it reaches `peer_id`; then `addr`
    joins `won` and the race is over (`race` cancelled)."""
    try:
        reached = await network.connect(addr, timeout=timeout)
    except (P2PError, trio.TooSlowError) as e:
        log.debug("could not dial %s at %s: %s", peer_id[-8:], addr[:80], e)
        failed.set()
        return
    if reached != peer_id:
        log.debug("dialled %s at %s and reached %s", peer_id[-8:], addr[:80], reached[-8:])
        failed.set()
        return
    won.append(addr)
    race.cancel()


def _raise_typed(e: InferenceError, peer_id: str) -> NoReturn:
    """Raise a server's error `e`: as the typed `Refused` its kind maps to, else as it is (a fault)."""
    refusal = REFUSALS.get(e.kind)
    if refusal is None:
        raise e
    raise refusal(e.kind, e.message, peer_id=peer_id, limit=e.limit) from e


async def _receive_reply(stream: Stream, kind: str, peer_id: str) -> dict:
    """The next reply on `stream`, of type `kind`; a refusal raises its typed `Refused`."""
    msg = await stream.receive()
    try:
        return expect_reply(msg, kind)
    except InferenceError as e:
        _raise_typed(e, peer_id)


class OverstatedServed(FrameError):
    """An "out" whose "served" exceeds the tokens the client sent that session (less the refunds): a fault."""


@dataclass(frozen=True)
class StepRecord:
    """A completed step of a hop: its position, inputs, the chunks they ran in, and the outputs."""

    pos: int
    inputs: torch.Tensor  # [1, tokens, hidden]
    chunks: tuple[int, ...]
    outputs: torch.Tensor  # [1, tokens, hidden]

    @property
    def tokens(self) -> int:
        return self.inputs.shape[1]

    def upto(self, end: int) -> "StepRecord":
        """This step without its positions from `end` on (rejected drafts rolled back), `end` > `pos`."""
        keep = end - self.pos
        if keep >= self.tokens:
            return self
        chunks, total = [], 0
        for c in self.chunks:
            if total + c >= keep:
                chunks.append(keep - total)
                break
            chunks.append(c)
            total += c
        return StepRecord(self.pos, self.inputs[:, :keep], tuple(chunks), self.outputs[:, :keep])


class RemoteHop:
    """One open session with another peer's server for blocks [start, end), over a stream."""

    def __init__(self, peer_id: str, start: int, end: int, stream: Stream, session_id: bytes, *,
                 model_id: str, dtype: str, seed: bytes, rate: int | None = None):
        self.peer_id, self.start, self.end = peer_id, start, end
        self.stream, self.session_id = stream, session_id
        self.model_id, self.dtype, self.seed = model_id, dtype, seed
        self.server_key = public_key_from_peer_id(peer_id)
        self.rate = rate  # the session's rate, as "opened" stated it (None: the server bills nothing)
        self.served = 0  # tokens the server says it has computed in this session, at most `counted` (what we sign for)
        self.counted = 0  # tokens of our steps the server answered, less rolled-back drafts (the server's own rule)
        self.last_pos, self.last_tokens = 0, 0  # the last answered step (what a rollback may credit back)
        self.sent: dict[int, tuple[int, int]] = {}  # step id → (pos, tokens) of steps sent, until answered
        self.closed = False
        self.signed: dict[int, SignedStep] = {}  # step id → its signed result, until its inputs are accepted
        self.log = ProvenLog(session_id)  # the signed history: what a dispute proof is built from

    def __repr__(self) -> str:
        return f"<hop {self.peer_id[-6:]} [{self.start},{self.end})>"

    @classmethod
    async def open(cls, network: Network, hop: RouteHop, addrs: Sequence[str], *, model_id: str, max_length: int,
                   dtype: str, timeout: float) -> "RemoteHop":
        """A session with `hop`'s server, which announced `addrs`, within `timeout` (its dials included)."""
        stream = None
        try:
            with trio.fail_after(timeout):
                if addrs and hop.peer_id not in network.connected_peers():
                    # each address gets its share of the time: a dead first one leaves the others theirs
                    await connect_announced(network, hop.peer_id, addrs, each=timeout / len(addrs))
                stream = await network.open_stream(hop.peer_id, proto.INFERENCE)
                seed = secrets.token_bytes(SEED_LEN)  # ours, so the server cannot aim a lie at the fingerprint
                await stream.send({"t": "open", "model": model_id, "start": hop.start, "end": hop.end,
                                   "max_length": max_length, "dtype": dtype, "seed": seed})
                reply = await _receive_reply(stream, "opened", hop.peer_id)
            sid = reply.get("session")
            if not isinstance(sid, bytes) or len(sid) != proto.SESSION_ID_LEN:
                raise FrameError("'opened' reply lacks a session id")
            rate = reply.get("rate")
            if rate is not None and (not isinstance(rate, int) or isinstance(rate, bool) or not 1 <= rate <= MAX_RATE):
                raise FrameError(f"'opened' reply's rate is not an integer in [1, {MAX_RATE}]")
            return cls(hop.peer_id, hop.start, hop.end, stream, sid, model_id=model_id, dtype=dtype, seed=seed, rate=rate)
        except BaseException:
            if stream is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                    try:
                        await stream.aclose()
                    except P2PError:
                        pass
            raise

    async def send_step(self, msg: dict) -> None:
        try:
            await self.stream.send(msg)
        except StreamClosed:
            await self._last_word()
            raise

    async def _last_word(self) -> None:
        """The server closed the stream: raise its error reply still waiting there (why it ended the
        session, e.g. SessionExpired), if there is one."""
        with trio.move_on_after(1.0):
            try:
                last = await self.stream.receive()
            except P2PError:
                return
            if isinstance(last, dict) and last.get("t") == "error":
                expect_reply(last, "out")  # raises it, an InferenceError

    def note_sent(self, step_id: int, pos: int, tokens: int) -> None:
        """Step `step_id` (`tokens` at `pos`) is on its way to the server, sent or pushed: what its "out" counts."""
        self.sent[step_id] = (pos, tokens)

    def _count(self, step_id: int) -> None:
        """The server answered step `step_id`, so computed it: count it as the server does (pipeline/server.py
        `_run`); steps sent before it and never answered (stale pushes) were not computed: the server
        answers a session's steps in the order it computes them."""
        step = self.sent.pop(step_id, None)
        self.sent = {i: s for i, s in self.sent.items() if i > step_id}
        if step is None:
            return
        pos, tokens = step
        self.counted += tokens - proto.refunded_tokens(self.last_pos, self.last_tokens, pos)
        self.last_pos, self.last_tokens = pos, tokens

    def reconcile(self, covered: int, step_id: int, pos: int, n: int) -> bool:
        """The server refused step `step_id` (`n` tokens at `pos`, so not computed) with ReceiptRequired,
        asking receipts for `covered` tokens. True when that is what it counts had it computed the steps
        it answered without our reading their "served" (skipped outs), then the first of those still
        unanswered (pushes whose replies we stopped waiting for): the hop's count moves there, and a fresh
        receipt for the step is due. Never beyond what `_count` would give: we still sign for no step we
        did not send."""
        self.sent.pop(step_id, None)
        state = (self.counted, self.last_pos, self.last_tokens)
        unanswered = sorted(i for i in self.sent if i < step_id)
        for k in range(len(unanswered) + 1):
            counted, last_pos, last_tokens = state
            if counted - proto.refunded_tokens(last_pos, last_tokens, pos) + n == covered:
                for i in unanswered[:k]:
                    self._count(i)
                self.served = self.counted
                return True
            if k < len(unanswered):
                p, t = self.sent[unanswered[k]]
                state = (counted + t - proto.refunded_tokens(last_pos, last_tokens, p), p, t)
        return False

    async def receive_out(self, step_id: int, n: int, hidden_size: int, dtype: str) -> tuple[torch.Tensor, float]:
        """The "out" for `step_id` (older outs, e.g. duplicates after a fallback, are skipped)."""
        while True:
            m = await _receive_reply(self.stream, "out", self.peer_id)
            got = m.get("id")
            if not isinstance(got, int) or got > step_id:
                raise FrameError(f"reply for step {got!r} while waiting for step {step_id}")
            self._count(got)  # skipped outs too: the server computed them
            if got < step_id:
                continue
            out = unpack_hidden(m.get("h"), dtype=dtype, hidden_size=hidden_size)
            if out.shape[1] != n:
                raise FrameError(f"server returned {out.shape[1]} tokens for a step of {n}")
            if not torch.isfinite(out).all():
                raise FrameError("server returned non-finite hidden states")
            self.signed = {step_id: check_signed(m.get("signed"), server=self.server_key, model=self.model_id,
                                                 start=self.start, end=self.end, dtype=self.dtype,
                                                 session=self.session_id, step=step_id, seed=self.seed, outputs=out)}
            served = m.get("served")
            if isinstance(served, int) and not isinstance(served, bool) and served >= 0:
                if served > self.counted:  # we would sign for work we never sent (or skipped refunds)
                    raise OverstatedServed(f"server claims {served} tokens served, we sent {self.counted}")
                self.served = served
            c = m.get("compute_s")
            return out, float(c) if isinstance(c, (int, float)) and not isinstance(c, bool) else 0.0

    def accept(self, step_id: int, pos: int, chunks: list[int] | tuple[int, ...], inputs: torch.Tensor,
               outputs: torch.Tensor) -> None:
        """The inputs of step `step_id` (received by `receive_out`) are known: the server must have signed
        them (BadSignedStep, a fault, otherwise); the step joins the signed history `log`."""
        record = self.signed.pop(step_id, None)
        if record is None:
            raise BadSignedStep(f"no signed result for step {step_id}")
        self.log.accept(record, pos, chunks, inputs, outputs)

    def billed_before(self, pos: int) -> int:
        """What the server counts as served before a step at `pos`: `served` less the rejected drafts
        that step rolls back (pipeline/protocol.py `refunded_tokens`, the server's own rule)."""
        return self.served - proto.refunded_tokens(self.last_pos, self.last_tokens, pos)

    async def close(self, polite: bool = True, receipt: list | None = None) -> None:
        self.closed = True
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            try:
                if polite:
                    await self.stream.send({"t": "close"} if receipt is None else {"t": "close", "receipt": receipt})
                await self.stream.aclose()
            except P2PError:
                pass


class LocalServerSession(Protocol):
    """A session of this peer's own server (pipeline/server.py `InProcessSession`)."""

    @property
    def id(self) -> bytes: ...

    async def run(self, hidden: torch.Tensor, pos: int, chunks: list[int] | None) -> tuple[torch.Tensor, float]:
        """(outputs, compute seconds); the server's checks raise InferenceErrors."""

    def close(self) -> None: ...


class LocalServer(Protocol):
    """What a `LocalHop` uses of this peer's own BlockServer (pipeline/server.py)."""

    async def open_local(self, model: str, start: int, end: int, max_length: int, dtype: str) -> LocalServerSession:
        """A session admitted like a stream's "open" (refusals raised as InferenceErrors)."""


class LocalHop:
    """One open session with this peer's own server for blocks [start, end), in this process."""

    addr: str | None = None  # nothing to dial

    def __init__(self, peer_id: str, start: int, end: int, session: LocalServerSession):
        self.peer_id, self.start, self.end = peer_id, start, end
        self.session, self.session_id = session, session.id
        self.closed = False

    def __repr__(self) -> str:
        return f"<local hop [{self.start},{self.end})>"

    @classmethod
    async def open(cls, server: LocalServer, hop: RouteHop, *, model_id: str, max_length: int,
                   dtype: str) -> "LocalHop":
        try:
            session = await server.open_local(model_id, hop.start, hop.end, max_length, dtype)
        except InferenceError as e:
            _raise_typed(e, hop.peer_id)
        return cls(hop.peer_id, hop.start, hop.end, session)

    async def run(self, h: torch.Tensor, pos: int, chunks: list[int] | None) -> tuple[torch.Tensor, float]:
        """One step (or a replay of several, `chunks`): (outputs, compute seconds)."""
        try:
            out, compute_s = await self.session.run(h, pos, chunks)
        except InferenceError as e:
            _raise_typed(e, self.peer_id)
        except CacheError as e:  # what a stream's session answers as an error reply: a fault
            raise InferenceError("CacheError", str(e)) from e
        if not torch.isfinite(out).all():
            raise FrameError("our own server returned non-finite hidden states")
        return out.to("cpu"), compute_s

    def close(self) -> None:
        self.closed = True
        self.session.close()


Hop = RemoteHop | LocalHop
