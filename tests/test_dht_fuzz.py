"""Hypothesis fuzzing of the /potluck/kad/1.0.0 decoders: hostile input gets FrameError, never a crash."""

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dht import protocol as proto
from dht.records import SignedValue
from dht.vivaldi import Coord
from p2p import framing
from p2p.errors import FrameError
from p2p.identity import Identity

ALICE = Identity(b"\x01" * 32)
BOB = Identity(b"\x02" * 32)
ADDR = f"/sim/1/p2p/{ALICE.peer_id}"

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                    st.text(max_size=80), st.binary(max_size=80))
wire = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                      st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=6)),
                    max_leaves=40)


def info():
    return {"c": Coord(0.01, 0.02, 0.003, 0.5).wire(), "l": [[2, BOB.peer_id, 0.012, 3.5, Coord(0.02, 0.01, 0.004, 0.2).wire()]], "a": ADDR}


def valid_requests():
    entry = SignedValue.create(ALICE, "k/1", {"x": 1}, 1.7e9 + 60).wire()
    return [
        {"op": "ping", "i": info()},
        {"op": "find_node", "i": info(), "t": b"\x07" * 32, "lv": 2, "cl": BOB.peer_id},
        {"op": "find_value", "i": info(), "k": "k/1", "lv": 0, "cl": ""},
        {"op": "store", "i": info(), "k": "k/1", "e": [entry]},
    ]


def mutate(msg, path, value):
    """Replace msg[path...] with value (deep copy through msgpack)."""
    msg = framing.decode(framing.encode(msg))
    cur = msg
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value
    return msg


def test_valid_requests_decode():
    for msg in valid_requests():
        req = proto.decode_request(ALICE.peer_id, framing.decode(framing.encode(msg)))
        assert req.op == msg["op"] and req.info.addr == ADDR


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wire)
def test_arbitrary_objects_never_crash_the_decoders(obj):
    for decode in (lambda o: proto.decode_request(ALICE.peer_id, o),
                   lambda o: proto.decode_reply("find_value", ALICE.peer_id, o, "k"),
                   lambda o: proto.decode_reply("find_node", ALICE.peer_id, o),
                   lambda o: proto.decode_reply("store", ALICE.peer_id, o)):
        try:
            decode(obj)
        except FrameError:
            pass


FIELDS = [("op",), ("i",), ("i", "c"), ("i", "c", 0), ("i", "l"), ("i", "l", 0), ("i", "l", 0, 0), ("i", "l", 0, 1),
          ("i", "l", 0, 2), ("i", "l", 0, 3), ("i", "l", 0, 4), ("i", "l", 0, 4, 0),
          ("i", "a"), ("t",), ("lv",), ("cl",), ("k",), ("e",), ("e", 0), ("e", 0, 0), ("e", 0, 1), ("e", 0, 2), ("e", 0, 3)]


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(range(4)), st.sampled_from(FIELDS), wire)
def test_mutated_valid_requests_are_refused_cleanly(which, path, value):
    msg = valid_requests()[which]
    try:
        msg = mutate(msg, path, value)
    except (KeyError, IndexError, TypeError):
        return  # this field does not exist in this op
    try:
        req = proto.decode_request(ALICE.peer_id, msg)
    except FrameError:
        return
    # whatever got through is well-typed
    assert isinstance(req.info.coord, Coord) and isinstance(req.level, int) and isinstance(req.key, str)
    for level, advert in req.info.labels.items():
        assert isinstance(level, int) and isinstance(advert.centre, Coord)
        assert 0 <= advert.dist <= 60 and 0 <= advert.age <= proto.MAX_LABEL_AGE
    for e in req.entries:
        assert isinstance(e.raw, bytes) and isinstance(e.expires, float) and len(e.signature) == 64


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(scalars, max_size=4), max_size=50), st.lists(wire, max_size=5))
def test_reply_contacts_and_entries_are_checked(contacts, entries):
    body = {"i": info(), "n": contacts, "e": entries}
    try:
        reply = proto.decode_reply("find_value", ALICE.peer_id, body, "k/1")
    except FrameError:
        return
    assert len(reply.contacts) <= proto.MAX_CONTACTS
    for c in reply.contacts:
        assert proto.valid_peer_id(c.peer_id) and c.addr.endswith("/p2p/" + c.peer_id)


def test_specific_hostile_replies():
    too_many = [[BOB.peer_id, f"/sim/2/p2p/{BOB.peer_id}"]] * (proto.MAX_CONTACTS + 1)
    wrong_addr = [[BOB.peer_id, ADDR]]  # an address that names another peer
    fake_id = [["12D3KooWfake", "/sim/2/p2p/12D3KooWfake"]]
    nan_coord = [[BOB.peer_id, f"/sim/2/p2p/{BOB.peer_id}", [float("nan"), 0.0, 0.0, 0.5]]]
    for contacts in (too_many, wrong_addr, fake_id, nan_coord):
        try:
            proto.decode_reply("find_node", ALICE.peer_id, {"i": info(), "n": contacts})
        except FrameError:
            continue
        raise AssertionError(f"accepted {contacts[:1]}")
    # sender address must be the sender's own
    bad_info = dict(info(), a=f"/sim/2/p2p/{BOB.peer_id}")
    try:
        proto.decode_request(ALICE.peer_id, {"op": "ping", "i": bad_info})
        raise AssertionError("accepted a sender address of another peer")
    except FrameError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_through_framing_and_decoder(data):
    try:
        obj = framing.decode(data)
    except FrameError:
        return
    try:
        proto.decode_request(ALICE.peer_id, obj)
    except FrameError:
        pass


def test_oversized_entry_fields():
    big = SignedValue.create(ALICE, "k/1", "x", 1.7e9 + 60).wire()
    big[1] = b"x" * (16 * 1024 + 1)
    msg = dict(valid_requests()[3], e=[big])
    try:
        proto.decode_request(ALICE.peer_id, msgpack.unpackb(msgpack.packb(msg)))
        raise AssertionError("accepted an oversized value")
    except FrameError:
        pass
