"""One potluck peer process: overlay, membership, gossip, DHT, credits, and — when asked — a block
server and a client for generating through the swarm; plus the local control socket.

`run_peer` owns every task of the peer in one nursery, so SIGINT/SIGTERM cancel it and everything
stops together. Each peer gossips a signed presence note (addresses, region, whether it is a relay)
when it starts, every `presence_interval`, and when its addresses change (a relay reservation made or
lost: its server re-announces then too), so peers learn of members they are not directly connected to.

Relays: a `--relay-service` peer announces itself (potluck/relays.py); a peer given no `--relay` that
autonat finds behind NAT chooses relays from those announcements (potluck/autorelay.py).

With `--blocks`, the peer serves that span of `--model` (the default model unless named). Given several
`--model` candidates, it serves the one the swarm needs most (pipeline/modelchoice.py: demand per copy
served), waiting until some candidate is asked for; every peer counts the requests its front doors take
and gossips them (pipeline/demand.py). The
client half (embeddings, final norm, LM head, tokenizer) is loaded on the first generation request,
so volunteers that only serve never pay for it. Several `--model` folders without `--blocks` are
versions of a family the peer generates with: a request runs on the newest complete one
(potluck/generation.py `choose_version`), each version's client half loaded when first used.

Every peer, with a model or none, lists the models the swarm serves (`swarm_models`: for `potluck
status`, `/api/status`, `/v1/models`) from the servers' announcements: the DHT's model index and the
gossip notes it receives.

With `--api HOST:PORT`, the same nursery also runs the OpenAI-compatible HTTP API and the dashboard
(potluck/api.py); a non-loopback address needs `--api-key`. `--apps` and `--fallback` are the API's
(potluck/apps.py, potluck/fallback.py; `--fallback local`: potluck/localfallback.py).
"""

from __future__ import annotations

import functools
import logging
import math
import signal
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import trio

from credits import CreditPolicy, Ledger, StandingView
from credits.replication import Replicator
from dht import Validators
from dht.node import DHTConfig, DHTNode
from dht.records import StoreLimits
from p2p import framing
from p2p.errors import P2PError
from p2p.gossip import Gossip, GossipQuotas
from p2p.identity import Identity
from p2p.libp2p import InboundLimits, Libp2pNetwork
from p2p.membership import Membership, check_addr
from p2p.network import Network
from p2p.swarm_key import load_key
from pipeline.announce import (GOSSIP_TOPIC, AnnouncementValidator, ModelCard, ServerInfo, fetch_models,
                               fetch_servers, from_gossip_note)
from pipeline.attestations import AttestationBook
from pipeline.billing import ClientBilling, ServerBilling
from pipeline.checkpolicy import AdaptivePolicy
from pipeline.client import ClientConfig, DistributedModel
from pipeline.convert import model_folder
from pipeline.demand import DemandBook, has_standing
from pipeline.disputes import DisputeJudge, ServedBlocks
from pipeline.hop import connect_announced
from pipeline.identity import model_id as compute_model_id
from pipeline.loading import ModelFolder
from pipeline.modelchoice import Candidate, choose_model, complete, copies, move_to, wanted_by_version
from pipeline.proofshelf import ProofShelf
from pipeline.pricing import POLICIES, ModelPricing
from pipeline.protocol import ANNOUNCE_NAMESPACE
from pipeline.server import BlockServer, ServerConfig, parse_blocks
from pipeline.speculative import with_draft_model
from pipeline.versions import Claim, Lineage
from pipeline.spotcheck import SpotCheckConfig

from . import control, generation, memory
from .apps import AppTable
from .autorelay import AutoRelay
from .relays import MAX_ADDRS, MAX_RELAY_RECORDS, RELAY_NAMESPACE, RelayAd, RelayAnnouncing, RelayBook, \
    RelayRecordValidator, plain_addrs, relay_addrs, relay_key
from .fallback import FallbackConfig
from .localfallback import LocalFallback
from .openai_schema import ChatRequest, CompletionRequest
from .swarmview import coverage_view

log = logging.getLogger(__name__)

PRESENCE_TOPIC = "presence"
MAX_HEARD_MODELS = 32  # models heard of (gossip, the DHT's model index) that status lists; the latest kept
MAX_OLDER_VERSIONS = 8  # versions the candidates supersede whose announcements a model choice reads
MAX_CLAIMANTS_DIALLED = 8  # servers claiming `supersedes` a model choice dials to believe them (versions.py)
CLAIMANT_DIAL_TIMEOUT = 3.0  # seconds
MAX_PRESENCE_SEEN = 256  # authors of presence notes that status lists; the latest kept (new keys are free)


