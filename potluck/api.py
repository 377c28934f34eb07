"""The local peer's HTTP face: an OpenAI-compatible API, `/api/status`, `/api/credits`, the dashboard.

    potluck serve --api 127.0.0.1:8000                      # loopback: no key needed
    potluck serve --api 0.0.0.0:8000 --api-key SECRET       # any other address: the key is required

    GET  /v1/models              the model(s) this peer can run, with the swarm's coverage of their blocks
    POST /v1/chat/completions    messages through the tokenizer's chat template; stream: true gives SSE
    POST /v1/completions         a plain prompt
    GET  /api/status             this peer, its server, known peers, coverage, the last request's route
    GET  /api/credits            this peer's credits, its standing as others likely see it, and per known
                                 peer: balance, what we owe each other, standing in this peer's view
    GET  /api/usage              with --apps: an app's own usage (its key), every app's (the operator)
    GET  /                       the dashboard (potluck/dashboard/: plain HTML + JS, no CDN)

Why hypercorn + Starlette. The peer is one trio program: every task of it lives in one nursery
(`run_peer`), so SIGINT stops everything together and nothing needs locks across threads. The HTTP
server therefore has to be a trio citizen that can be started *inside* that nursery, not a second
event loop or a thread:
- hypercorn has a native trio worker, and `hypercorn.trio.serve(app, config, task_status=...)` is an
  ordinary trio task: `nursery.start` returns the bound address (port 0 works), cancelling the
  nursery stops it. uvicorn is asyncio-only; daphne is Twisted; writing an HTTP/1.1 server on h11
  ourselves would re-do keep-alive, pipelining, chunking and limits that hypercorn already does.
- Starlette is written against anyio, so it runs on trio unchanged (routing, requests, responses),
  and it is small: one pure-Python dependency (anyio, already here). FastAPI would add pydantic
  models and OpenAPI generation we do not need; Quart is asyncio-first.
- Generation code stays plain trio: a response runs a nursery with the generation (producer), the
  SSE writer (consumer) and a watcher of `http.disconnect`; a client that goes away cancels that
  nursery, which cancels the generation inside `InferenceSession`'s `async with`, which closes the
  servers' sessions (hypercorn reports the disconnect as soon as the socket closes; its ASGI spec
  version, 2.1, makes no promise that `send` fails, so we watch `receive` ourselves).

Errors use the OpenAI shape, `{"error": {"message", "type", "param", "code"}}`:
    400 invalid_request_error  bad JSON (or JSON nested deeper than 32 levels), a bad, out-of-range or
                               unsupported parameter (tools, response_format, ...), a prompt too long
                               (code says which)
    401 invalid_request_error  missing or wrong API key (code invalid_api_key)
    402 insufficient_quota     a server refused us: this peer owes it its allowance (debt limit + standing)
                               (code insufficient_credits; the message says how to earn). Not 429:
                               retrying soon does not help, serving blocks does.
    404 invalid_request_error  unknown model (code model_not_found), unknown path
    429 requests               an app (--apps) used up a quota, or has its max_in_flight requests being
                               answered; `retry-after` says when to retry (code rate_limit_exceeded)
    503 server_error           no route covers the model (code no_route, names the missing blocks),
                               or the swarm failed mid-generation (code generation_failed); with
                               --fallback URL the upstream answers instead (potluck/fallback.py), with
                               --fallback local this peer itself (potluck/localfallback.py) unless it
                               lacks the memory (the 503 then says so)
In a stream, an error after the first byte arrives as one `data: {"error": ...}` event (the openai
client raises it), then `data: [DONE]`. 402 and 503 carry `x-should-retry: false` so clients do not
hammer a swarm that cannot serve them.

Non-standard additions: every completion (and the final chunk of a stream) has a `potluck` field
with the route, tokens/s, speculative decoding's tokens per pass and acceptance
(`speculation`) and the credits this request spent (what this peer signed for the request's
own server sessions, listed in `paid`), and `fallback` (true when the fallback answered, wholly or
from where the swarm stopped; "local" when this peer answered with its own copy of the model, wholly or
from the swarm's last token; `swarm_pieces` says how many pieces of text the swarm wrote); a request with `"potluck": {"receipts": true}` also gets `receipts`,
the receipts this peer signed to the servers for this answer (hex msgpack, `credits.Receipt.from_list`):
an application can check their signatures and prices and compare them with the servers' ledgers.
`/v1/models` entries have `potluck` with the coverage.

Many applications (--apps, potluck/apps.py, which needs --api-key): each request with an app's key is
metered and held to its quotas; the operator (the --api-key key) sees every app's usage.
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import json
import logging
import time
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable
from urllib.parse import parse_qs, urlencode

import msgpack
import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .apps import App, AppTable
from .fallback import UPSTREAM_CODES, FallbackConfig, FallbackFailed, Upstream, continuation
from .generation import (ApiPeer, GenerationResult, Interrupted, LocalRunner, PreparedGeneration, Prompt,
                         continue_locally, map_error, prepare, prepare_local, resolve, run, seeded)
from .memory import NotEnoughMemory
from .openai_schema import (ApiError, ChatRequest, CompletionRequest, GenerationRequest, chat_chunk, chat_completion,
                            completion_chunk, new_id, parse_json_body, text_completion, usage)

log = logging.getLogger(__name__)

MAX_BODY = 4 * 1024 * 1024
DASHBOARD_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                   "style.css": "text/css; charset=utf-8"}


# --- binding ---------------------------------------------------------------------------------------


def parse_hostport(spec: str) -> tuple[str, int]:
    """"127.0.0.1:8000", "[::1]:8000", ":8000" (loopback) → (host, port)."""
    host, sep, port = spec.rpartition(":")
    if not sep:
        raise ValueError(f"--api wants HOST:PORT, got {spec!r}")
    host = host.strip("[]") or "127.0.0.1"
    try:
        p = int(port)
    except ValueError:
        raise ValueError(f"--api wants HOST:PORT with a numeric port, got {spec!r}") from None
    if not 0 <= p <= 65535:
        raise ValueError(f"--api port {p} is out of range")
    return host, p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None, *, apps: bool = False) -> None:
    if not is_loopback(host) and not api_key:
        raise ValueError(f"--api {host}: an address other than loopback needs --api-key KEY "
                         "(every request must then send `Authorization: Bearer KEY`)")
    # Without an operator key, a key-less request would be the operator's; behind a reverse proxy on
    # this host every stranger's request comes from loopback.
    if apps and not api_key:
        raise ValueError("--apps needs --api-key KEY too: the operator's key, which sees every app's usage, "
                         "the peer's status and credits")


async def serve(peer: ApiPeer, host: str, port: int, api_key: str | None = None, *, apps: AppTable | None = None,
                fallback: FallbackConfig | None = None, local: LocalRunner | None = None,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve the API for `peer` until cancelled; `started` with the base URL (e.g. http://127.0.0.1:8000)."""
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    check_bind(host, api_key, apps=apps is not None)
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("potluck.api.http")
    config.graceful_timeout = 1.0
    config.keep_alive_timeout = 30.0

    class _Status:  # hypercorn reports the bound addresses (port 0 resolved) through task_status
        def started(self, binds=None):
            url = binds[0] if binds else f"http://{host}:{port}"
            # a wildcard bind is reached locally through loopback: report an address one can open
            url = url.replace("//0.0.0.0:", "//127.0.0.1:").replace("//[::]:", "//[::1]:")
            log.info("HTTP API on %s", url)
            task_status.started(url)

    async with AsyncExitStack() as stack:
        upstream = await stack.enter_async_context(Upstream.connect(fallback)) if fallback is not None else None
        app = create_app(peer, api_key=api_key, apps=apps, upstream=upstream, local=local)
        await hypercorn_serve(app, config, task_status=_Status())


