"""The swarm's model index: announcements carry the model's card (name, blocks, context length), the
`models` DHT record lists each server's model, and `potluck status` shows models this peer never loaded."""

import pytest
import trio
from rich.console import Console

from credits import Ledger
from dht.records import InvalidRecord, SignedValue
from p2p.gossip import Gossip
from p2p.identity import Identity
from pipeline.announce import (GOSSIP_TOPIC, MAX_MODEL_NAME_LEN, MODEL_INDEX_KEY, ModelCard, ServerInfo,
                               fetch_models, from_gossip_note, gossip_note)
from pipeline.config import ModelConfig
from pipeline.pricing import ModelPricing
from potluck.peer import Peer, PeerConfig
from potluck.status import render_status
from potluck.swarmview import coverage_view
from testkit.swarms import HERE, swarm

MODEL = "ab" * 32
SERVER = Identity(b"\x05" * 32)


def announced(**fields) -> dict:
    info = ServerInfo(SERVER.peer_id, 0, 15, decode_tps=300.0, prefill_tps=3000.0, cache_tokens=4096, t=5.0,
                      model_name="SmolLM2-135M-Instruct", num_blocks=30, context_length=8192)
    return {**info.to_value(), **fields}


def test_announcements_carry_the_model_card():
    info = ServerInfo.from_value(SERVER.peer_id, announced(), num_blocks=30)
    assert (info.model_name, info.num_blocks, info.context_length) == ("SmolLM2-135M-Instruct", 30, 8192)
    assert info.card(MODEL) == ModelCard(MODEL, "SmolLM2-135M-Instruct", 30, 8192)
    # By gossip too: a peer that loaded no model learns the card from the note it already receives.
    note = gossip_note(MODEL, info, ttl=60)
    model_id, heard = from_gossip_note(SERVER.peer_id, note, now=0.0)
    assert model_id == MODEL and heard.card(MODEL) == info.card(MODEL)


def test_announcements_without_the_model_card_still_decode():
    old = announced()
    for name in ("model_name", "num_blocks", "context_length"):
        del old[name]
    info = ServerInfo.from_value(SERVER.peer_id, old, num_blocks=30)
    assert (info.start, info.end, info.online) == (0, 15, True)
    assert (info.model_name, info.num_blocks, info.context_length) == (None, None, None)
    assert info.card(MODEL) is None
    assert ServerInfo.from_value(SERVER.peer_id, announced(context_length=None)).card(MODEL).context_length is None


@pytest.mark.parametrize("fields", [
    {"model_name": "x" * (MAX_MODEL_NAME_LEN + 1)},  # oversize name
    {"model_name": ""}, {"model_name": 7}, {"model_name": "bad\x1b[2Jname"},  # a terminal escape
    {"num_blocks": 0}, {"num_blocks": True}, {"num_blocks": 1 << 17}, {"num_blocks": 12},  # 12 < end = 15
    {"num_blocks": 31},  # disagrees with the model's 30 blocks
    {"context_length": 0}, {"context_length": 1.5}, {"context_length": "long"},
])
def test_bad_model_cards_in_announcements_are_refused(fields):
    with pytest.raises(InvalidRecord):
        ServerInfo.from_value(SERVER.peer_id, announced(**fields), num_blocks=30)


def test_a_server_announces_its_folder_name_within_the_bound():
    config = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
                                    "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                                    "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 512})
    card = ModelCard.announced(MODEL, "M" * 200, config)
    assert (len(card.name), card.num_blocks, card.context_length) == (MAX_MODEL_NAME_LEN, 4, 512)
    assert ModelCard.from_value(card.to_value()) == card
    assert ModelCard.announced(MODEL, "tab\there", config).name == "tab?here"


@pytest.mark.parametrize("value", [
    None, {"v": 2}, {"v": 1, "model": "", "model_name": "m", "num_blocks": 3},
    {"v": 1, "model": "x" * 129, "model_name": "m", "num_blocks": 3},
    {"v": 1, "model": MODEL, "model_name": "x" * (MAX_MODEL_NAME_LEN + 1), "num_blocks": 3},
    {"v": 1, "model": MODEL, "model_name": "m"}, {"v": 1, "model": MODEL, "model_name": "m", "num_blocks": -3},
])
def test_bad_model_index_entries_are_refused(value):
    with pytest.raises(InvalidRecord):
        ModelCard.from_value(value)


class Directory:
    """The model index record as a DHT lookup returns it: {subkey: entry}."""

    def __init__(self, entries: list[SignedValue]):
        self.entries = {e.subkey: e for e in entries}
        self.asked: list[tuple[str, int]] = []

    async def get(self, key: str, *, quorum: int = 1) -> dict[str, SignedValue]:
        self.asked.append((key, quorum))
        return self.entries if key == MODEL_INDEX_KEY else {}


