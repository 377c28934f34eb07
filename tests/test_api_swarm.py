"""The user's peer against a real local swarm: three `potluck serve --blocks` processes of SmolLM2 and
a user peer with `--api` (on a wildcard address, so with `--api-key`). The official `openai` client,
`potluck chat` driven through its stdin/stdout, `potluck status`, the dashboard in headless
Chromium, and the README's client snippet all run against it. One swarm for the module; the last
test takes a server away (no route: 503 naming the blocks) and lets a `--blocks auto` volunteer
fill the gap."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import trio
from openai import OpenAI

from potluck import control
from potluck.localswarm import POTLUCK, PeerProcess, start_all, wait_until
from testkit.processes import earned_per_session

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
KEY = "test-key-123"
README = Path(__file__).resolve().parent.parent / "README.md"
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                "--window-size=1280,1300"]


class Swarm:
    def __init__(self, procs: dict[str, PeerProcess], url: str, root: Path, model_dir: Path):
        self.procs, self.url, self.root, self.model_dir = procs, url, root, model_dir
        self.user = procs["user"]
        self.servers = [procs[n] for n in ("head", "mid", "tail")]

    def openai(self, **kw) -> OpenAI:
        return OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=120, **kw)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


@pytest.fixture(scope="module")
def model_dir(smollm2_data):
    return smollm2_data[1]  # converted once per session (tests/conftest.py)


@pytest.fixture(scope="module")
def swarm(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("apiswarm")
    common = ["--model", str(model_dir), "--threads", "1"]
    procs: dict[str, PeerProcess] = {}
    try:
        procs["head"] = PeerProcess(root / "head", *common, "--blocks", "0:10", "--region", "lab-a").start(timeout=120)
        boot = ["--bootstrap", procs["head"].addr]
        rest = {"mid": ["--blocks", "10:20", "--region", "lab-a"], "tail": ["--blocks", "20:30", "--region", "lab-b"],
                "user": ["--api", "0.0.0.0:0", "--api-key", KEY, "--region", "home"]}
        for name, args in rest.items():
            procs[name] = PeerProcess(root / name, *common, *boot, *args)
        start_all([procs[n] for n in rest], timeout=120)
        url = procs["user"].call("status")["api"]
        assert url and url.startswith("http://127.0.0.1:"), url
        s = Swarm(procs, url, root, model_dir)
        with s.http() as http:
            wait_until(lambda: http.get("/v1/models").json()["data"][0]["potluck"]["covered_blocks"] == 30, 90, 1,
                       message="the user's peer to see all 30 blocks covered")
        yield s
    finally:
        for p in procs.values():
            p.close()


def _sessions(swarm: Swarm) -> list[int]:
    return [(p.call("status")["server"] or {}).get("sessions", 0) for p in swarm.servers]


# --- the API through the official client ------------------------------------------------------------


def test_openai_client_gives_the_python_apis_text(swarm):
    client = swarm.openai()
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["potluck"]["covered_blocks"] == 30

    messages = [{"role": "user", "content": "Name a fruit."}]
    kw = dict(model=MODEL, messages=messages, max_tokens=10, temperature=0.8, seed=11)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ref = swarm.user.call("generate", messages=messages, max_tokens=10, temperature=0.8, seed=11)
    assert whole.choices[0].message.content == streamed == ref["text"] != ""
    assert whole.usage.completion_tokens == chunks[-1].usage.completion_tokens == len(ref["token_ids"])
    assert whole.usage.prompt_tokens == ref["prompt_tokens"]
    assert whole.choices[0].finish_reason == ref["finish_reason"]
    route = whole.model_extra["potluck"]["route"]
    assert [(h["start"], h["end"]) for h in route] == [(0, 10), (10, 20), (20, 30)]

    prompt = "The three primary colors are"
    text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0).choices[0].text
    assert text == swarm.user.call("generate", prompt=prompt, max_tokens=8)["text"] != ""


def test_errors_have_the_openai_shape_and_status(swarm):
    client = swarm.openai()
    msg = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=msg, max_tokens=2)
    assert e.value.code == "model_not_found" and e.value.param == "model" and MODEL in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=msg, max_tokens=2, stream=True)
    for bad, param in (({"temperature": 3}, "temperature"), ({"top_p": 1.5}, "top_p"), ({"max_tokens": -1}, "max_tokens"),
                       ({"max_tokens": 9000}, "max_tokens")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=msg, **bad)
        assert e.value.status_code == 400 and e.value.param == param and e.value.type == "invalid_request_error"
    with swarm.http() as http:
        r = http.post("/v1/chat/completions", content=b'{"model": "x",', headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = httpx.get(swarm.url + "/v1/models")  # no key
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=swarm.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_disconnect_mid_stream_frees_the_servers_sessions(swarm):
    client = swarm.openai()
    stream = client.chat.completions.create(model=MODEL, max_tokens=400, temperature=0, stream=True,
                                            messages=[{"role": "user", "content": "Tell me a long story about a dragon."}])
    got = 0
    for chunk in stream:
        got += bool(chunk.choices and chunk.choices[0].delta.content)
        if got == 3:
            break
    assert min(_sessions(swarm)) >= 1  # under way on every server
    tokens_before = sum(p.call("status")["server"]["tokens"] for p in swarm.servers)
    stream.close()
    wait_until(lambda: _sessions(swarm) == [0, 0, 0], 10, 0.2, message="every server's session to close")
    tokens_after = sum(p.call("status")["server"]["tokens"] for p in swarm.servers)
    assert tokens_after - tokens_before < 3 * 40  # stopped, far from 400 tokens


def test_readme_client_snippet_runs_unchanged(swarm, capsys):
    text = README.read_text()
    snippet = re.search(r"```python\n(from openai import OpenAI\n.*?)```", text, re.S).group(1)
    assert 'base_url="http://127.0.0.1:8000/v1"' in snippet
    snippet = snippet.replace("http://127.0.0.1:8000", swarm.url).replace('api_key="-"', f'api_key="{KEY}"')
    exec(compile(snippet, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.strip() and re.search(r" \d+\n", out)


def test_concurrent_requests_each_report_the_credits_of_their_own_sessions(swarm):
    """Two requests at once: each answer's credits_spent is what the servers earned for that request's
    sessions, not the movement of the ledger while both ran."""
    client = swarm.openai()
    questions = ["Name a fruit.", "Tell me, in one long sentence, about the history of the city of Rome."]
    answers: dict[int, dict] = {}

    def ask(i: int) -> None:
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": questions[i]}],
                                               max_tokens=4 + 12 * i, temperature=0)
        answers[i] = reply.model_extra["potluck"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(answers) == [0, 1]
    for extra in answers.values():
        paid = {p["session"]: p["credits"] for p in extra["paid"]}
        assert len(paid) == 3 and {p["peer_id"] for p in extra["paid"]} == {p.peer_id for p in swarm.servers}
        earned = wait_until(lambda: (e := earned_per_session([p.data_dir for p in swarm.servers], set(paid))).keys() == paid.keys() and e, 30, 0.5,
                            message="the servers' earn entries for the request's sessions")
        assert earned == pytest.approx(paid)
        assert extra["credits_spent"] == pytest.approx(sum(earned.values())) and extra["credits_spent"] > 0
    assert answers[0]["credits_spent"] < answers[1]["credits_spent"]  # the longer request cost more


# --- potluck chat, potluck status ---------------------------------------------------------------------


class Terminal:
    """`potluck chat` on pipes: write a line, read what comes back with the time each piece arrived."""

    def __init__(self, *args: str, env: dict | None = None):
        self.proc = subprocess.Popen([*POTLUCK, "chat", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.out = b""
        self.pieces: list[tuple[float, bytes]] = []

    def read_until(self, pattern: str, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.out.decode(errors="replace")):
            left = deadline - time.monotonic()
            piece = None
            if left > 0 and select.select([self.proc.stdout], [], [], min(left, 0.5))[0]:
                piece = os.read(self.proc.stdout.fileno(), 4096)
                if piece:
                    self.pieces.append((time.monotonic(), piece))
                    self.out += piece
            if left <= 0 or piece == b"":  # out of time, or the chat ended
                self.proc.kill()
                raise AssertionError(f"no {pattern!r} in chat output:\n{self.out.decode(errors='replace')}\n"
                                     f"stderr: {self.proc.stderr.read().decode(errors='replace')}")
        return self.out.decode(errors="replace")

    def say(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                return self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def _answers(out: str) -> list[tuple[int, int]]:
    """(completion tokens, prompt tokens) of each answer's stats line."""
    return [(int(a), int(b)) for a, b in re.findall(r"\[(\d+) tokens \(prompt (\d+)\)", out)]


