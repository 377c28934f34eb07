"""A bad day on a real swarm (issue #12): what users do on day one must not take the swarm away.

Three `potluck serve` processes of SmolLM2 (blocks 0:15 once, 15:30 twice, each with a small KV cache)
and two user peers with `--api`, driven with the official `openai` client, in a swarm whose credit
policy grants nothing and allows no debt (a busy server refuses whoever owes it). Each mishap — a
prompt longer than the servers can hold, a second peer started on a port in use, a broke user while
the servers are busy, a server stopped mid-answer — gets its clear answer, and right after it an
ordinary request is served on the first try: nobody was banned for a refusal (a ban of the head
server would leave blocks 0:15 without a route), and the status tells the truth. The figures (latency of the ordinary request after each mishap) are printed with -s."""

from __future__ import annotations

import subprocess
import time

import openai
import pytest
from openai import OpenAI

from potluck.localswarm import POTLUCK, PeerProcess, start_all, wait_until

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
ORDINARY = [{"role": "user", "content": "Name a primary color."}]


class Swarm:
    def __init__(self, procs: dict[str, PeerProcess]):
        self.procs = procs
        self.user = procs["user"]
        self.client = self.openai("user")

    def openai(self, name: str) -> OpenAI:
        url = self.procs[name].call("status")["api"]
        return OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=120)

    def model(self) -> dict:
        return self.client.models.retrieve(MODEL).model_extra["potluck"]

    def ordinary(self, after: str) -> None:
        """One ordinary chat request, on the first try (max_retries=0)."""
        t0 = time.monotonic()
        reply = self.client.chat.completions.create(model=MODEL, messages=ORDINARY, max_tokens=4, temperature=0)
        assert reply.choices[0].message.content
        print(f"ordinary request after {after}: {time.monotonic() - t0:.2f} s")


