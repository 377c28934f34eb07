"""The OpenAI wire format, as far as potluck speaks it: request checking and response shapes.

Requests (`ChatRequest.parse`, `CompletionRequest.parse`) are checked field by field; a bad one
raises `ApiError` naming the field, which the API answers as OpenAI does:

    HTTP 4xx/5xx  {"error": {"message": "...", "type": "invalid_request_error", "param": "top_p", "code": "..."}}

Fields we take: model, messages | prompt, max_tokens (or max_completion_tokens), temperature,
top_p, seed, stop, stream, stream_options.include_usage, n (= 1 only), potluck.receipts (ours: the
answer carries the signed receipts it was charged by), potluck.prefer (ours: "fast", "green" or "cheap", the
route's preference, pipeline/grid.py), and the penalties,
logprobs, tools / tool_choice / functions and response_format only at their neutral values (we do
not implement them, and say so rather than ignore them). Other fields (user, metadata, ...) are
ignored, like OpenAI's servers ignore what they do not use.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.grid import PREFERENCES

DEFAULT_MAX_TOKENS = 256
MAX_STOP = 4
MAX_STOP_LEN = 256
MAX_MESSAGES = 1024
MAX_PROMPT_CHARS = 1 << 20
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_JSON_DEPTH = 32  # no request needs more; deeper would only exhaust the parser's recursion
MAX_JSON_STRUCTURE = 1 << 17  # brackets and commas in a body: ~40k values; MAX_MESSAGES messages need ~5k
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b"[]{},")


class ApiError(Exception):
    """An error answered in the OpenAI shape with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry: bool = False, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.retry = status, message, type, param, code, retry
        self.retry_after = retry_after  # seconds (a 429 past an app's quota): a retry then may succeed

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def parse_json_body(data: bytes) -> Any:
    """A request body's JSON, or ApiError ("invalid_json"). Its brackets and commas are counted first
    with byte operations that run at C speed (strings cut out only when the raw count is over the
    bound: text may hold brackets), so a body of a million empty arrays is refused before Python
    builds, or walks, a million lists. Depth: the parser refuses what would exhaust its recursion
    (cheaply: it stops there), and the parsed value, bounded by the count, is walked level by level."""
    if len(data.translate(None, _NOT_STRUCTURE)) > MAX_JSON_STRUCTURE:
        skeleton = _JSON_STRING.sub(b"", data).translate(None, _NOT_STRUCTURE)
        if len(skeleton) > MAX_JSON_STRUCTURE:
            raise ApiError(400, f"the JSON body has more than {MAX_JSON_STRUCTURE} brackets and commas",
                           code="invalid_json")
    try:
        body = json.loads(data)
    except RecursionError:
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"We could not parse the JSON body of your request: {e}. Send a JSON object "
                            "with Content-Type: application/json.", code="invalid_json") from None
    if _deeper_than(body, MAX_JSON_DEPTH):
        raise _too_deep()
    return body