def test_chat_streams_keeps_the_conversation_and_resets(swarm):
    term = Terminal("--data-dir", str(swarm.user.data_dir), "--max-tokens", "12", "--temperature", "0",
                    env={"POTLUCK_API_KEY": KEY})
    try:
        term.read_until(r"you> ")
        assert f"potluck chat · {MODEL}" in term.out.decode()
        term.say("What is the capital of France?")
        out = term.read_until(r"credits spent.*\n.*you> ")
        n = len(term.pieces)
        term.say("And of Italy?")
        out = term.read_until(r"(credits spent.*\n(.|\n)*){2}you> ")
        # streamed: the second answer came in several pieces before its stats line
        before_stats = []
        for _, piece in term.pieces[n:]:
            if b"credits spent" in piece:
                break
            before_stats.append(piece)
        assert len(before_stats) >= 2, term.pieces[n:]
        term.say("/reset")
        term.read_until(r"\(conversation cleared\)\nyou> ")
        term.say("What is the capital of France?")
        out = term.read_until(r"(credits spent.*\n(.|\n)*){3}you> ")
        term.say("/quit")
        assert term.close() == 0
    finally:
        term.close()
    (t1, p1), (t2, p2), (t3, p3) = _answers(out)
    assert p2 > p1 + t1  # the history went with the second question
    assert p3 == p1  # and not after /reset
    assert out.count("bot> ") == 3 and "tok/s" in out and "route 0-9" in out
    first, third = (re.findall(r"bot> (.*)\n", out)[i] for i in (0, 2))
    assert first == third  # greedy: the same question without history, the same answer


