"""Credits between real `potluck serve` processes (SmolLM2 on one server of all 30 blocks): a busy
server's exposure to a client that never serves anything back is at most that client's allowance
(`--debt-limit` plus its standing there, which is 0), asserted on the server's own record; both
processes agree on what moved."""

import threading

import pytest

from potluck.localswarm import wait_until
from testkit.processes import first_generation, server_and_client

pytestmark = pytest.mark.slow

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # greedy decoding keeps counting: a long generation
DEBT = 20.0  # GFLOP-credits a newcomer may owe a busy server: ~74 tokens through SmolLM2's 30 blocks


def test_a_busy_servers_exposure_to_a_defaulting_client_is_its_allowance(smollm2_data, tmp_path):
    model_dir = smollm2_data[1]
    common = ["--model", str(model_dir), "--threads", "1", "--debt-limit", str(DEBT)]  # the swarm's policy
    with server_and_client(tmp_path, common) as (server, client):
        # While the server is idle the client is served (free when idle), and owes what it signed for.
        first_generation(client, COUNTING, 1)
        wait_until(lambda: server.call("status")["server"]["sessions"] == 0, 30, 0.2, message="its session closed")

        # The server gets busy with a long generation of its own; the client asks for more than it may owe.
        box: dict = {}
        own = threading.Thread(target=lambda: box.update(own=server.call("generate", prompt=COUNTING, max_tokens=400,
                                                                         timeout=600)))
        own.start()
        try:
            wait_until(lambda: server.call("status")["server"]["sessions"] > 0, 60, 0.05, message="the server busy")
            with pytest.raises(RuntimeError):  # refused for credit partway: the generation fails
                client.call("generate", prompt=COUNTING, max_tokens=200, timeout=600)
            still_busy = own.is_alive()
        finally:
            own.join(timeout=600)
        assert still_busy, "the server's own generation ended before the client was refused: it was idle"
        billing = server.call("status")["server"]["billing"]
        assert billing["refused"] + billing["over_allowance"] >= 1  # refused for credit, not for a fault

        # What the server did for the client and was never paid back: at most the allowance.
        def owed():
            rows = {row["peer_id"]: row for row in server.call("credits")["peers"]}
            mine = {row["peer_id"]: row for row in client.call("credits")["peers"]}
            if client.peer_id not in rows or client.peer_id not in mine:
                return None
            theirs, ours = rows[client.peer_id], mine[client.peer_id]
            # both processes fold the same receipts: what the server earned is what the client spent
            return theirs if ours["spent"] == theirs["spent"] == theirs["earned_from"] > 0 else None

        row = wait_until(owed, 60, 1, message="both sides to agree on what the client owes")
        print(f"\nexposure to a defaulting client: {row['earned_from']:.2f} of an allowance of {DEBT} GFLOP-credits")
        assert row["standing"] == 0 and row["granted"] == 0
        assert 0 < row["earned_from"] <= DEBT and row["balance"] == -row["earned_from"]