# --- the application -------------------------------------------------------------------------------


def error_response(err: ApiError) -> JSONResponse:
    headers = {} if err.retry else {"x-should-retry": "false"} if err.status >= 429 else {}
    if err.retry_after is not None:
        headers = {"retry-after": str(err.retry_after)}
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


MAX_KEYS_GIVEN = 4  # keys of one request compared with every app's: a URL of a thousand ?key= is not a thousand
CALLER = "potluck.app"  # the ASGI scope's key for who is asking: an `App`, or None for the operator
APP_PATHS = ("/v1/", "/api/usage")  # what an app's key opens; the rest (status, credits, dashboard) is the operator's


class _KeyCheck:
    """ASGI middleware: with a key, every HTTP request must carry it (Bearer header, x-api-key, or
    ?key= for the dashboard's page, which a browser opens without headers). With apps, an app's key
    is let in as that app (`scope[CALLER]`); the operator is the --api-key key (apps need one:
    `check_bind`). An app sees the API and its usage, not the peer's status or credits."""

    def __init__(self, app, key: str | None, apps: AppTable | None):
        self.app, self.key, self.apps = app, key, apps

    @staticmethod
    def _given(scope) -> list[str]:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = []
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given.append(auth[7:].strip())
        if "x-api-key" in headers:
            given.append(headers["x-api-key"].strip())
        given += parse_qs(scope.get("query_string", b"").decode("latin-1")).get("key", [])
        return given[:MAX_KEYS_GIVEN]

    def _caller(self, scope) -> tuple[bool, App | None]:
        """(let in, the app asking or None for the operator)."""
        given = self._given(scope)
        if self.key is not None and any(hmac.compare_digest(g.encode(), self.key.encode()) for g in given):
            return True, None
        if self.apps is None:
            return self.key is None, None
        for g in given:
            app = self.apps.by_key(g)
            if app is not None:
                return True, app
        return False, None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            allowed, scope[CALLER] = self._caller(scope)
            if not allowed:
                which = "an app's key (--apps) or " if self.apps is not None else ""
                err = ApiError(401, f"Missing or wrong API key: send `Authorization: Bearer KEY` with {which}the key "
                                    "this peer was started with (--api-key).", code="invalid_api_key")
                await error_response(err)(scope, receive, send)
                return
            if scope[CALLER] is not None and not scope["path"].startswith(APP_PATHS):
                err = ApiError(403, f"An app's key opens the OpenAI API and /api/usage; {scope['path'][:100]} is the "
                                    "operator's.", code="operator_only")
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Api:
    def __init__(self, peer: ApiPeer, apps: AppTable | None = None, upstream: Upstream | None = None,
                 local: LocalRunner | None = None):
        self.peer, self.apps, self.upstream, self.local = peer, apps, upstream, local

    # --- helpers ------------------------------------------------------------------------------------

    async def body_json(self, request: Request) -> Any:
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_BODY:
                raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes", code="body_too_large")
        return parse_json_body(bytes(data))

    async def models(self, load: bool = True) -> list[dict]:
        return await self.peer.swarm_models(load=load)

    # --- endpoints ----------------------------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        data = [self.model_object(m) for m in await self.models()]
        return JSONResponse({"object": "list", "data": data})

    async def get_model(self, request: Request) -> Response:
        return JSONResponse(self.model_object(await resolve(self.peer, request.path_params["model"])))

    @staticmethod
    def model_object(m: dict) -> dict:
        view = m.get("coverage") or {}
        return {"id": m["name"], "object": "model", "created": 0, "owned_by": "potluck-swarm", "root": m["model_id"],
                "potluck": {"model_id": m["model_id"], "num_blocks": m["num_blocks"],
                            "covered_blocks": view.get("covered_blocks"), "missing_blocks": view.get("missing"),
                            "replicas": view.get("replicas"), "throughput": view.get("throughput"),
                            "context_length": m.get("context_length"),
                            "max_request_tokens": view.get("max_request_tokens"),
                            # model versions (pipeline/versions.py): requests go to the newest complete one
                            "supersedes": m.get("supersedes", []), "superseded_by": m.get("superseded_by")}}

    async def status(self, request: Request) -> Response:
        status = self.peer.status()
        status["models"] = await self.models(load=request.query_params.get("load", "1") != "0")
        return JSONResponse(status)

    async def credits(self, request: Request) -> Response:
        return JSONResponse(await self.peer.credits())

    async def usage(self, request: Request) -> Response:
        if self.apps is None:
            raise ApiError(404, "This peer serves no apps (start it with --apps FILE to meter them).",
                           code="no_apps")
        return JSONResponse(self.apps.usage(request.scope.get(CALLER)))

    async def dashboard(self, request: Request) -> Response:
        name = request.path_params.get("name", "index.html")
        if name not in DASHBOARD_FILES:
            raise HTTPException(404)
        text = resources.files("potluck").joinpath("dashboard", name).read_text(encoding="utf-8")
        key = request.query_params.get("key")
        if name == "index.html" and key:  # the page's own assets need the key too (a browser sends no header)
            q = html.escape(urlencode({"key": key}))
            text = text.replace('.css"', f'.css?{q}"').replace('.js"', f'.js?{q}"')
        return Response(text, media_type=DASHBOARD_FILES[name], headers={"cache-control": "no-cache"})

    async def chat_completions(self, request: Request) -> _GenerationResponse:
        return await self._generate(request, ChatRequest, "chat")

    async def completions(self, request: Request) -> _GenerationResponse:
        return await self._generate(request, CompletionRequest, "text")

    async def _generate(self, request: Request, kind: type[ChatRequest] | type[CompletionRequest],
                        what: str) -> _GenerationResponse:
        caller: App | None = request.scope.get(CALLER)
        if caller is None or self.apps is None:
            return await self._prepare(request, kind, what, None)
        self.apps.admit(caller)
        try:
            return await self._prepare(request, kind, what, caller)  # the response gives the app's slot back
        except ApiError:
            self.apps.record_failure(caller)
            self.apps.release(caller)
            raise
        except BaseException:  # the client went away while sending its request: nothing to meter
            self.apps.release(caller)
            raise

    async def _prepare(self, request: Request, kind: type[ChatRequest] | type[CompletionRequest], what: str,
                       caller: App | None) -> _GenerationResponse:
        req = kind.parse(await self.body_json(request))
        prompt = req.messages if isinstance(req, ChatRequest) else req.prompt
        try:
            job = await prepare(self.peer, req.model, prompt, req.params, max_tokens_given=req.max_tokens_given,
                                prefer=req.prefer)
        except ApiError as e:
            if e.code not in UPSTREAM_CODES or (self.upstream is None and self.local is None):
                raise
            if self.local is not None:
                local_job = await local_generation(self.peer, self.local, req, e)
                return _GenerationResponse(self, req, what, local_job.model, caller, job=local_job, swarm_error=e,
                                           local=True)
            return _GenerationResponse(self, req, what, await resolve(self.peer, req.model), caller, swarm_error=e)
        if self.local is not None:  # our own copy may have to go on with this answer as the swarm would have
            job = seeded(job)
        return _GenerationResponse(self, req, what, job.model, caller, job=job)