@dataclass(frozen=True)
class PeerLimits:
    """What this peer grants other peers, layer by layer (`potluck serve`'s limit flags). The defaults
    are each layer's own, sized for a volunteer's machine."""

    inbound: InboundLimits = InboundLimits()  # connections not admitted yet, per IP; the upgrade deadline
    inflight_bytes_in: int | None = None  # one peer's requests held at once, as decoded (None: the network's)
    request_rate: float | None = None  # one peer's requests served a second, after a burst of twice that (None: the network's)
    dht_store: StoreLimits = StoreLimits()  # DHT records stored for others
    gossip: GossipQuotas = GossipQuotas()  # per-author gossip rates, and the gossip held

    def network_options(self) -> dict:
        """The `Libp2pNetwork.open` options these limits set."""
        options: dict = {"inbound_limits": self.inbound}
        if self.inflight_bytes_in is not None:
            options["max_inflight_bytes_in"] = self.inflight_bytes_in
        if self.request_rate is not None:
            options["request_rate"] = self.request_rate
            options["request_burst"] = max(1, round(2 * self.request_rate))
        return options


@dataclass(frozen=True)
class ModelOption:
    """One of the candidate models a volunteer may serve (`--model`, several)."""

    name: str  # as given to --model
    folder: Path
    model_id: str
    num_blocks: int
    context_length: int | None = None

    def card(self) -> dict:
        """The model card, as `model_card` says it."""
        return {"name": self.folder.name, "model_id": self.model_id, "num_blocks": self.num_blocks,
                "context_length": self.context_length}


@dataclass
class PeerConfig:
    data_dir: Path
    listen: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    bootstrap: list[str] = field(default_factory=list)
    swarm_key_file: Path | None = None
    relay_service: bool = False  # serve circuit relay v2 for members behind NAT (a public peer)
    relays: list[str] = field(default_factory=list)  # behind NAT: reserve on these relays, announce the circuit
    hole_punch: bool = True  # peers met through a relay try a direct connection (DCUtR)
    region: str = ""
    presence_interval: float = 30.0
    model: str | None = None  # None: the default model
    # several: serve the one demand needs most (with `blocks`); generate with any (versions of a family)
    model_candidates: list[str] = field(default_factory=list)
    model_choice_wait: float = 10.0  # seconds to hear the swarm's demand before choosing (and between tries)
    model_recheck: float = 60.0  # seconds between a candidates' server's looks for a model that needs it more
    supersedes: str | None = None  # the model id the served model is a new version of (announced)
    blocks: str | None = None  # "a:b" or "auto": serve blocks; None: serve none
    dtype: str = "float32"
    cache_mib: int | None = None  # the KV cache budget of served blocks (None: the server's default)
    max_batch: int | None = None  # steps computed as one forward by the served blocks (None: the server's default)
    stranger_cache_tokens: int | None = None  # KV cache tokens one client without standing may hold (None: default)
    strangers_cache_tokens: int | None = None  # ... all of them together (None: the server's default)
    spot_check_fraction: float | None = None  # fixed spot-check fraction (0: none); None: adaptive (checkpolicy)
    draft_model: str | None = None  # an HF folder: speculative decoding drafts with it (None: prompt lookup)
    grid_signal: str | None = None  # a grid signal file the served blocks announce (pipeline/grid.py)
    prefer: str = "fast"  # this peer's generations route "fast", "green" or "cheap" (a request may say otherwise)
    credit_policy: CreditPolicy | None = None  # the swarm's credit rules (None: the open swarm's defaults)
    pricing: str = "flops"  # the swarm's pricing policy (pipeline/pricing.py POLICIES): flops or tiered
    tier_quarantine_s: float | None = None  # after a change of hardware tier (None: pipeline/tiers.py's default)
    api: str | None = None  # "host:port": serve the HTTP API and dashboard there
    api_key: str | None = None  # required on every HTTP request when set (and for non-loopback binds)
    apps: AppTable | None = None  # --apps: the applications the API serves, their keys and quotas
    fallback: FallbackConfig | None = None  # --fallback: the upstream that answers when the swarm cannot
    local_fallback: bool = False  # --fallback local: this peer answers with its own copy of the model instead
    limits: PeerLimits = PeerLimits()


