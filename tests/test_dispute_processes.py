"""A dispute between real `potluck serve` processes, end to end: a user's spot check catches a lying
server process (bench.liarpeer), the user files a dispute; a third serving process holding the
liar's span takes the dispute from the user's replicated chain, re-runs its proof and records the
verdict in its own ledger; there, the liar's work stops counting for its standing.

Four processes on loopback (the tiny model, float32: the liar's 5 % lie is far beyond float32's
tolerance): the liar (blocks 0:2, announcing itself fastest, honest for 3 steps of each session),
two honest servers A and B of 0:2 (the user's checker and referee, and judges of the dispute), and
the user U serving 2:4. A first generates through U (so U served A: work from U reaches A), then the
liar starts and U generates through it. The liar's standing in A's view would be what it did for U
relayed by U (credits.standing); A's verdict makes it 0. U's passed checks reach A as attestations
(pipeline/attestations.py)."""

import sqlite3
import sys

import pytest

from credits.standing import WorkGraph, standings
from credits.store import DB_FILE
from p2p.identity import public_key_from_peer_id
from potluck.localswarm import PeerProcess, start_all, wait_until

pytestmark = pytest.mark.slow

PROMPT = [5, 17, 42, 8, 99, 3]


def read_only(proc: PeerProcess) -> sqlite3.Connection:
    """The process's ledger, read beside it (SQLite in WAL mode allows a reader while it writes)."""
    return sqlite3.connect(f"file:{proc.data_dir / DB_FILE}?mode=ro", uri=True)


def verdicts(proc: PeerProcess) -> set[tuple[bytes, bytes, int]]:
    with read_only(proc) as db:
        return {(a, x, lie) for a, x, lie in db.execute("SELECT accuser, accused, lie FROM verdicts")}


def standing_without_verdicts(proc: PeerProcess, of: bytes) -> int:
    """`of`'s standing in `proc`'s view computed as credits.standing does, but with no verdict applied."""
    me = public_key_from_peer_id(proc.peer_id)
    with read_only(proc) as db:
        transfers = [(s, c, f) for s, c, f in db.execute(
            "SELECT server, client, MAX(flops) FROM transfers GROUP BY server, client, session")]
    into_me = [t for t in transfers if t[1] == me]
    relays = {s for s, _, _ in into_me}
    graph = WorkGraph.from_transfers(into_me + [t for t in transfers if t[1] in relays], {})
    return standings(graph, me).get(of, 0)


def test_a_liar_caught_by_a_user_is_judged_by_a_third_process(llama_folder, tmp_path):
    common = ["--model", str(llama_folder), "--threads", "1", "--dtype", "float32"]
    wrap = ["-m", "bench.liarpeer"]

    user = PeerProcess(tmp_path / "user", *common, "--blocks", "2:4").start(timeout=180)
    boot = ["--bootstrap", user.addr]
    honest = [PeerProcess(tmp_path / f"honest{i}", *common, *boot, "--blocks", "0:2",
                          command=[sys.executable, *wrap, "--lie-rate", "0", "--announce-tps", "20"]) for i in range(2)]
    procs = [user, *honest]
    try:
        start_all(honest, timeout=180)
        a = honest[0]

        def generated(proc: PeerProcess):
            try:
                return proc.call("generate", prompt=PROMPT, max_tokens=6, timeout=120)
            except RuntimeError:
                return None  # no route learned yet

        # A generates through U's blocks: U's work reaches A (U is the relay of the liar's standing)
        first = wait_until(lambda: generated(a), 180, 2, message="A's generation through U")
        assert user.peer_id in [hop["peer_id"] for hop in first["route"]]
        liar = PeerProcess(tmp_path / "liar", *common, *boot, "--blocks", "0:2",
                           command=[sys.executable, *wrap, "--lie-rate", "1", "--honest-steps", "3",
                                    "--announce-tps", "1e6"]).start(timeout=180)
        procs.append(liar)
        liar_key, user_key = public_key_from_peer_id(liar.peer_id), public_key_from_peer_id(user.peer_id)

        def caught():  # U generates until its spot check has caught the liar (its own verdict)
            g = generated(user)
            return g if g is not None and (user_key, liar_key, 1) in verdicts(user) else None

        g = wait_until(caught, 180, 2, message="U's spot check to catch the liar")
        assert liar.peer_id not in [hop["peer_id"] for hop in g["route"]]  # replaced mid-generation
        assert liar.peer_id in [paid["peer_id"] for paid in g["paid"]]  # it was routed through (and paid before)
        with read_only(user) as db:  # the dispute on U's chain
            assert db.execute("SELECT COUNT(*) FROM entries WHERE author = ? AND kind = 'dispute'",
                              (user_key,)).fetchone()[0] == 1
        # A takes the dispute from U's replicated chain, re-runs the proof and records the verdict
        wait_until(lambda: (user_key, liar_key, 1) in verdicts(a), 180, 1, message="A's verdict on the liar")
        # the liar served U (receipts A holds, relayed by U's work for A): it would have standing at A ...
        wait_until(lambda: standing_without_verdicts(a, liar_key) > 0, 120, 1,
                   message="the liar's earn entries replicated to A")
        # ... but in A's own view, with its verdict, its work counts nothing
        rows = {r["peer_id"]: r for r in a.call("credits")["peers"]}
        assert rows[user.peer_id]["standing"] > 0 and rows[liar.peer_id]["standing"] == 0
        assert (user_key, liar_key, 0) not in verdicts(a) and not any(lie == 0 for _, _, lie in verdicts(a))
        # U's passed checks reach A as signed attestations, counted there (U has standing at A). A drops
        # (keeps nothing of) any that came before U's standing there counted, so U goes on generating:
        # its checks of the honest servers pass and are attested again each interval.
        def attested():
            if a.call("status")["attestations"]["accepted"] >= 1:
                return True
            generated(user)
            return False

        wait_until(attested, 120, 1, message="U's attestations at A")
    finally:
        for p in procs:
            p.close()
