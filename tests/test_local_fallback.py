"""`--fallback local` (potluck/localfallback.py): the peer answers with its own copy of the model.

Fast, on the tiny Llama in process: the memory check refuses (typed) before anything is loaded and
the API's 503 then says why; with room, the answer is the model's own greedy one, its route our own
blocks only, nothing paid, and the blocks go once idle. A swarm (simulated) whose only server of
blocks 0:2 dies after 4 tokens: our copy goes on from those tokens in the same answer (greedy: the
uninterrupted answer; seeded: the same sample; a stop string across the seam still ends it); without
`--fallback local` the answer ends with the swarm's error. Slow, on real `potluck serve` processes of
SmolLM2: a swarm missing blocks 15:30; the user's peer with `--fallback local` answers (plain and
streamed) with the tokens of a local greedy run, marked "local", spending nothing; the peer without
it says 503."""

from __future__ import annotations

import copy
import functools
import json
from contextlib import aclosing, asynccontextmanager
from typing import AsyncIterator

import httpx
import openai
import pytest
import trio
from openai import OpenAI

from p2p.sim import SimWorld
from pipeline.client import DistributedModel, Finished, PartialAnswer, TokenEvent
from pipeline.sampling import SamplingParams
from potluck import api, memory
from potluck.chat import stats_line
from potluck.cli import _api_gateway, build_parser
from potluck.localfallback import LocalFallback, NoDirectory, cache_bytes, weights_bytes
from potluck.localswarm import PeerProcess, start_all, wait_until
from potluck.openai_schema import ApiError, CompletionRequest
from testkit.swarms import HERE, Peer as SwarmPeer, Swarm, swarm

MODEL = "SmolLM2-135M-Instruct"
PROMPT = [5, 17, 42, 8, 3]


@asynccontextmanager
async def swarm_client(folder) -> AsyncIterator[DistributedModel]:
    """The client half of the model on a simulated network of its own: no server anywhere."""
    async with SimWorld.open(seed=0) as world:
        net = world.add_node(place=HERE)
        yield await DistributedModel.from_pretrained(folder, net, NoDirectory(net), tokenizer=None)


def test_check_room_refuses_what_does_not_fit():
    memory.check_room(100, available=100)
    with pytest.raises(memory.NotEnoughMemory) as e:
        memory.check_room(101 << 20, available=100 << 20)
    assert (e.value.need, e.value.available) == (101 << 20, 100 << 20)


async def test_without_the_memory_nothing_is_loaded_and_the_503_says_why(llama):
    async with swarm_client(llama[0]) as client:
        await _refused_then_loaded(client)


async def _refused_then_loaded(client: DistributedModel) -> None:
    length = len(PROMPT) + 8  # the request's prompt and max_tokens below
    need = weights_bytes(client) + cache_bytes(client, length)
    local = LocalFallback(lambda model_id: _same(client), client.network, available=lambda: need - 1)
    with pytest.raises(memory.NotEnoughMemory):
        await local.client(client.model_id, length)
    assert local.blocks is None and local.loads == 0

    peer = StandInPeer(client)
    no_route = ApiError(503, "No route covers the model.", type="server_error", code="no_route")
    req = CompletionRequest.parse({"model": "default", "prompt": PROMPT, "max_tokens": 8})
    with pytest.raises(ApiError) as e:
        await api.local_generation(peer, local, req, no_route)
    assert (e.value.status, e.value.code) == (503, "no_route")
    assert isinstance(e.value.__cause__, memory.NotEnoughMemory)

    local.available = lambda: need  # just enough: loaded
    job = await api.local_generation(peer, local, req, no_route)
    assert job.client is not client and local.loads == 1


async def test_the_local_answer_is_the_models_own_and_costs_nothing(llama):
    async with swarm_client(llama[0]) as client:
        await _answered_locally(client, llama[2])


