"""Volunteers at home join with no flags (issue #16): real `potluck serve` processes in network namespaces,
three public relay services, a volunteer serving the tiny Llama behind one NAT and a user behind another,
neither given `--relay`. Autonat finds both private; each picks relays from the relays' announcements
(potluck/relays.py, potluck/autorelay.py), the volunteer announces its circuit address, and the user
generates through it. Then the relay the volunteer is announced through is killed while a generation is
in progress: the client reaches the volunteer again through its other relay and that generation ends as
an undisturbed one would; the volunteer moves to another relay and later generations go on, with
identical output. So that the dying relay carries that generation, the user stays on relays
(`--no-hole-punch`) and reserves on the volunteer's first relay only (`--relay`): whichever of the two
dialled the other, their connection runs through it.

Needs root, `ip`, `iptables`, `tc` and /dev/net/tun (scripts/setup-netns.sh); skips otherwise."""

import threading
import time

import pytest

from netlab import Lab, skip_reason
from potluck.localswarm import wait_until

_reason = skip_reason()
pytestmark = [pytest.mark.skipif(_reason is not None, reason=_reason or ""), pytest.mark.slow]

PROMPT = [5, 17, 42, 8, 99, 3]
PORT = 4100


@pytest.fixture(scope="module")
def lab():
    with Lab(regions={"eu": 1, "us": 2}, nats={"home": ("eu", 1), "cafe": ("us", 1)}) as lab:
        yield lab


def reserved_on(peer) -> set[str]:
    """The relays the peer chose that granted it a reservation (potluck status's `autorelay`)."""
    chosen = (peer.status()["autorelay"] or {}).get("relays", {})
    return {relay_id for relay_id, state in chosen.items() if state["reserved"]}


def try_generate(user, n):
    try:
        return user.call("generate", prompt=PROMPT, max_tokens=n, timeout=60)
    except RuntimeError as e:
        print(f"generation failed: {e}"[:500])
        return None  # no route yet


def test_nated_volunteer_with_no_flags_picks_relays_serves_and_moves_when_one_dies(lab, llama_folder):
    common = ["--model", str(llama_folder), "--threads", "1"]
    first = lab.spawn_peer(lab.host("eu-0"), "--relay-service", port=PORT)
    relays = [first, *lab.spawn_peers([lab.host("us-0"), lab.host("us-1")], "--relay-service",
                                      "--bootstrap", first.addr, port=PORT)]
    relay_by_id = {r.peer_id: r for r in relays}
    for relay in relays:  # a relay announces itself once peers have dialled it back
        wait_until(lambda relay=relay: relay.status()["reachability"]["status"] == "public", 60, 1,
                   message=f"autonat finds the relay on {relay.host.name} public")
    volunteer, user = [lab.peer_process(lab.host(host), *common, *flags, "--bootstrap", first.addr, port=PORT).launch()
                       for host, flags in (("home-0", ["--blocks", "0:4"]), ("cafe-0", ["--no-hole-punch", "--relay", first.addr]))]
    for peer in (volunteer, user):
        peer.wait_ready(120)
    # The volunteer was given no relay: autonat finds it private, and it reserves on two announced relays.
    wait_until(lambda: volunteer.status()["reachability"]["status"] == "private", 60, 1,
               message="autonat finds the volunteer private")
    wait_until(lambda: len(reserved_on(volunteer)) == 2, 60, 1, message="the volunteer reserves on two relays")
    held = reserved_on(volunteer)
    assert held <= set(relay_by_id)
    assert first.peer_id in held  # the eu relay is 5 ms from the eu home, the us ones 80 ms: nearest first
    wait_until(lambda: "/p2p-circuit/" in volunteer.status()["addrs"][0], 10, 0.5,
               message="the volunteer's first address is a circuit")
    assert not lab.tcp_connect(lab.host("cafe-0"), lab.host("home-0").ip, PORT, timeout=1)["ok"]

    # The user, behind another NAT, generates through the volunteer's blocks.
    before = wait_until(lambda: try_generate(user, 12), 120, 2, message="a generation through the volunteer")
    assert len(before["token_ids"]) == 12
    circuits = sum(r.status()["relay"]["circuits_opened"] for r in relays)
    assert circuits >= 1  # two NATed peers meet only through a relay
    assert volunteer.status()["relay"]["hole_punch"]["direct"] == 0  # and stay there: the user does not punch

    # Kill the relay the volunteer is announced through, while a generation is in progress.
    announced = volunteer.status()["addrs"][0]
    dying = relay_by_id[announced.split("/p2p-circuit/")[0].rsplit("/p2p/", 1)[1]]
    assert dying is first and first.status()["relay"]["circuits_active"] >= 1
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(result=try_generate(user, 40)))
    worker.start()
    time.sleep(1.0)
    dying.kill()
    t0 = time.monotonic()
    worker.join(timeout=120)
    wait_until(lambda: len(reserved_on(volunteer)) == 2 and dying.peer_id not in reserved_on(volunteer), 60, 1,
               message="the volunteer reserves on another relay")
    print(f"volunteer holds two reservations again {time.monotonic() - t0:.1f} s after its relay was killed")
    assert reserved_on(volunteer) == set(relay_by_id) - {dying.peer_id}
    assert dying.peer_id not in volunteer.status()["addrs"][0]
    after = wait_until(lambda: try_generate(user, 40), 120, 2, message="a generation after the relay died")
    print(f"the user generates again {time.monotonic() - t0:.1f} s after the relay was killed")
    assert after["token_ids"][:12] == before["token_ids"]
    mid = box.get("result")
    assert mid is not None, "the generation in progress when the relay died failed"
    assert mid["token_ids"] == after["token_ids"]
    # it was broken by the relay's death, and went on with the same server, reached through its other relay
    assert mid["recoveries"] >= 1 and [hop["peer_id"] for hop in mid["route"]] == [volunteer.peer_id]
