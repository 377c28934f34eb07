"""Fuzz inputs from valid ones: byte mutations, structural mutations, random shapes, random bytes.

`FuzzInputs(rng, seeds, encode).next()` returns one input (bytes) for a decoder whose valid inputs
are `encode(seed)`. A quarter of the inputs each:
- mutate a valid encoding's bytes (bit flips, interesting bytes, truncation, insertion, deletion,
  duplication, a splice with another seed, a msgpack length field set huge);
- mutate a valid structure and encode it (a field replaced by a value of another type, a huge
  count or a deep nesting, a field dropped or added, a list item repeated);
- keep the seed's top-level shape (the map's keys, the list's length) with random values;
- random bytes.
`minimise(data, fails)` shrinks a crashing input while `fails` still says it crashes.
"""

from __future__ import annotations

import random
from typing import Any, Awaitable, Callable

INTERESTING_BYTES = bytes([0x00, 0x01, 0x7F, 0x80, 0xFF, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6, 0xC7, 0xCA,
                           0xCB, 0xCF, 0xD3, 0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0x90, 0x9F, 0x80, 0x8F])
# msgpack headers that announce a huge container or string: the decoder must not believe them
HUGE_HEADERS = (b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xdb\x7f\xff\xff\xff", b"\xc6\x7f\xff\xff\xff",
                b"\xdc\xff\xff", b"\xde\xff\xff", b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff", b"\xd3\x80\x00\x00\x00\x00\x00\x00\x00")
INTERESTING_INTS = (0, 1, -1, 10**400, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, -(2**63), 2**64 - 1, 255, 256, 65535, 65536)
MAX_INPUT = 4 * 1024 * 1024  # inputs stay below this; length fields still claim up to 4 GiB
INTERESTING_FLOATS = (float("nan"), float("inf"), float("-inf"), -0.0, 1e308, -1e308, 5e-324, 0.5)


def random_scalar(rng: random.Random) -> Any:
    kind = rng.randrange(8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice(INTERESTING_INTS) if rng.random() < 0.6 else rng.randint(-(2**63), 2**64 - 1)
    if kind == 3:
        return rng.choice(INTERESTING_FLOATS) if rng.random() < 0.6 else rng.uniform(-1e6, 1e6)
    if kind == 4:
        n = rng.choice((0, 1, 8, 64, 300, 70_000)) if rng.random() < 0.3 else rng.randrange(24)
        return "".join(chr(rng.choice((rng.randrange(32, 127), rng.randrange(0, 0x2FFF)))) for _ in range(min(n, 64))) * max(1, n // 64)
    if kind == 5:
        n = rng.choice((0, 16, 32, 64, 65, 300, 70_000)) if rng.random() < 0.4 else rng.randrange(40)
        return rng.randbytes(n)
    if kind == 6:
        return rng.choice(("", "a", "12D3KooW", "/ip4/127.0.0.1/tcp/1", "float32", "bfloat16", "online", "earn",
                           "grant", "step", "open", "push", "error", "user", "assistant", "\x00", "é" * 10))
    return rng.randrange(-4, 70)


def random_value(rng: random.Random, depth: int = 0, *, wild: bool = False) -> Any:
    """Any msgpack value, mostly small; a `wild` one is half the time a huge count or a deep nesting."""
    roll = rng.random()
    if wild and roll < 0.5:
        return rng.choice(_wild_values())
    if depth > 3 or roll < 0.6:
        return random_scalar(rng)
    if roll < 0.8:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(6))]
    return {random_scalar(rng) if rng.random() < 0.2 else rng.choice(("t", "k", "a", "b", "x", "v", "h", "data")):
            random_value(rng, depth + 1) for _ in range(rng.randrange(6))}


_WILD: list[Any] = []
_WILD_IDS: set[int] = set()  # shared by every input: mutations never reach inside them


def _wild_values() -> list[Any]:
    """Huge counts of small things and deep nestings, built once (building them is what would cost the time)."""
    if not _WILD:
        for n in (1000, 20_000):
            _WILD.extend(([0] * n, dict.fromkeys(range(n)), [[]] * n, [b"x" * 64] * (n // 10)))
        _WILD.append([[]] * 140_000)  # past p2p.framing's object budget
        for depth in (10, 100, 400):
            value: Any = 1
            for i in range(depth):
                value = [value] if i % 2 else {"k": value}
            _WILD.append(value)
        _WILD_IDS.update(id(v) for v in _WILD)
    return _WILD


def _copy(value: Any, depth: int = 0) -> Any:
    """A copy of the top of `value` (what `_slots` does not reach is shared, never mutated)."""
    if depth > 12 or id(value) in _WILD_IDS:
        return value
    if isinstance(value, list):
        return [_copy(v, depth + 1) for v in value[:64]] + value[64:]
    if isinstance(value, dict):
        return {k: _copy(v, depth + 1) if i < 64 else v for i, (k, v) in enumerate(value.items())}
    return value


def _slots(value: Any, out: list[tuple[Any, Any]], depth: int = 0) -> None:
    """The (container, key-or-index) places inside `value`, depth-first: the first 64 of each
    container, to a depth of 12 (a huge or deep value is mutated near its top)."""
    if depth > 12 or len(out) > 512 or id(value) in _WILD_IDS:
        return
    if isinstance(value, list):
        for i, v in enumerate(value[:64]):
            out.append((value, i))
            _slots(v, out, depth + 1)
    elif isinstance(value, dict):
        for k, v in list(value.items())[:64]:
            out.append((value, k))
            _slots(v, out, depth + 1)


def mutate_structure(rng: random.Random, seed: Any) -> Any:
    value = _copy(seed)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        slots: list[tuple[Any, Any]] = []
        _slots(value, slots)
        if not slots:
            return random_value(rng)
        container, key = rng.choice(slots)
        op = rng.randrange(10)
        if op < 5:
            container[key] = random_value(rng, wild=rng.random() < 0.2)
        elif op == 5:
            container[key] = rng.choice(INTERESTING_INTS)
        elif op == 6:
            if isinstance(container, dict):
                del container[key]
            else:
                container.pop(key)
        elif op == 7:
            if isinstance(container, dict):
                container[rng.choice(("zz", 0, b"k", "t", "extra"))] = random_value(rng)
            else:
                container.insert(key, _copy(container[key]))
        elif op == 8:
            if isinstance(container, list):
                item = container[key]  # a scalar many times; a container (a huge one, maybe) twice
                small = not isinstance(item, (list, dict)) and (not isinstance(item, (str, bytes)) or len(item) <= 64)
                container.extend([item] * (rng.choice((10, 1000, 5000)) if small else 2))
            else:
                container[key] = [container[key]]
        else:
            item = container[key]
            container[key] = (item.encode("utf-8", "surrogatepass") if isinstance(item, str) else
                              item.decode("latin-1") if isinstance(item, bytes) else
                              float(item) if isinstance(item, int) and not isinstance(item, bool) and abs(item) < 2**60 else
                              str(item) if not isinstance(item, (list, dict)) else random_scalar(rng))
    return value


def random_shape(rng: random.Random, seed: Any) -> Any:
    """The seed's top-level shape with random values in it."""
    wild = rng.randrange(len(seed)) if isinstance(seed, (list, dict)) and seed and rng.random() < 0.3 else -1
    if isinstance(seed, dict):
        return {k: random_value(rng, wild=i == wild) for i, k in enumerate(seed)}
    if isinstance(seed, list):
        return [random_value(rng, wild=i == wild) for i in range(len(seed))]
    return random_value(rng, wild=True)


def mutate_bytes(rng: random.Random, data: bytes, others: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 5))):
        n = len(buf)
        op = rng.randrange(10)
        at = rng.randrange(n + 1)
        if op == 0 and n:
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            buf[rng.randrange(n)] = rng.choice(INTERESTING_BYTES)
        elif op == 2:
            del buf[at:]
        elif op == 3:
            buf[at:at] = rng.randbytes(rng.randrange(1, 9))
        elif op == 4 and n:
            del buf[at:at + rng.randrange(1, 9)]
        elif op == 5 and n:
            chunk = buf[at:at + rng.randrange(1, 33)]
            buf[at:at] = chunk * rng.choice((1, 2, 50))
        elif op == 6 and others:
            other = rng.choice(others)
            cut = rng.randrange(len(other) + 1)
            buf = buf[:at] + bytearray(other[cut:])
        elif op == 7:
            header = rng.choice(HUGE_HEADERS)
            buf[at:at + len(header)] = header
        elif op == 8 and rng.random() < 0.3:  # a deep nesting of one-element arrays or maps
            buf[at:at] = rng.choice((b"\x91", b"\x81\x00")) * rng.choice((100, 1000, 100_000))
        elif n:
            i = rng.randrange(n)
            buf[i] = (buf[i] + rng.choice((1, -1, 16, -16))) % 256
    return bytes(buf)


class FuzzInputs:
    """An endless supply of inputs for one decoder; deterministic for a given rng."""

    def __init__(self, rng: random.Random, seeds: list[Any], encode: Callable[[Any], bytes]):
        self.rng = rng
        self.seeds = seeds
        self.encode = encode
        self.encoded = [encode(s) for s in seeds]

    def next(self) -> bytes:
        rng = self.rng
        roll = rng.random()
        if roll < 0.02:  # a valid input now and then: the decoder must take it (or say why, e.g. a replay)
            return rng.choice(self.encoded)
        if roll < 0.25:
            return mutate_bytes(rng, rng.choice(self.encoded), self.encoded)
        if roll < 0.75:
            seed = rng.choice(self.seeds)
            value = mutate_structure(rng, seed) if roll < 0.5 else random_shape(rng, seed)
            try:
                data = self.encode(value)
            except (TypeError, ValueError, OverflowError, RecursionError):  # not encodable in this format
                data = b""
            if 0 < len(data) <= MAX_INPUT:
                return data
            return mutate_bytes(rng, rng.choice(self.encoded), self.encoded)
        return rng.randbytes(rng.choice((0, 1, 2, 4, 8, 16, 64, 256, 1024)))


async def minimise(data: bytes, fails: Callable[[bytes], Awaitable[bool]], budget: int = 1000) -> bytes:
    """A shorter input that still `fails`: drop chunks, halving their size (greedy delta debugging),
    trying at most `budget` candidates."""
    best = data
    chunk = max(1, len(best) // 2)
    while chunk >= 1 and budget > 0:
        i, shrunk = 0, False
        while i < len(best) and budget > 0:
            candidate = best[:i] + best[i + chunk:]
            budget -= 1
            if await fails(candidate):
                best, shrunk = candidate, True
            else:
                i += chunk
        if not shrunk:
            chunk //= 2
    return best