class Peer:
    """The parts of a running peer, wired together; `run_peer` drives it."""

    def __init__(self, config: PeerConfig, identity: Identity, network: Network, ledger: Ledger,
                 swarm_key: bytes | None = None):
        self.config = config
        self.identity = identity
        self.network = network
        self.ledger = ledger
        self.standing = StandingView(ledger)  # this peer's own view of others' work: its server decides on it
        self.membership = Membership(network, region=config.region)
        self.dht = DHTNode(network, bootstrap=config.bootstrap, region=config.region or None,
                           validators=_validators(), config=DHTConfig(store_limits=config.limits.dht_store))
        self.gossip = Gossip(network, identity, quotas=config.limits.gossip)
        self.replicator = Replicator(ledger, network, self.gossip)
        # proofs of our disputes too large for an entry, served to verifiers (kept across restarts)
        self.proofs = ProofShelf.open(config.data_dir)
        self.proofs.serve_on(network)
        # our passed spot checks, shared; others', counted toward servers' probation (pipeline/attestations.py)
        self.attestations = AttestationBook(identity, self.standing.standings, network.now)
        # requests per model, ours and (capped, by standing) others' (pipeline/demand.py)
        self.demand = DemandBook(identity.peer_id, self.standing.standings, network.now)
        self.model_choice: dict | None = None  # with several candidate models: what the choice saw
        self._model_options_found: list[ModelOption] | None = None
        self.gossip.subscribe(PRESENCE_TOPIC, self._on_presence, validator=self._valid_presence)
        self.gossip.subscribe(GOSSIP_TOPIC, self._on_server_note, validator=self._valid_server_note)
        self.presence_seen: dict[str, None] = {}  # authors of presence notes, the least recently heard first
        self.relay_key = relay_key(swarm_key)
        self.relay_book = RelayBook(identity.peer_id, network.now,  # relays heard of (DHT, presence notes)
                                    in_use=lambda relay_id: self.autorelay is not None and relay_id in self.autorelay.chosen)
        self.autorelay: AutoRelay | None = None  # set by run_peer where this peer chooses relays itself
        self.local_fallback = LocalFallback(self.client, network) if config.local_fallback else None
        self.addrs_changed = trio.Event()
        self.server: BlockServer | None = None
        self._client: DistributedModel | None = None  # `config.model`'s
        self._version_clients: dict[str, DistributedModel] = {}  # the other candidates', by model id
        self._client_lock = trio.Lock()
        # set while the model this peer generates with is settled; a move clears it until its server is up
        self._model_settled = trio.Event()
        self._model_settled.set()
        self.last_generation: dict | None = None  # generation.GenerationResult.summary() of the latest one
        self.api_url: str | None = None
        self._model_card: dict | None = None
        # model id → (card as its servers announce it, until when), the least recently heard first
        self._heard_models: dict[str, tuple[ModelCard, float]] = {}
        self._swarm_cache: tuple[float, list[dict]] | None = None
        self._swarm_lock = trio.Lock()

    def _valid_presence(self, message) -> bool:
        body = framing.expect_map(message.data, "presence")
        addrs = framing.field(body, "addrs", list, max_len=8)
        framing.field(body, "region", str, max_len=64)
        framing.field(body, "relay", bool, optional=True)
        for addr in addrs:
            check_addr(addr, message.author)
        return True

    def _on_presence(self, message) -> None:
        self.presence_seen.pop(message.author, None)
        self.presence_seen[message.author] = None
        while len(self.presence_seen) > MAX_PRESENCE_SEEN:
            del self.presence_seen[next(iter(self.presence_seen))]
        addrs = message.data["addrs"]
        if message.author != self.identity.peer_id and addrs:
            self.membership.learn(message.author, addrs[0], message.data["region"])
        direct = plain_addrs(addrs)[:MAX_ADDRS]
        if message.data.get("relay") and direct:
            # heard again within three presence intervals, or forgotten
            self.relay_book.hear_note(RelayAd(message.author, tuple(direct), message.data["region"],
                                              self.network.now() + 3 * self.config.presence_interval))

    def _valid_server_note(self, message) -> bool:
        from_gossip_note(message.author, message.data, self.network.now())
        return True

    def _on_server_note(self, message) -> None:
        """A server's announcement by gossip: the client's routes see it before the next DHT read, and
        `swarm_models` lists its model even on a peer that has loaded none."""
        model_id, info = from_gossip_note(message.author, message.data, self.network.now())
        client = self._loaded_client(model_id)
        if client is not None:
            client.sequence.hear(info)
        card = info.card(model_id)
        if info.online and card is not None:
            self._hear_model(card, info.expires)

    def _hear_model(self, card: ModelCard, expires: float) -> None:
        """A model a server announces, listed until its announcement expires (unless heard again)."""
        _, known_until = self._heard_models.pop(card.model_id, (card, 0.0))
        self._heard_models[card.model_id] = (card, max(expires, known_until))
        while len(self._heard_models) > MAX_HEARD_MODELS:
            del self._heard_models[next(iter(self._heard_models))]

    def _models_heard(self) -> list[ModelCard]:
        """The models heard of whose announcements have not expired, by name."""
        now = self.network.now()
        for model_id, (_, expires) in list(self._heard_models.items()):
            if expires <= now:
                del self._heard_models[model_id]
        return sorted((card for card, _ in self._heard_models.values()), key=lambda c: (c.name, c.model_id))

    def saw_request(self, model_id: str) -> None:
        """A request for `model_id` came in at one of our front doors: it counts toward the swarm's demand."""
        self.demand.saw(model_id)

    async def _model_options(self) -> list[ModelOption]:
        """The candidate models (`--model`, several), each opened once for its id and size."""
        if self._model_options_found is None:
            found = []
            for name in self.config.model_candidates:
                folder = await trio.to_thread.run_sync(model_folder, name, self.config.data_dir)
                mf = await trio.to_thread.run_sync(ModelFolder, folder)
                found.append(ModelOption(name, folder, await trio.to_thread.run_sync(compute_model_id, mf),
                                         mf.config.num_layers, _context_length(mf.config)))
            self._model_options_found = found
        return self._model_options_found

    async def _survey_models(self, options: list[ModelOption]) -> tuple[list[Candidate], dict[str, int]]:
        """Each candidate's coverage now, and the requests each version is wanted for (pipeline/modelchoice.py):
        reads the candidates' announcements (and those of the older versions they supersede) and the demand."""
        swarms = {o.model_id: (await fetch_servers(self.dht, o.model_id, num_blocks=o.num_blocks), o.num_blocks)
                  for o in options}
        claims = [Claim(s.peer_id, model_id, s.supersedes) for model_id, (servers, _) in swarms.items()
                  for s in servers if s.supersedes is not None]
        claimants = [s for servers, _ in swarms.values() for s in servers if s.supersedes is not None]
        lineage = Lineage.from_claims(claims, await self.vouched_servers(claimants))
        for old in sorted(set(lineage.successor) - set(swarms))[:MAX_OLDER_VERSIONS]:
            servers = await fetch_servers(self.dht, old)
            swarms[old] = (servers, max((s.num_blocks or 0 for s in servers), default=0))
        wanted = wanted_by_version(await self.demand.demand(), lineage,
                                   lambda m: m in swarms and complete(*swarms[m]))
        candidates = [Candidate(o.model_id, copies(*swarms[o.model_id])) for o in options]
        self.model_choice = {
            "candidates": [{"model_id": c.model_id, "copies": c.copies, "demand": wanted.get(c.model_id, 0)}
                           for c in candidates],
            "serving": self.server.model_id if self.server is not None else None,
            "tries": (self.model_choice or {}).get("tries", 0) + 1}
        log.info("model choice: %s", self.model_choice)
        return candidates, wanted

    async def vouched_servers(self, claimants: Iterable[ServerInfo], *, dial: bool = True) -> Callable[[str], bool]:
        """Whose `supersedes` claims this peer believes (pipeline/versions.py): a claim moves demand and
        requests, so it counts only from a server whose work reached us (standing) or that this peer
        reaches — connected now, or (`dial`: the model choice, not a status read) dialled here at its
        announced addresses (at most `MAX_CLAIMANTS_DIALLED`): a running peer per vote, not a record per vote."""
        standings = await self.standing.standings()
        reached = set(self.network.connected_peers())
        unreached = {s.peer_id: s.addrs for s in claimants  # announced at its own addresses (the decoder's rule)
                     if dial and s.addrs and s.peer_id not in reached and not has_standing(standings, s.peer_id)}

        async def dial_one(peer_id: str, addrs: tuple[str, ...]) -> None:
            if await connect_announced(self.network, peer_id, addrs, each=CLAIMANT_DIAL_TIMEOUT):
                reached.add(peer_id)

        async with trio.open_nursery() as nursery:
            for peer_id, addrs in sorted(unreached.items())[:MAX_CLAIMANTS_DIALLED]:
                nursery.start_soon(dial_one, peer_id, addrs)
        return lambda peer_id: peer_id in reached or has_standing(standings, peer_id)

    async def choose_model(self) -> ModelOption:
        """The candidate model to serve: the one with the most demand per copy the swarm serves
        (pipeline/modelchoice.py); waits, reading again every `model_choice_wait` s, until one is asked for."""
        options = await self._model_options()
        while True:
            await trio.sleep(self.config.model_choice_wait)  # the demand notes arrive by gossip (pull on join)
            try:
                chosen = choose_model(*await self._survey_models(options))
            except P2PError as e:
                log.info("could not read the swarm for the model choice: %s", e)
                continue
            for option in options:
                if option.model_id == chosen:
                    return option

    async def better_model(self, serving: ModelOption, blocks: int) -> ModelOption:
        """Once the swarm would gain by it (`modelchoice.move_to`): the candidate to move to from `serving`,
        where we serve `blocks` blocks; read every `model_recheck` s."""
        options = await self._model_options()
        while True:
            await trio.sleep(self.config.model_recheck)
            try:
                candidates, wanted = await self._survey_models(options)
            except P2PError as e:
                log.info("could not read the swarm for the model choice: %s", e)
                continue
            sizes = {o.model_id: o.num_blocks for o in options}
            current = next(c for c in candidates if c.model_id == serving.model_id)
            target = move_to(current, blocks / serving.num_blocks, candidates, wanted,
                             lambda m: min(blocks, sizes[m]) / sizes[m])
            for option in options:
                if option.model_id == target:
                    return option

    async def announce_presence(self) -> None:
        await self.gossip.publish(
            PRESENCE_TOPIC, {"addrs": self.network.listen_addrs(), "region": self.config.region,
                             "relay": bool(self.relay_addrs())}
        )

    def relay_addrs(self) -> list[str]:
        """Where this peer relays for others (`potluck.relays.relay_addrs`); none unless `--relay-service`."""
        if not self.config.relay_service:
            return []
        return relay_addrs(self.network.reachability(), self.network.listen_addrs(), self.network.peer_id)

    async def read_relay_announcements(self) -> None:
        """The DHT's relay announcements of this swarm, into `relay_book`: every level's (a nearest-copies
        read holds only the relays that stored in our clusters, and the nearest may not be among them)."""
        self.relay_book.hear_entries(await self.dht.get(self.relay_key, exhaustive=True))

    def relay_rtt(self, peer_id: str) -> float | None:
        """Seconds to a relay: the DHT's estimate (measured, else Vivaldi), else membership's ping RTT."""
        rtt = self.dht.rtt_estimate(peer_id)
        return rtt if rtt is not None else self.membership.rtt(peer_id)

    def relay_measured_rtt(self, peer_id: str) -> float | None:
        """Seconds to a relay as measured (the DHT's recent samples, else membership's ping RTT), never
        a coordinate estimate: what a relay says of its place cannot make it look near."""
        state = self.dht.peers.get(peer_id)
        rtt = state.rtt if state is not None else None
        return rtt if rtt is not None else self.membership.rtt(peer_id)

    def status(self) -> dict:
        return {
            "peer_id": self.identity.peer_id,
            "addrs": self.network.listen_addrs(),
            "observed_addrs": [addr for addr, _ in self.network.observed_addrs()],
            "reachability": self.network.reachability(),
            "region": self.config.region,
            "private_swarm": self.config.swarm_key_file is not None,
            "peers": [p.as_dict() for p in self.membership.peers()],
            "connected": sorted(self.network.connected_peers()),
            "presence_seen": sorted(self.presence_seen),
            "gossip": asdict(self.gossip.stats),
            "attestations": dict(self.attestations.stats),
            "dht": self.dht.status(),
            "server": self.server.status() if self.server else None,
            "model_choice": self.model_choice,
            "last_generation": self.last_generation,
            "api": self.api_url,
            "relay": self.network.relay_status() if isinstance(self.network, Libp2pNetwork) else None,
            # requests that waited for their peer's pace (p2p/libp2p/pace.py): floods, or a peer sending too fast
            "requests_paced": self.network.pace.delayed if isinstance(self.network, Libp2pNetwork) else None,
            "autorelay": self.autorelay.status() if self.autorelay else None,
            "local_fallback": self.local_fallback.status() if self.local_fallback else None,
        }

    async def _status_command(self, request: dict) -> dict:
        status = self.status()
        if request.get("models"):
            # Coverage of the models this peer already knows (a DHT read; never loads a model for it).
            status["models"] = await self.swarm_models(load=False, timeout=2.0)
        return status

    # --- the swarm's models, as this peer sees them ---------------------------------------------------

    async def model_card(self, load: bool = False) -> dict | None:
        """name, model_id, num_blocks, context_length of this peer's model; None when not known without
        loading it (`load=True` loads the client half)."""
        if self._model_card is not None:
            return self._model_card
        card = None
        if self._client is not None:
            c = self._client
            card = {"name": c.folder.path.name, "model_id": c.model_id, "num_blocks": c.model_config.num_layers,
                    "context_length": _context_length(c.model_config)}
        elif self.server is not None and self.server.model_id and self.server.mf is not None:
            mf = self.server.mf
            card = {"name": mf.path.name, "model_id": self.server.model_id, "num_blocks": mf.config.num_layers,
                    "context_length": _context_length(mf.config)}
        elif load:
            await self.client()
            return await self.model_card()
        self._model_card = card
        return card

    async def swarm_models(self, load: bool = False, timeout: float = 5.0, max_age: float = 2.0) -> list[dict]:
        """Every model the swarm serves, as far as this peer knows, with the swarm's coverage of it (read
        from the DHT at most every `max_age` s): this peer's own model first (`"runs_here": True`: it
        generates with it), then the other versions it holds the folders of (several `--model`; runs_here
        too, once known: `load` opens them), then those its servers announce (the DHT's model index, gossip).
        Each lists the versions its servers say it `supersedes` and the one `superseded_by` it
        (pipeline/versions.py `Lineage`, from the online servers' claims)."""
        own = await self.model_card(load=load)  # outside the lock: during a move it waits for the new model
        async with self._swarm_lock:
            now = trio.current_time()
            if self._swarm_cache is not None and now - self._swarm_cache[0] < max_age:
                return self._swarm_cache[1]
            deadline = now + timeout
            cards = [{**own, "runs_here": True}] if own is not None else []
            versions = await self._model_options() if load and len(self.config.model_candidates) > 1 else \
                self._model_options_found or []
            for option in versions:
                if all(option.model_id != card["model_id"] for card in cards):
                    cards.append({**option.card(), "runs_here": True})
            views: dict[str, dict | None] = {}
            claims: list[Claim] = []  # one per online server that says its model supersedes another
            claimants: list[ServerInfo] = []

            async def read_coverage(card: dict) -> None:
                views[card["model_id"]] = None
                with trio.move_on_at(deadline):
                    try:
                        servers, views[card["model_id"]] = await self._coverage(card)
                        for s in servers:
                            if s.online and s.supersedes is not None:
                                claims.append(Claim(s.peer_id, card["model_id"], s.supersedes))
                                claimants.append(s)
                    except Exception as e:  # a status must not fail because a lookup did
                        log.info("could not read the swarm of %s: %s", card["name"], e)

            async def read_index() -> None:
                with trio.move_on_at(deadline):
                    try:
                        for heard, expires in await fetch_models(self.dht):
                            self._hear_model(heard, expires)
                    except P2PError as e:  # the models heard by gossip are still listed
                        log.info("could not read the swarm's model index: %s", e)

            async with trio.open_nursery() as nursery:  # our own model's coverage does not wait for the index
                for card in cards:
                    nursery.start_soon(read_coverage, card)
                nursery.start_soon(read_index)
            others = [{**c.as_dict(), "runs_here": False} for c in self._models_heard() if c.model_id not in views]
            async with trio.open_nursery() as nursery:
                for card in others:
                    nursery.start_soon(read_coverage, card)
            cards += others
            lineage = Lineage.from_claims(claims, await self.vouched_servers(claimants, dial=False))
            models = [{**card, "coverage": views[card["model_id"]],
                       "supersedes": sorted(old for old, new in lineage.successor.items() if new == card["model_id"]),
                       "superseded_by": lineage.successor.get(card["model_id"])} for card in cards]
            self._swarm_cache = (trio.current_time(), models)
            return models

    async def _coverage(self, card: dict) -> tuple[list[ServerInfo], dict]:
        """The model's servers as announced, and the swarm's coverage of it (`coverage_view`)."""
        # Capacity counts the servers reached: ourselves and those our client opened a session with —
        # not peers merely connected (a Sybil accepts connections and streams and never answers).
        me = self.identity.peer_id
        client = self._loaded_client(card["model_id"])
        if client is not None:
            # The view routes are built from (DHT + gossip), so "no route" means just that.
            sequence = client.sequence
            servers = await sequence.refresh()
            return servers, coverage_view(servers, card["num_blocks"], lambda p: p == me or sequence.verified(p))
        servers = await fetch_servers(self.dht, card["model_id"], num_blocks=card["num_blocks"])
        return servers, coverage_view(servers, card["num_blocks"], lambda p: p == me)

    async def credits(self) -> dict:
        """What `potluck credits` and `GET /api/credits` show: the ledger's summary with every peer's
        standing in this peer's view, and this peer's own standing as the peers it served likely see it.
        Recomputed for each request (a person asking wants what the ledger holds now; it also refreshes
        the view the server decides on)."""
        return await self.ledger.summary(standings=await self.ledger.read(self.standing.standings_sync),
                                         seen_by=await self.ledger.read(self.standing.seen_by_sync))

    async def _credits_command(self, request: dict) -> dict:
        return await self.credits()

    # DHT operations for operators and tests, through the control socket.
    async def _dht_store_command(self, request: dict) -> dict:
        key = framing.field(request, "key", str, max_len=256)
        ttl = framing.field(request, "ttl", (int, float))
        # One-shot, like any store an operator makes by hand: it lives `ttl` seconds, not republished.
        return {"stored_at": await self.dht.store(key, request.get("value"), ttl=ttl, republish=False)}

    async def _dht_get_command(self, request: dict) -> dict:
        entries = await self.dht.get(framing.field(request, "key", str, max_len=256))
        return {subkey: {"value": e.value, "expires": e.expires} for subkey, e in entries.items()}

    async def _dht_find_peer_command(self, request: dict) -> dict:
        return {"addr": await self.dht.find_peer(framing.field(request, "peer_id", str, max_len=64))}

    # --- generating through the swarm ----------------------------------------------------------------

    async def client(self, model_id: str | None = None) -> DistributedModel:
        """The client half of `config.model` (None), or of the candidate model `model_id` (another version
        of a family this peer holds the folder of), loaded on first use; during a move (`leave_model`), once
        the new model's server is up. Raises LookupError for another id."""
        while True:
            settled = self._model_settled
            await settled.wait()
            async with self._client_lock:
                if settled is not self._model_settled:  # a move began meanwhile: wait for its end
                    continue
                if self._client is None:
                    folder = await trio.to_thread.run_sync(model_folder, self.config.model, self.config.data_dir)
                    self._client = await self._load_client(folder)
                if model_id is None or model_id == self._client.model_id:
                    return self._client
                if model_id not in self._version_clients:
                    option = next((o for o in await self._model_options() if o.model_id == model_id), None)
                    if option is None:
                        raise LookupError(f"this peer holds no folder of model {model_id}")
                    self._version_clients[model_id] = await self._load_client(option.folder)
                return self._version_clients[model_id]

    async def _load_client(self, folder: Path) -> DistributedModel:
        policy = AdaptivePolicy()
        client = await DistributedModel.from_pretrained(
            folder, self.network, self.dht, dtype=self.config.dtype,
            config=ClientConfig(billing=ClientBilling(self.ledger, shelf=self.proofs), prefer=self.config.prefer,
                                spot_check=SpotCheckConfig(fraction=self.config.spot_check_fraction,
                                                           policy=policy, attestations=self.attestations)),
            local_server=self.server)
        policy.vouches = self.attestations.vouches(client.model_id)
        if self.config.draft_model is not None:
            client.client_config.speculative = await trio.to_thread.run_sync(
                with_draft_model, self.config.draft_model, client.model_config.vocab_size)
        return client

    def _loaded_client(self, model_id: str) -> DistributedModel | None:
        """The client half of `model_id` if loaded."""
        if self._client is not None and self._client.model_id == model_id:
            return self._client
        return self._version_clients.get(model_id)

    async def leave_model(self) -> None:
        """A move begins: the client halves (built for the model we leave, with its server as local blocks)
        are dropped — generations under way keep theirs — and `client` waits for `settle_model`."""
        async with self._client_lock:  # a client being built finishes first, then is dropped
            self._model_settled = trio.Event()
            self._client = None
            self._version_clients.clear()
            self._model_card = self._swarm_cache = None

    def settle_model(self) -> None:
        """The server of the model we move to (`config.model`) is up: the client half is built for it on next use."""
        self._model_card = self._swarm_cache = None
        self._model_settled.set()

    async def _generate_command(self, request: dict) -> dict:
        """A generation for `potluck`'s own tools: checked and run like an API request (potluck/generation.py),
        with greedy sampling and 64 tokens unless asked otherwise."""
        body = {"model": request.get("model", "default"), "max_tokens": request.get("max_tokens", 64),
                "temperature": request.get("temperature", 0.0),
                **{k: request[k] for k in ("top_p", "seed") if k in request}}
        req: ChatRequest | CompletionRequest
        if "messages" in request:
            req = ChatRequest.parse({**body, "messages": request["messages"]})
        else:
            req = CompletionRequest.parse({**body, "prompt": request.get("prompt")})
        prompt = req.messages if isinstance(req, ChatRequest) else req.prompt
        job = await generation.prepare(self, req.model, prompt, req.params,
                                       max_tokens_given=request.get("max_tokens") is not None)
        result = await generation.complete(self, job, source="control")
        return {"text": result.generation.text, "token_ids": result.generation.token_ids, **result.summary()}

    def commands(self) -> dict:
        return {
            "generate": self._generate_command,
            "status": self._status_command,
            "credits": self._credits_command,
            "dht_store": self._dht_store_command,
            "dht_get": self._dht_get_command,
            "dht_find_peer": self._dht_find_peer_command,
        }

    async def _presence_loop(self) -> None:
        while True:
            await self.announce_presence()
            await trio.sleep(self.config.presence_interval)

    async def _readdress_loop(self) -> None:
        """When our addresses change, tell the swarm at once: presence note, and the server's announcement
        (clients dial a server at the addresses it announces)."""
        while True:
            await self.addrs_changed.wait()
            await trio.sleep(0.5)  # the other reservation often changes right after
            self.addrs_changed = trio.Event()
            await self.announce_presence()
            if self.server is not None:
                try:
                    await self.server.announce()
                except P2PError as e:
                    log.info("announcement after an address change failed: %s", e)


