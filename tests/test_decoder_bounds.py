"""Regressions for what `bench.fuzz` found: each input crashed a decoder (an untyped exception or a
stall) before its fix, and now gets the decoder's typed refusal."""

from __future__ import annotations

import json

import pytest

from credits import LogEntry
from credits.entry import ZERO_HASH, SignedHeader
from credits.errors import InvalidEntry
from dht.records import InvalidRecord
from p2p import framing, tensor
from p2p.errors import FrameError
from p2p.identity import Identity, IdentityKeyError, KEY_FILE
from p2p.swarm_key import SwarmKeyError, decode_key_file, format_key
from pipeline.announce import ServerInfo
from potluck.openai_schema import MAX_JSON_DEPTH, MAX_JSON_STRUCTURE, ApiError, ChatRequest, parse_json_body


def nested(depth: int) -> list:
    """[[[...]]] `depth` deep: its repr recurses past Python's limit."""
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


DEEP = nested(5000)


def test_brief_shows_a_deep_value_without_recursing():
    assert framing.brief(DEEP) == "<list of 1>"
    assert framing.brief({"a": DEEP}) == "<dict of 1>"
    assert framing.brief("x" * 10_000) == repr("x" * 39)[:40]
    assert framing.brief(b"\xff" * 100, 10) == repr(b"\xff" * 10)[:10]


def test_tensor_shape_of_nested_lists_is_refused():
    with pytest.raises(FrameError):
        tensor.unpack({"dtype": "int64", "shape": [1, DEEP], "data": b""})


def test_entry_kind_of_nested_lists_is_refused():
    author = Identity(b"\x01" * 32)
    good = LogEntry.create(author, 1, ZERO_HASH, 5, "dispute", b"")
    fields = [good.author, 1, ZERO_HASH, 5, DEEP, b"", good.signature]
    with pytest.raises(InvalidEntry):
        LogEntry.from_list(fields)
    with pytest.raises(InvalidEntry):  # as a fork proof carries it, in a heads exchange
        SignedHeader.from_list([*fields[:5], b"\x00" * 32, good.signature])


def test_announcement_number_of_nested_lists_is_refused():
    value = {"v": 1, "start": DEEP, "end": 2, "state": "online", "decode_tps": 1.0, "prefill_tps": 1.0,
             "cache_tokens": 1, "dtype": "float32", "version": "0.1.0", "t": 1.0}
    with pytest.raises(InvalidRecord):
        ServerInfo.from_value("peer", value)


@pytest.mark.parametrize("name", ["temperature", "top_p", "presence_penalty", "frequency_penalty"])
def test_a_number_too_large_for_a_float_is_refused(name):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], name: 10**400}
    with pytest.raises(ApiError) as e:
        ChatRequest.parse(parse_json_body(json.dumps(body).encode()))
    assert e.value.status == 400 and e.value.param == name


def test_json_bodies_are_bounded_in_structure_and_depth():
    # a million empty arrays would cost seconds to build and walk: refused from the bytes alone
    with pytest.raises(ApiError) as e:
        parse_json_body(b"[" + b"[]," * (MAX_JSON_STRUCTURE // 3 + 1) + b"[]]")
    assert e.value.code == "invalid_json"
    ok = b"[" + b"[]," * (MAX_JSON_STRUCTURE // 4) + b"[]]"
    assert len(parse_json_body(ok)) == MAX_JSON_STRUCTURE // 4 + 1
    assert parse_json_body(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH) == nested(MAX_JSON_DEPTH - 1)
    with pytest.raises(ApiError) as e:
        parse_json_body(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1))
    assert e.value.code == "invalid_json"
    # brackets and commas inside strings (escaped quotes too) are text, not structure
    text = "[[[{,]" * MAX_JSON_STRUCTURE + '\\"]]'
    assert parse_json_body(json.dumps({"content": text}).encode()) == {"content": text}
    deep_text = "[{" * (4 * MAX_JSON_DEPTH)  # few brackets in all, all in a string: text, not depth
    assert parse_json_body(json.dumps({"content": deep_text}).encode()) == {"content": deep_text}
    # nesting deeper than the parser's recursion is a depth refusal, not a parse error
    with pytest.raises(ApiError, match="nested more than"):
        parse_json_body(b'{"prompt":' * 50_000 + b"1" + b"}" * 50_000)


def test_key_files_are_refused_by_type(tmp_path):
    with pytest.raises(SwarmKeyError):
        decode_key_file(format_key(b"\x01" * 32).encode() + b"\n" * 5000, "key")
    with pytest.raises(SwarmKeyError):
        decode_key_file(b"\xff" * 10, "key")
    with pytest.raises(IdentityKeyError):
        Identity.from_key_file(b"\x01" * 33, "key")
    (tmp_path / KEY_FILE).write_bytes(b"\x01" * 10_000_000)
    with pytest.raises(IdentityKeyError):  # a ValueError, as before, so `potluck` exits 2 with one line
        Identity.load_or_create(tmp_path)
    assert Identity.from_key_file(b"\x01" * 32, "key") == Identity(b"\x01" * 32)