def test_chat_starts_a_fresh_peer_when_none_runs(swarm, tmp_path):
    term = Terminal("--data-dir", str(tmp_path / "fresh"), "--bootstrap", swarm.procs["head"].addr,
                    "--model", str(swarm.model_dir), "--max-tokens", "4", "--temperature", "0")
    try:
        term.read_until(r"you> ", timeout=120)
        assert "starting one" in term.out.decode()
        term.say("Hi!")
        out = term.read_until(r"credits spent.*\n.*you> ")
        term.say("/quit")
        assert term.close() == 0
    finally:
        term.close()
    assert _answers(out)[0][0] >= 1
    assert not (tmp_path / "fresh" / control.SOCKET_NAME).exists()  # the peer it started is gone


def test_a_killed_chat_takes_its_fresh_peer_with_it(swarm, tmp_path):
    data_dir = tmp_path / "orphan"
    term = Terminal("--data-dir", str(data_dir), "--bootstrap", swarm.procs["head"].addr,
                    "--model", str(swarm.model_dir))
    try:
        term.read_until(r"you> ", timeout=120)
        assert (data_dir / control.SOCKET_NAME).exists()  # the peer it started is up
        term.proc.kill()  # SIGKILL: the chat runs no cleanup of its own
        term.proc.wait()
        wait_until(lambda: not (data_dir / control.SOCKET_NAME).exists(), 20, message="the orphaned peer to stop")
        with pytest.raises(control.PeerNotRunning):
            trio.run(control.call, data_dir, "status")
    finally:
        term.close()


