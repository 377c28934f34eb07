"""One generation through the swarm, the same for every front door: the HTTP API (potluck/api.py)
and the control socket (`generate`, potluck/peer.py).

    job = await prepare(peer, "default", prompt_or_messages, params, max_tokens_given=True)
    async for piece in run(peer, job, source="api"):   # str ..., then one GenerationResult
        ...
    result = await complete(peer, job, source="control")  # or all at once

- `prepare` checks a request against the model and the swarm before anything runs: the model
  exists (404; a request for any version of a family runs on the newest complete version this peer holds
  the folder of, `choose_version`, and its result names the id that served), the prompt tokenizes (400), its ids fit the vocabulary, prompt + max_tokens fit the
  context (400 context_length_exceeded; an unasked-for max_tokens is lowered to fit), and a route
  covers every block (503 no_route, naming the missing blocks).
- `prepare_local` makes the same checks, but the swarm's, for an answer on this peer's own copy of
  the model (`LocalRunner`, `--fallback local`: potluck/localfallback.py); `continue_locally` hands a
  swarm's job that failed to that copy, to go on from the tokens the swarm generated (`seeded` first
  fixes the job's sampling seed, so that a sampled answer goes on as the swarm's would have).
- `run` streams the text and ends with the typed `GenerationResult` (`complete` waits for it); it
  records the result as the peer's last generation (status, dashboard). The credits a result
  reports are what this client signed for this generation's own sessions (`Generation.paid`), so
  concurrent requests never see each other's spending.
- A failure is raised as the `ApiError` both front doors answer with (`explain`), as an `Interrupted`
  that also holds the answer's start produced before it (`PartialAnswer`: token ids, characters
  shown): refusals and failures are told apart by exception type on the cause chain, never by their
  text.
- `ApiPeer` is what the front doors use of a peer (`peer.Peer` is one; tests use a stand-in).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncGenerator, Iterator, Protocol

from credits import CreditRefused, credits
from p2p.identity import peer_id_from_public_key
from pipeline.client import Finished, Generation, GenerationFailed, PartialAnswer, TokenEvent
from pipeline.errors import REFUSALS, CacheFull, InsufficientCredit, Refused, TooLong
from pipeline.protocol import InferenceError
from pipeline.routing import NoRoute
from pipeline.sampling import SamplingParams
from pipeline.versions import Lineage

from .openai_schema import ApiError
from .swarmview import format_ranges

log = logging.getLogger(__name__)

EARN_HINT = ("Earn standing by serving blocks of the model: `potluck serve --blocks auto` (a volunteer peer earns "
             "for every step it computes), then retry; `potluck credits` shows your standing.")

Prompt = str | list[int] | list[dict]


# --- what the front doors use of a peer ---------------------------------------------------------------


class ModelVocabulary(Protocol):
    """What a request check reads of a model's config (`pipeline.config.ModelConfig`)."""

    @property
    def vocab_size(self) -> int: ...


class GenerationClient(Protocol):
    """The client half of a model (`pipeline.client.DistributedModel`)."""

    @property
    def model_config(self) -> ModelVocabulary: ...

    def encode(self, prompt: Prompt) -> list[int]: ...

    def stream(self, prompt: list[int], params: SamplingParams, *, prefer: str | None = None,
               continuing: PartialAnswer | None = None) -> AsyncGenerator[TokenEvent | Finished, None]: ...


class ApiPeer(Protocol):
    """What the HTTP API and the control socket use of a running peer (`potluck.peer.Peer`)."""

    last_generation: dict | None  # the summary of the latest generation, for status and the dashboard

    async def credits(self) -> dict: ...

    def status(self) -> dict: ...

    async def client(self, model_id: str | None = None) -> GenerationClient:
        """The client half of the model `model_id` (one this peer `runs_here`; None: its own)."""

    async def swarm_models(self, load: bool = False, timeout: float = 5.0, max_age: float = 2.0) -> list[dict]: ...

    def saw_request(self, model_id: str) -> None:
        """A request for the model came in: it counts toward the swarm's demand (pipeline/demand.py)."""


class LocalRunner(Protocol):
    """This peer's own copy of the model (`potluck.localfallback.LocalFallback`)."""

    async def client(self, model_id: str, max_length: int) -> GenerationClient:
        """The client answering with its copy of `model_id`, for a request of `max_length` tokens (raises
        NotEnoughMemory)."""


# --- checking a request -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedGeneration:
    """A request that passed every check: ready to run."""

    model: dict  # the model card with its coverage (Peer.swarm_models)
    client: GenerationClient
    ids: list[int]
    params: SamplingParams
    prefer: str | None = None  # the route's preference, "fast" or "green" (None: the peer's)
    continuing: PartialAnswer | None = None  # the answer's start another generation wrote before it failed


