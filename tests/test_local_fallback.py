"""`--fallback local` (potluck/localfallback.py): the peer answers with its own copy of the model.

Fast, on the tiny Llama in process: the memory check refuses (typed) before anything is loaded and
the API's 503 then says why; with room, the answer is the model's own greedy one, its route our own
blocks only, nothing paid, and the blocks go once idle. Slow, on real `potluck serve` processes of
SmolLM2: a swarm missing blocks 15:30; the user's peer with `--fallback local` answers (plain and
streamed) with the tokens of a local greedy run, marked "local", spending nothing; the peer without
it says 503."""

from __future__ import annotations

import copy
import functools
import json
from contextlib import asynccontextmanager
from typing import AsyncIterator

import httpx
import openai
import pytest
import trio
from openai import OpenAI

from p2p.sim import SimWorld
from pipeline.client import DistributedModel
from pipeline.sampling import SamplingParams
from potluck import api, memory
from potluck.chat import stats_line
from potluck.cli import _api_gateway, build_parser
from potluck.localfallback import LocalFallback, NoDirectory, cache_bytes, weights_bytes
from potluck.localswarm import PeerProcess, start_all, wait_until
from potluck.openai_schema import ApiError, CompletionRequest
from testkit.swarms import HERE

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


def test_chat_says_an_answer_came_from_this_peer():
    line = stats_line(5, 3, 1.0, {"fallback": "local", "credits_spent": 0.0, "route": []})
    assert "own copy of the model" in line and "no credits" in line


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

    def __init__(self, client: DistributedModel):
        self._client = client
        self.coverage: dict | None = None  # the swarm's, as `swarm_models` reports it (None: not known)
        self.last_generation: dict | None = None

    async def client(self, model_id: str | None = None) -> DistributedModel:
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


@pytest.fixture(scope="module")
def half_swarm(smollm2_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("localfb")
    model = ["--model", str(smollm2_data[1]), "--threads", "1"]
    procs: dict[str, PeerProcess] = {}
    try:
        procs["server"] = PeerProcess(root / "server", *model, "--blocks", "0:15")
        start_all([procs["server"]], timeout=120)
        boot = ["--bootstrap", procs["server"].addr, "--api", "127.0.0.1:0"]
        procs["user"] = PeerProcess(root / "user", *model, *boot, "--fallback", "local")
        procs["plain"] = PeerProcess(root / "plain", *model, *boot)
        start_all([procs["user"], procs["plain"]], timeout=120)
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
