"""Credits inside inference sessions: receipts per step, earn / spend entries, admission, compute priority.

The peer wires one object on each side (see `ServerBilling` / `ClientBilling`):

    ledger = Ledger.open(identity, data_dir, pricing=ModelPricing())
    server = BlockServer(network, dht, folder, a, b, config=ServerConfig(...), billing=ServerBilling(ledger))
    model = await DistributedModel.from_pretrained(folder, network, dht,
                                                   config=ClientConfig(billing=ClientBilling(ledger)))

Both register the model's config with the ledger's pricing (`ModelPricing.register`) when the model is
loaded, so the receipts they sign or check can be priced; every other verifier of those receipts must
know the config too (the default model's is built in; a peer that loads a model registers it).

The protocol (pipeline/protocol.py carries it; the fields below are additions of this module):

- Session id: the server's 16-byte session id is the receipt's session id (unique per server and
  session, so per (client, session, server) the receipt counter rises and replays are refused).
- Every "out" reply carries "served": the tokens the server has computed in this session so far
  (all steps, replays and re-runs included); the client counts the same itself and takes a larger
  claim for a fault (pipeline/hop.py `OverstatedServed`). With each step the client signs a cumulative
  receipt (`ReceiptSigner`) for that count PLUS the step's own tokens — a signed commitment to pay for the
  step before it is computed — and sends it as the step's "receipt"; in push mode each push-list
  entry carries its hop's receipt and the servers forward it untouched (they cannot alter it: it is
  signed by the client).
- The server checks the receipt BEFORE computing (`ServerBilling.commit`): a receipt that is not for
  this (server, client, model, span, session), is not newer, claims more than was served plus the
  step, is not signed by the client or is mispriced (FLOPs re-computed from the model config) is
  refused with `BadReceipt`; a step whose tokens the receipts held do not cover is refused with
  `ReceiptRequired: the client stopped signing receipts`; and, unless the server is idle (no other
  client's session open), a step that would put what the client owes (its unsettled receipts across
  all its sessions here, plus spent − granted as this server's ledger shows it) past its allowance
  (`CreditPolicy.debt_limit` + its standing in this server's own view, `credits.admission`) is
  refused with `CreditRefused`. So no step or prefill is computed unpaid, and what a server can lose
  to a client that never pays up is that client's allowance (a fresh key: `debt_limit`).
  A step that is not computed after all gives its receipt back (`ServerAccount.rollback`).
- "close" carries the final receipt (covering the last step). The server appends its latest receipt
  to its chain as an *earn* entry when the session ends (close, expiry, disconnect, shutdown) and,
  for long sessions, every `earn_every` receipts or `earn_interval` seconds; the ledger refuses a
  replayed or non-increasing counter, so a settle never double-counts. The client appends its latest
  receipt per hop as the matching *spend* when it closes (or abandons) the hop. Balances follow from
  the servers' earn entries alone (see credits.ledger), so a client that skips its spends still pays.
- Rates (a swarm's `PricingPolicy`, pipeline/pricing.py; pure FLOPs by default): each session has one
  rate, the server's. The "opened" reply states it (`ServerBilling.rate`: its policy's rate for the tier
  it announces and its precision, `set_tier`), and the server accepts receipts at exactly that rate for
  the session (anything else is `BadReceipt`). The client signs at that rate when it is at most what it
  believes the server's tier is worth (`ClientBilling.agree`; `tier_source`, from routing, and the
  session's dtype); otherwise it refuses the server for this route (`RateRefused`, server-specific: it
  re-routes, and bans nobody). So no client can pay a server less than it asks, and no server can charge
  more than the client believes. The receipt is both the earn and the spend: what the client pays is
  exactly what the server earns.
- Admission: on "open" the server calls `Admission.admit(client, idle=<no other session open>)`; a
  client past its allowance is refused with `CreditRefused` and how to earn, unless the server is
  idle (free when idle).
- Priority: every torch job goes through `PriorityLimiter` (pipeline/limiter.py; it replaces the
  plain CapacityLimiter in front of the compute threads): waiting steps are served highest client
  standing (in this server's view) first, FIFO within an equal standing — a farmed balance buys no
  place in the queue; loading and cache allocation go first (priority +inf).

Reliability (`Ledger.reliability`): how much a peer trusts a server, from what it checked itself —
0 for a server it proved a liar (a dispute whose proof it re-ran, pipeline/disputes.py, or its own
referee-backed spot check, `ClientBilling.dispute`), for a peer whose accusation it found false, and
for a forked author — folded with what it saw itself (spot checks passed / failed, hop failures;
`SequenceManager`). Servers sign every step's result (pipeline/proofs.py), so a dispute carries
the accused's own signature over what it returned and the inputs it ran on: anyone holding the span
can check it, and a dispute nobody could check counts nothing. Disputes never move balances: the
fold stays the same everywhere and conserved, so dispute spam changes nobody's balance; a proven
liar's work is worth 0 in the standing of the peers that proved it (credits.standing). Servers
announce their own factor in ServerInfo, but routing never takes a self-report above its own view:
it uses min(announced, observed).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import trio

from credits import RATE_UNIT, CreditRefused, InvalidReceipt, Ledger, Receipt, ReceiptSigner, ReceiptTracker, StandingView
from credits.admission import Admission
from p2p.identity import peer_id_from_public_key, public_key_from_peer_id

from .proofs import MAX_FETCHED_PROOF, MAX_PROOF_BYTES, DisputeClaim, DisputeProof, is_claim
from .proofshelf import ProofShelf
from .pricing import FLOPS_POLICY, ModelPricing
from .errors import RateRefused
from .protocol import InferenceError
from .tiers import MIN_MILLI

log = logging.getLogger(__name__)

EARN_HINT = ("To earn standing, serve blocks of this model: `potluck serve --model {model} --blocks auto` "
             "(or wait for an idle server).")


# --- server side ------------------------------------------------------------------------------------------


def _register(pricing: Any, model_id: str, config: Any) -> None:
    reg = getattr(pricing, "register", None)
    if reg is not None and config is not None and not (getattr(pricing, "knows", None) and pricing.knows(model_id)):
        reg(model_id, config)


def parse_receipt(obj: Any) -> Receipt:
    """A receipt from the wire (a list, as `Receipt.to_list`); InferenceError("BadReceipt") if malformed."""
    try:
        return Receipt.from_list(obj)
    except InvalidReceipt as e:
        raise InferenceError("BadReceipt", f"malformed receipt: {e}") from None


@dataclass(eq=False)  # one per session, kept in sets
class ServerAccount:
    """One session's credit state on the server."""

    billing: "ServerBilling"
    client: bytes
    tracker: ReceiptTracker
    priority: float
    priority_at: float
    rate: int = RATE_UNIT  # the session's rate, stated in "opened": its receipts carry exactly this one
    recorded_counter: int = 0
    recorded_flops: int = 0
    recorded_at: float = 0.0
    lock: trio.Lock = field(default_factory=trio.Lock)

    @property
    def unsettled_flops(self) -> int:
        """What the receipts held here are worth beyond the last earn entry (not in the ledger yet)."""
        latest = self.tracker.latest
        return latest.flops - self.recorded_flops if latest is not None else 0

    @property
    def standing(self) -> bool:
        """The client has standing in this server's view (as of the last priority refresh)."""
        return self.priority > 0

    def check(self, receipt: Any, covered_tokens: int, *, require: bool = True) -> Receipt | None:
        """Accept `receipt` (if any; the one already held again is fine), which may cover up to
        `covered_tokens`, then require that the receipts held cover all `covered_tokens`. Returns the
        receipt held before (see `rollback`). Raises InferenceError ("BadReceipt" or "ReceiptRequired")."""
        previous = self.tracker.latest
        r = parse_receipt(receipt) if receipt is not None else None
        if r is not None and r == previous:
            r = None  # the one held, again
        if r is not None and r.rate != self.rate:
            self.billing.stats["bad_receipts"] += 1
            raise InferenceError("BadReceipt", f"receipt priced at rate {r.rate}; this session's rate is {self.rate}")
        if r is not None:
            try:
                self.tracker.accept(r, served_tokens=covered_tokens)
            except InvalidReceipt as e:
                self.billing.stats["bad_receipts"] += 1
                raise InferenceError("BadReceipt", f"receipt refused: {e}") from None
        if require:
            try:
                self.tracker.require(covered_tokens)
            except InvalidReceipt as e:
                self.billing.stats["unpaid_refusals"] += 1
                self.rollback(previous)
                # the count asked for goes with it: a client that stopped waiting for a pushed step's
                # reply learns that the step was computed (pipeline/hop.py `RemoteHop.reconcile`)
                raise InferenceError("ReceiptRequired", f"the client stopped signing receipts: {e}",
                                     covered_tokens) from None
        return previous

    def rollback(self, previous: Receipt | None) -> None:
        """The step a receipt committed to was not computed: hold the receipt from before it again."""
        self.tracker.latest = previous

    def due(self, now: float) -> bool:
        """A periodic earn entry is due (long sessions)."""
        latest = self.tracker.latest
        if latest is None or latest.counter <= self.recorded_counter:
            return False
        return (latest.counter - self.recorded_counter >= self.billing.earn_every
                or now - self.recorded_at >= self.billing.earn_interval)