def test_status_is_a_readable_table_and_json(swarm):
    head = subprocess.run([*POTLUCK, "status", "--data-dir", str(swarm.procs["head"].data_dir)],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "80"})
    assert head.returncode == 0, head.stderr
    out = head.stdout
    for text in (f"serving blocks 0:10 of {MODEL}", "30/30 blocks covered, complete", "known peers", "credits",
                 "balance", "10:20", "20:30", "…" + swarm.procs["tail"].peer_id[-8:]):
        assert text in out, (text, out)
    assert all(len(line) <= 80 for line in out.splitlines()), out
    user = json.loads(subprocess.run([*POTLUCK, "status", "--json", "--data-dir", str(swarm.user.data_dir)],
                                     capture_output=True, text=True, timeout=60, check=True).stdout)
    assert user["api"] == swarm.url and user["server"] is None
    cov = user["models"][0]["coverage"]
    assert cov["complete"] and cov["replicas"] == [1] * 30 and len(cov["servers"]) == 3
    assert user["last_generation"]["route"] and "balance" in user["credits"]


# --- the dashboard in headless Chromium -------------------------------------------------------------


def test_dashboard_shows_peers_and_coverage_in_chromium(swarm, tmp_path):
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.skip("chromium/chromedriver missing: run scripts/setup-test-system.sh as root")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'chrome'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(f"{swarm.url}/?key={KEY}")
        WebDriverWait(driver, 30).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "1"
            and len(d.find_elements(By.CSS_SELECTOR, ".bar .cell")) == 30
            and len(d.find_elements(By.CSS_SELECTOR, ".span-row")) == 3)
        cells = driver.find_elements(By.CSS_SELECTOR, ".bar .cell")
        assert [c.get_attribute("data-replicas") for c in cells] == ["1"] * 30
        assert "30 / 30 blocks covered" in driver.find_element(By.ID, "models").text
        rows = driver.find_elements(By.CSS_SELECTOR, "#peers tbody tr")
        shown = {r.get_attribute("data-peer") for r in rows}
        assert {p.peer_id for p in swarm.procs.values() if p.peer_id} <= shown
        table = driver.find_element(By.ID, "peers").text
        assert "serves blocks 0–9" in table and "lab-b" in table and " ms" in table
        assert driver.find_element(By.ID, "cr-balance").text not in ("", "–")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#balances tbody tr")) >= 1
        # live: a new request shows up as the last route without reloading the page
        swarm.openai().completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3, temperature=0)
        WebDriverWait(driver, 15).until(lambda d: d.find_element(By.ID, "route-stats").text.startswith("3 tokens"))
        assert len(driver.find_elements(By.CSS_SELECTOR, "#route .hop")) == 3
        shot = tmp_path / "dashboard.png"
        driver.save_screenshot(str(shot))
        if os.environ.get("POTLUCK_SCREENSHOT_DIR"):
            shutil.copy(shot, Path(os.environ["POTLUCK_SCREENSHOT_DIR"]) / "dashboard.png")
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe
    finally:
        driver.quit()


# --- last: a server leaves, a volunteer fills the gap -----------------------------------------------


def test_no_route_names_the_missing_blocks_until_a_volunteer_serves_them(swarm):
    client = swarm.openai()
    swarm.procs["tail"].stop()  # SIGTERM: it announces itself offline

    def refusal():
        try:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        except openai.APIStatusError as e:
            return e if e.status_code == 503 else None
        return None

    err = wait_until(refusal, 30, 0.5, message="a 503 once blocks 20-29 have no server")
    assert err.code == "no_route" and err.type == "server_error"
    assert "blocks 20-29" in err.message and "--blocks 20:30" in err.message
    models = client.models.list().data
    assert models[0].model_extra["potluck"]["missing_blocks"] == [[20, 30]]

    volunteer = PeerProcess(swarm.root / "volunteer", "--model", str(swarm.model_dir), "--threads", "1",
                            "--bootstrap", swarm.procs["head"].addr, "--blocks", "auto")
    swarm.procs["volunteer"] = volunteer
    volunteer.start(timeout=120)

    def answered():
        try:
            return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=2, temperature=0)
        except openai.APIStatusError:
            return None

    reply = wait_until(answered, 60, 1, message="an answer once the volunteer serves the missing blocks")
    assert any(h["peer_id"] == volunteer.peer_id for h in reply.model_extra["potluck"]["route"])
