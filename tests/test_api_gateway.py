"""The API as a gateway, against stand-in peers over real HTTP on loopback: the fallback upstream
(another peer's API, itself a stand-in) when no route exists or the swarm fails mid-answer, an
upstream that fails or floods; per-app keys, quotas (429 + retry-after) and usage; receipts in
answers. Fast; the same on real `potluck serve` processes is tests/test_gateway_processes.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import AsyncGenerator

import httpx
import msgpack
import pytest
import trio

from credits import Receipt
from p2p.identity import Identity
from pipeline.client import Finished, Generation, GenerationFailed, PartialAnswer, TokenEvent
from pipeline.sampling import SamplingParams
from potluck import api, fallback
from potluck.apps import AppTable, load_apps, parse_apps
from potluck.chat import stats_line
from potluck.cli import main
from potluck.fallback import FallbackConfig, FallbackFailed, Upstream
from potluck.generation import ApiPeer, GenerationClient
from potluck.swarmview import coverage_view

SERVER = Identity.generate().public_key


class FakeInfo:
    def __init__(self, peer_id, start, end):
        self.peer_id, self.start, self.end, self.decode_tps, self.prefill_tps = peer_id, start, end, 100.0, 100.0
        self.cache_tokens, self.clusters, self.addrs, self.online = 1000, {"1": "c0"}, (), True


class FakeConfig:
    vocab_size = 1000
    num_layers = 6


class FakeClient:
    """Tokens are characters; the answer is `answer`, one token per character; it fails with
    GenerationFailed after `fail_after` tokens when that is set, and waits for `resume` after
    `pause_after` tokens when that is. Pays 1e9 FLOPs per prompt token."""

    model_config = FakeConfig()

    def __init__(self, answer: str):
        self.answer = answer
        self.fail_after: int | None = None
        self.pause_after: int | None = None
        self.resume = trio.Event()
        self.prompts: list[list[int]] = []

    def encode(self, prompt):
        text = prompt if isinstance(prompt, str) else "|".join(f"{m['role']}:{m['content']}" for m in prompt)
        return [ord(c) % 1000 for c in text]

    async def stream(self, ids: list[int], params: SamplingParams, *, prefer: str | None = None,
                     continuing: PartialAnswer | None = None) -> AsyncGenerator[TokenEvent | Finished, None]:
        assert continuing is None  # the swarm's client: it never goes on with another generation's answer
        self.prompts.append(ids)
        answer = self.answer[:params.max_new_tokens]
        route = [("peerA", 0, 6)]
        for i, c in enumerate(answer):
            if i == self.fail_after:
                raise GenerationFailed("peerA went away")
            if i == self.pause_after:
                await self.resume.wait()
            await trio.sleep(0)
            yield TokenEvent(ord(c), c, i, route)
        paid = [Receipt(SERVER, b"\1" * 32, "ab" * 32, 0, 6, len(ids) + len(answer), len(ids) * 10**9,
                        b"s" * 16, 1, b"\0" * 64)]
        yield Finished("", Generation([ord(c) for c in answer], answer, "length", len(ids), route=route, paid=paid,
                                      ttft_s=0.01, wall_s=0.1, tokens_per_s=10.0))


class FakePeer:
    """A stand-in for `potluck.peer.Peer` as the API sees it (`ApiPeer`)."""

    def __init__(self, name: str, servers, answer: str):
        self.name, self.servers = name, servers
        self._client = FakeClient(answer)
        self.last_generation: dict | None = None
        self.requests_seen: list[str] = []  # model ids, as `saw_request` counted them

    def saw_request(self, model_id: str) -> None:
        self.requests_seen.append(model_id)

    def status(self) -> dict:
        return {"peer_id": "me", "peers": [], "last_generation": self.last_generation}

    async def credits(self) -> dict:
        return {}

    async def client(self, model_id: str | None = None) -> GenerationClient:
        return self._client

    async def swarm_models(self, load: bool = False, timeout: float = 5.0, max_age: float = 2.0) -> list[dict]:
        return [{"name": self.name, "model_id": "ab" * 32, "num_blocks": 6, "context_length": 4096,
                 "runs_here": True, "coverage": coverage_view(self.servers, 6)}]


FULL = [FakeInfo("peerA", 0, 6)]
HALF = [FakeInfo("peerA", 0, 3)]  # blocks 3:6 served by nobody: no route


async def start(nursery, peer: FakePeer, **kw) -> str:
    as_seen: ApiPeer = peer
    return await nursery.start(lambda task_status: api.serve(as_seen, "127.0.0.1", 0, task_status=task_status, **kw))


@pytest.fixture
async def upstream(nursery):
    """Another peer's API with a complete route: the fallback."""
    peer = FakePeer("Upstream-Model", FULL, "from upstream")
    return peer, (await start(nursery, peer)) + "/v1"