async def _answered_locally(client: DistributedModel, reference) -> None:
    local = LocalFallback(lambda model_id: _same(client), client.network, idle_s=0.2)
    own = await local.client(client.model_id, len(PROMPT) + 12)
    generation = await own.generate(PROMPT, SamplingParams(max_new_tokens=12, temperature=0.0), speculative=False)
    assert generation.token_ids == reference.generate_greedy(PROMPT, 12)[:len(generation.token_ids)]
    assert len(generation.token_ids) == 12
    assert generation.route == [(client.network.peer_id, 0, 4)] and generation.paid == [] and generation.spent_flops == 0
    speculated = await own.generate(PROMPT, SamplingParams(max_new_tokens=12, temperature=0.0))
    assert speculated.token_ids == generation.token_ids
    assert local.blocks is not None and local.blocks.sessions == 0

    async with trio.open_nursery() as nursery:  # idle: the blocks go, and come back when asked for
        nursery.start_soon(local.run)
        with trio.fail_after(10):
            while local.blocks is not None:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    await local.client(client.model_id, 8)
    assert local.loads == 2


async def test_the_blocks_are_those_of_the_model_asked_for(llama):
    """A peer holding two versions answers each with its own weights: the other version's idle blocks are
    dropped for the one asked for, never used under its id; busy, they are not taken."""
    async with swarm_client(llama[0]) as client:
        other = copy.copy(client)
        other.model_id = "another-version"
        clients = {client.model_id: client, other.model_id: other}
        local = LocalFallback(lambda model_id: _same(clients[model_id]), client.network)
        first = await local.client(client.model_id, 8)
        assert local.blocks is not None and local.blocks.model_id == client.model_id
        session = await local.blocks.open_local(first.model_id, 0, 4, 8, first.dtype_name)
        with pytest.raises(memory.NotEnoughMemory):  # busy with the first version: not swapped under it
            await local.client(other.model_id, 8)
        session.close()
        second = await local.client(other.model_id, 8)
        assert second.model_id == other.model_id and local.blocks.model_id == other.model_id
        assert local.loads == 2


async def test_the_api_answers_locally_without_a_route_or_when_the_swarm_fails_first(llama, nursery):
    async with swarm_client(llama[0]) as client:
        peer = StandInPeer(client)
        local = LocalFallback(lambda model_id: _same(client), client.network)
        url = await nursery.start(functools.partial(api.serve, peer, "127.0.0.1", 0, local=local))
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            # the coverage says nothing is missing: the swarm's own client fails (no server), before any text
            failed_first = (await http.post("/v1/completions", json=body)).json()
            peer.coverage = {"complete": False, "missing": [[0, 4]], "num_blocks": 4}  # no route: 503 no_route
            no_route = (await http.post("/v1/completions", json=body)).json()
            async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                events = [line async for line in r.aiter_lines() if line.startswith("data: {")]
        for answer in (failed_first, no_route):
            assert answer["potluck"]["fallback"] == "local", answer
            assert answer["potluck"]["route"] == [{"peer_id": client.network.peer_id, "start": 0, "end": 4}]
            assert answer["potluck"]["credits_spent"] == 0.0 and answer["usage"]["completion_tokens"] == 6
        assert json.loads(events[-1][6:])["potluck"]["fallback"] == "local"
        assert peer.last_generation["fallback"] == "local" and local.loads == 1
        nursery.cancel_scope.cancel()


class BracketTokenizer:
    """Token t reads "[t]": every token is a piece of text, and a stop string can span two of them."""

    eos_token_id = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"[{t}]" for t in ids)


class KillsItsServer:
    """The swarm's client half as the API uses it (`GenerationClient`), which kills `victim`, the only server
    of its blocks, once an answer has `after` tokens: the swarm then fails mid-answer, for real."""

    def __init__(self, client: DistributedModel, swarm: Swarm, victim: SwarmPeer, after: int):
        self.client, self.swarm, self.victim, self.after = client, swarm, victim, after
        self.model_id, self.model_config = client.model_id, client.model_config

    def encode(self, prompt):
        return self.client.encode(prompt)

    async def stream(self, ids: list[int], params: SamplingParams, *, prefer: str | None = None,
                     continuing: PartialAnswer | None = None) -> AsyncIterator[TokenEvent | Finished]:
        async with aclosing(self.client.stream(ids, params, prefer=prefer, continuing=continuing)) as events:
            async for event in events:
                yield event
                if isinstance(event, TokenEvent) and event.index + 1 == self.after:
                    await self.swarm.kill(self.victim)


