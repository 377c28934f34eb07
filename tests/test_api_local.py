"""One `potluck serve --blocks auto --api` alone — a volunteer who also wants to chat — answers the
official `openai` client from its own blocks, in process: plain and streamed give the same greedy
text, the route is the peer itself, and nothing is spent (serving ourselves is free)."""

from __future__ import annotations

import httpx
import pytest
from openai import OpenAI

from potluck.localswarm import PeerProcess, wait_until

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def volunteer(smollm2_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("apilocal")
    peer = PeerProcess(root / "me", "--model", str(smollm2_data[1]), "--threads", "1", "--blocks", "auto",
                       "--api", "127.0.0.1:0")
    try:
        peer.start(timeout=120)
        url = peer.call("status")["api"]
        assert url and url.startswith("http://127.0.0.1:"), url
        with httpx.Client(base_url=url, timeout=60) as http:
            wait_until(lambda: http.get("/v1/models").json()["data"][0]["potluck"]["covered_blocks"] == 30, 90, 1,
                       message="the peer to see its own 30 blocks")
        yield peer, url
    finally:
        peer.close()


def test_a_lone_volunteer_answers_the_openai_client_from_its_own_blocks(volunteer):
    peer, url = volunteer
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.content == streamed != ""
    assert whole.usage.completion_tokens == chunks[-1].usage.completion_tokens
    extra = whole.model_extra["potluck"]
    assert [(h["peer_id"], h["start"], h["end"]) for h in extra["route"]] == [(peer.peer_id, 0, 30)]
    assert extra["credits_spent"] == 0
    server = peer.call("status")["server"]
    assert server["sessions_opened"] == 2 and server["sessions"] == 0
