"""netlab: hosts in network namespaces with latency, loss, partitions and NAT, for real-socket tests.

`tc netem` is not available in the kernels we run on, so delay comes from our own userspace router
(`netlab.delay_router`) in the router namespace.

    topology.py      hosts, the router namespace, per-region delay, loss, cuts, NAT (three kinds): the `Lab` API
    delay_router.py  the userspace delay line (TUN) the router runs
    probe.py         TCP echo and round-trip probes run inside namespaces; UDP probes of how a NAT maps and filters
    netpeer.py       a bare p2p-layer peer (echo handler) for the lab; waits for hole punching on request
    dhtprobe.py      a client-mode DHT node driven by JSON lines, and the cluster-settle helpers
"""

from .topology import Host, Lab, LabError, cleanup_stale, skip_reason

__all__ = ["Host", "Lab", "LabError", "cleanup_stale", "skip_reason"]