def _validators() -> Validators:
    """What this peer's DHT stores under the swarm's own keys: well-formed server announcements only,
    one per server (not whatever a stranger signs under the model's record)."""
    validators = Validators()
    validators.register(ANNOUNCE_NAMESPACE, AnnouncementValidator())
    validators.register(RELAY_NAMESPACE, RelayRecordValidator(), max_entries=MAX_RELAY_RECORDS)
    return validators


def _server_config(config: PeerConfig) -> ServerConfig:
    sc = ServerConfig(dtype=config.dtype)
    if config.cache_mib is not None:
        sc.cache_budget_bytes = config.cache_mib << 20
    if config.max_batch is not None:
        sc.max_batch_steps = config.max_batch
    if config.stranger_cache_tokens is not None:
        sc.stranger_cache_tokens = config.stranger_cache_tokens
    if config.strangers_cache_tokens is not None:
        sc.strangers_cache_tokens = config.strangers_cache_tokens
    sc.grid_signal_file = config.grid_signal
    sc.supersedes = config.supersedes
    sc.state_dir = str(config.data_dir)  # the served blocks' tier, kept for its quarantine (pipeline/tiers.py)
    if config.tier_quarantine_s is not None:
        sc.tier_quarantine_s = config.tier_quarantine_s
    return sc


