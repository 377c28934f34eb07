"""Many applications behind one peer: per-app API keys, quotas per minute, and metering.

    potluck serve --api 0.0.0.0:8000 --api-key ADMIN --apps apps.toml

    # apps.toml (or the same shape as JSON: {"apps": {"notes": {...}}})
    [apps.notes]
    key = "sk-notes-0123456789abcdef"   # the app sends `Authorization: Bearer sk-notes-...`
    tokens_per_minute = 20000           # prompt + completion tokens; absent: no limit
    credits_per_minute = 500            # GFLOP-credits its answers spend; absent: no limit
    max_in_flight = 4                   # its requests being answered at once (default 4)

A request with an app's key is that app's: it is metered (requests, tokens, credits, fallback
answers, refusals) and refused with 429 and `retry-after` while one of its quotas is used up.
Quotas are leaky buckets: what an app used drains at its quota per minute, and a request is taken
while the bucket is below the quota; an answer is charged when it ends (or when its client goes
away: what was produced until then), so requests already in flight may take an app past its quota
once (the next ones wait for it to drain). `max_in_flight` bounds that overshoot: past it a
request is refused with 429 at once, so an app cannot open a thousand requests while below quota.

The operator is whoever sends the `--api-key` key (required with `--apps`: a key-less request from
loopback may be any stranger behind a reverse proxy): it is not metered and `GET /api/usage` shows it
every app; an app sees its own usage.

Bounded: the table is the operator's file (at most MAX_APPS apps), and each app holds a fixed set
of counters, whatever its traffic.
"""

from __future__ import annotations

import hmac
import json
import math
import re
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .openai_schema import ApiError

