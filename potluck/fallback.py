"""The fallback: an OpenAI-compatible upstream that answers when the swarm cannot.

    potluck serve --api 127.0.0.1:8000 --fallback https://api.example.com/v1 \
                  --fallback-key-env EXAMPLE_API_KEY --fallback-model SmolLM2-135M-Instruct=small-model

When no route covers the model (503 no_route), or the swarm fails mid-answer (503
generation_failed), the API asks the upstream instead (`Upstream.answer`). The answer continues
from the text the swarm already produced: a completion's prompt is sent with that text appended,
a chat's messages with it as the assistant's last message, and max_tokens is what is left. Text a
client has seen is never taken back, so a stream stays one answer. Nothing through the upstream
spends credits. Off by default: without `--fallback` the 503 is the answer.

The HTTP client is httpx's, which runs on trio (through anyio). The upstream is a stranger's
server as far as this peer's memory is concerned: every answer is read as a stream, lines and the
whole body are bounded, each read has a timeout and the whole answer a deadline, and every event
is checked for its shape before a field of it is used (`FallbackFailed` otherwise).
"""

from __future__ import annotations

import json
import logging
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncGenerator, AsyncIterator, Awaitable, Callable

import httpx
import trio

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 << 20  # a whole answer as it comes over the wire
MAX_LINE_BYTES = 1 << 20  # one SSE line
MAX_ERROR_BYTES = 4096  # what is kept of an upstream's error body, for the log
UPSTREAM_CODES = ("no_route", "generation_failed")  # the swarm could not answer: the fallback may


class FallbackFailed(Exception):
    """The upstream did not give an answer (refused, unreachable, too slow, malformed). Its message
    goes to the client: it names no URL and quotes nothing the upstream sent (those are logged)."""


@dataclass(frozen=True)
class FallbackConfig:
    url: str  # the upstream's base URL, e.g. https://api.example.com/v1
    key: str | None = field(default=None, repr=False)  # sent as `Authorization: Bearer KEY`
    models: dict[str, str] = field(default_factory=dict)  # our model name → the upstream's; "*" for any other
    read_timeout: float = 60.0  # between two pieces of the upstream's answer
    deadline: float = 600.0  # a whole answer

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"--fallback wants an http:// or https:// URL of an OpenAI-compatible API, got {self.url!r}")

    def upstream_model(self, name: str) -> str:
        return self.models.get(name, self.models.get("*", name))


def parse_model_map(specs: list[str]) -> dict[str, str]:
    """`--fallback-model` values: "UPSTREAM" (every model) or "OURS=UPSTREAM"."""
    out: dict[str, str] = {}
    for spec in specs:
        ours, sep, theirs = spec.rpartition("=")
        if not theirs or (sep and not ours):
            raise ValueError(f"--fallback-model wants NAME or OURS=NAME, got {spec!r}")
        out[ours if sep else "*"] = theirs
    return out


@dataclass(frozen=True)
class UpstreamFinished:
    """The end of an upstream answer."""

    model: str  # the model the upstream was asked for (after --fallback-model)
    finish_reason: str
    prompt_tokens: int | None  # as the upstream counted them (None if it did not say)
    completion_tokens: int | None


def continuation(what: str, prompt: str | list[dict], partial: str) -> dict:
    """The request fields that ask for the rest of an answer whose first `partial` text was written."""
    if what == "chat":
        assert isinstance(prompt, list)
        return {"messages": prompt + [{"role": "assistant", "content": partial}] if partial else prompt}
    assert isinstance(prompt, str)
    return {"prompt": prompt + partial}


