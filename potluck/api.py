"""The local peer's HTTP face: an OpenAI-compatible API, `/api/status`, `/api/credits`, the dashboard.

    potluck serve --api 127.0.0.1:8000                      # loopback: no key needed
    potluck serve --api 0.0.0.0:8000 --api-key SECRET       # any other address: the key is required

    GET  /v1/models              the model(s) this peer can run, with the swarm's coverage of their blocks
    POST /v1/chat/completions    messages through the tokenizer's chat template; stream: true gives SSE
    POST /v1/completions         a plain prompt
    GET  /api/status             this peer, its server, known peers, coverage, the last request's route
    GET  /api/credits            this peer's credits, its standing as others likely see it, and per known
                                 peer: balance, what we owe each other, standing in this peer's view
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
    503 server_error           no route covers the model (code no_route, names the missing blocks),
                               or the swarm failed mid-generation (code generation_failed)
In a stream, an error after the first byte arrives as one `data: {"error": ...}` event (the openai
client raises it), then `data: [DONE]`. 402 and 503 carry `x-should-retry: false` so clients do not
hammer a swarm that cannot serve them.

Non-standard additions: every completion (and the final chunk of a stream) has a `potluck` field
with the route, tokens/s and the credits this request spent (what this peer signed for the request's
own server sessions, listed in `paid`); `/v1/models` entries have `potluck`
with the coverage.
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import json
import logging
import time
from contextlib import aclosing
from importlib import resources
from typing import Any, Callable
from urllib.parse import parse_qs, urlencode

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .generation import ApiPeer, GenerationResult, PreparedGeneration, map_error, prepare, resolve, run
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


def check_bind(host: str, api_key: str | None) -> None:
    if not is_loopback(host) and not api_key:
        raise ValueError(f"--api {host}: an address other than loopback needs --api-key KEY "
                         "(every request must then send `Authorization: Bearer KEY`)")


async def serve(peer: ApiPeer, host: str, port: int, api_key: str | None = None, *,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve the API for `peer` until cancelled; `started` with the base URL (e.g. http://127.0.0.1:8000)."""
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    check_bind(host, api_key)
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("potluck.api.http")
    config.graceful_timeout = 1.0
    config.keep_alive_timeout = 30.0
    app = create_app(peer, api_key=api_key)

    class _Status:  # hypercorn reports the bound addresses (port 0 resolved) through task_status
        def started(self, binds=None):
            url = binds[0] if binds else f"http://{host}:{port}"
            # a wildcard bind is reached locally through loopback: report an address one can open
            url = url.replace("//0.0.0.0:", "//127.0.0.1:").replace("//[::]:", "//[::1]:")
            log.info("HTTP API on %s", url)
            task_status.started(url)

    await hypercorn_serve(app, config, task_status=_Status())


# --- the application -------------------------------------------------------------------------------


def error_response(err: ApiError) -> JSONResponse:
    headers = {} if err.retry else {"x-should-retry": "false"} if err.status >= 429 else {}
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


class _KeyCheck:
    """ASGI middleware: with a key, every HTTP request must carry it (Bearer header, x-api-key, or
    ?key= for the dashboard's page, which a browser opens without headers)."""

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key

    def _ok(self, scope) -> bool:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = []
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given.append(auth[7:].strip())
        if "x-api-key" in headers:
            given.append(headers["x-api-key"].strip())
        given += parse_qs(scope.get("query_string", b"").decode("latin-1")).get("key", [])
        assert self.key is not None  # checked only with a key
        return any(hmac.compare_digest(g.encode(), self.key.encode()) for g in given)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.key is not None and not self._ok(scope):
            err = ApiError(401, "Missing or wrong API key: send `Authorization: Bearer KEY` with the key this peer "
                                "was started with (--api-key).", code="invalid_api_key")
            await error_response(err)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class Api:
    def __init__(self, peer: ApiPeer):
        self.peer = peer

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
                            "max_request_tokens": view.get("max_request_tokens")}}

    async def status(self, request: Request) -> Response:
        status = self.peer.status()
        status["models"] = await self.models(load=request.query_params.get("load", "1") != "0")
        return JSONResponse(status)

    async def credits(self, request: Request) -> Response:
        return JSONResponse(await self.peer.credits())

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
        req = kind.parse(await self.body_json(request))
        prompt = req.messages if isinstance(req, ChatRequest) else req.prompt
        job = await prepare(self.peer, req.model, prompt, req.params, max_tokens_given=req.max_tokens_given)
        return _GenerationResponse(self.peer, job, req, what)


