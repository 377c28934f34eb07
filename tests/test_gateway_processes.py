"""The user's peer as a gateway, on real `potluck serve` processes of SmolLM2: a server of all 30
blocks; the user's peer with `--api --apps FILE --fallback URL`, whose fallback is another peer's
own API (a lone volunteer in a swarm of its own, behind its own key); a second user peer without
`--fallback`. The official `openai` client with apps' keys: receipts that verify and add up to the
credits reported and earned, quotas and usage; then the server is killed mid-answer (the fallback
writes the rest), after which the fallback answers alone and the peer without one says 503."""

from __future__ import annotations

import threading

import httpx
import msgpack
import openai
import pytest
from openai import OpenAI

from credits import Receipt, credits
from pipeline.pricing import ModelPricing
from potluck.localswarm import PeerProcess, start_all, wait_until
from testkit.processes import earned_per_session

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
NOTES_KEY, TINY_KEY = "sk-notes-0123456789abcdef", "sk-tiny-0123456789abcdef"
UPSTREAM_KEY = "upstream-secret-key"
OPERATOR_KEY = "user-operator-key"  # the user's peer's --api-key: --apps needs one


OPERATOR = {"authorization": f"Bearer {OPERATOR_KEY}"}


class Gateway:
    def __init__(self, procs: dict[str, PeerProcess], urls: dict[str, str]):
        self.procs, self.urls = procs, urls

    def openai(self, key: str, who: str = "user") -> OpenAI:
        return OpenAI(base_url=self.urls[who] + "/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def gateway(smollm2_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("gateway")
    model = ["--model", str(smollm2_data[1]), "--threads", "1"]
    apps = root / "apps.toml"
    apps.write_text(f'[apps.notes]\nkey = "{NOTES_KEY}"\n\n'
                    f'[apps.tiny]\nkey = "{TINY_KEY}"\ntokens_per_minute = 20\n')
    procs: dict[str, PeerProcess] = {}
    try:
        procs["server"] = PeerProcess(root / "server", *model, "--blocks", "0:30")
        procs["upstream"] = PeerProcess(root / "upstream", *model, "--blocks", "auto", "--api", "127.0.0.1:0",
                                        "--api-key", UPSTREAM_KEY)
        start_all([procs["server"], procs["upstream"]], timeout=120)
        upstream_url = procs["upstream"].call("status")["api"]
        boot = ["--bootstrap", procs["server"].addr, "--spot-check-fraction", "0", "--api", "127.0.0.1:0"]
        procs["user"] = PeerProcess(root / "user", *model, *boot, "--apps", str(apps), "--api-key", OPERATOR_KEY,
                                    "--fallback", upstream_url + "/v1", "--fallback-key-env", "UPSTREAM_KEY",
                                    env={"UPSTREAM_KEY": UPSTREAM_KEY})
        procs["plain"] = PeerProcess(root / "plain", *model, *boot)
        start_all([procs["user"], procs["plain"]], timeout=120)
        urls = {name: procs[name].call("status")["api"] for name in ("user", "plain", "upstream")}
        for name, key in (("user", NOTES_KEY), ("plain", None), ("upstream", UPSTREAM_KEY)):
            headers = {"authorization": f"Bearer {key}"} if key else {}
            with httpx.Client(base_url=urls[name], headers=headers, timeout=60) as http:
                wait_until(lambda: http.get("/v1/models").json()["data"][0]["potluck"]["covered_blocks"] == 30,
                           90, 1, message=f"{name} to see all 30 blocks covered")
        yield Gateway(procs, urls)
    finally:
        for p in procs.values():
            p.close()


def test_an_answers_receipts_verify_and_add_up_to_what_it_cost(gateway):
    reply = gateway.openai(NOTES_KEY).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=8, temperature=0,
        extra_body={"potluck": {"receipts": True}})
    extra = reply.model_extra["potluck"]
    assert extra["fallback"] is False and extra["credits_spent"] > 0
    receipts = [Receipt.from_list(msgpack.unpackb(bytes.fromhex(x), raw=False)) for x in extra["receipts"]]
    user_key = receipts[0].client
    for r in receipts:
        r.verify(ModelPricing())  # signed by the user's peer; FLOPs as the model's config prices them
        assert r.client == user_key
    assert sum(credits(r.flops) for r in receipts) == pytest.approx(extra["credits_spent"])
    # what the server's own ledger holds for these sessions is what the answer says it was charged
    sessions = {r.session.hex(): credits(r.flops) for r in receipts}
    earned = wait_until(lambda: (e := earned_per_session([gateway.procs["server"].data_dir], set(sessions))).keys() == sessions.keys() and e,
                        30, 0.5, message="the server's earn entries for the answer's sessions")
    assert earned == pytest.approx(sessions)