def find_model(models: list[dict], name: str) -> dict | None:
    """The model called `name` (its name, id, an id prefix of 8+ characters, or "default": this peer's
    own) among `models` (`swarm_models`), those this peer generates with first; None if none."""
    wanted = name.strip().lower()
    for m in sorted(models, key=lambda m: not m.get("runs_here")):  # stable: this peer's own model first
        if wanted in (m["name"].lower(), m["model_id"]) or (len(wanted) >= 8 and m["model_id"].startswith(wanted)):
            return m
        if wanted == "default" and m.get("runs_here"):
            return m
    return None


def choose_version(models: list[dict], requested: str) -> dict | None:
    """The model a request for the model id `requested` runs on: among the versions of its family this
    peer generates with (`runs_here`: it has their folders), the newest complete one, else an older
    complete one (pipeline/versions.py `Lineage.preference`, from the models' `superseded_by`); when none
    is complete, `requested` if this peer runs it, else its nearest version here (whose 503 then names the
    missing blocks); None when this peer runs no version of it."""
    lineage = Lineage({m["model_id"]: m["superseded_by"] for m in models if m.get("superseded_by")})
    here = {m["model_id"]: m for m in models if m.get("runs_here")}
    versions = [here[model_id] for model_id in lineage.preference(requested) if model_id in here]
    served = next((m for m in versions if (m.get("coverage") or {}).get("complete")), None)
    return served or here.get(requested) or next(iter(versions), None)


async def resolve(peer: ApiPeer, name: str) -> dict:
    """The model a request for `name` runs on (`find_model`, then `choose_version`); 404 if none."""
    return (await _requested_and_served(peer, name))[1]


async def _requested_and_served(peer: ApiPeer, name: str) -> tuple[str, dict]:
    """The id asked for by `name`, and the model the request runs on (`resolve`)."""
    models = await peer.swarm_models(load=True)
    requested = find_model(models, name)
    served = choose_version(models, requested["model_id"]) if requested is not None else None
    if requested is None or served is None:
        known = ", ".join(f"{m['name']} (id {m['model_id'][:12]})" for m in models if m.get("runs_here")) or "none"
        raise ApiError(404, f"The model '{name[:100]}' does not exist here. This peer runs: {known}; "
                            "GET /v1/models lists them.", param="model", code="model_not_found")
    return requested["model_id"], served


def no_route(model: dict) -> ApiError | None:
    """The 503 to answer when no route covers `model`'s blocks, else None."""
    view = model.get("coverage")
    if view is None or view["complete"]:
        return None
    missing = view["missing"]
    span = " ".join(f"--blocks {a}:{b}" for a, b in missing)
    return ApiError(503, f"No route covers model {model['name']}: blocks {format_ranges(missing)} (of "
                         f"{view['num_blocks']}) are served by no online peer. Wait for servers to join, or "
                         f"serve them yourself: potluck serve --model {model['name']} {span}",
                    type="server_error", code="no_route")


async def prepare(peer: ApiPeer, model_name: str, prompt: Prompt, params: SamplingParams, *,
                  max_tokens_given: bool, prefer: str | None = None) -> PreparedGeneration:
    """Check a request (see the module docstring); raises ApiError naming what is wrong."""
    requested, model = await _requested_and_served(peer, model_name)
    # asked for, whether or not the swarm can answer it; by the id asked for (pipeline/modelchoice.py
    # counts it toward the version that serves it)
    peer.saw_request(requested)
    client = await peer.client(model["model_id"])
    ids, params, what = _checked(client, model, prompt, params, max_tokens_given=max_tokens_given)
    blocked = no_route(model)
    if blocked is not None:
        raise blocked
    params = _fit_swarm_cache(model, len(ids), params, max_tokens_given=max_tokens_given, what=what)
    return PreparedGeneration(model, client, ids, params, prefer)


async def prepare_local(peer: ApiPeer, local: LocalRunner, model_name: str, prompt: Prompt, params: SamplingParams,
                        *, max_tokens_given: bool) -> PreparedGeneration:
    """`prepare` for an answer with this peer's own copy of the model (`--fallback local`): the same
    checks but the swarm's (coverage, its servers' caches); raises ApiError, or NotEnoughMemory when
    this machine cannot hold the model."""
    model = await resolve(peer, model_name)
    ids, params, _ = _checked(await peer.client(model["model_id"]), model, prompt, params,
                              max_tokens_given=max_tokens_given)
    client = await local.client(model["model_id"], len(ids) + params.max_new_tokens)
    return PreparedGeneration(model, client, ids, params)


