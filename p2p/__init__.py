"""The overlay: identities, framed messages, the Network interface and its backends, gossip.

Layers, each readable alone (imports only go down the list; nothing here imports dht/ or above):
    errors.py      the overlay's exceptions, one type per failure a caller can meet
    identity.py    Ed25519 identities and libp2p-compatible peer ids
    framing.py     length-prefixed msgpack frames, bounded in bytes and in the objects they decode into
    tensor.py      tensors on the wire: raw bytes + dtype + shape, never pickle
    swarm_key.py   private swarms' key files
    network.py     `Network`: the one interface every protocol above is written against
    sim.py         `Network` in memory under trio's clock (latency, loss, partitions): thousands of peers
    libp2p/        `Network` on real sockets: py-libp2p with TCP + Noise + yamux (see its __init__)
    gossip.py      signed epidemic broadcast with pull anti-entropy, within per-author quotas
    membership.py  who is alive: peer exchange, pings with RTT, reconnection
"""