def test_apps_are_metered_and_refused_past_their_quota(gateway):
    tiny = gateway.openai(TINY_KEY)
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4, temperature=0)
    first = tiny.chat.completions.create(**kw)  # its prompt alone is more than 20 tokens
    with pytest.raises(openai.RateLimitError) as e:
        tiny.chat.completions.create(**kw)
    assert e.value.code == "rate_limit_exceeded" and int(e.value.response.headers["retry-after"]) >= 1
    with pytest.raises(openai.AuthenticationError):
        gateway.openai("sk-nobody-0123456789abcdef").models.list()

    with httpx.Client(base_url=gateway.urls["user"], timeout=30) as http:
        own = http.get("/api/usage", headers={"authorization": f"Bearer {TINY_KEY}"}).json()["apps"]
        assert list(own) == ["tiny"]
        u = own["tiny"]
        assert (u["requests"], u["rate_limited"], u["completion_tokens"]) == (1, 1, first.usage.completion_tokens)
        assert u["prompt_tokens"] == first.usage.prompt_tokens
        assert u["credits_spent"] == pytest.approx(first.model_extra["potluck"]["credits_spent"])
        everyone = http.get("/api/usage", headers=OPERATOR).json()["apps"]
        assert set(everyone) == {"notes", "tiny"} and everyone["notes"]["requests"] >= 1


def test_a_server_lost_mid_answer_the_fallback_writes_the_rest(gateway):
    client = gateway.openai(NOTES_KEY)
    prompt = "Once upon a time, in a small village by the sea, there lived"
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=120, temperature=0, stream=True)
    pieces: list[str] = []
    extra = None
    for chunk in stream:
        for c in chunk.choices:
            pieces.append(c.text)
        if len(pieces) == 4:
            threading.Thread(target=gateway.procs["server"].kill).start()  # the only server: no replica
        extra = (chunk.model_extra or {}).get("potluck") or extra
    assert extra is not None and extra["fallback"] is True, extra
    assert extra["swarm_error"] in ("generation_failed", "no_route") and extra["swarm_pieces"] >= 4
    text = "".join(pieces)
    swarm_part = "".join(pieces[:extra["swarm_pieces"]])
    # the upstream continued from the text already sent: greedy, so asking it directly gives the same rest
    rest = gateway.openai(UPSTREAM_KEY, "upstream").completions.create(
        model=MODEL, prompt=prompt + swarm_part, max_tokens=120 - extra["swarm_pieces"], temperature=0)
    assert text == swarm_part + rest.choices[0].text and rest.choices[0].text


def test_without_a_route_the_fallback_answers_and_nothing_is_spent(gateway):
    with httpx.Client(base_url=gateway.urls["user"], headers=OPERATOR, timeout=60) as http:
        spent_before = http.get("/api/credits").json()["spent"]
    client = gateway.openai(NOTES_KEY)
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Name a color."}], max_tokens=6, temperature=0)

    def fallback_answer():
        reply = client.chat.completions.create(**kw)
        return reply if reply.model_extra["potluck"]["swarm_error"] == "no_route" else None

    whole = wait_until(fallback_answer, 60, 1, message="the user's peer to see no route and use its fallback")
    extra = whole.model_extra["potluck"]
    assert extra["fallback"] is True and extra["credits_spent"] == 0.0 and extra["route"] == []
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].model_extra["potluck"]["fallback"] is True
    direct = gateway.openai(UPSTREAM_KEY, "upstream").chat.completions.create(**kw)
    assert whole.choices[0].message.content == direct.choices[0].message.content != ""
    with httpx.Client(base_url=gateway.urls["user"], headers=OPERATOR, timeout=60) as http:
        assert http.get("/api/credits").json()["spent"] == spent_before
        status = http.get("/api/status", params={"load": "0"}).json()
        assert status["last_generation"]["fallback"] is True
        assert http.get("/api/usage").json()["apps"]["notes"]["fallback_answers"] >= 3


def test_a_peer_without_fallback_still_answers_503(gateway):
    client = OpenAI(base_url=gateway.urls["plain"] + "/v1", api_key="unused", max_retries=0, timeout=60)

    def refusal():
        try:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        except openai.APIStatusError as e:
            return e if e.status_code == 503 else None
        return None

    err = wait_until(refusal, 60, 1, message="a 503 from the peer without a fallback")
    assert err.code == "no_route"