def _too_deep() -> ApiError:
    return ApiError(400, f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep", code="invalid_json")


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest in `value` more than `limit` levels deep."""
    level = [value] if isinstance(value, (list, dict)) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        inner: list = []
        for container in level:
            items = container.values() if isinstance(container, dict) else container
            inner.extend(item for item in items if isinstance(item, (list, dict)))
        level = inner
    return False


def bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _number(body: dict, name: str, lo: float, hi: float, default: float, *, lo_open: bool = False) -> float:
    x = body.get(name)
    if x is None:
        return default
    # (an int is finite, and may be too large for math.isfinite: it compares with the bounds as it is)
    if isinstance(x, bool) or not isinstance(x, (int, float)) or (isinstance(x, float) and not math.isfinite(x)):
        raise bad(name, f"'{name}' must be a number, got {str(x)[:40]!r}", "invalid_type")
    if x < lo or x > hi or (lo_open and x == lo):
        left = "(" if lo_open else "["
        raise bad(name, f"'{name}' is {x}; it must be in {left}{lo:g}, {hi:g}]")
    return float(x)


def _int(body: dict, name: str, lo: int, hi: int, default: int | None) -> int | None:
    x = body.get(name)
    if x is None:
        return default
    if isinstance(x, bool) or not isinstance(x, int):
        raise bad(name, f"'{name}' must be an integer, got {str(x)[:40]!r}", "invalid_type")
    if not lo <= x <= hi:
        raise bad(name, f"'{name}' is {x}; it must be between {lo} and {hi}")
    return x


def _neutral(body: dict, name: str, neutral: Any) -> None:
    x = body.get(name)
    if x is not None and x != neutral:
        raise bad(name, f"'{name}' is not supported by potluck (leave it out or set it to {neutral!r})", "unsupported_parameter")


def _free_text_only(body: dict) -> None:
    """Tools and structured output need a model that was asked for them; potluck's models answer in
    free text, so a request that relies on them is refused rather than answered as if it did not."""
    for name, neutral in (("tools", []), ("functions", []), ("tool_choice", "none"), ("function_call", "none"),
                          ("response_format", {"type": "text"})):
        x = body.get(name)
        if x is not None and x != neutral:
            raise bad(name, f"'{name}' is not supported by potluck: its models answer in free text (leave "
                            f"'{name}' out)", "unsupported_parameter")


@dataclass
class GenerationRequest:
    model: str
    params: Any  # pipeline.sampling.SamplingParams
    stream: bool = False
    include_usage: bool = False
    max_tokens_given: bool = False
    receipts: bool = False  # `"potluck": {"receipts": true}`: the answer carries its signed receipts
    prefer: str | None = None  # `"potluck": {"prefer": "green"}`: the route weighs grid signals (None: the peer's)

    @staticmethod
    def _common(body: Any, max_tokens_limit: int) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_body")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise bad("model", "'model' is required: a model name from GET /v1/models", "missing_required_parameter"
                      if model is None else "invalid_type")
        given = body.get("max_completion_tokens", body.get("max_tokens"))
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _int({name: given}, name, 1, max_tokens_limit, DEFAULT_MAX_TOKENS)
        assert max_tokens is not None  # it has a default
        temperature = _number(body, "temperature", 0.0, 2.0, 1.0)
        top_p = _number(body, "top_p", 0.0, 1.0, 1.0, lo_open=True)
        seed = _int(body, "seed", -(1 << 63), (1 << 63) - 1, None)
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(
                isinstance(s, str) and 0 < len(s) <= MAX_STOP_LEN for s in stop):
            raise bad("stop", f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them")
        stream = body.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise bad("stream", "'stream' must be true or false", "invalid_type")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise bad("stream_options", "'stream_options' must be an object", "invalid_type")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise bad("stream_options", "'stream_options.include_usage' must be true or false", "invalid_type")
        _int(body, "n", 1, 1, 1)
        for name in ("presence_penalty", "frequency_penalty"):
            _number(body, name, -2.0, 2.0, 0.0)
            _neutral(body, name, 0)
        _neutral(body, "logprobs", False)
        _neutral(body, "best_of", 1)
        _neutral(body, "echo", False)
        _neutral(body, "suffix", None)
        _free_text_only(body)
        extensions = body.get("potluck") or {}
        if not isinstance(extensions, dict):
            raise bad("potluck", "'potluck' must be an object", "invalid_type")
        receipts = extensions.get("receipts", False)
        if not isinstance(receipts, bool):
            raise bad("potluck", "'potluck.receipts' must be true or false", "invalid_type")
        prefer = extensions.get("prefer")
        if prefer is not None and (not isinstance(prefer, str) or prefer not in PREFERENCES):
            raise bad("potluck", f"'potluck.prefer' must be one of {', '.join(PREFERENCES)}")
        if seed is not None:
            seed %= 1 << 63  # torch generators take non-negative seeds
        from pipeline.sampling import SamplingParams  # (torch: imported when a request comes, not with the CLI)

        # OpenAI's default temperature is 1 (sampling); temperature 0 is greedy here.
        params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop)
        return dict(model=model, params=params, stream=stream, include_usage=include_usage,
                    max_tokens_given=given is not None, receipts=receipts, prefer=prefer)


@dataclass
class ChatRequest(GenerationRequest):
    messages: list[dict] = field(default_factory=list)

    @classmethod
    def parse(cls, body: Any, *, max_tokens_limit: int = 8192) -> "ChatRequest":
        common = cls._common(body, max_tokens_limit)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad("messages", "'messages' must be a non-empty list of {role, content} objects",
                      "missing_required_parameter" if messages is None else "invalid_value")
        if len(messages) > MAX_MESSAGES:
            raise bad("messages", f"at most {MAX_MESSAGES} messages")
        out, chars = [], 0
        for i, m in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                raise bad(where, f"'{where}' must be an object with 'role' and 'content'", "invalid_type")
            role = m.get("role")
            if role not in ROLES:
                raise bad(f"{where}.role", f"'{where}.role' must be one of {', '.join(ROLES)}; got {str(role)[:40]!r}")
            content = m.get("content")
            if isinstance(content, list):  # content parts: only text ones
                parts = []
                for part in content:
                    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise bad(f"{where}.content", f"'{where}.content' parts must be text parts; "
                                                      "this model reads text only")
                    parts.append(part["text"])
                content = "".join(parts)
            if content is None and role == "assistant":
                content = ""
            if not isinstance(content, str):
                raise bad(f"{where}.content", f"'{where}.content' must be a string", "invalid_type")
            chars += len(content)
            out.append({"role": "system" if role == "developer" else role, "content": content})
        if chars > MAX_PROMPT_CHARS:
            raise bad("messages", f"the messages are longer than {MAX_PROMPT_CHARS} characters")
        return cls(**common, messages=out)


@dataclass
class CompletionRequest(GenerationRequest):
    prompt: str | list[int] = ""

    @classmethod
    def parse(cls, body: Any, *, max_tokens_limit: int = 8192) -> "CompletionRequest":
        common = cls._common(body, max_tokens_limit)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, list):
            if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
                raise bad("prompt", "'prompt' must be a string, or a list of token ids (a batch of more than one "
                                    "prompt is not supported)")
        elif not isinstance(prompt, str) or not prompt:
            raise bad("prompt", "'prompt' must be a non-empty string",
                      "missing_required_parameter" if prompt is None else "invalid_value")
        elif len(prompt) > MAX_PROMPT_CHARS:
            raise bad("prompt", f"'prompt' is longer than {MAX_PROMPT_CHARS} characters")
        return cls(**common, prompt=prompt)


# --- responses -------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(rid: str, model: str, text: str, finish_reason: str, use: dict, extra: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": use, "potluck": extra}


def text_completion(rid: str, model: str, text: str, finish_reason: str, use: dict, extra: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": use, "potluck": extra}


def _with_usage(chunk: dict, use: dict | None, extra: dict | None) -> dict:
    """A streamed chunk with its optional usage and potluck fields."""
    if use is not None:
        chunk["usage"] = use
    if extra is not None:
        chunk["potluck"] = extra
    return chunk


def chat_chunk(rid: str, model: str, created: int, *, delta: dict | None = None, finish_reason: str | None = None,
               use: dict | None = None, no_choices: bool = False, extra: dict | None = None) -> dict:
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
           "system_fingerprint": None,
           "choices": [] if no_choices else [{"index": 0, "delta": delta or {}, "logprobs": None,
                                              "finish_reason": finish_reason}]}
    return _with_usage(out, use, extra)


def completion_chunk(rid: str, model: str, created: int, *, text: str = "", finish_reason: str | None = None,
                     use: dict | None = None, no_choices: bool = False, extra: dict | None = None) -> dict:
    out = {"id": rid, "object": "text_completion", "created": created, "model": model, "system_fingerprint": None,
           "choices": [] if no_choices else [{"index": 0, "text": text, "logprobs": None,
                                              "finish_reason": finish_reason}]}
    return _with_usage(out, use, extra)