class _GenerationResponse:
    """An ASGI response that runs the generation: non-streamed JSON, or SSE chunks. The generation,
    the writer and a watcher of `http.disconnect` share one nursery; a disconnect cancels it."""

    def __init__(self, peer: ApiPeer, job: PreparedGeneration, req: GenerationRequest, what: str):
        self.peer, self.job, self.req, self.what = peer, job, req, what
        self.model = job.model
        self.rid = new_id("chatcmpl" if what == "chat" else "cmpl")
        self.created = int(time.time())

    async def __call__(self, scope, receive, send) -> None:
        self.scope, self.receive = scope, receive
        send_ch, recv_ch = trio.open_memory_channel(256)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_disconnect, receive, nursery.cancel_scope)
            nursery.start_soon(self._produce, send_ch)
            if self.req.stream:
                await self._write_stream(recv_ch, send)
            else:
                await self._write_whole(recv_ch, send)
            nursery.cancel_scope.cancel()

    async def _watch_disconnect(self, receive, scope: trio.CancelScope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                log.info("client went away; cancelling its generation")
                scope.cancel()
                return

    async def _produce(self, ch: trio.MemorySendChannel) -> None:
        """Run the generation, sending ("text", str) ..., then ("done", GenerationResult) or ("error", ApiError)."""
        async with ch:
            try:
                async with aclosing(run(self.peer, self.job, source="api")) as pieces:
                    async for piece in pieces:
                        if isinstance(piece, GenerationResult):
                            await ch.send(("done", piece))
                        else:
                            await ch.send(("text", piece))
            except Exception as e:  # every failure becomes an answer, never a crashed connection
                await ch.send(("error", map_error(e)))

    def _usage(self, result: GenerationResult) -> dict:
        return usage(len(self.job.ids), len(result.generation.token_ids))

    @staticmethod
    def _extra(result: GenerationResult) -> dict:
        """The answer's `potluck` field."""
        summary = result.summary()
        return {k: summary[k] for k in ("route", "tokens_per_s", "ttft_s", "wall_s", "credits_spent", "paid",
                                        "recoveries", "model_id")}

    async def _write_whole(self, recv: trio.MemoryReceiveChannel, send) -> None:
        parts = []
        async for kind, value in recv:
            if kind == "text":
                parts.append(value)
            elif kind == "error":
                await error_response(value)(self.scope, self.receive, send)
                return
            else:
                make = chat_completion if self.what == "chat" else text_completion
                body = make(self.rid, self.model["name"], "".join(parts), value.generation.finish_reason,
                            self._usage(value), self._extra(value))
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
                await event(self._chunk(delta={}, finish_reason=value.generation.finish_reason,
                                        extra=self._extra(value)))
                if self.req.include_usage:
                    await event(self._chunk(no_choices=True, use=self._usage(value)))
                break
        await event("[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def create_app(peer: ApiPeer, *, api_key: str | None = None):
    api = Api(peer)

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
    ]
    # Starlette types every handler as taking any Exception; each of ours takes the class it is registered for
    handlers: dict[Any, Callable[..., Any]] = {ApiError: on_api_error, HTTPException: on_http_error,
                                               Exception: on_error}
    app = Starlette(routes=routes, exception_handlers=handlers)
    return _KeyCheck(app, api_key)