async def test_the_model_index_lists_each_model_once_as_most_servers_announce_it():
    card = ModelCard(MODEL, "SmolLM2-135M-Instruct", 30, 8192)
    other = ModelCard("cd" * 32, "Qwen2-0.5B", 24, None)
    servers = [Identity(bytes([i]) * 32) for i in range(1, 6)]
    entries = [SignedValue.create(servers[0], MODEL_INDEX_KEY, card.to_value(), 100.0),
               SignedValue.create(servers[1], MODEL_INDEX_KEY, card.to_value(), 100.0),
               SignedValue.create(servers[2], MODEL_INDEX_KEY, {**card.to_value(), "model_name": "Liar"}, 100.0),
               SignedValue.create(servers[3], MODEL_INDEX_KEY, other.to_value(), 100.0),
               SignedValue.create(servers[4], MODEL_INDEX_KEY, {"v": 1, "model": MODEL}, 100.0),  # malformed: dropped
               SignedValue.create(servers[4], MODEL_INDEX_KEY, card.to_value(), 100.0, suffix="x")]  # not a bare id
    directory = Directory(entries)
    cards = await fetch_models(directory)
    assert sorted(cards, key=lambda c: c[0].name) == [(other, 100.0), (card, 100.0)]
    assert directory.asked == [(MODEL_INDEX_KEY, 3)]


class Info:
    def __init__(self, peer_id, start, end):
        self.peer_id, self.start, self.end, self.online = peer_id, start, end, True
        self.decode_tps, self.prefill_tps, self.cache_tokens, self.addrs, self.clusters = 300.0, 900.0, 12000, (), {}


def pid(i: int) -> str:
    return "12D3KooW" + "x" * 36 + f"Peer{i:04d}"  # 52 characters, like a real id


def test_status_of_a_peer_without_a_model_shows_the_swarms_models():
    a, b = pid(1), pid(2)
    status = {"peer_id": pid(0), "region": "", "addrs": [], "dht": {}, "api": None, "server": None,
              "last_generation": None,
              "peers": [{"peer_id": p, "addr": None, "region": "[red]x", "rtt_ms": 1.0, "alive": True} for p in (a, b)],
              "models": [{"name": "Smol[bold]LM", "model_id": MODEL, "num_blocks": 30, "context_length": 8192,
                          "runs_here": False, "coverage": coverage_view([Info(a, 0, 15), Info(b, 15, 30)], 30)}]}
    console = Console(record=True, width=80, color_system=None)
    render_status(status, console)
    out = console.export_text()
    assert all(len(line.rstrip()) <= 80 for line in out.splitlines()), out
    for text in ("Smol[bold]LM (model abababababab, 30 blocks, context 8,192)", "30/30 blocks covered, complete",
                 "0:15", "15:30", "[red]x"):
        assert text in out, (text, out)
    serves = {line.split()[0]: line for line in out.splitlines() if line.startswith("…")}
    assert "0:15" in serves["…" + a[-8:]] and "15:30" in serves["…" + b[-8:]]


async def test_a_peer_without_a_model_lists_the_swarms_models_from_the_index_and_gossip(llama_folder, tmp_path):
    from pipeline.identity import model_id

    mid = model_id(llama_folder)
    with trio.fail_after(60):
        async with swarm("sim", llama_folder, [(0, 2), (2, 4)], model_id=mid) as s, trio.open_nursery() as nursery:
            node = s.world.add_node(place=HERE)
            peer = Peer(PeerConfig(data_dir=tmp_path, bootstrap=list(s.bootstrap)), node.identity, node,
                        Ledger.open(node.identity, tmp_path, pricing=ModelPricing()))
            await nursery.start(peer.dht.run)
            await nursery.start(peer.gossip.run)
            # The servers (testkit's: no gossip) listed their model in the DHT's model index.
            (model,) = await peer.swarm_models()
            assert model["model_id"] == mid and model["name"] == llama_folder.name[:MAX_MODEL_NAME_LEN]
            assert (model["num_blocks"], model["runs_here"], model["coverage"]["complete"]) == (4, False, True)
            assert [(srv["start"], srv["end"]) for srv in model["coverage"]["servers"]] == [(0, 2), (2, 4)]
            assert await peer.model_card() is None  # listed without loading anything

            # A model heard only by gossip (its server's DHT entries not read yet) is listed too.
            other = s.world.add_node(place=HERE)
            gossip = Gossip(other, other.identity)
            await nursery.start(gossip.run)
            await other.connect(node.listen_addrs()[0])
            info = ServerInfo(other.peer_id, 0, 24, decode_tps=50.0, prefill_tps=500.0, cache_tokens=64, t=other.now(),
                              model_name="Qwen2-0.5B", num_blocks=24, context_length=32768)
            await gossip.publish(GOSSIP_TOPIC, gossip_note("cd" * 32, info, ttl=60))
            await trio.sleep(1)
            models = {m["name"]: m for m in await peer.swarm_models(max_age=0.0)}
            assert models.keys() == {model["name"], "Qwen2-0.5B"}
            heard = models["Qwen2-0.5B"]
            assert (heard["model_id"], heard["num_blocks"], heard["context_length"]) == ("cd" * 32, 24, 32768)
            assert heard["coverage"]["covered_blocks"] == 0  # what the DHT holds of it: nothing yet
            nursery.cancel_scope.cancel()