CHAT = {"model": "Tiny-Model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 40, "temperature": 0}


async def sse(http: httpx.AsyncClient, path: str, body: dict) -> list[dict]:
    async with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        lines = [line async for line in r.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


async def test_without_a_route_the_fallback_answers_marked_and_free(nursery, upstream):
    up_peer, up_url = upstream
    me = FakePeer("Tiny-Model", HALF, "from the swarm")
    url = await start(nursery, me, fallback=FallbackConfig(up_url, models={"*": "Upstream-Model"}))
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        r = await http.post("/v1/chat/completions", json=CHAT)
        body = r.json()
        assert r.status_code == 200, body
        assert body["choices"][0]["message"]["content"] == "from upstream"
        extra = body["potluck"]
        assert extra["fallback"] is True and extra["fallback_model"] == "Upstream-Model"
        assert extra["swarm_error"] == "no_route" and extra["credits_spent"] == 0.0 and extra["paid"] == []
        assert body["usage"]["completion_tokens"] == len("from upstream")
        assert me.last_generation["fallback"] is True  # the dashboard's and `potluck status`'s last answer
        # the upstream was asked the user's own messages (its stand-in renders them as role:content)
        assert up_peer._client.prompts[-1] == up_peer._client.encode([{"role": "user", "content": "hello"}])

        events = await sse(http, "/v1/chat/completions", CHAT)
        assert "".join(c["delta"].get("content") or "" for e in events for c in e["choices"]) == "from upstream"
        assert events[-1]["potluck"]["fallback"] is True and events[-1]["choices"][0]["finish_reason"] == "length"


async def test_without_fallback_no_route_stays_503(nursery):
    me = FakePeer("Tiny-Model", HALF, "from the swarm")
    async with httpx.AsyncClient(base_url=await start(nursery, me), timeout=10) as http:
        r = await http.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_route"


async def test_a_failure_mid_answer_continues_from_the_text_already_sent(nursery, upstream):
    up_peer, up_url = upstream
    me = FakePeer("Tiny-Model", FULL, "the swarm's start")
    me._client.fail_after = 4  # "the " is written, then the swarm fails
    url = await start(nursery, me, fallback=FallbackConfig(up_url, models={"Tiny-Model": "Upstream-Model"}))
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        body = {"model": "Tiny-Model", "prompt": "Say:", "max_tokens": 20, "temperature": 0}
        events = await sse(http, "/v1/completions", body)
        text = "".join(c["text"] for e in events for c in e["choices"])
        assert text == "the " + "from upstream"
        extra = events[-1]["potluck"]
        assert extra["fallback"] is True and extra["swarm_error"] == "generation_failed" and extra["swarm_pieces"] == 4
        # the upstream continued the answer: the prompt with the text already sent, for what was left of max_tokens
        assert up_peer._client.prompts[-1] == up_peer._client.encode("Say:the ")

        r = await http.post("/v1/completions", json=body)  # not streamed: the same answer, whole
        assert r.json()["choices"][0]["text"] == "the from upstream"


async def test_a_failing_upstream_leaves_the_swarms_error(nursery, upstream, caplog):
    """The client hears the upstream's status, not its URL (it may hold credentials) nor its error body."""
    up_peer, up_url = upstream
    me = FakePeer("Tiny-Model", HALF, "x")
    with_password = up_url.replace("http://", "http://someone:up-password@")
    config = FallbackConfig(with_password, key="up-secret-key", models={"*": "No-Such-Model"})
    assert "up-secret-key" not in repr(config)
    url = await start(nursery, me, fallback=config)
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        r = await http.post("/v1/chat/completions", json=CHAT)
        err = r.json()["error"]
        assert r.status_code == 503 and err["code"] == "no_route" and "fallback failed too" in err["message"]
        assert "HTTP 404" in err["message"]
        assert "127.0.0.1" not in err["message"] and "No-Such-Model" not in err["message"]
    logged = caplog.text
    assert "No-Such-Model" in logged and "up-password" not in logged


async def _answer_with(stream: trio.SocketStream, head: bytes, body: bytes) -> None:
    await stream.receive_some(65536)
    await stream.send_all(head + f"content-length: {len(body)}\r\n\r\n".encode() + body)
    with trio.move_on_after(10):  # read on until the client closes: closing first could reset what it has not read
        while await stream.receive_some(65536):
            pass


async def test_a_deeply_nested_upstream_event_is_a_malformed_answer(nursery):
    deep = b"data: " + b"[" * 100_000 + b"]" * 100_000 + b"\n\n"
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    listeners = await nursery.start(trio.serve_tcp, lambda s: _answer_with(s, head, deep), 0)
    port = listeners[0].socket.getsockname()[1]

    async def keep(text: str) -> None:
        raise AssertionError(text)

    async with Upstream.connect(FallbackConfig(f"http://127.0.0.1:{port}/v1", read_timeout=10)) as upstream:
        with pytest.raises(FallbackFailed, match="not JSON"):
            await upstream.answer("chat", "m", {"messages": []}, keep)


async def test_an_upstream_error_body_is_read_as_sent_not_inflated(nursery, caplog):
    """A small gzip error body that would inflate to 64 MiB: what is read of it stays small."""
    import gzip

    bomb = gzip.compress(b"A" * (64 << 20))
    head = b"HTTP/1.1 500 Oops\r\ncontent-encoding: gzip\r\n"
    listeners = await nursery.start(trio.serve_tcp, lambda s: _answer_with(s, head, bomb), 0)
    port = listeners[0].socket.getsockname()[1]
    async with Upstream.connect(FallbackConfig(f"http://127.0.0.1:{port}/v1", read_timeout=10)) as upstream:
        with pytest.raises(FallbackFailed, match="HTTP 500"):
            await upstream.answer("chat", "m", {"messages": []}, None)  # type: ignore[arg-type]
    assert "A" * 64 not in caplog.text


async def test_an_upstream_that_floods_is_cut_at_the_line_bound(nursery, monkeypatch):
    """A stranger's upstream sends one endless SSE line: the reader stops at MAX_LINE_BYTES, not at
    the whole-body bound (and never holds more than about that)."""
    listeners = await nursery.start(trio.serve_tcp, _flood, 0)
    port = listeners[0].socket.getsockname()[1]
    monkeypatch.setattr(fallback, "MAX_LINE_BYTES", 64 << 10)
    received: list[str] = []

    async def keep(text: str) -> None:
        received.append(text)

    async with Upstream.connect(FallbackConfig(f"http://127.0.0.1:{port}/v1", read_timeout=10)) as upstream:
        with pytest.raises(FallbackFailed, match="line longer than"):
            await upstream.answer("chat", "m", {"messages": []}, keep)
    assert received == []


async def _flood(stream: trio.SocketStream) -> None:
    await stream.receive_some(65536)
    await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: ")
    with trio.move_on_after(10):
        for _ in range(4096):  # 16 MiB at most: past both bounds
            await stream.send_all(b"x" * 4096)


# --- apps -------------------------------------------------------------------------------------------


KEY_A, KEY_B = "sk-app-a-0123456789abcdef", "sk-app-b-0123456789abcdef"
OPERATOR_KEY = "operator-key"


@pytest.fixture
async def gateway(nursery):
    clock = [1000.0]
    apps = AppTable(parse_apps({"apps": {"a": {"key": KEY_A, "tokens_per_minute": 30},
                                         "b": {"key": KEY_B, "credits_per_minute": 1000}}}, "test"),
                    clock=lambda: clock[0])
    me = FakePeer("Tiny-Model", FULL, "0123456789")
    url = await start(nursery, me, api_key=OPERATOR_KEY, apps=apps)
    return url, clock, apps


def as_app(url: str, key: str | None) -> httpx.AsyncClient:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(base_url=url, headers=headers, timeout=10)


async def test_apps_are_metered_and_held_to_their_quota(gateway):
    url, clock, _ = gateway
    body = {**CHAT, "max_tokens": 10}  # "user:hello" is 10 prompt tokens: 20 a request
    async with as_app(url, KEY_A) as a, as_app(url, KEY_B) as b, as_app(url, OPERATOR_KEY) as operator:
        assert (await a.post("/v1/chat/completions", json=body)).status_code == 200
        assert (await a.post("/v1/chat/completions", json=body)).status_code == 200  # 20 < 30: room left
        r = await a.post("/v1/chat/completions", json=body)  # 40 used of 30 a minute: wait 20 s
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        assert r.headers["retry-after"] == "21" and "x-should-retry" not in r.headers
        assert (await b.post("/v1/chat/completions", json=body)).status_code == 200  # b has its own quota
        clock[0] += 21
        assert (await a.post("/v1/chat/completions", json=body)).status_code == 200

        mine = (await a.get("/api/usage")).json()["apps"]
        assert list(mine) == ["a"]
        assert mine["a"] | {"name": "a"} == {"name": "a", "tokens_per_minute": 30.0, "credits_per_minute": None,
                                            "max_in_flight": 4, "requests": 3, "prompt_tokens": 30, "completion_tokens": 30,
                                            "credits_spent": 30.0, "fallback_answers": 0, "rate_limited": 1}
        everyone = (await operator.get("/api/usage")).json()["apps"]
        assert set(everyone) == {"a", "b"} and everyone["b"]["credits_spent"] == 10.0
        assert (await as_app(url, "sk-wrong-0123456789abcdef").get("/api/usage")).status_code == 401
        r = await a.get("/api/credits")  # the operator's, not an app's
        assert r.status_code == 403 and r.json()["error"]["code"] == "operator_only"
        assert (await operator.get("/api/credits")).status_code == 200


async def test_an_app_cannot_have_more_than_max_in_flight_requests_at_once(nursery):
    """Quotas are charged when answers end: without a bound on requests in flight, an app below its
    quota could open any number at once."""
    apps = AppTable(parse_apps({"apps": {"a": {"key": KEY_A, "tokens_per_minute": 10**6, "max_in_flight": 2}}},
                               "test"))
    me = FakePeer("Tiny-Model", FULL, "0123456789")
    me._client.pause_after = 1
    url = await start(nursery, me, api_key=OPERATOR_KEY, apps=apps)
    async with as_app(url, KEY_A) as a, trio.open_nursery() as requests:
        answered = []

        async def ask() -> None:
            answered.append((await a.post("/v1/chat/completions", json=CHAT)).status_code)

        for _ in range(2):
            requests.start_soon(ask)
        await until(lambda: apps.apps["a"].in_flight == 2)
        r = await a.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        assert r.headers["retry-after"] == "1"
        me._client.resume.set()
    assert answered == [200, 200]
    await until(lambda: apps.apps["a"].in_flight == 0)  # (the slot is given back just after the answer is sent)
    assert (await as_app(url, KEY_A).post("/v1/chat/completions", json=CHAT)).status_code == 200
    usage = apps.apps["a"].usage
    assert (usage.requests, usage.rate_limited) == (3, 1)


async def test_an_app_whose_client_goes_away_mid_answer_is_charged_what_was_produced(nursery):
    apps = AppTable(parse_apps({"apps": {"a": {"key": KEY_A, "tokens_per_minute": 10**6}}}, "test"))
    me = FakePeer("Tiny-Model", FULL, "0123456789")
    me._client.pause_after = 3
    url = await start(nursery, me, api_key=OPERATOR_KEY, apps=apps)
    async with as_app(url, KEY_A) as a:
        async with a.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            lines = r.aiter_lines()
            texts = 0
            while texts < 3:
                line = await lines.__anext__()
                texts += line.startswith("data: ") and bool(json.loads(line[6:])["choices"][0]["delta"].get("content"))
        # the stream is closed here, before the answer ended
    app = apps.apps["a"]
    await until(lambda: app.usage.requests == 1)
    prompt_tokens = len("user:hello")
    assert (app.usage.prompt_tokens, app.usage.completion_tokens) == (prompt_tokens, 3)
    assert app.buckets["tokens"].level == pytest.approx(prompt_tokens + 3, abs=1)
    assert app.in_flight == 0


async def until(predicate, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def test_with_an_admin_key_apps_and_admin_get_in_and_nobody_else(nursery):
    apps = AppTable(parse_apps({"apps": {"a": {"key": KEY_A}}}, "test"))
    url = await start(nursery, FakePeer("Tiny-Model", FULL, "x"), api_key="admin-key", apps=apps)
    async with as_app(url, None) as nobody, as_app(url, "admin-key") as admin, as_app(url, KEY_A) as a:
        assert (await nobody.get("/api/usage")).status_code == 401
        assert set((await admin.get("/api/usage")).json()["apps"]) == {"a"}
        assert (await a.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_without_apps_usage_is_404_and_any_key_is_taken_as_today(nursery):
    url = await start(nursery, FakePeer("Tiny-Model", FULL, "x"))
    async with as_app(url, "anything") as http:
        assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
        assert (await http.get("/api/usage")).status_code == 404


async def test_a_request_offers_at_most_a_few_keys(gateway):
    """Each key a request offers is compared with every app's: past MAX_KEYS_GIVEN they are not read."""
    url, _, _ = gateway
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        wrong = [("key", f"sk-wrong-{i:016d}") for i in range(api.MAX_KEYS_GIVEN)]
        assert (await http.get("/api/usage", params=wrong + [("key", KEY_A)])).status_code == 401
        assert (await http.get("/api/usage", params=wrong[1:] + [("key", KEY_A)])).status_code == 200


def test_apps_files_are_checked(tmp_path: Path):
    good = tmp_path / "apps.toml"
    good.write_text('[apps.notes]\nkey = "sk-notes-0123456789abcdef"\ntokens_per_minute = 100\n')
    table = load_apps(good)
    assert table.by_key("sk-notes-0123456789abcdef").name == "notes" and table.by_key("sk-notes") is None
    (tmp_path / "apps.json").write_text(json.dumps({"apps": {"x": {"key": "k" * 16, "credits_per_minute": 5}}}))
    assert load_apps(tmp_path / "apps.json").apps["x"].credits_per_minute == 5.0
    for bad in ({"apps": {"x": {"key": "short"}}}, {"apps": {"x": {"key": "k" * 16, "tokens_per_minute": 0}}},
                {"apps": {"x": {"key": "k" * 16}, "y": {"key": "k" * 16}}}, {"apps": {"x y": {"key": "k" * 16}}},
                {"apps": {"x": {"key": "k" * 16, "admin": True}}}, {"apps": {}}, [],
                {"apps": {"x": {"key": "k" * 16, "max_in_flight": 0}}},
                {"apps": {"x": {"key": "k" * 16, "max_in_flight": 2.5}}}):
        with pytest.raises(ValueError):
            parse_apps(bad, "test")


# --- receipts -----------------------------------------------------------------------------------------


async def test_receipts_come_with_the_answer_when_asked(nursery):
    me = FakePeer("Tiny-Model", FULL, "abc")
    async with httpx.AsyncClient(base_url=await start(nursery, me), timeout=10) as http:
        plain = (await http.post("/v1/chat/completions", json=CHAT)).json()["potluck"]
        assert "receipts" not in plain
        asked = (await http.post("/v1/chat/completions", json={**CHAT, "potluck": {"receipts": True}})).json()
        receipts = [Receipt.from_list(msgpack.unpackb(bytes.fromhex(x), raw=False))
                    for x in asked["potluck"]["receipts"]]
        assert [r.session.hex() for r in receipts] == [p["session"] for p in asked["potluck"]["paid"]]
        r = await http.post("/v1/chat/completions", json={**CHAT, "potluck": {"receipts": "yes"}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "potluck"


def test_the_apps_file_and_fallback_flags_are_checked_before_start(tmp_path: Path, capsys):
    bad = tmp_path / "apps.json"
    bad.write_text(json.dumps({"apps": {"x": {"key": "short"}}}))
    assert main(["serve", "--data-dir", str(tmp_path / "d"), "--api", "127.0.0.1:0", "--apps", str(bad)]) == 2
    assert main(["serve", "--data-dir", str(tmp_path / "d"), "--fallback", "http://127.0.0.1:1/v1"]) == 2
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"apps": {"x": {"key": "k" * 16}}}))
    assert main(["serve", "--data-dir", str(tmp_path / "d"), "--api", "127.0.0.1:0", "--apps", str(good)]) == 2
    assert "--apps needs --api-key" in capsys.readouterr().err
    assert main(["serve", "--data-dir", str(tmp_path / "d"), "--api", "127.0.0.1:0", "--fallback",
                 "http://127.0.0.1:1/v1", "--fallback-key-env", "POTLUCK_TEST_UNSET_VARIABLE"]) == 2


def test_chat_says_an_answer_came_from_the_fallback():
    line = stats_line(5, 3, 1.0, {"fallback": True, "fallback_model": "big-model", "credits_spent": None, "route": []})
    assert "answered by the fallback (big-model): no credits" in line