async def local_generation(peer: ApiPeer, local: LocalRunner, req: GenerationRequest,
                           swarm_error: ApiError) -> PreparedGeneration:
    """`req` prepared for this peer's own copy of the model; when this machine cannot hold it, the
    swarm's error, saying why this peer cannot answer either."""
    prompt: Prompt
    if isinstance(req, ChatRequest):
        prompt = req.messages
    else:
        assert isinstance(req, CompletionRequest)  # the only other kind
        prompt = req.prompt
    try:
        return await prepare_local(peer, local, req.model, prompt, req.params, max_tokens_given=req.max_tokens_given)
    except NotEnoughMemory as e:
        raise _cannot_run_locally(swarm_error, e) from e


async def local_continuation(local: LocalRunner, job: PreparedGeneration, failed: Interrupted) -> PreparedGeneration:
    """The swarm's `job`, which failed (`failed`) after producing `failed.partial`, to be finished on this peer's
    own copy of the model; when this machine cannot hold it, the swarm's error, saying why."""
    try:
        return await continue_locally(local, job, failed.partial)
    except NotEnoughMemory as e:
        raise _cannot_run_locally(failed, e) from e


def _cannot_run_locally(swarm_error: ApiError, e: NotEnoughMemory) -> ApiError:
    return ApiError(swarm_error.status, f"{swarm_error.message} This peer cannot run the model itself "
                                        f"(--fallback local): {e}.", type=swarm_error.type, code=swarm_error.code)


