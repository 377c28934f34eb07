"""The HTTP API against a stand-in peer (no swarm, no model): request checking, the OpenAI error shape,
SSE framing, a refusal past the debt limit, the API key, the dashboard files. Fast; the real swarm
is in tests/test_api_swarm.py."""

from __future__ import annotations

import json
from typing import AsyncGenerator

import httpx
import pytest
import trio

from credits import Receipt, credits
from p2p.identity import Identity
from pipeline.client import Finished, Generation, GenerationFailed, PartialAnswer, TokenEvent
from pipeline.errors import REFUSALS, Refused
from pipeline.protocol import InferenceError
from pipeline.sampling import SamplingParams
from potluck import api
from potluck.generation import ApiPeer, GenerationClient
from potluck.openai_schema import ApiError, ChatRequest, CompletionRequest
from potluck.swarmview import coverage_view, format_ranges, missing_ranges


class FakeInfo:
    def __init__(self, peer_id, start, end, tps=100.0):
        self.peer_id, self.start, self.end, self.decode_tps, self.prefill_tps = peer_id, start, end, tps, tps
        self.cache_tokens, self.clusters, self.addrs, self.online = 1000, {"1": "c0"}, (), True


class FakeConfig:
    vocab_size = 1000
    num_layers = 6


SERVER = Identity.generate().public_key


def receipt(flops: int, session: bytes) -> Receipt:
    """A receipt as a server holds it (the API only reads its server, session, tokens and FLOPs)."""
    return Receipt(SERVER, b"\1" * 32, "ab" * 32, 0, 6, 10, flops, session, 1, b"\0" * 64)


class FakeClient:
    """Tokens are characters; the answer is the prompt's words reversed, one token per character.
    Each generation pays 1e9 FLOPs per prompt token in one session (its receipts: `paid`)."""

    model_config = FakeConfig()

    def __init__(self):
        self.fail: BaseException | None = None
        self.started = trio.Event()
        self.cancelled = False
        self.slow = 0.0
        self.paid: list[Receipt] = []

    def encode(self, prompt):
        text = prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt)
        return [ord(c) % 1000 for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    async def stream(self, ids: list[int], params: SamplingParams, *, prefer: str | None = None,
                     continuing: PartialAnswer | None = None) -> AsyncGenerator[TokenEvent | Finished, None]:
        assert continuing is None  # the swarm's client: it never goes on with another generation's answer
        self.started.set()
        if self.fail is not None:
            raise self.fail
        answer = "olleh dlrow"[:params.max_new_tokens]
        route = [("peerA", 0, 6)]
        out = []
        try:
            for i, c in enumerate(answer):
                await trio.sleep(self.slow)
                out.append(ord(c))
                yield TokenEvent(ord(c), c, i, route)
        except trio.Cancelled:
            self.cancelled = True
            raise
        paid = [receipt(len(ids) * 10**9, len(ids).to_bytes(16, "big"))]
        self.paid += paid
        yield Finished("", Generation(out, answer, "length", len(ids), route=route, paid=paid, ttft_s=0.01,
                                      wall_s=0.1, tokens_per_s=10.0))


class FakePeer:
    """A stand-in for `potluck.peer.Peer`, as the API sees it (`ApiPeer`)."""

    def __init__(self, servers):
        self._client = FakeClient()
        self.servers = servers
        self.last_generation: dict | None = None
        self.requests_seen: list[str] = []  # model ids, as `saw_request` counted them

    def saw_request(self, model_id: str) -> None:
        self.requests_seen.append(model_id)

    def status(self) -> dict:
        return {"peer_id": "me", "peers": [], "last_generation": self.last_generation}

    async def credits(self) -> dict:
        return {"peer_id": "me", "balance": 5.0, "earned": 0.0, "spent": 0.0, "granted": 5.0, "unit": "GFLOP-credits",
                "frozen": False, "peers": [], "total": 5.0, "recent": [], "chain_length": 1, "forked": []}

    async def client(self, model_id: str | None = None) -> GenerationClient:
        return self._client

    async def swarm_models(self, load: bool = False, timeout: float = 5.0, max_age: float = 2.0) -> list[dict]:
        return [{"name": "Tiny-Model", "model_id": "ab" * 32, "num_blocks": 6, "context_length": 64,
                 "runs_here": True, "coverage": coverage_view(self.servers, 6)}]


@pytest.fixture
async def served(nursery):
    peer = FakePeer([FakeInfo("peerA", 0, 3), FakeInfo("peerB", 3, 6)])
    as_seen: ApiPeer = peer  # the Protocol the API takes: a type checker holds the stand-in to it
    url = await nursery.start(api.serve, as_seen, "127.0.0.1", 0)
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        yield peer, http


CHAT = {"model": "Tiny-Model", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 5}


def error_of(r, status, code=None, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err


async def test_chat_completion_and_usage(served):
    peer, http = served
    r = await http.post("/v1/chat/completions", json=CHAT)
    body = r.json()
    assert r.status_code == 200, body
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "olleh", "refusal": None}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}
    assert peer.last_generation["source"] == "api"
    assert body["potluck"]["credits_spent"] == peer.last_generation["credits_spent"] == 11.0  # 11 prompt tokens