async def run_peer(config: PeerConfig, on_ready: Callable[[Peer], None] | None = None) -> None:
    """Run a peer until cancelled or until SIGINT/SIGTERM arrives."""
    memory.return_big_blocks()  # KV caches and big frames go back to the OS when freed
    identity = Identity.load_or_create(config.data_dir)
    swarm_key = load_key(config.swarm_key_file) if config.swarm_key_file else None
    ledger = Ledger.open(identity, config.data_dir, pricing=ModelPricing(POLICIES[config.pricing]),
                         policy=config.credit_policy)
    try:
        choose_relays = not config.relays and not config.relay_service  # `--relay` overrides the choice
        async with Libp2pNetwork.open(identity, config.listen, swarm_key=swarm_key,
                                      relay_service=config.relay_service, relays=config.relays,
                                      hole_punch=config.hole_punch,
                                      **config.limits.network_options()) as network:
            peer = Peer(config, identity, network, ledger, swarm_key=swarm_key)
            network.add_address_listener(lambda: peer.addrs_changed.set())
            if config.bootstrap:
                # Before any task starts, so a refused swarm key ends the peer with a plain error.
                await peer.membership.bootstrap(config.bootstrap)
            await ledger.claim_starting_grant()
            if config.blocks is not None and len(config.model_candidates) <= 1:
                folder = await trio.to_thread.run_sync(model_folder, config.model, config.data_dir)
                peer.server = _block_server(peer, folder)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
                await nursery.start(peer.gossip.run)
                await nursery.start(peer.membership.run)
                await nursery.start(peer.replicator.run)
                await nursery.start(peer.attestations.run, peer.gossip)
                await nursery.start(peer.demand.run, peer.gossip)
                await nursery.start(peer.dht.run)
                if peer.server is not None:
                    await _serve(peer, nursery)
                await nursery.start(control.serve, Path(config.data_dir) / control.SOCKET_NAME, peer.commands())
                if config.api is not None:
                    from . import api

                    host, port = api.parse_hostport(config.api)
                    api.check_bind(host, config.api_key)
                    peer.api_url = await nursery.start(functools.partial(
                        api.serve, peer, host, port, config.api_key, apps=config.apps, fallback=config.fallback,
                        local=peer.local_fallback))
                    if peer.local_fallback is not None:
                        nursery.start_soon(peer.local_fallback.run)
                nursery.start_soon(peer._readdress_loop)
                if config.relay_service:
                    nursery.start_soon(RelayAnnouncing(peer.dht, peer.relay_key, peer.relay_addrs, config.region).run)
                if choose_relays:
                    peer.autorelay = AutoRelay(network, peer.relay_book, peer.read_relay_announcements,
                                               peer.relay_rtt, peer.relay_measured_rtt)
                    nursery.start_soon(peer.autorelay.run)
                nursery.start_soon(peer._presence_loop)
                if config.blocks is not None and len(config.model_candidates) > 1:
                    nursery.start_soon(_serve_by_demand, peer)
                if on_ready:
                    on_ready(peer)
    finally:
        ledger.store.close()