@pytest.fixture(scope="module")
def swarm(smollm2_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("badday")
    common = ["--model", str(smollm2_data[1]), "--threads", "1", "--cache-mb", "32",
              "--starting-grant", "0", "--debt-limit", "0"]
    procs: dict[str, PeerProcess] = {}
    try:
        procs["head"] = PeerProcess(root / "head", *common, "--blocks", "0:15").start(timeout=120)
        boot = ["--bootstrap", procs["head"].addr]
        # the users spot-check nothing: a checker session, once opened on the other tail, stays open for
        # the rest of its session, so the stream below would find both tails busy (under the adaptive
        # default at once, at a fixed 2 % now and then); spot checks have their own process tests
        users = ["--api", "127.0.0.1:0", "--spot-check-fraction", "0"]
        rest = {"tail-a": ["--blocks", "15:30"], "tail-b": ["--blocks", "15:30"], "user": users, "other-user": users}
        for name, args in rest.items():
            procs[name] = PeerProcess(root / name, *common, *boot, *args)
        start_all([procs[n] for n in rest], timeout=120)
        s = Swarm(procs)
        wait_until(lambda: s.model()["replicas"] == [1] * 15 + [2] * 15, 120, 1,
                   message="the user's peer to see all three servers")
        yield s
    finally:
        for p in procs.values():
            p.close()


def _sessions(swarm: Swarm) -> dict[str, int]:
    return {n: swarm.procs[n].call("status")["server"]["sessions"] for n in ("head", "tail-a", "tail-b")}


def _opened(swarm: Swarm) -> dict[str, int]:
    return {n: swarm.procs[n].call("status")["server"]["sessions_opened"] for n in ("head", "tail-a", "tail-b")}


def test_a_prompt_longer_than_the_servers_hold_is_400_naming_the_limit(swarm):
    swarm.ordinary("the swarm started")  # the room counted is that of servers the user has opened a session with
    limit = wait_until(lambda: swarm.model()["max_request_tokens"], 30, 0.5, message="the room of the servers reached")
    assert limit is not None and limit < 8192  # the servers' cache, not the model's context, is the limit here
    opened = _opened(swarm)
    long_prompt = [{"role": "user", "content": "Summarize this. " + "The lighthouse keeper counted waves. " * (limit // 6)}]
    with pytest.raises(openai.BadRequestError) as refused:
        swarm.client.chat.completions.create(model=MODEL, messages=long_prompt, max_tokens=10)
    assert refused.value.code == "context_length_exceeded"
    assert f"at most {limit} tokens" in refused.value.message and "Shorten the prompt" in refused.value.message
    assert _opened(swarm) == opened  # no server was even asked
    swarm.ordinary("a prompt too long")


def test_a_second_peer_on_a_used_port_exits_2_and_the_swarm_goes_on(swarm, tmp_path):
    port = swarm.user.addr.split("/tcp/")[1].split("/")[0]
    proc = subprocess.run([*POTLUCK, "serve", "--data-dir", str(tmp_path / "again"), "--listen",
                           f"/ip4/127.0.0.1/tcp/{port}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "already in use" in proc.stderr, proc.stderr
    swarm.ordinary("a peer refused its port")


def test_a_broke_user_gets_402_while_the_servers_are_busy(swarm):
    swarm.ordinary("nothing (so this user owes the servers)")
    other = swarm.openai("other-user")
    story = other.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell a long story."}],
                                          max_tokens=48, temperature=0, stream=True)
    chunks = iter(story)
    first = ""
    while not first:  # its first token came back: the other user's sessions are open, the servers busy
        chunk = next(chunks)
        first = chunk.choices[0].delta.content or "" if chunk.choices else ""
    with pytest.raises(openai.APIStatusError) as refused:
        swarm.client.chat.completions.create(model=MODEL, messages=ORDINARY, max_tokens=4, temperature=0)
    assert refused.value.status_code == 402 and refused.value.code == "insufficient_credits"
    assert "potluck serve --blocks auto" in refused.value.message  # it says how to earn
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # the other user is served
    wait_until(lambda: not any(_sessions(swarm).values()), 30, 0.2, message="the other user's sessions to close")
    swarm.ordinary("a refusal for credit")  # idle servers serve debtors; nobody was banned


def test_a_server_stopped_mid_answer_changes_nothing_for_the_user(swarm):
    prompt = [{"role": "user", "content": "Write two sentences about the sea."}]
    want = swarm.user.call("generate", messages=prompt, max_tokens=24)["text"]  # greedy, undisturbed
    # that generation's sessions close as its servers read the close: none left when the stream starts,
    # so the one busy replica below is the stream's
    wait_until(lambda: not any(_sessions(swarm).values()), 30, 0.2, message="the servers to close earlier sessions")
    stream = swarm.client.chat.completions.create(model=MODEL, messages=prompt, max_tokens=24, temperature=0,
                                                  stream=True)
    pieces, stopped = [], None
    for chunk in stream:
        pieces.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
        if stopped is None and len(pieces) >= 3:
            busy = [n for n in ("tail-a", "tail-b") if swarm.procs[n].call("status")["server"]["sessions"]]
            assert len(busy) == 1, busy  # the route goes through one of the two replicas
            stopped = busy[0]
            swarm.procs[stopped].stop()  # SIGTERM: it leaves mid-answer
    assert stopped is not None and "".join(pieces) == want  # failover replays: the answer is unchanged
    swarm.ordinary("a server left mid-answer")
    # the status tells the truth: the user's peer sees one replica of 15:30 now
    wait_until(lambda: swarm.model()["replicas"] == [1] * 30, 30, 1, message="the departed server to leave the view")


def test_a_restarted_server_is_routed_to_again(swarm):
    """The server that left mid-answer (a fault for the user's peer, which banned it) restarts on its
    identity; its fresh announcement lifts the ban: with the other replica SIGKILLed, the user's next
    request goes through the restarted server at once, not after the ban's backoff."""
    gone = next(n for n in ("tail-a", "tail-b") if swarm.procs[n].proc.poll() is not None)
    other = "tail-b" if gone == "tail-a" else "tail-a"
    swarm.procs[gone].start(timeout=120)
    wait_until(lambda: swarm.model()["replicas"] == [1] * 15 + [2] * 15, 60, 1,
               message="the restarted server to be announced again")
    swarm.procs[other].kill()
    swarm.ordinary("a server restarted on its identity and the other replica killed")