@asynccontextmanager
async def failing_swarm(llama, nursery, *, after: int, local: bool) -> AsyncIterator[tuple[str, StandInPeer]]:
    """The API of a peer (`--fallback local` when `local`) whose swarm, blocks 0:2 and 2:4 on one server each,
    loses the server of 0:2 once an answer has `after` tokens; yields the API's URL and the peer."""
    folder, model_id, _ = llama
    async with swarm("sim", folder, [(0, 2), (2, 4)], model_id=model_id) as s:
        client = await s.client(step_timeout=5.0, speculative=None)  # plain decoding: the seam is after `after` tokens
        client.tokenizer = BracketTokenizer()
        peer = StandInPeer(KillsItsServer(client, s, s.servers[0], after))
        runner = LocalFallback(lambda model_id: _same(client), client.network) if local else None
        yield await nursery.start(functools.partial(api.serve, peer, "127.0.0.1", 0, local=runner)), peer


def _text(ids: list[int]) -> str:
    return BracketTokenizer().decode(ids)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_swarm_failing_mid_answer_is_continued_by_our_own_copy(llama, nursery, stream):
    """The local copy goes on from the swarm's 4 tokens: the answer is the greedy one, as if nothing failed."""
    want = llama[2].generate_greedy(PROMPT, 12)
    assert 2 not in want  # no EOS: the answer is 12 tokens long
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stream": stream}
    with trio.fail_after(60):
        async with failing_swarm(llama, nursery, after=4, local=True) as (url, peer):
            text, extra, use, _ = await _ask(url, body)
    assert text == _text(want)
    assert extra["fallback"] == "local" and extra["swarm_pieces"] == 4 and extra["swarm_error"] == "generation_failed"
    assert extra["credits_spent"] is None  # the swarm's part is in the ledger; ours is free
    assert use["completion_tokens"] == 12 and use["prompt_tokens"] == len(PROMPT)
    assert peer.last_generation["fallback"] == "local" and peer.last_generation["swarm_pieces"] == 4
    nursery.cancel_scope.cancel()


async def test_a_stop_string_across_the_seam_ends_the_answer(llama, nursery):
    """The swarm held back "[g3]"'s tail (it could start the stop string); our copy's first token completes it."""
    want = llama[2].generate_greedy(PROMPT, 12)
    stop = f"{want[3]}][{want[4]}"  # the swarm's last token and ours
    seam = len(_text(want[:4]))
    assert _text(want).find(stop) == seam - len(f"{want[3]}]")  # nowhere earlier
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stream": True, "stop": [stop]}
    with trio.fail_after(60):
        async with failing_swarm(llama, nursery, after=4, local=True) as (url, _):
            text, extra, use, finish_reason = await _ask(url, body)
    assert text == _text(want)[:seam - len(f"{want[3]}]")] and finish_reason == "stop"
    assert extra["fallback"] == "local" and extra["swarm_pieces"] == 4
    assert use["completion_tokens"] == 5
    nursery.cancel_scope.cancel()


async def test_a_seeded_sample_goes_on_as_the_swarm_would_have(llama, nursery):
    """Sampling continues with the request's seed at the swarm's next output index: the uninterrupted answer."""
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0.9, "seed": 11}
    with trio.fail_after(60):
        async with swarm_client(llama[0]) as client:
            local = LocalFallback(lambda model_id: _same(client), client.network)
            own = await local.client(client.model_id, len(PROMPT) + 12)
            params = SamplingParams(max_new_tokens=12, temperature=0.9, seed=11, stop_token_ids=[])
            want = (await own.generate(PROMPT, params, speculative=False)).token_ids
        async with failing_swarm(llama, nursery, after=4, local=True) as (url, _):
            text, extra, use, _ = await _ask(url, body)
    assert 2 not in want and extra["fallback"] == "local" and extra["swarm_pieces"] == 4
    assert text == _text(want)
    nursery.cancel_scope.cancel()