@dataclass(frozen=True)
class _FallbackAnswer:
    """How an answer through the fallback ended: what the response's last chunk says."""

    finish_reason: str
    use: dict
    extra: dict


class _GenerationResponse:
    """An ASGI response that runs the generation: non-streamed JSON, or SSE chunks. The generation,
    the writer and a watcher of `http.disconnect` share one nursery; a disconnect cancels it. When
    the swarm cannot answer (`swarm_error` before it starts, with a local `job` the reason it answers
    instead; or a failure on the way) and a fallback
    is configured, the fallback writes the rest of the answer; a local fallback (`local`: the job runs
    on this peer's own copy of the model) goes on with a failed swarm answer from the swarm's last token
    (`local_continuation`). An app's request is metered exactly once, however it ends, and gives back
    the app's slot in flight (`AppTable.admit`)."""

    def __init__(self, api: Api, req: GenerationRequest, what: str, model: dict, caller: App | None, *,
                 job: PreparedGeneration | None = None, swarm_error: ApiError | None = None, local: bool = False):
        self.peer, self.apps, self.upstream, self.local_runner = api.peer, api.apps, api.upstream, api.local
        self.req, self.what, self.model, self.caller = req, what, model, caller
        self.job, self.swarm_error = job, swarm_error
        self.rid = new_id("chatcmpl" if what == "chat" else "cmpl")
        self.created = int(time.time())
        self.pieces_produced = 0  # pieces of text of the answer so far, the swarm's and the fallback's
        self.fell_back = False
        self.local = local  # the job runs on this peer's own copy of the model
        self.swarm_pieces = 0  # pieces of text the swarm wrote before our own copy took over
        self.metered = False

    async def __call__(self, scope, receive, send) -> None:
        self.scope, self.receive = scope, receive
        send_ch, recv_ch = trio.open_memory_channel(256)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_disconnect, receive, nursery.cancel_scope)
                nursery.start_soon(self._produce, send_ch)
                if self.req.stream:
                    await self._write_stream(recv_ch, send)
                else:
                    await self._write_whole(recv_ch, send)
                nursery.cancel_scope.cancel()
        finally:
            # Plain bookkeeping, no awaits: it runs even while a cancellation (the client went away)
            # passes through, and does not stop it.
            if self.caller is not None and self.apps is not None:
                if not self.metered:  # the answer did not end: charge what was produced for it
                    prompt_tokens = len(self.job.ids) if self.job is not None else 0
                    self._meter(prompt_tokens, self.pieces_produced, 0.0, fallback=self.fell_back)
                self.apps.release(self.caller)

    async def _watch_disconnect(self, receive, scope: trio.CancelScope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                log.info("client went away; cancelling its generation")
                scope.cancel()
                return

    async def _produce(self, ch: trio.MemorySendChannel) -> None:
        """Run the generation, sending ("text", str) ..., then ("done", GenerationResult),
        ("fallback", _FallbackAnswer) or ("error", ApiError)."""
        async with ch:
            written: list[str] = []
            try:
                if self.job is None:
                    assert self.swarm_error is not None  # one or the other
                    raise self.swarm_error
                try:
                    await self._run_job(ch, self.job, written)
                except Interrupted as failed:
                    if self.local or self.local_runner is None or failed.code not in UPSTREAM_CODES:
                        raise
                    log.info("the swarm failed after %d tokens (%s): our own copy goes on",
                             len(failed.partial.token_ids), failed.code)
                    self.swarm_error, self.swarm_pieces = failed, len(written)
                    self.job = await local_continuation(self.local_runner, self.job, failed)
                    self.local = True
                    await self._run_job(ch, self.job, written)
            except Exception as e:  # every failure becomes an answer, never a crashed connection
                error = map_error(e)
                if self.upstream is not None and error.code in UPSTREAM_CODES and self._prompt_text() is not None:
                    await self._fall_back(ch, self.upstream, error, written)
                    return
                self._meter_failure()
                await ch.send(("error", error))

    async def _run_job(self, ch: trio.MemorySendChannel, job: PreparedGeneration, written: list[str]) -> None:
        async with aclosing(run(self.peer, job, source="api")) as pieces:
            async for piece in pieces:
                if isinstance(piece, GenerationResult):
                    if self.local:
                        self.peer.last_generation = {**piece.summary(), **self._local_extra()}
                    self._meter(len(job.ids), len(piece.generation.token_ids), piece.credits_spent,
                                fallback=self.local)
                    await ch.send(("done", piece))
                else:
                    written.append(piece)
                    self.pieces_produced += 1
                    await ch.send(("text", piece))

    def _prompt_text(self) -> str | list[dict] | None:
        """The prompt as an upstream can take it: text or messages (token ids are this model's own)."""
        prompt = self.req.messages if isinstance(self.req, ChatRequest) else getattr(self.req, "prompt", None)
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)):
            return prompt
        return None

    async def _fall_back(self, ch: trio.MemorySendChannel, upstream: Upstream, error: ApiError,
                         written: list[str]) -> None:
        """The rest of the answer (all of it when the swarm wrote nothing) through the fallback."""
        prompt = self._prompt_text()
        assert prompt is not None  # checked by the caller
        log.info("the swarm cannot answer (%s): asking the fallback after %d pieces", error.code, len(written))
        params = self.req.params
        request: dict[str, Any] = {**continuation(self.what, prompt, "".join(written)),
                                   "max_tokens": max(1, params.max_new_tokens - len(written)),
                                   "temperature": params.temperature, "top_p": params.top_p}
        if params.seed is not None:
            request["seed"] = params.seed
        if params.stop:
            request["stop"] = list(params.stop)
        pieces_after = 0
        self.fell_back = True

        async def write(text: str) -> None:
            nonlocal pieces_after
            pieces_after += 1
            self.pieces_produced += 1
            await ch.send(("text", text))

        try:
            end = await upstream.answer(self.what, self.model["name"], request, write)
        except FallbackFailed as e:
            self._meter_failure()
            await ch.send(("error", ApiError(error.status, f"{error.message} The fallback failed too: {e}",
                                             type=error.type, code=error.code)))
            return
        prompt_tokens = len(self.job.ids) if self.job is not None else end.prompt_tokens or 0
        completion = len(written) + (end.completion_tokens if end.completion_tokens is not None else pieces_after)
        extra = {"fallback": True, "fallback_model": end.model, "swarm_error": error.code,
                 "swarm_pieces": len(written), "route": [], "paid": [], "model_id": self.model["model_id"],
                 # nothing through the fallback costs credits; what a swarm part cost before it failed
                 # is in the ledger (this answer does not know it)
                 "credits_spent": 0.0 if not written else None}
        if self.req.receipts:
            extra["receipts"] = []
        self.peer.last_generation = {**extra, "tokens": completion, "prompt_tokens": prompt_tokens,
                                     "finish_reason": end.finish_reason, "source": "api"}
        self._meter(prompt_tokens, completion, 0.0, fallback=True)
        await ch.send(("fallback", _FallbackAnswer(end.finish_reason, usage(prompt_tokens, completion), extra)))

    def _meter(self, prompt_tokens: int, completion_tokens: int, credits_spent: float, *, fallback: bool) -> None:
        if self.caller is not None and self.apps is not None:
            self.metered = True
            self.apps.record(self.caller, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                             credits_spent=credits_spent, fallback=fallback)

    def _meter_failure(self) -> None:
        if self.caller is not None and self.apps is not None:
            self.metered = True
            self.apps.record_failure(self.caller)

    def _usage(self, result: GenerationResult) -> dict:
        assert self.job is not None  # a swarm's result has its job
        return usage(len(self.job.ids), len(result.generation.token_ids))

    def _extra(self, result: GenerationResult) -> dict:
        """The answer's `potluck` field."""
        summary = result.summary()
        extra = {k: summary[k] for k in ("route", "tokens_per_s", "ttft_s", "wall_s", "credits_spent", "paid",
                                         "recoveries", "speculation", "model_id")}
        extra["fallback"] = False
        if self.local:
            extra.update(self._local_extra())
        if self.req.receipts:
            extra["receipts"] = [msgpack.packb(r.to_list(), use_bin_type=True).hex() for r in result.generation.paid]
        return extra

    def _local_extra(self) -> dict:
        """What an answer of our own copy of the model adds to its `potluck` field: how much the swarm wrote
        before it failed, and why; what a swarm part cost is in the ledger (this answer does not know it)."""
        failure = self.swarm_error
        extra: dict[str, Any] = {"fallback": "local", "swarm_pieces": self.swarm_pieces,
                                 "swarm_error": failure.code if failure is not None else None}
        if isinstance(failure, Interrupted) and failure.partial.token_ids:
            extra["credits_spent"] = None
        return extra

    def _ending(self, value: GenerationResult | _FallbackAnswer) -> tuple[str, dict, dict]:
        """(finish_reason, usage, potluck field) of a finished answer."""
        if isinstance(value, _FallbackAnswer):
            return value.finish_reason, value.use, value.extra
        return value.generation.finish_reason, self._usage(value), self._extra(value)

    async def _write_whole(self, recv: trio.MemoryReceiveChannel, send) -> None:
        parts = []
        async for kind, value in recv:
            if kind == "text":
                parts.append(value)
            elif kind == "error":
                await error_response(value)(self.scope, self.receive, send)
                return
            else:
                finish_reason, use, extra = self._ending(value)
                make = chat_completion if self.what == "chat" else text_completion
                body = make(self.rid, self.model["name"], "".join(parts), finish_reason, use, extra)
                await JSONResponse(body)(self.scope, self.receive, send)
                return

    def _chunk(self, **kw) -> dict:
        if self.what == "chat":
            return chat_chunk(self.rid, self.model["name"], self.created, **kw)
        if "delta" in kw:
            kw["text"] = kw.pop("delta").get("content", "")
        return completion_chunk(self.rid, self.model["name"], self.created, **kw)

    async def _write_stream(self, recv: trio.MemoryReceiveChannel, send) -> None:
        started = False

        async def event(obj: Any) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
            await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})

        async def start() -> None:
            nonlocal started
            started = True
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                    (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
            if self.what == "chat":
                await event(self._chunk(delta={"role": "assistant", "content": ""}))

        async for kind, value in recv:
            if kind == "error":
                if not started:  # nothing sent yet: a plain HTTP error with the right status
                    await error_response(value)(self.scope, self.receive, send)
                    return
                await event(value.body())
                break
            if not started:
                await start()
            if kind == "text":
                await event(self._chunk(delta={"content": value}))
            else:
                finish_reason, use, extra = self._ending(value)
                await event(self._chunk(delta={}, finish_reason=finish_reason, extra=extra))
                if self.req.include_usage:
                    await event(self._chunk(no_choices=True, use=use))
                break
        await event("[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def create_app(peer: ApiPeer, *, api_key: str | None = None, apps: AppTable | None = None,
               upstream: Upstream | None = None, local: LocalRunner | None = None):
    api = Api(peer, apps, upstream, local)

    async def on_api_error(request: Request, exc: ApiError) -> Response:
        return error_response(exc)

    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return error_response(ApiError(404, f"Unknown path {request.method} {request.url.path}. This peer "
                                                "serves /v1/models, /v1/chat/completions, /v1/completions, "
                                                "/api/status, /api/credits and the dashboard at /.",
                                           code="unknown_url"))
        if exc.status_code == 405:
            return error_response(ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                                           code="method_not_allowed"))
        return error_response(ApiError(exc.status_code, str(exc.detail)))

    async def on_error(request: Request, exc: Exception) -> Response:
        return error_response(map_error(exc))

    routes = [
        Route("/", api.dashboard, methods=["GET"]),
        Route("/dashboard/{name}", api.dashboard, methods=["GET"]),
        Route("/v1/models", api.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", api.get_model, methods=["GET"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/api/status", api.status, methods=["GET"]),
        Route("/api/credits", api.credits, methods=["GET"]),
        Route("/api/usage", api.usage, methods=["GET"]),
    ]
    # Starlette types every handler as taking any Exception; each of ours takes the class it is registered for
    handlers: dict[Any, Callable[..., Any]] = {ApiError: on_api_error, HTTPException: on_http_error,
                                               Exception: on_error}
    app = Starlette(routes=routes, exception_handlers=handlers)
    return _KeyCheck(app, api_key, apps)
