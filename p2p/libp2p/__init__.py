"""The real-socket backend of `p2p.network.Network`: py-libp2p with TCP + Noise + yamux.

One concept a module (imports only go down the list):
    io.py         frames on libp2p streams: exact reads, writes, bounded decoding, best-effort reset/close
    patches.py    workarounds for py-libp2p 0.8.1 defects, applied by `Libp2pNetwork.open()`, and the
                  limits on inbound connections not admitted yet (`InboundLimits`)
    addresses.py  full multiaddrs (…/p2p/<id>), circuit addresses through a relay, and which IPs we may
                  be made to dial (`may_dial`: never this host or its link; a private range only from one),
                  the order others should try ours in (`announce_order`); verdicts remembered (`DialVerdicts`)
    book.py       the address book (where to dial each peer) and py-libp2p's peerstore, both bounded
    gate.py       the session handshake: wire version, the swarm key proof, where each side sees the
                  other; `GatedHost`, what every part below needs of the network (each part's Protocol
                  adds its own needs to it)
    identify.py   libp2p identify, identify-push and ping for other libp2p nodes (open swarms), and
                  the addresses admitted peers observe us at (counted per reporting network)
    autonat.py    reachability detection: peers dial us back on new connections (public / private)
    pace.py       RequestPace: each peer's requests served at a bounded rate, paid for by waiting
    session.py    RequestSession: one peer's requests and replies, multiplexed on one stream
    stream.py     FlowControlledStream: a long-lived message stream with credit-based flow control
    relay.py      circuit relay v2: reservations, circuit dialing, the relay service
    holepunch.py  DCUtR: peers that met over a relay dial each other at once and move their sessions
    network.py    Libp2pNetwork: the host, connections, admission, and the `Network` methods
"""

from .autonat import AutonatLimits
from .identify import PeerRecord
from .network import Libp2pNetwork
from .patches import InboundLimits
from .relay import RelayLimits, RelayRefused

__all__ = ["AutonatLimits", "InboundLimits", "Libp2pNetwork", "PeerRecord", "RelayLimits", "RelayRefused"]