async def test_without_the_local_fallback_the_swarm_error_ends_the_answer(llama, nursery):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stream": True}
    with trio.fail_after(60):
        async with failing_swarm(llama, nursery, after=4, local=False) as (url, _):
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    events = [json.loads(line[6:]) async for line in r.aiter_lines() if line.startswith("data: {")]
    assert [e["choices"][0]["text"] for e in events[:-1]] == [_text([t]) for t in llama[2].generate_greedy(PROMPT, 4)]
    assert events[-1]["error"]["code"] == "generation_failed"
    nursery.cancel_scope.cancel()


async def _ask(url: str, body: dict) -> tuple[str, dict, dict, str]:
    """(text, potluck field, usage, finish_reason) of a completion, streamed or not."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        if not body.get("stream"):
            answer = (await http.post("/v1/completions", json=body)).json()
            assert "error" not in answer, answer
            return answer["choices"][0]["text"], answer["potluck"], answer["usage"], answer["choices"][0]["finish_reason"]
        async with http.stream("POST", "/v1/completions", json={**body, "stream_options": {"include_usage": True}}) as r:
            events = [json.loads(line[6:]) async for line in r.aiter_lines() if line.startswith("data: {")]
    assert not any("error" in e for e in events), events
    chunks = [e for e in events if e["choices"]]
    text = "".join(e["choices"][0]["text"] for e in chunks)
    return text, chunks[-1]["potluck"], events[-1]["usage"], chunks[-1]["choices"][0]["finish_reason"]


def test_chat_says_an_answer_came_from_this_peer():
    line = stats_line(5, 3, 1.0, {"fallback": "local", "credits_spent": 0.0, "route": []})
    assert "own copy of the model" in line and "no credits" in line
    line = stats_line(5, 12, 1.0, {"fallback": "local", "swarm_pieces": 4, "credits_spent": None, "route": []})
    assert "the swarm wrote 4 pieces, then this peer's own copy" in line and "only the swarm's part cost" in line


def test_the_flag_local_needs_no_url_and_takes_no_upstream_flags(tmp_path):
    args = build_parser().parse_args(["serve", "--data-dir", str(tmp_path), "--api", "127.0.0.1:0",
                                      "--fallback", "local"])
    assert _api_gateway(args) == (None, None)  # no upstream: the peer answers itself
    with pytest.raises(ValueError):
        _api_gateway(build_parser().parse_args(["serve", "--api", "127.0.0.1:0", "--fallback", "local",
                                                "--fallback-model", "x"]))
    with pytest.raises(ValueError):
        _api_gateway(build_parser().parse_args(["serve", "--fallback", "local"]))  # the API's: needs --api


async def _same(client: DistributedModel) -> DistributedModel:
    return client


class StandInPeer:
    """The `ApiPeer` a local answer's preparation uses: the model card and the client half."""

    def __init__(self, client: DistributedModel | KillsItsServer):
        self._client = client
        self.coverage: dict | None = None  # the swarm's, as `swarm_models` reports it (None: not known)
        self.last_generation: dict | None = None

    async def client(self, model_id: str | None = None) -> DistributedModel | KillsItsServer:
        return self._client

    async def swarm_models(self, load: bool = False, timeout: float = 5.0, max_age: float = 2.0) -> list[dict]:
        c = self._client
        return [{"name": "tiny", "model_id": c.model_id, "num_blocks": 4, "context_length": 64, "runs_here": True,
                 "coverage": self.coverage}]

    def saw_request(self, model_id: str) -> None:
        pass

    async def credits(self) -> dict:
        return {}

    def status(self) -> dict:
        return {}


