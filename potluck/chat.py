"""`potluck chat`: a terminal chat through a peer's OpenAI-compatible API.

    potluck chat                          # the peer running with the data dir (its --api), or a fresh one
    potluck chat --url http://127.0.0.1:8000
    potluck chat --bootstrap /ip4/…/p2p/… # no peer running: start one that joins through this address

Tokens are printed as they stream in; the conversation is kept (the whole history goes with each
question, through the model's chat template); `/reset` forgets it, `/quit` (or end of input) ends.
After each answer one line says how many tokens, how fast, the credits it cost and the route.

Only the standard library talks HTTP here (http.client, reading the SSE stream line by line), so
the command starts in a fraction of a second and needs no torch.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

HELP = "/reset clears the conversation, /quit ends (so does Ctrl-D); Ctrl-C stops an answer"


class ChatError(Exception):
    pass


class ApiClient:
    """The few calls `chat` makes, over http.client."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 300.0):
        parts = urlsplit(base_url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ChatError(f"not an http(s) URL: {base_url!r}")
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.prefix = parts.path[:-3] if parts.path.endswith("/v1") else parts.path
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout
        self.base_url = f"{parts.scheme}://{parts.netloc}{self.prefix}"

    def _conn(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def _error(self, resp: http.client.HTTPResponse) -> ChatError:
        raw = resp.read()
        try:
            msg = json.loads(raw)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = raw.decode(errors="replace")[:500]
        return ChatError(f"HTTP {resp.status}: {msg}")

    def get(self, path: str) -> dict:
        conn = self._conn()
        try:
            conn.request("GET", self.prefix + path, headers=self.headers)
            resp = conn.getresponse()
            if resp.status != 200:
                raise self._error(resp)
            return json.loads(resp.read())
        except OSError as e:
            raise ChatError(f"cannot reach {self.base_url}: {e}") from None
        finally:
            conn.close()

    def stream_chat(self, body: dict):
        """Yield each SSE event's JSON object until [DONE]."""
        conn = self._conn()
        try:
            conn.request("POST", self.prefix + "/v1/chat/completions", body=json.dumps(body), headers=self.headers)
            resp = conn.getresponse()
            if resp.status != 200:
                raise self._error(resp)
            while True:
                line = resp.readline()
                if not line:
                    raise ChatError("the peer closed the stream before [DONE]")
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise ChatError(event["error"].get("message", "error"))
                yield event
        except OSError as e:
            raise ChatError(f"lost the connection to {self.base_url}: {e}") from None
        finally:
            conn.close()  # closing mid-stream makes the peer cancel the generation


def _short(peer_id: str) -> str:
    return "…" + peer_id[-6:]


def stats_line(prompt_tokens: int | None, tokens: int, wall: float, extra: dict | None) -> str:
    extra = extra or {}
    tps = extra.get("tokens_per_s") or (tokens / wall if wall > 0 else 0.0)
    parts = [f"{tokens} tokens" + (f" (prompt {prompt_tokens})" if prompt_tokens is not None else ""),
             f"{tps:.1f} tok/s"]
    if extra.get("ttft_s") is not None:
        parts.append(f"first token {extra['ttft_s']:.2f} s")
    fallback = extra.get("fallback")
    by = "this peer's own copy of the model (--fallback local)" if fallback == "local" else \
        f"the fallback ({extra.get('fallback_model')})"
    if fallback and extra.get("swarm_pieces"):
        parts.append(f"the swarm wrote {extra['swarm_pieces']} pieces, then {by} the rest: only the swarm's part "
                     "cost credits")
    elif fallback:
        parts.append(f"answered by {by}: no credits")
    else:
        parts.append(f"{extra.get('credits_spent', 0.0):,.1f} credits spent")
    route = extra.get("route") or []
    if route:
        parts.append("route " + " → ".join(f"{h['start']}-{h['end'] - 1} {_short(h['peer_id'])}" for h in route))
    return "[" + " · ".join(parts) + "]"


class Chat:
    def __init__(self, api: ApiClient, model: str, *, system: str | None, max_tokens: int, temperature: float,
                 seed: int | None, out=sys.stdout):
        self.api, self.model = api, model
        self.system, self.max_tokens, self.temperature, self.seed = system, max_tokens, temperature, seed
        self.out = out
        self.history: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def ask(self, question: str) -> str | None:
        """Stream one answer to `question`; it joins the history. None when it failed or was stopped."""
        messages = self.history + [{"role": "user", "content": question}]
        body = {"model": self.model, "messages": messages, "stream": True, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "stream_options": {"include_usage": True}}
        if self.seed is not None:
            body["seed"] = self.seed
        w = self.out.write
        w("bot> ")
        self.out.flush()
        parts: list[str] = []
        extra, use = None, None
        t0 = time.perf_counter()
        try:
            for event in self.api.stream_chat(body):
                for choice in event.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        parts.append(text)
                        w(text)
                        self.out.flush()
                extra = event.get("potluck") or extra
                use = event.get("usage") or use
        except ChatError as e:
            w(f"\n[error] {e}\n")
            return None
        except KeyboardInterrupt:
            w("\n[stopped]\n")
            return None
        wall = time.perf_counter() - t0
        answer = "".join(parts)
        tokens = use["completion_tokens"] if use else len(parts)
        w("\n" + stats_line(use["prompt_tokens"] if use else None, tokens, wall, extra) + "\n")
        self.out.flush()
        self.history = messages + [{"role": "assistant", "content": answer}]
        return answer

    def run(self, read=input) -> int:
        w = self.out.write
        w(f"potluck chat · {self.model} via {self.api.base_url}/v1 · {HELP}\n")
        while True:
            try:
                line = read("you> ")
            except EOFError:
                w("\n")
                return 0
            except KeyboardInterrupt:
                w("\n")
                return 0
            line = line.strip()
            if not line:
                continue
            if line in ("/quit", "/exit", "/q"):
                return 0
            if line == "/reset":
                self.reset()
                w("(conversation cleared)\n")
                continue
            if line == "/help":
                w(HELP + "\n")
                continue
            if line.startswith("/"):
                w(f"unknown command {line.split()[0]}; {HELP}\n")
                continue
            self.ask(line)


# --- finding (or starting) a peer --------------------------------------------------------------------


def running_peer_api(data_dir: Path) -> tuple[bool, str | None]:
    """(is a peer running with `data_dir`, its API base URL or None)."""
    import trio

    from . import control

    try:
        status = trio.run(control.call, data_dir, "status")
    except control.PeerNotRunning:
        return False, None
    return True, status.get("api")


class FreshPeer:
    """A `potluck serve --api 127.0.0.1:0` started for this chat, stopped when it ends."""

    def __init__(self, args: argparse.Namespace):
        cmd = [sys.executable, "-m", "potluck.cli", "serve", "--data-dir", str(args.data_dir), "--api", "127.0.0.1:0"]
        for b in args.bootstrap:
            cmd += ["--bootstrap", b]
        if args.swarm_key:
            cmd += ["--swarm-key", str(args.swarm_key)]
        if args.model:
            cmd += ["--model", args.model]
        Path(args.data_dir).mkdir(parents=True, exist_ok=True)
        self.log_path = Path(args.data_dir) / "chat-peer.log"
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, preexec_fn=_stop_with_parent,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert self.proc.stdout is not None  # stdout=PIPE
        self.url = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if not line:
                break
            if line.startswith("api on "):
                self.url = line.split()[2].removesuffix("/v1")
                return
        self.close()
        tail = self.log_path.read_text(errors="replace")[-1500:]
        raise ChatError(f"could not start a peer (log {self.log_path}):\n{tail}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()


def _stop_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when the chat process dies, however it
    dies (a SIGKILLed chat runs no `finally`, and its peer must not outlive it)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _sigterm_exits(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through `finally`, which stops a peer we started


def wait_for_model(api: ApiClient, wanted: str | None, timeout: float, out) -> str:
    """The model to chat with; waits (up to `timeout`) until the swarm covers every block of it."""
    deadline = time.monotonic() + timeout
    said = False
    while True:
        models = api.get("/v1/models")["data"]
        if not models:
            raise ChatError("the peer knows no model")
        # --model may be a folder (the fresh peer's --model): its name is the model's name here
        m = next((m for m in models if wanted is None or wanted in (m["id"], m.get("root"))
                  or Path(wanted).name == m["id"]), None)
        if m is None:
            raise ChatError(f"the peer does not run model {wanted!r}; it runs {', '.join(x['id'] for x in models)}")
        info = m.get("potluck") or {}
        if not info.get("missing_blocks"):
            return m["id"]
        if time.monotonic() > deadline:
            return m["id"]  # let the first question say which blocks are missing
        if not said:
            out.write(f"waiting for the swarm to cover {m['id']} ({info.get('covered_blocks')}/{info.get('num_blocks')} "
                      "blocks so far) …\n")
            out.flush()
            said = True
        time.sleep(1.0)


def main(args: argparse.Namespace) -> int:
    out = sys.stdout
    fresh = None
    signal.signal(signal.SIGTERM, _sigterm_exits)
    try:
        url = args.url
        if url is None:
            running, url = running_peer_api(args.data_dir)
            if running and url is None:
                print(f"the peer running with data dir {args.data_dir} has no HTTP API; restart it with "
                      "`potluck serve --api 127.0.0.1:8000 ...`, or pass --url", file=sys.stderr)
                return 1
            if not running:
                out.write(f"no peer is running with data dir {args.data_dir}; starting one …\n")
                out.flush()
                fresh = FreshPeer(args)
                url = fresh.url
        api = ApiClient(url, args.api_key)
        model = wait_for_model(api, args.model, 60.0 if fresh else 0.0, out)
        chat = Chat(api, model, system=args.system, max_tokens=args.max_tokens, temperature=args.temperature,
                    seed=args.seed, out=out)
        return chat.run()
    except ChatError as e:
        print(f"potluck chat: {e}", file=sys.stderr)
        return 1
    finally:
        if fresh is not None:
            fresh.close()
