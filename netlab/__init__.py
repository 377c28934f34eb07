"""netlab: hosts in network namespaces with latency, loss, partitions and NAT, for real-socket tests.

`tc netem` is not available in the kernels we run on, so delay comes from our own userspace router
(`netlab.delay_router`) in the router namespace. See `netlab.topology` for the layout and the API.
"""

from .topology import Host, Lab, LabError, cleanup_stale, skip_reason

__all__ = ["Host", "Lab", "LabError", "cleanup_stale", "skip_reason"]