def seeded(job: PreparedGeneration) -> PreparedGeneration:
    """`job` with a sampling seed drawn now if the request gave none (its sampler would draw one anyway):
    a generation that continues it (`continue_locally`) then draws the tokens this one would have."""
    if job.params.seed is not None:
        return job
    return dataclasses.replace(job, params=dataclasses.replace(job.params, seed=secrets.randbits(63)))


async def continue_locally(local: LocalRunner, job: PreparedGeneration, partial: PartialAnswer) -> PreparedGeneration:
    """`job`, whose swarm generation failed after `partial`, to be finished on this peer's own copy of the
    model: the same prompt ids and params (the rest of max_tokens is what is left); raises NotEnoughMemory."""
    client = await local.client(job.model["model_id"], len(job.ids) + job.params.max_new_tokens)
    return dataclasses.replace(job, client=client, prefer=None, continuing=partial)


def _checked(client: GenerationClient, model: dict, prompt: Prompt, params: SamplingParams, *,
             max_tokens_given: bool) -> tuple[list[int], SamplingParams, str]:
    """(the prompt's ids, the params with max_tokens fitted to the context, "messages" or "prompt")."""
    what = "messages" if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict) else "prompt"
    try:
        ids = client.encode(prompt)
    except Exception as e:  # a template that refuses the roles, a tokenizer error
        raise ApiError(400, f"could not tokenize the {what}: {e}", param=what) from None
    if not ids:
        raise ApiError(400, f"the {what} is empty", param=what)
    vocab = client.model_config.vocab_size
    if any(t >= vocab for t in ids):
        raise ApiError(400, f"token ids must be below the vocabulary size {vocab}", param="prompt")
    limit = model.get("context_length")
    if limit:
        room = limit - len(ids)
        if room < 1 or (max_tokens_given and params.max_new_tokens > room):
            raise ApiError(400, f"This model's context is {limit} tokens; the prompt has {len(ids)} and "
                                f"max_tokens asks for {params.max_new_tokens}. Shorten the prompt or lower "
                                "max_tokens.", param="max_tokens" if room >= 1 else what,
                           code="context_length_exceeded")
        params = dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens, room))
    return ids, params, what


def _fit_swarm_cache(model: dict, prompt_tokens: int, params: SamplingParams, *, max_tokens_given: bool,
                     what: str) -> SamplingParams:
    """Refuse (400, naming the limit) a request longer than any route's servers have KV cache for, as
    they announced it, before any server is asked; an unasked-for max_tokens is lowered to fit."""
    fits = (model.get("coverage") or {}).get("max_request_tokens")
    if fits is None:
        return params
    room = fits - prompt_tokens
    if room < 1 or (max_tokens_given and params.max_new_tokens > room):
        raise ApiError(400, f"This request is too long for the swarm now: its servers can hold at most {fits} tokens "
                            f"of a request (prompt + max_tokens); the prompt has {prompt_tokens} and max_tokens asks "
                            f"for {params.max_new_tokens}. Shorten the prompt or lower max_tokens.",
                       param="max_tokens" if room >= 1 else what, code="context_length_exceeded")
    return dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens, room))


# --- running it -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationResult:
    """A finished generation as the front doors report it."""

    generation: Generation
    model_id: str
    source: str  # "api" or "control"

    @property
    def credits_spent(self) -> float:
        """GFLOP-credits this client signed for this generation's sessions (receipts' face value)."""
        return credits(self.generation.spent_flops)

    def summary(self) -> dict:
        """Route, tokens, timings and cost: the peer's `last_generation`, the API's `potluck` field."""
        g = self.generation
        return {
            "route": [{"peer_id": peer_id, "start": start, "end": end} for peer_id, start, end in g.route],
            "tokens": len(g.token_ids),
            "prompt_tokens": g.prompt_tokens,
            "finish_reason": g.finish_reason,
            "ttft_s": g.ttft_s,
            "wall_s": g.wall_s,
            "tokens_per_s": g.tokens_per_s,
            "recoveries": g.recoveries,
            # steps, and their wall time split into the servers' compute and the rest (network, queues)
            "steps": g.steps,
            "compute_s": g.compute_s,
            "network_s": g.network_s,
            "push_fallbacks": g.push_fallbacks,
            # speculative decoding: decode passes, drafts, tokens per pass, acceptance (None: off)
            "speculation": g.speculation.summary() if g.speculation is not None else None,
            "credits_spent": self.credits_spent,
            "paid": [{"peer_id": peer_id_from_public_key(r.server), "session": r.session.hex(), "start": r.start,
                      "end": r.end, "tokens": r.tokens, "credits": credits(r.flops)} for r in g.paid],
            "model_id": self.model_id,
            "source": self.source,
        }