class ServerBilling:
    """The server's side: admission, receipt checks, earn entries, compute priority. Pass it to
    `BlockServer(..., billing=ServerBilling(ledger))`."""

    def __init__(self, ledger: Ledger, pricing: Any = None, *, standing: StandingView | None = None,
                 earn_every: int = 256, earn_interval: float = 60.0, priority_ttl: float = 1.0,
                 model_name: str | None = None, clock: Callable[[], float] = time.monotonic):
        """`standing`: this peer's view of others (the peer shares its own; default: a new one on
        `ledger`). `earn_every` / `earn_interval`: a long session's receipt is appended as an earn entry
        every that many receipts or seconds (and always at its end). `model_name`: what `--model` the
        refusal message suggests (the served folder or hub id)."""
        self.ledger = ledger
        self.admission = Admission(ledger, standing)
        self.model_name = model_name
        self.pricing = pricing if pricing is not None else ledger.pricing
        self.policy = self.pricing.policy if isinstance(self.pricing, ModelPricing) else FLOPS_POLICY
        # the rate a session opened now is priced at (set_tier); pure FLOPs until then
        self.rate = RATE_UNIT
        self.earn_every = earn_every
        self.earn_interval = earn_interval
        self.priority_ttl = priority_ttl
        self.clock = clock
        self.me = ledger.me
        self.started = clock()
        self.open_accounts: dict[bytes, set[ServerAccount]] = {}  # client → its sessions' accounts
        self.stats = {"admitted": 0, "admitted_idle": 0, "refused": 0, "bad_receipts": 0, "unpaid_refusals": 0,
                      "over_allowance": 0, "earn_entries": 0, "earned_flops": 0}

    def register_model(self, model_id: str, config: Any) -> None:
        _register(self.pricing, model_id, config)

    def set_tier(self, tier_milli: int, dtype: str) -> None:
        """Price sessions opened from now on at the tier multiplier `tier_milli` / 1000 in `dtype` (the
        policy may ignore either); a session keeps the rate it opened at."""
        self.rate = self.policy.rate(tier_milli, dtype)

    async def open(self, peer_id: str, *, session: bytes, model: str, start: int, end: int,
                   idle: bool) -> ServerAccount | None:
        """Admit a client's new session (raises InferenceError("CreditRefused") past its allowance
        while busy) and start its account; None for this peer's own sessions (serving itself is free)."""
        try:
            client = public_key_from_peer_id(peer_id)
        except ValueError:
            raise InferenceError("BadPeer", "the client's peer id does not name an Ed25519 key") from None
        if client == self.me:
            return None
        try:
            position = await self.admission.admit(client, idle=idle)
        except CreditRefused as e:
            self.stats["refused"] += 1
            raise InferenceError("CreditRefused", f"{e} {EARN_HINT.format(model=self.model_name or '<model>')}") from None
        self.stats["admitted"] += 1
        if idle:
            self.stats["admitted_idle"] += 1
        tracker = ReceiptTracker(server=self.me, client=client, model=model, start=start, end=end, session=session,
                                 pricing=self.pricing)
        now = self.clock()
        account = ServerAccount(self, client, tracker, float(position.standing), now, rate=self.rate,
                                recorded_at=now)
        self.open_accounts.setdefault(client, set()).add(account)
        return account

    async def commit(self, account: ServerAccount, receipt: Any, *, served: int, step_tokens: int,
                     idle: bool) -> Receipt | None:
        """Before computing a step of `step_tokens` after `served` tokens: the step's receipt must
        cover both (a signed commitment to pay), and unless `idle`, what the client owes (the step
        included) must stay within its allowance (`credits.admission`). Returns the receipt held before, for
        `ServerAccount.rollback` if the step is not computed. Raises InferenceError ("BadReceipt",
        "ReceiptRequired", "CreditRefused")."""
        previous = account.check(receipt, served + step_tokens)
        if idle:
            return previous
        position = await self.admission.position(account.client)
        unsettled = sum(a.unsettled_flops for a in self.open_accounts.get(account.client, ()))
        try:
            self.admission.check(position, unsettled)
        except CreditRefused as e:
            account.rollback(previous)
            self.stats["over_allowance"] += 1
            raise InferenceError("CreditRefused",
                                 f"{e} {EARN_HINT.format(model=self.model_name or '<model>')}") from None
        return previous

    async def end(self, account: ServerAccount) -> None:
        """The session is over: its earn entry, and it no longer counts as open."""
        try:
            await self.settle(account)
        finally:
            self.forget(account)

    def forget(self, account: ServerAccount) -> None:
        """`account`'s session is gone (or never opened): it no longer counts as open."""
        accounts = self.open_accounts.get(account.client)
        if accounts is not None:
            accounts.discard(account)
            if not accounts:
                del self.open_accounts[account.client]

    async def priority(self, account: ServerAccount) -> float:
        """The client's standing in this server's view (FLOPs), refreshed at most every `priority_ttl` seconds."""
        now = self.clock()
        if now - account.priority_at >= self.priority_ttl:
            account.priority_at = now
            account.priority = float(await self.admission.view.standing(account.client))
        return account.priority

    async def settle(self, account: ServerAccount) -> bool:
        """Append the latest receipt as an earn entry if it is newer than the last one; True if appended."""
        async with account.lock:
            latest = account.tracker.latest
            if latest is None or latest.counter <= account.recorded_counter:
                return False
            try:
                await self.ledger.record_earn(latest)
            except InvalidReceipt as e:  # e.g. a receipt whose counter this chain already passed
                log.warning("earn entry refused by our own ledger: %s", e)
                account.recorded_counter = latest.counter
                account.recorded_flops = latest.flops
                return False
            account.recorded_counter = latest.counter
            account.recorded_flops = latest.flops
            account.recorded_at = self.clock()
            self.stats["earn_entries"] += 1
            self.stats["earned_flops"] = self.stats.get("earned_flops", 0) + latest.flops
            return True

    async def reliability(self) -> float:
        """What this server announces: its standing in its own ledger (`Ledger.reliability`)."""
        return (await self.ledger.reliability()).get(self.me, 1.0)


