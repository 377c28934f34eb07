"""Gossip between real `potluck serve` processes, with a hostile peer pushing forged and unsigned messages."""


import pytest
import trio

from p2p import framing
from p2p.gossip import PUSH
from p2p.identity import Identity
from p2p.libp2p import Libp2pNetwork

pytestmark = pytest.mark.slow


def _presence(author: Identity, addrs: list[str], now: float, signer: Identity | None = None) -> dict:
    body = framing.encode({"topic": "presence", "author": author.peer_id, "seq": 1, "ts": now,
                           "data": {"addrs": addrs, "region": "evil"}})
    signer = signer or author
    return {"b": body, "s": signer.sign(b"potluck-gossip/1\x00" + body)}


async def test_five_processes_spread_signed_messages_and_drop_forgeries(spawn):
    peers = [spawn()]
    for _ in range(4):
        peers.append(spawn("--bootstrap", peers[0].addr))
    ids = {p.peer_id for p in peers}

    async def sees(p, wanted):
        return wanted <= set((await trio.to_thread.run_sync(p.status))["presence_seen"])

    for p in peers:
        with trio.fail_after(60):
            while not await sees(p, ids):
                await trio.sleep(0.5)

    attacker, victim = Identity.generate(), Identity.generate()
    async with Libp2pNetwork.open(attacker) as net:
        target = peers[0]
        await net.connect(target.addr)
        now = net.now()
        fake_addr = f"/ip4/127.0.0.1/tcp/9/p2p/{victim.peer_id}"
        forged = _presence(victim, [fake_addr], now, signer=attacker)  # claims the victim, signed by us
        unsigned = {**_presence(victim, [fake_addr], now + 1), "s": b"\0" * 64}
        missing_sig = {"b": _presence(victim, [fake_addr], now + 2)["b"]}
        before = (await trio.to_thread.run_sync(target.status))["gossip"]["dropped_invalid"]
        for bad in (forged, unsigned, missing_sig):
            with pytest.raises(Exception, match="signature|missing field"):
                await net.request(target.peer_id, PUSH, bad)
        # The same path carries a genuine message to everyone: the channel works, only forgeries die.
        genuine = _presence(attacker, [f"{net.listen_addrs()[0]}"], now)
        await net.request(target.peer_id, PUSH, genuine)
        for p in peers:
            with trio.fail_after(30):
                while not await sees(p, {attacker.peer_id}):
                    await trio.sleep(0.5)
        after = (await trio.to_thread.run_sync(target.status))["gossip"]["dropped_invalid"]
        assert after - before == 3
        for p in peers:
            status = await trio.to_thread.run_sync(p.status)
            assert victim.peer_id not in status["presence_seen"]
            assert victim.peer_id not in {q["peer_id"] for q in status["peers"]}