async def test_each_answer_reports_the_credits_of_its_own_sessions(served):
    """Two requests at once: each answer's credits are what its own generation paid, not the ledger's
    movement over the time both ran."""
    peer, http = served
    peer._client.slow = 0.05
    answers = {}

    async def ask(content):
        r = await http.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": content}]})
        answers[content] = r.json()["potluck"]

    async with trio.open_nursery() as nursery:
        for content in ("hi", "a longer question"):
            nursery.start_soon(ask, content)
    assert len(peer._client.paid) == 2
    for content, extra in answers.items():
        (mine,) = [r for r in peer._client.paid if r.session == len(content).to_bytes(16, "big")]
        assert extra["credits_spent"] == credits(mine.flops) == len(content)
        assert extra["paid"] == [{"peer_id": extra["paid"][0]["peer_id"], "session": mine.session.hex(), "start": 0,
                                  "end": 6, "tokens": 10, "credits": credits(mine.flops)}]


async def test_stream_is_sse_chunks_ending_with_done(served):
    _, http = served
    async with http.stream("POST", "/v1/completions", json={"model": "tiny-model", "prompt": "hi", "max_tokens": 3,
                                                            "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in r.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["text"] for e in events for c in e["choices"]) == "oll"
    assert events[-2]["choices"][0]["finish_reason"] == "length" and "potluck" in events[-2]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("patch, status, code, param", [
    ({"model": "gpt-4"}, 404, "model_not_found", "model"),
    ({"model": None}, 400, "missing_required_parameter", "model"),
    ({"temperature": 2.5}, 400, "invalid_value", "temperature"),
    ({"temperature": "hot"}, 400, "invalid_type", "temperature"),
    ({"top_p": 0}, 400, "invalid_value", "top_p"),
    ({"max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ({"max_tokens": 100000}, 400, "invalid_value", "max_tokens"),
    ({"max_tokens": 60}, 400, "context_length_exceeded", "max_tokens"),
    ({"n": 2}, 400, "invalid_value", "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_value", "stop"),
    ({"presence_penalty": 0.5}, 400, "unsupported_parameter", "presence_penalty"),
    ({"messages": []}, 400, "invalid_value", "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_value", "messages[0].role"),
    ({"stream": "yes"}, 400, "invalid_type", "stream"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "unsupported_parameter", "tools"),
    ({"tool_choice": "auto"}, 400, "unsupported_parameter", "tool_choice"),
    ({"response_format": {"type": "json_object"}}, 400, "unsupported_parameter", "response_format"),
])
async def test_bad_requests_are_400_or_404_in_openai_shape(served, patch, status, code, param):
    _, http = served
    body = {k: v for k, v in {**CHAT, **patch}.items() if v is not None}
    error_of(await http.post("/v1/chat/completions", json=body), status, code, param)


async def test_bad_json_unknown_path_and_method(served):
    _, http = served
    err = error_of(await http.post("/v1/chat/completions", content=b"{not json"), 400, "invalid_json")
    assert "JSON" in err["message"]
    error_of(await http.post("/v1/chat/completions", content=b"[1, 2]"), 400, "invalid_body")
    for depth in (40, 100_000):  # deeper than the API takes; deeper than the parser can
        error_of(await http.post("/v1/chat/completions", content=b"[" * depth + b"]" * depth), 400, "invalid_json")
    ok = {**CHAT, "response_format": {"type": "text"}, "tool_choice": "none", "tools": []}  # neutral values
    assert (await http.post("/v1/chat/completions", json=ok)).status_code == 200
    error_of(await http.get("/v1/nothing"), 404, "unknown_url")
    error_of(await http.get("/v1/chat/completions"), 405)


async def test_no_route_names_the_missing_blocks(served):
    peer, http = served
    peer.servers = [FakeInfo("peerA", 0, 2), FakeInfo("peerB", 4, 5)]
    r = await http.post("/v1/chat/completions", json=CHAT)
    err = error_of(r, 503, "no_route")
    assert "blocks 2-3, 5" in err["message"] and "--blocks 2:4" in err["message"]
    assert r.headers["x-should-retry"] == "false"
    models = (await http.get("/v1/models")).json()["data"]
    assert models[0]["potluck"]["missing_blocks"] == [[2, 4], [5, 6]]


def refused(kind: str, message: str, limit: int | None = None) -> Exception:
    """What production raises when every server refused: the typed refusal of the server's wire kind
    (pipeline/hop.py maps the error reply), the reply itself as its cause."""
    reply = InferenceError(kind, message, limit=limit)
    try:
        raise REFUSALS[kind](kind, message, peer_id="peerA", limit=limit) from reply
    except Refused as e:
        return e


@pytest.mark.parametrize("stream", [False, True])
async def test_over_the_debt_limit_is_402_and_says_how_to_earn(served, stream):
    peer, http = served
    peer._client.fail = refused("CreditRefused", "your balance is -2,000 GFLOP-credits, past this swarm's debt limit")
    r = await http.post("/v1/chat/completions", json={**CHAT, "stream": stream})
    err = error_of(r, 402, "insufficient_credits")
    assert err["type"] == "insufficient_quota"
    assert "potluck serve --blocks auto" in err["message"] and "debt limit" in err["message"]


@pytest.mark.parametrize("kind", ["CacheFull", "MaxLengthExceeded"])
async def test_too_long_for_every_server_is_400_naming_the_limit(served, kind):
    peer, http = served
    peer._client.fail = refused(kind, "no room for 6,600 tokens", limit=5800)
    err = error_of(await http.post("/v1/chat/completions", json=CHAT), 400, "context_length_exceeded")
    assert "at most 5800 tokens" in err["message"] and "Shorten the prompt" in err["message"]


async def test_a_busy_swarm_is_503_not_a_client_error(served):
    peer, http = served
    peer._client.fail = refused("TooManySessions", "this server holds 64 sessions")
    error_of(await http.post("/v1/chat/completions", json=CHAT), 503, "generation_failed")


async def test_generation_failure_is_503(served):
    peer, http = served
    peer._client.fail = GenerationFailed("could not open a route through blocks [0, 6)")
    error_of(await http.post("/v1/chat/completions", json=CHAT), 503, "generation_failed")


async def test_disconnect_cancels_the_generation(served):
    peer, http = served
    peer._client.slow = 0.2
    with trio.move_on_after(0.5):
        async with http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            async for _ in r.aiter_lines():
                pass
    with trio.fail_after(5):
        while not peer._client.cancelled:
            await trio.sleep(0.05)


async def test_api_key_is_checked_on_every_request(nursery):
    with pytest.raises(ValueError, match="--api-key"):
        api.check_bind("0.0.0.0", None)
    api.check_bind("::1", None)
    peer: ApiPeer = FakePeer([FakeInfo("peerA", 0, 6)])
    url = await nursery.start(api.serve, peer, "127.0.0.1", 0, "s3cret")
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        for method, path in (("GET", "/v1/models"), ("GET", "/api/status"), ("GET", "/"), ("POST", "/v1/completions")):
            error_of(await http.request(method, path), 401, "invalid_api_key")
            error_of(await http.request(method, path, headers={"Authorization": "Bearer wrong"}), 401)
        ok = {"Authorization": "Bearer s3cret"}
        assert (await http.get("/v1/models", headers=ok)).status_code == 200
        page = await http.get("/?key=s3cret")
        assert page.status_code == 200 and "/dashboard/app.js?key=s3cret" in page.text
        assert (await http.get("/dashboard/app.js?key=s3cret")).status_code == 200


async def test_dashboard_files_are_served(served):
    _, http = served
    page = await http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<script src=\"/dashboard/app.js\">" in page.text and "http" not in page.text.split("<body>")[1]
    for name, kind in (("app.js", "javascript"), ("style.css", "css")):
        r = await http.get(f"/dashboard/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
    error_of(await http.get("/dashboard/../api.py"), 404)


def test_parsing_units():
    req = ChatRequest.parse({**CHAT, "stop": "\n", "seed": -1, "temperature": 0, "max_completion_tokens": 9})
    assert req.params.stop == ["\n"] and req.params.seed == (1 << 63) - 1 and req.params.max_new_tokens == 9
    assert req.params.greedy
    assert CompletionRequest.parse({"model": "m", "prompt": [[1, 2, 3]]}).prompt == [1, 2, 3]
    with pytest.raises(ApiError):
        CompletionRequest.parse({"model": "m", "prompt": ["a", "b"]})
    assert api.parse_hostport("[::1]:80") == ("::1", 80) and api.parse_hostport(":8000") == ("127.0.0.1", 8000)
    assert missing_ranges([1, 0, 0, 2, 0]) == [[1, 3], [4, 5]]
    assert format_ranges([[1, 3], [4, 5]]) == "1-2, 4"


async def test_a_request_longer_than_the_announced_cache_is_400_before_any_server_is_asked(served):
    peer, http = served
    for info in peer.servers:
        info.cache_tokens = 40  # what the servers announce as free: the route holds 40 tokens
    r = await http.post("/v1/completions", json={"model": "default", "prompt": "x" * 30, "max_tokens": 20})
    err = error_of(r, 400, "context_length_exceeded")
    assert "at most 40 tokens" in err["message"] and "the prompt has 30" in err["message"]
    assert not peer._client.started.is_set()  # refused before the generation started
    # an unasked-for max_tokens is lowered to what fits; the request succeeds
    r = await http.post("/v1/completions", json={"model": "default", "prompt": "x" * 30})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 10