class Upstream:
    """The fallback's client; its connections are kept open between answers (`connect`)."""

    def __init__(self, config: FallbackConfig, http: httpx.AsyncClient):
        self.config, self.http = config, http

    @classmethod
    @asynccontextmanager
    async def connect(cls, config: FallbackConfig) -> AsyncIterator["Upstream"]:
        timeout = httpx.Timeout(config.read_timeout, connect=10.0)
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as http:
            yield cls(config, http)

    @asynccontextmanager
    async def _open(self, path: str, body: dict) -> AsyncIterator[httpx.Response]:
        headers = {"content-type": "application/json", "accept": "text/event-stream", "accept-encoding": "identity"}
        if self.config.key:
            headers["authorization"] = f"Bearer {self.config.key}"
        try:
            async with self.http.stream("POST", self.config.url.rstrip("/") + path, json=body, headers=headers) as r:
                if r.status_code != 200:
                    log.warning("the fallback %s answered HTTP %d: %s", _shown(self.config.url), r.status_code,
                                await _head(r))
                    raise FallbackFailed(f"the fallback answered HTTP {r.status_code}")
                yield r
        except httpx.HTTPError as e:
            log.warning("the fallback %s failed: %s: %s", _shown(self.config.url), type(e).__name__, e)
            raise FallbackFailed(f"the fallback failed: {type(e).__name__}") from e

    async def answer(self, what: str, model: str, request: dict,
                     on_text: Callable[[str], Awaitable[None]]) -> UpstreamFinished:
        """The upstream's answer to `request` (prompt or messages, sampling fields), `what` "chat" or
        "text": each piece of text is given to `on_text` as it comes. Raises FallbackFailed."""
        upstream_model = self.config.upstream_model(model)
        body = {**request, "model": upstream_model, "stream": True, "stream_options": {"include_usage": True}}
        path = "/chat/completions" if what == "chat" else "/completions"
        finish: str | None = None
        counts: dict[str, int | None] = {"prompt_tokens": None, "completion_tokens": None}
        with trio.move_on_after(self.config.deadline) as deadline:
            async with self._open(path, body) as r:
                async with aclosing(_events(r)) as events:
                    async for data in events:
                        if data == "[DONE]":
                            break
                        event = _json_object(data)
                        if "error" in event:
                            log.warning("the fallback failed mid-answer: %s", str(event["error"])[:MAX_ERROR_BYTES])
                            raise FallbackFailed("the fallback failed mid-answer")
                        usage = event.get("usage")
                        if isinstance(usage, dict):
                            counts = {k: _count(usage.get(k)) for k in counts}
                        text, reason = _choice(event, what)
                        if text:
                            await on_text(text)
                        if reason is not None:
                            finish = reason
        if deadline.cancelled_caught:
            raise FallbackFailed(f"the fallback did not finish its answer in {self.config.deadline:g} s")
        if finish is None:
            raise FallbackFailed("the fallback's answer ended without a finish_reason")
        return UpstreamFinished(upstream_model, finish, **counts)


def _shown(url: str) -> str:
    """`url` for the log: without user:password@ and without the query (either may hold a credential)."""
    u = httpx.URL(url)
    return str(u.copy_with(userinfo=b"", query=None, fragment=None))


async def _head(r: httpx.Response) -> str:
    """The start of an error body, as sent (raw: a small compressed body may inflate without bound)."""
    data = bytearray()
    async for chunk in r.aiter_raw():
        data += chunk
        if len(data) >= MAX_ERROR_BYTES:
            break
    return bytes(data[:MAX_ERROR_BYTES]).decode("utf-8", "replace")


async def _events(r: httpx.Response) -> AsyncGenerator[str, None]:
    """The `data:` payloads of an SSE body, each line and the whole body bounded."""
    total = 0
    buffer = b""
    async for chunk in r.aiter_raw():
        total += len(chunk)
        if total > MAX_BODY_BYTES:
            raise FallbackFailed(f"the fallback's answer is longer than {MAX_BODY_BYTES} bytes")
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        if len(buffer) > MAX_LINE_BYTES:
            raise FallbackFailed(f"the fallback sent a line longer than {MAX_LINE_BYTES} bytes")
        for line in lines:
            line = line.rstrip(b"\r")
            if line.startswith(b"data:"):
                yield line[5:].strip().decode("utf-8", "replace")


def _json_object(data: str) -> dict:
    try:
        event = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser's stack
        log.warning("the fallback sent an event that is not JSON: %r", data[:80])
        raise FallbackFailed("the fallback sent an event that is not JSON") from None
    if not isinstance(event, dict):
        raise FallbackFailed("the fallback sent an event that is not a JSON object")
    return event


def _count(x: object) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 40 else None


def _choice(event: dict, what: str) -> tuple[str, str | None]:
    """(text, finish_reason) of a stream chunk's first choice; ("", None) for a chunk without one."""
    choices = event.get("choices")
    if choices is None or choices == []:
        return "", None
    if not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise FallbackFailed("the fallback sent malformed choices")
    choice = choices[0]
    if what == "chat":
        delta = choice.get("delta") or {}
        text = delta.get("content") if isinstance(delta, dict) else None
    else:
        text = choice.get("text")
    reason = choice.get("finish_reason")
    if not isinstance(text, (str, type(None))) or not isinstance(reason, (str, type(None))):
        raise FallbackFailed("the fallback sent a chunk whose text or finish_reason is not a string")
    if reason is not None and not 0 < len(reason) <= 64:
        raise FallbackFailed("the fallback sent a malformed finish_reason")
    return text or "", reason