def _block_server(peer: Peer, folder: Path, model_id: str | None = None, num_blocks: int | None = None) -> BlockServer:
    """`num_blocks`: the model's (a candidate of several `--model`): `--blocks a:b` is clamped to it, so a
    move to a smaller model serves its last blocks instead of failing the peer."""
    config = peer.config
    assert config.blocks is not None  # only a peer that serves builds one
    start, end = parse_blocks(config.blocks)
    if num_blocks is not None and end is not None and start is not None and end > num_blocks:
        end = num_blocks
        start = min(start, end - 1)
    return BlockServer(peer.network, peer.dht, folder, start, end, gossip=peer.gossip, model_id=model_id,
                       config=_server_config(config),
                       billing=ServerBilling(peer.ledger, standing=peer.standing, model_name=config.model))


async def _serve(peer: Peer, nursery: trio.Nursery) -> None:
    assert peer.server is not None
    await nursery.start(peer.server.run)
    # disputes against servers of our span: re-run their proofs (pipeline/disputes.py)
    await nursery.start(DisputeJudge(peer.ledger, ServedBlocks(peer.server), network=peer.network).run)


async def _serve_by_demand(peer: Peer) -> None:
    """Serve the candidate model demand needs most, like a single `--model`; move to another candidate
    when the swarm would gain by it (its server stops, announcing itself offline, and the new one starts).
    The client half follows: requests wait while a model's server starts, then generate with that model."""
    option = await peer.choose_model()
    await peer.leave_model()  # a client half built meanwhile is for `--model`'s first name, not the choice
    while True:
        peer.config = replace(peer.config, model=option.name)  # the client half, once settled, uses the same model
        async with trio.open_nursery() as serving:
            peer.server = _block_server(peer, option.folder, option.model_id, option.num_blocks)
            await _serve(peer, serving)
            peer.settle_model()
            assert peer.server.start is not None and peer.server.end is not None  # serving
            moved_to = await peer.better_model(option, peer.server.end - peer.server.start)
            log.info("moving from model %s to %s: the swarm needs it more", option.model_id[:12],
                     moved_to.model_id[:12])
            await peer.leave_model()  # before its server stops: no new request is routed through it
            serving.cancel_scope.cancel()
        peer.server = None
        option = moved_to


def _context_length(config) -> int | None:
    n = getattr(config, "max_position_embeddings", None)
    return n if isinstance(n, int) and 0 < n < math.inf else None


async def _stop_on_signal(cancel_scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            cancel_scope.cancel()
            return