MAX_APPS = 4096
MAX_FILE_BYTES = 4 << 20
MIN_KEY_LEN, MAX_KEY_LEN = 16, 256
DEFAULT_MAX_IN_FLIGHT = 4
MAX_IN_FLIGHT_LIMIT = 1024  # the most an apps file may allow one app
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass
class Usage:
    """What one app used since this peer started."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    credits_spent: float = 0.0
    fallback_answers: int = 0  # answered (wholly or in part) by the fallback
    rate_limited: int = 0  # refused with 429


class Bucket:
    """A leaky bucket: `level` drains at `per_minute` per minute; room while it is below `per_minute`."""

    def __init__(self, per_minute: float, clock: Callable[[], float]):
        self.per_minute, self.clock = per_minute, clock
        self.level, self.at = 0.0, clock()

    def _drain(self) -> None:
        now = self.clock()
        self.level = max(0.0, self.level - (now - self.at) * self.per_minute / 60.0)
        self.at = now

    def wait_s(self) -> float:
        """Seconds until there is room again (0: there is room now)."""
        self._drain()
        if self.level < self.per_minute:
            return 0.0
        return (self.level - self.per_minute) * 60.0 / self.per_minute + 1e-3

    def charge(self, amount: float) -> None:
        self._drain()
        self.level += amount


@dataclass
class App:
    name: str
    key: str = field(repr=False)
    tokens_per_minute: float | None = None
    credits_per_minute: float | None = None
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    in_flight: int = 0  # requests admitted and not yet ended
    usage: Usage = field(default_factory=Usage)
    buckets: dict[str, Bucket] = field(default_factory=dict, repr=False)

    def view(self) -> dict:
        return {"name": self.name, "tokens_per_minute": self.tokens_per_minute,
                "credits_per_minute": self.credits_per_minute, "max_in_flight": self.max_in_flight,
                **asdict(self.usage)}


class AppTable:
    """The apps of `--apps FILE`, by key; admission against their quotas and their meters."""

    def __init__(self, apps: list[App], clock: Callable[[], float] = time.monotonic):
        self.apps = {a.name: a for a in apps}
        for a in apps:
            for what, limit in (("tokens", a.tokens_per_minute), ("credits", a.credits_per_minute)):
                if limit is not None:
                    a.buckets[what] = Bucket(limit, clock)

    def by_key(self, given: str) -> App | None:
        """The app whose key this is (every key compared in constant time)."""
        found = None
        for a in self.apps.values():
            if hmac.compare_digest(given.encode(), a.key.encode()):
                found = a
        return found

    def admit(self, app: App) -> None:
        """Take one request of `app` in flight (give it back with `release`). Raise 429 (with the
        seconds to wait) while one of its quotas is used up or `max_in_flight` of its requests are."""
        waits = {what: b.wait_s() for what, b in app.buckets.items()}
        what, wait = max(waits.items(), key=lambda kv: kv[1], default=("", 0.0))
        if wait > 0:
            app.usage.rate_limited += 1
            raise ApiError(429, f"App '{app.name}' used its {what} per minute ({app.buckets[what].per_minute:g}); "
                                f"retry in {math.ceil(wait)} s.", type="requests", code="rate_limit_exceeded",
                           retry_after=math.ceil(wait))
        if app.in_flight >= app.max_in_flight:
            app.usage.rate_limited += 1
            raise ApiError(429, f"App '{app.name}' has {app.in_flight} requests being answered (its max_in_flight); "
                                "retry when one ends.", type="requests", code="rate_limit_exceeded", retry_after=1)
        app.in_flight += 1

    def release(self, app: App) -> None:
        """One request `admit` took has ended."""
        app.in_flight -= 1

    def record(self, app: App, *, prompt_tokens: int, completion_tokens: int, credits_spent: float,
               fallback: bool) -> None:
        """Meter one answered request."""
        u = app.usage
        u.requests += 1
        u.prompt_tokens += prompt_tokens
        u.completion_tokens += completion_tokens
        u.credits_spent += credits_spent
        u.fallback_answers += fallback
        if "tokens" in app.buckets:
            app.buckets["tokens"].charge(prompt_tokens + completion_tokens)
        if "credits" in app.buckets:
            app.buckets["credits"].charge(credits_spent)

    def record_failure(self, app: App) -> None:
        """Meter a request that got no answer (an error): it counts, it costs nothing."""
        app.usage.requests += 1

    def usage(self, app: App | None) -> dict:
        """`GET /api/usage`: `app`'s own, or every app's for the operator (None)."""
        shown = [app] if app is not None else list(self.apps.values())
        return {"apps": {a.name: a.view() for a in shown}}


def load_apps(path: Path) -> AppTable:
    """The table of `--apps FILE` (TOML, or JSON when the name ends in .json); ValueError names what is wrong."""
    data = path.read_bytes()
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"--apps {path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        doc: Any = json.loads(data) if path.suffix == ".json" else tomllib.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"--apps {path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}") from None
    return AppTable(parse_apps(doc, str(path)))


def parse_apps(doc: Any, where: str) -> list[App]:
    apps = doc.get("apps") if isinstance(doc, dict) else None
    if not isinstance(apps, dict) or not apps:
        raise ValueError(f"--apps {where}: wants a table 'apps' of name → "
                         "{key, tokens_per_minute, credits_per_minute, max_in_flight}")
    if len(apps) > MAX_APPS:
        raise ValueError(f"--apps {where}: at most {MAX_APPS} apps")
    out: list[App] = []
    keys: set[str] = set()
    for name, spec in apps.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"--apps {where}: app name {str(name)[:70]!r} must be 1-64 letters, digits, _ . -")
        if not isinstance(spec, dict):
            raise ValueError(f"--apps {where}: app '{name}' must be a table")
        unknown = set(spec) - {"key", "tokens_per_minute", "credits_per_minute", "max_in_flight"}
        if unknown:
            raise ValueError(f"--apps {where}: app '{name}' has unknown fields {sorted(unknown)}")
        key = spec.get("key")
        if not isinstance(key, str) or not MIN_KEY_LEN <= len(key) <= MAX_KEY_LEN or not key.isprintable() or " " in key:
            raise ValueError(f"--apps {where}: app '{name}' needs a key of {MIN_KEY_LEN}-{MAX_KEY_LEN} printable "
                             "characters without spaces")
        if key in keys:
            raise ValueError(f"--apps {where}: app '{name}' has the key of another app")
        keys.add(key)
        tokens, credits = (_per_minute(spec, what, name, where) for what in ("tokens_per_minute", "credits_per_minute"))
        in_flight = spec.get("max_in_flight", DEFAULT_MAX_IN_FLIGHT)
        if isinstance(in_flight, bool) or not isinstance(in_flight, int) or not 1 <= in_flight <= MAX_IN_FLIGHT_LIMIT:
            raise ValueError(f"--apps {where}: app '{name}': max_in_flight must be a whole number in "
                             f"[1, {MAX_IN_FLIGHT_LIMIT}]")
        out.append(App(name, key, tokens_per_minute=tokens, credits_per_minute=credits, max_in_flight=in_flight))
    return out


def _per_minute(spec: dict, what: str, name: str, where: str) -> float | None:
    x = spec.get(what)
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x < math.inf:
        raise ValueError(f"--apps {where}: app '{name}': {what} must be a positive number")
    return float(x)