# --- client side ------------------------------------------------------------------------------------------


class ClientBilling:
    """The client's side: signs cumulative receipts per (server, session), records spends, files
    disputes. Pass it as `ClientConfig(billing=ClientBilling(ledger))`."""

    def __init__(self, ledger: Ledger, pricing: Any = None, *, shelf: ProofShelf | None = None,
                 inline_proof_bytes: int = MAX_PROOF_BYTES):
        """`shelf`: where proofs larger than `inline_proof_bytes` are kept and served to verifiers
        (pipeline/proofshelf.py; the peer serves it on its network); None: such disputes are not filed."""
        self.ledger = ledger
        self.shelf = shelf
        self.inline_proof_bytes = min(inline_proof_bytes, MAX_PROOF_BYTES)
        self.identity = ledger.identity
        self.pricing = pricing if pricing is not None else ledger.pricing
        self.policy = self.pricing.policy if isinstance(self.pricing, ModelPricing) else FLOPS_POLICY
        self.signers: dict[tuple[str, bytes], ReceiptSigner] = {}
        self.agreed: dict[tuple[str, bytes], int] = {}  # (server, session) → the rate its "opened" stated
        # peer id → the tier multiplier in thousandths we believe it has; routing sets it
        self.tier_source: Callable[[str], int] | None = None
        self.stats = {"receipts": 0, "spend_entries": 0, "spent_flops": 0, "disputes": 0, "unfiled_disputes": 0}

    def register_model(self, model_id: str, config: Any) -> None:
        _register(self.pricing, model_id, config)

    def rate(self, peer_id: str, dtype: str) -> int:
        """The most we pay `peer_id` for a session in `dtype`: the policy's rate for the tier we believe it has."""
        return self.policy.rate(MIN_MILLI if self.tier_source is None else self.tier_source(peer_id), dtype)

    def agree(self, peer_id: str, session_id: bytes, rate: int, dtype: str) -> None:
        """`peer_id`'s "opened" stated `rate` for session `session_id` in `dtype`: its receipts are signed
        at that rate, if it is one our policy prices and at most what we believe the server is worth;
        otherwise `RateRefused` (server-specific: the client routes elsewhere)."""
        ours = self.rate(peer_id, dtype)
        if not self.policy.allows(rate) or rate > ours:
            raise RateRefused("RateRefused", f"server {peer_id[-8:]} asks rate {rate} for this session; we pay it "
                              f"at most {ours} (the tier we believe it has, in {dtype})", peer_id=peer_id)
        self.agreed[(peer_id, session_id)] = rate

    def receipt(self, peer_id: str, session_id: bytes, info: dict) -> list | None:
        """The receipt to send with a step (or close) to `peer_id`: covers `info["served"]`, the tokens
        the server said it has computed so far, plus the step's own `info["tokens"]` (servers compute
        only what is signed for); None when nothing is owed."""
        served = int(info.get("served") or 0) + int(info.get("tokens") or 0)
        key = (peer_id, session_id)
        signer = self.signers.get(key)
        try:
            if signer is None:
                server = public_key_from_peer_id(peer_id)
                if served <= 0 or server == self.identity.public_key:  # nothing owed; serving ourselves is free
                    return None
                signer = self.signers[key] = ReceiptSigner(
                    self.identity, server=server, model=info["model"], start=info["start"], end=info["end"],
                    pricing=self.pricing, session=session_id, rate=self.agreed[key])
            if served > signer.tokens:
                signer.sign(served)
                self.stats["receipts"] += 1
        except (InvalidReceipt, KeyError, ValueError) as e:  # e.g. a model we cannot price: the server will say
            log.warning("could not sign a receipt for %s: %s", peer_id[-8:], e)
        return signer.latest.to_list() if signer is not None and signer.latest is not None else None

    async def closed(self, peer_id: str, session_id: bytes) -> Receipt | None:
        """The session with `peer_id` is over: record the latest receipt signed for it as a spend.
        Returns that receipt (what the session cost: what we signed, even if our ledger refused to
        record it), or None when nothing was owed."""
        self.agreed.pop((peer_id, session_id), None)
        signer = self.signers.pop((peer_id, session_id), None)
        if signer is None or signer.latest is None:
            return None
        try:
            await self.ledger.record_spend(signer.latest)
        except InvalidReceipt as e:
            log.warning("spend entry refused by our own ledger: %s", e)
            return signer.latest
        self.stats["spend_entries"] += 1
        self.stats["spent_flops"] += signer.latest.flops
        return signer.latest

    async def reliability_by_peer(self) -> dict[str, float]:
        """peer id → reliability factor from this ledger's verified chains (for routing)."""
        return {peer_id_from_public_key(k): r for k, r in (await self.ledger.reliability()).items()}

    async def dispute(self, accused_peer: str, reason: str, proof: DisputeProof | None) -> None:
        """A referee-backed spot check caught `accused_peer` lying: a verdict in our own view, and a
        dispute entry for everyone else carrying `proof` (inline when it fits, else a claim naming the
        proof on our shelf). Without a proof none is filed: it would count nothing anywhere and make
        us a false accuser."""
        try:
            accused = public_key_from_peer_id(accused_peer)
        except ValueError:
            return
        seq = 0
        evidence = proof.encode() if proof is not None else b""
        if proof is not None and len(evidence) > self.inline_proof_bytes and self.shelf is not None \
                and len(evidence) <= MAX_FETCHED_PROOF:
            evidence = DisputeClaim(proof.record, self.shelf.put(evidence), len(evidence)).encode()
        filed = len(evidence) <= self.inline_proof_bytes or is_claim(evidence)
        if proof is not None and filed and len(evidence) <= MAX_PROOF_BYTES:
            seq = (await self.ledger.record_dispute(accused, reason[:200], evidence)).seq
            self.stats["disputes"] += 1
        else:
            self.stats["unfiled_disputes"] += 1
        await self.ledger.record_verdict(self.ledger.me, seq, accused, True)