# --- real processes -------------------------------------------------------------------------------


def _start_server_and_users(procs: dict[str, PeerProcess], root, model: list[str], name: str, blocks: str) -> list[str]:
    """Start (into `procs`) server `name` of `blocks`, then two peers with an API bootstrapped from it: "user"
    with `--fallback local` and "plain" without; the bootstrap flags."""
    procs[name] = PeerProcess(root / name, *model, "--blocks", blocks)
    start_all([procs[name]], timeout=120)
    boot = ["--bootstrap", procs[name].addr]
    procs["user"] = PeerProcess(root / "user", *model, *boot, "--api", "127.0.0.1:0", "--fallback", "local")
    procs["plain"] = PeerProcess(root / "plain", *model, *boot, "--api", "127.0.0.1:0")
    start_all([procs["user"], procs["plain"]], timeout=120)
    return boot


@pytest.fixture(scope="module")
def half_swarm(smollm2_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("localfb")
    model = ["--model", str(smollm2_data[1]), "--threads", "1"]
    procs: dict[str, PeerProcess] = {}
    try:
        _start_server_and_users(procs, root, model, "server", "0:15")
        urls = {name: procs[name].call("status")["api"] for name in ("user", "plain")}
        for url in urls.values():
            with httpx.Client(base_url=url, timeout=60) as http:
                wait_until(lambda: http.get("/v1/models").json()["data"][0]["potluck"]["covered_blocks"] == 15,
                           90, 1, message="the peers to see blocks 0:15 covered")
        yield procs, urls
    finally:
        for p in procs.values():
            p.close()


@pytest.mark.slow
def test_without_a_route_the_peer_answers_itself(half_swarm, smollm2_data):
    from pipeline.loading import load_local_model
    from transformers import AutoTokenizer

    procs, urls = half_swarm
    messages = [{"role": "user", "content": "Name a color."}]
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_data[1]))
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
               ["input_ids"])
    greedy = load_local_model(smollm2_data[1]).generate_greedy(ids, 8)
    with httpx.Client(base_url=urls["user"], timeout=60) as http:
        spent_before = http.get("/api/credits").json()["spent"]

    client = OpenAI(base_url=urls["user"] + "/v1", api_key="unused", max_retries=0, timeout=300)
    kw = dict(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**kw)
    extra = whole.model_extra["potluck"]
    assert extra["fallback"] == "local" and extra["credits_spent"] == 0.0 and extra["paid"] == []
    assert extra["route"] == [{"peer_id": procs["user"].call("status")["peer_id"], "start": 0, "end": 30}]
    n = whole.usage.completion_tokens
    assert whole.choices[0].message.content == tokenizer.decode(greedy[:n], skip_special_tokens=True) != ""
    assert n == 8 or greedy[n - 1] in (tokenizer.eos_token_id, 2)

    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].model_extra["potluck"]["fallback"] == "local"

    with httpx.Client(base_url=urls["user"], timeout=60) as http:
        assert http.get("/api/credits").json()["spent"] == spent_before
        status = http.get("/api/status", params={"load": "0"}).json()
        assert status["last_generation"]["fallback"] == "local"
        assert status["local_fallback"]["loads"] == 1
        assert status["server"] is None  # answering for itself made it no volunteer
    # nothing announced: the swarm still lacks blocks 15:30
    with httpx.Client(base_url=urls["plain"], timeout=60) as http:
        assert http.get("/v1/models").json()["data"][0]["potluck"]["missing_blocks"] == [[15, 30]]

    plain = OpenAI(base_url=urls["plain"] + "/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.APIStatusError) as e:
        plain.chat.completions.create(**kw)
    assert e.value.status_code == 503 and e.value.code == "no_route"


# --- real processes: a server killed mid-answer ------------------------------------------------------------

CONTINUED_PROMPT = "The three primary colors are"
CONTINUED_TOKENS = 48


@pytest.fixture(scope="module")
def split_swarm(smollm2_data, tmp_path_factory):
    """Blocks 15:30 on a server that stays; the user's peer with `--fallback local` and a plain one. Each
    test starts the only server of blocks 0:15 itself (`procs` closes it)."""
    root = tmp_path_factory.mktemp("localcont")
    model = ["--model", str(smollm2_data[1]), "--threads", "1"]
    procs: dict[str, PeerProcess] = {}
    try:
        boot = _start_server_and_users(procs, root, model, "tail", "15:30")
        yield procs, lambda name: PeerProcess(root / name, *model, *boot, "--blocks", "0:15")
    finally:
        for p in procs.values():
            p.close()


def _answer_killing_the_head(procs: dict[str, PeerProcess], new_head, asker: str) -> list[dict]:
    """Start the only server of blocks 0:15, stream a greedy completion from peer `asker`, SIGKILL that server
    as the first piece of text arrives; the stream's events."""
    head = procs[f"head-{asker}"] = new_head(f"head-{asker}").start(timeout=120)
    url = procs[asker].call("status")["api"]
    with httpx.Client(base_url=url, timeout=300) as http:
        wait_until(lambda: head.call("status")["server"]["start"] is not None, 120, 1, message="blocks 0:15 served")
        wait_until(lambda: http.get("/v1/models").json()["data"][0]["potluck"]["covered_blocks"] == 30, 90, 1,
                   message=f"{asker} to see every block covered")
        body = {"model": MODEL, "prompt": CONTINUED_PROMPT, "max_tokens": CONTINUED_TOKENS, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        events = []
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
                    if head.proc is not None and head.proc.poll() is None and _text_of(events[-1]):
                        head.kill()  # mid-answer: the swarm wrote this piece
    assert head.proc is not None and head.proc.poll() is not None, "the answer had no text"
    return events


def _text_of(event: dict) -> str:
    return (event.get("choices") or [{}])[0].get("text") or ""


@pytest.mark.slow
def test_a_server_killed_mid_answer_and_our_own_copy_goes_on(split_swarm, smollm2_data):
    from pipeline.loading import load_local_model
    from transformers import AutoTokenizer

    procs, new_head = split_swarm
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_data[1]))
    greedy = load_local_model(smollm2_data[1]).generate_greedy(tokenizer(CONTINUED_PROMPT)["input_ids"],
                                                                CONTINUED_TOKENS)
    user_url = procs["user"].call("status")["api"]
    with httpx.Client(base_url=user_url, timeout=60) as http:
        spent_before = http.get("/api/credits").json()["spent"]

    events = _answer_killing_the_head(procs, new_head, "user")
    assert not any("error" in e for e in events), events[-1]
    pieces = [_text_of(e) for e in events if _text_of(e)]
    final = next(e for e in reversed(events) if e.get("choices"))
    extra, n = final["potluck"], events[-1]["usage"]["completion_tokens"]
    assert extra["fallback"] == "local" and extra["swarm_error"] in ("generation_failed", "no_route")
    assert 0 < extra["swarm_pieces"] < len(pieces)  # both wrote part of it
    assert extra["route"] == [{"peer_id": procs["user"].peer_id, "start": 0, "end": 30}]
    assert "".join(pieces) == tokenizer.decode(greedy[:n], skip_special_tokens=True)  # the undisturbed answer
    assert n == CONTINUED_TOKENS or greedy[n - 1] in (tokenizer.eos_token_id, 2)
    with httpx.Client(base_url=user_url, timeout=60) as http:
        assert http.get("/api/credits").json()["spent"] > spent_before  # the swarm's part, billed as ever
        last = http.get("/api/status", params={"load": "0"}).json()["last_generation"]
        assert last["fallback"] == "local" and last["swarm_pieces"] == extra["swarm_pieces"]

    # the same kill at a peer without `--fallback local`: the answer ends with the swarm's error
    events = _answer_killing_the_head(procs, new_head, "plain")
    assert any(_text_of(e) for e in events[:-1])
    assert events[-1]["error"]["code"] in ("generation_failed", "no_route")