class Interrupted(ApiError):
    """A generation that failed: the `ApiError` to answer with, and the start of the answer it had
    produced (`partial`: every token the stream gave, and the characters of text written)."""

    def __init__(self, error: ApiError, partial: PartialAnswer):
        super().__init__(error.status, error.message, type=error.type, param=error.param, code=error.code,
                         retry=error.retry, retry_after=error.retry_after)
        self.partial = partial


async def run(peer: ApiPeer, job: PreparedGeneration, *, source: str) -> AsyncGenerator[str | GenerationResult, None]:
    """Run a prepared generation (from `job.continuing` when set): its text piece by piece (the pieces
    add up to the text not written before), then its `GenerationResult`, which becomes the peer's last
    generation. A failure is raised as the `Interrupted` that says what went wrong (`explain`) and
    what was produced before it."""
    result = None
    start = job.continuing or PartialAnswer()
    token_ids: list[int] = []
    shown = 0
    try:
        async with aclosing(job.client.stream(job.ids, job.params, prefer=job.prefer,
                                              continuing=job.continuing)) as events:
            async for event in events:
                if isinstance(event, TokenEvent):
                    token_ids.append(event.token_id)
                shown += len(event.text)
                if event.text:
                    yield event.text
                if isinstance(event, Finished):
                    result = GenerationResult(event.generation, job.model["model_id"], source)
    except Exception as e:
        partial = PartialAnswer(start.token_ids + tuple(token_ids), start.shown + shown)
        raise Interrupted(await explain(peer, job.model, e), partial) from e
    if result is None:
        raise RuntimeError("the generation's stream ended without its Finished event")
    peer.last_generation = result.summary()
    yield result


async def complete(peer: ApiPeer, job: PreparedGeneration, *, source: str) -> GenerationResult:
    """`run` to the end, for a caller that wants the whole result at once."""
    async with aclosing(run(peer, job, source=source)) as pieces:
        async for piece in pieces:
            if isinstance(piece, GenerationResult):
                return piece
    raise RuntimeError("the generation ended without its result")


# --- failures -----------------------------------------------------------------------------------------------


def _causes(e: BaseException) -> Iterator[BaseException]:
    """`e` and everything on its cause/context chain and in its exception groups."""
    seen = set()
    stack: list[BaseException | None] = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        stack += [x.__cause__, x.__context__, *getattr(x, "exceptions", ())]


def _refusal(x: BaseException) -> Refused | None:
    """`x` as a typed refusal: the client's own, a server's error reply by its wire kind, or the
    ledger's credit refusal; None for anything else."""
    if isinstance(x, Refused):
        return x
    if isinstance(x, InferenceError) and x.kind in REFUSALS:
        return REFUSALS[x.kind](x.kind, str(x), limit=x.limit)
    if isinstance(x, CreditRefused):
        return InsufficientCredit("CreditRefused", str(x))
    return None


def map_error(e: BaseException) -> ApiError:
    """A failure as the front doors answer it, by the types on its cause chain: a refusal the user
    can act on (too long: 400 with the usable limit; no credit: 402) before any other failure (503)."""
    causes = list(_causes(e))
    for x in causes:
        if isinstance(x, ApiError):
            return x
    refusals = [r for r in map(_refusal, causes) if r is not None]
    credit = next((r for r in refusals if isinstance(r, InsufficientCredit)), None)
    if credit is not None:
        return ApiError(402, f"The swarm refused this request: {credit.message} {EARN_HINT}",
                        type="insufficient_quota", code="insufficient_credits")
    too_long = next((r for r in refusals if isinstance(r, (TooLong, CacheFull))), None)
    if too_long is not None:
        room = (f"the servers of this model can hold at most {too_long.limit} tokens of a request (prompt + "
                "max_tokens) right now" if too_long.limit is not None else "no server can hold a request this long now")
        return ApiError(400, f"This request is too long for the swarm: {room}. Shorten the prompt or lower max_tokens.",
                        param="messages", code="context_length_exceeded")
    failed = next((x for x in causes if isinstance(x, (GenerationFailed, NoRoute))), None)
    if failed is not None:
        return ApiError(503, f"The swarm could not complete the generation: {failed}", type="server_error",
                        code="generation_failed")
    if isinstance(e, ValueError):
        return ApiError(400, str(e))
    log.exception("generation failed", exc_info=e)
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error", code="internal_error")


async def explain(peer: ApiPeer, model: dict, e: BaseException) -> ApiError:
    """`map_error`, and when the swarm lost the route (a server left between the coverage check and
    the generation), which blocks are missing, as for any missing route."""
    error = map_error(e)
    if error.code == "generation_failed":
        models = await peer.swarm_models(max_age=0.0)
        missing = next((no_route(m) for m in models if m["model_id"] == model["model_id"]), None)
        if missing is not None:
            return missing
    return error
