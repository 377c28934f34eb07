"""Hosts in network namespaces, a router with per-region delay, loss, partitions, rate limits and NAT.

Layout (everything lives in namespaces this module creates; the host's own interfaces, routes and
firewall are never touched):

    region i (0-based), host j:  namespace plk-<pid>-<lab>-<name>, eth0 = 10.77.(i+1).(j+1)/32
        └─ veth ── router namespace (plk-<pid>-<lab>-router): h<k>, gateway 10.77.0.1/32 on every veth
    NAT k attached to region i:  namespace …-nat<k>, uplink eth0 = 10.77.(i+1).(200+k) (public)
        └─ private host j:       eth0 = 10.77.(100+k).(j+1), gateway 10.77.(100+k).254

A NAT's `kind` says how it maps and filters (RFC 4787 terms), all built with iptables on eth0:
- "port-restricted" (the default; a typical home router): MASQUERADE, which keeps the source port when
  it is free, so the mapping is endpoint-independent; conntrack admits only replies from the exact
  address and port a host sent to (address- and port-dependent filtering).
- "endpoint-independent" (full cone): the same port-preserving mapping, plus a DNAT of every new TCP/UDP
  flow to the NAT's public address onto its first private host at the same port (a router's "DMZ
  host"), so any outside host reaches a mapped port. Other private hosts behind it filter like
  port-restricted.
- "symmetric": MASQUERADE --random-fully: a random public port for each new flow, so each destination
  sees another port and a mapping learnt from one peer is useless to another; filtering as above.

Each host has one veth to the router (the NAT gateway for NATed hosts); routes cover only
10.77.0.0/16. The router forwards between veths, but policy routing first sends every forwarded
packet through the TUN device `dly0`, owned by `netlab.delay_router`, which holds it for the link's
one-way delay (intra-region RTT/2, or the region pair's RTT/2) with jitter. Loss on a link is
iptables `statistic` DROP on the router's side of that host's veth (both directions); a region cut is
iptables DROP in the router between the region's prefix and every other; rate limits are tbf on both
ends of a veth.

Usage (see tests/test_netns_*.py):

    with Lab(regions={"eu": 3, "us": 3, "ap": 3}, nats={"home": ("eu", 2), "cgn": ("us", 1, "symmetric")}) as lab:
        eu0, us0 = lab.host("eu-0"), lab.host("us-0")
        lab.tcp_rtt(eu0, us0)                    # {"median_ms": …}
        a = lab.spawn_peer(eu0)                  # `potluck serve` inside eu-0's namespace
        b = lab.spawn_peer(us0, "--bootstrap", a.addr)
        lab.set_loss(us0, 0.2); lab.cut_region("ap"); lab.heal_region("ap")

Every process started through the lab is killed and every namespace deleted on exit, even when the
body raised. Namespaces carry the creating process id, so `cleanup_stale()` removes what a crashed
run left behind.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from potluck.localswarm import PeerProcess

PREFIX = "plk-"
ROUTER_GW = "10.77.0.1"
DELAY_TUN = "dly0"
DELAY_TABLE = "100"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_INTER_RTT_MS = (80.0, 120.0, 150.0)  # assigned to region pairs in order, then repeated

NAT_KINDS = ("port-restricted", "endpoint-independent", "symmetric")

_lab_counter = itertools.count()


class LabError(RuntimeError):
    pass


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    """One line of an unbuffered (bufsize=0) pipe within `timeout` s; "" on EOF or timeout."""
    stdout = proc.stdout
    assert stdout is not None  # stdout=PIPE
    deadline = time.monotonic() + timeout
    buf = bytearray()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        b = stdout.read(1)
        if not b:
            break
        if b == b"\n":
            return buf.decode(errors="replace")
        buf += b
    return buf.decode(errors="replace") if buf and time.monotonic() < deadline else ""


def _run(args: list[str], *, check: bool = True, timeout: float = 30.0, input: str | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, input=input)
    if check and out.returncode != 0:
        raise LabError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    return out


def skip_reason() -> str | None:
    """Why netns tests cannot run here, or None when they can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "netns tests need root (ip netns, veth, TUN, iptables)"
    for tool in ("ip", "iptables", "tc"):
        if shutil.which(tool) is None:
            return f"netns tests need `{tool}` (Debian: run scripts/setup-netns.sh)"
    if not os.path.exists("/dev/net/tun"):
        return "netns tests need /dev/net/tun"
    probe = f"{PREFIX}{os.getpid()}-probe"
    out = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if out.returncode != 0:
        return f"cannot create a network namespace: {out.stderr.strip()}"
    try:
        out = subprocess.run(["ip", "netns", "exec", probe, "iptables", "-L", "-n"], capture_output=True, text=True)
        if out.returncode != 0:
            return f"iptables does not work in a namespace: {out.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _our_namespaces(prefix: str) -> list[str]:
    out = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.stdout.splitlines() if line.startswith(prefix)]


def _kill_namespace(ns: str) -> None:
    pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    _run(["ip", "netns", "del", ns], check=False)


def cleanup_stale(prefix: str = PREFIX, include_live: bool = False) -> list[str]:
    """Delete `plk-<pid>-…` namespaces whose creating process is gone (all of them with include_live);
    their processes are killed first. Returns the names removed."""
    removed = []
    for ns in _our_namespaces(prefix):
        try:
            pid = int(ns[len(prefix):].split("-", 1)[0])
        except ValueError:
            continue
        alive = os.path.exists(f"/proc/{pid}")
        if include_live or not alive:
            _kill_namespace(ns)
            removed.append(ns)
    return removed


@dataclass
class Host:
    name: str
    ns: str
    ip: str
    region: str
    kind: str = "host"  # host | nat | private
    router_if: str | None = None  # this host's veth on the router (or NAT gateway) side
    gateway: "Host | None" = None  # NAT gateway for private hosts
    nat_kind: str | None = None  # for NAT gateways: one of NAT_KINDS

    def cmd(self, args: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *args]

    def exec(self, args: list[str], *, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
        return _run(self.cmd(args), check=check, timeout=timeout)

    def popen(self, args: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(args), **kwargs)

    @property
    def public_ip(self) -> str:
        return self.gateway.ip if self.gateway else self.ip


class NetnsPeer(PeerProcess):
    """A `potluck serve` process inside a host's namespace (`ip netns exec NS python -m potluck.cli serve …`).

    `status()` and `alive_peers()` work from the test process: the control socket is a Unix socket in
    the data dir, which is a path on the shared filesystem."""

    def __init__(self, host: Host, data_dir: Path, *args: str, env: dict | None = None):
        super().__init__(data_dir, *args, env=env)
        self.host = host

    def start(self, timeout: float = 60.0) -> "NetnsPeer":
        return self.launch().wait_ready(timeout)

    def launch(self) -> "NetnsPeer":
        """Start the process without waiting for it (see `wait_ready`)."""
        self.log_path = self.data_dir.with_suffix(".log")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = self.host.popen(
            [sys.executable, "-m", "potluck.cli", "serve", "--data-dir", str(self.data_dir), *self.args],
            stdout=subprocess.PIPE, stderr=self._log, env=self.env, cwd=str(REPO_ROOT), bufsize=0,
        )
        return self

    def wait_ready(self, timeout: float = 60.0) -> "NetnsPeer":
        """Read the peer's stdout until it prints its listen address."""
        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + timeout
        self.addrs = []
        while time.monotonic() < deadline:
            # Bounded wait for the next line (a hung start-up must not hang the test).
            line = _read_line(self.proc, max(0.0, deadline - time.monotonic()))
            if not line:
                if time.monotonic() >= deadline:
                    break
                raise RuntimeError(f"peer in {self.host.name} exited early (rc={self.proc.wait()}); log: {self.log_tail()}")
            if line.startswith("potluck peer "):
                self.peer_id = line.split()[2]
            elif line.startswith("listening on "):
                self.addrs.append(line.split()[2])
                return self
        raise TimeoutError(f"peer in {self.host.name} did not start in {timeout}s; log: {self.log_tail()}")

    def status(self) -> dict:
        """`potluck status --json`, read in-process (no interpreter start-up)."""
        return self.call("status", timeout=15.0)

    def peers_by_id(self) -> dict[str, dict]:
        return {p["peer_id"]: p for p in self.status()["peers"]}


def _default_rtts(regions: list[str], intra: float) -> dict[tuple[str, str], float]:
    rtts: dict[tuple[str, str], float] = {(r, r): intra for r in regions}
    inter = itertools.cycle(DEFAULT_INTER_RTT_MS)
    for a, b in itertools.combinations(regions, 2):
        rtts[(a, b)] = next(inter)
    return rtts


class Lab:
    """A set of namespaces wired to a delay router. Use as a context manager (or start()/close())."""

    def __init__(
        self,
        regions: dict[str, int] | None = None,
        *,
        rtt_ms: dict[tuple[str, str], float] | None = None,
        intra_rtt_ms: float = 5.0,
        jitter_ms: float | dict[tuple[str, str], float] = 0.0,
        nats: dict[str, tuple[str, int] | tuple[str, int, str]] | None = None,
        workdir: Path | None = None,
        realtime_router: bool = True,
        seed: int | None = None,
    ):
        self.regions = dict(regions or {"eu": 3, "us": 3, "ap": 3})
        if len(self.regions) > 90:
            raise ValueError("at most 90 regions")
        names = list(self.regions)
        self.rtt_ms = _default_rtts(names, intra_rtt_ms)
        for (a, b), v in (rtt_ms or {}).items():
            self.rtt_ms[(a, b)] = v
        self.jitter_ms = jitter_ms
        self.nats: dict[str, tuple[str, int, str]] = {}
        for nat_name, spec in (nats or {}).items():
            region, count, *kind = spec
            nat_kind = kind[0] if kind else "port-restricted"
            if nat_kind not in NAT_KINDS:
                raise ValueError(f"NAT {nat_name}: kind {nat_kind!r} is not one of {', '.join(NAT_KINDS)}")
            self.nats[nat_name] = (region, count, nat_kind)
        self.realtime_router = realtime_router
        self.seed = seed
        self.id = f"{PREFIX}{os.getpid()}-{next(_lab_counter)}-"
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="netlab-"))
        self.hosts: dict[str, Host] = {}
        self.router: Host | None = None
        self.router_proc: subprocess.Popen | None = None
        self.procs: list[subprocess.Popen] = []
        self.peers: list[NetnsPeer] = []
        self._namespaces: list[str] = []
        self._if_counter = itertools.count()
        self._cut: set[str] = set()
        self._loss: dict[str, float] = {}
        self._closed = False

    # --- lifecycle ----------------------------------------------------------------------------------

    def __enter__(self) -> "Lab":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> "Lab":
        reason = skip_reason()
        if reason:
            raise LabError(reason)
        cleanup_stale()
        atexit.register(self.close)
        started = time.monotonic()
        self.router = Host("router", self._add_ns("router"), ROUTER_GW, "", kind="router")
        self._sysctl(self.router, forward=True)
        # The delay line first, so the TUN exists before the routes that use it.
        self._start_delay_router()
        for r_index, (region, count) in enumerate(self.regions.items()):
            for j in range(count):
                name = f"{region}-{j}"
                ip = f"10.77.{r_index + 1}.{j + 1}"
                self.hosts[name] = self._attach(name, ip, region, self.router, ROUTER_GW)
        for k, (nat_name, (region, count, nat_kind)) in enumerate(self.nats.items()):
            r_index = list(self.regions).index(region)
            gw = self._attach(nat_name, f"10.77.{r_index + 1}.{200 + k}", region, self.router, ROUTER_GW,
                              kind="nat", forward=True)
            gw.nat_kind = nat_kind
            self.hosts[nat_name] = gw
            lan_gw = f"10.77.{100 + k}.254"
            private = []
            for j in range(count):
                name = f"{nat_name}-{j}"
                host = self._attach(name, f"10.77.{100 + k}.{j + 1}", region, gw, lan_gw, kind="private")
                host.gateway = gw
                self.hosts[name] = host
                private.append(host)
            self._nat_rules(gw, nat_kind, private)
        self.router.exec(["iptables", "-N", "PLK_CUT"])
        self.router.exec(["iptables", "-I", "FORWARD", "-j", "PLK_CUT"])
        self.setup_s = time.monotonic() - started
        return self

    def close(self) -> None:
        """Kill every process, delete every namespace. Safe to call twice and after a failed start."""
        if self._closed:
            return
        self._closed = True
        for peer in self.peers:
            # A peer that died on its own (not killed by a test) is a bug: show why, or CI only
            # sees the next command failing.
            rc = peer.proc.poll() if peer.proc is not None else None
            if rc not in (None, 0, -signal.SIGKILL, -signal.SIGTERM):
                print(f"netlab: peer in {peer.host.name} exited with rc={rc}; log:\n{peer.log_tail()}",
                      file=sys.stderr)
        for peer in self.peers:
            try:
                peer.close()
            except Exception:
                pass
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if self.router_proc is not None and self.router_proc.poll() is None:
            self.router_proc.send_signal(signal.SIGTERM)
            try:
                self.router_proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.router_proc.kill()
                self.router_proc.wait(timeout=5)
        for ns in reversed(self._namespaces):
            _kill_namespace(ns)
        for ns in _our_namespaces(self.id):  # anything half-created
            _kill_namespace(ns)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        try:
            atexit.unregister(self.close)
        except Exception:
            pass

    def leftovers(self) -> list[str]:
        """Namespaces of this lab that still exist (empty after close())."""
        return _our_namespaces(self.id)

    # --- building -----------------------------------------------------------------------------------

    def _add_ns(self, name: str) -> str:
        ns = f"{self.id}{name}"
        _run(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        return ns

    @staticmethod
    def _sysctl(host: Host, forward: bool) -> None:
        settings = ["net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
                    "net.ipv4.conf.all.send_redirects=0", "net.ipv4.conf.default.send_redirects=0"]
        if forward:
            settings.append("net.ipv4.ip_forward=1")
        host.exec(["sysctl", "-qw", *settings])

    def _attach(self, name: str, ip: str, region: str, hub: Host, gw_ip: str, *, kind: str = "host",
                forward: bool = False) -> Host:
        """A new namespace `name` with eth0 = ip/32, wired by a veth to `hub` whose side carries gw_ip/32."""
        ns = self._add_ns(name)
        host = Host(name, ns, ip, region, kind=kind)
        self._sysctl(host, forward=forward)
        hub_if = f"h{next(self._if_counter)}"
        host.router_if = hub_if
        batch_hub = "\n".join([
            f"link add {hub_if} type veth peer name eth0 netns {ns}",
            f"addr add {gw_ip}/32 dev {hub_if}",
            f"link set {hub_if} up",
            f"route add {ip}/32 dev {hub_if}",
        ]) + "\n"
        _run(["ip", "-n", hub.ns, "-batch", "-"], input=batch_hub)
        batch_host = "\n".join([
            f"addr add {ip}/32 dev eth0",
            "link set eth0 up",
            f"route add {gw_ip}/32 dev eth0",
            f"route add 10.77.0.0/16 via {gw_ip} dev eth0",
        ]) + "\n"
        _run(["ip", "-n", ns, "-batch", "-"], input=batch_host)
        return host

    @staticmethod
    def _nat_rules(gw: Host, kind: str, private: list[Host]) -> None:
        """The gateway's iptables for a NAT of `kind` (see the module docstring)."""
        masquerade = ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j", "MASQUERADE"]
        gw.exec([*masquerade, "--random-fully"] if kind == "symmetric" else masquerade)
        if kind == "endpoint-independent" and private:
            # New inbound flows only: replies to a mapping are un-NATed by conntrack before this table.
            for proto in ("tcp", "udp"):
                gw.exec(["iptables", "-t", "nat", "-A", "PREROUTING", "-i", "eth0", "-d", gw.ip, "-p", proto,
                         "-j", "DNAT", "--to-destination", private[0].ip])
            gw.exec(["iptables", "-A", "FORWARD", "-i", "eth0", "-d", private[0].ip, "-m", "conntrack",
                     "--ctstate", "DNAT", "-j", "ACCEPT"])
        gw.exec(["iptables", "-A", "FORWARD", "-i", "eth0", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED",
                 "-j", "ACCEPT"])
        gw.exec(["iptables", "-A", "FORWARD", "-i", "eth0", "-j", "DROP"])

    def _router_config(self) -> dict:
        def jitter(a: str, b: str) -> float:
            if isinstance(self.jitter_ms, dict):
                return self.jitter_ms.get((a, b), self.jitter_ms.get((b, a), 0.0))
            return self.jitter_ms

        links = {}
        for (a, b), rtt in self.rtt_ms.items():
            links[f"{a}>{b}"] = {"delay_ms": rtt / 2, "jitter_ms": jitter(a, b) / 2, "loss": 0.0}
        return {
            "tun": DELAY_TUN,
            "regions": {f"10.77.{i + 1}.0/24": r for i, r in enumerate(self.regions)},
            "links": links,
            "default": {"delay_ms": 0, "jitter_ms": 0, "loss": 0.0},
            "stats": str(self.workdir / "router-stats.json"),
            "realtime": self.realtime_router,
            "seed": self.seed,
        }

    def _write_router_config(self) -> Path:
        path = self.workdir / "router.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._router_config(), indent=1))
        os.replace(tmp, path)
        return path

    def _start_delay_router(self) -> None:
        assert self.router is not None
        config = self._write_router_config()
        log = open(self.workdir / "router.log", "ab")
        self.router_proc = self.router.popen([sys.executable, "-m", "netlab.delay_router", str(config)],
                                             stdout=subprocess.PIPE, stderr=log, cwd=str(REPO_ROOT), bufsize=0)
        log.close()
        line = _read_line(self.router_proc, 15.0).strip()
        if line != "ready":
            raise LabError(f"delay router did not start: {(self.workdir / 'router.log').read_text()[-2000:]}")
        batch = "\n".join([
            f"rule add pref 100 iif {DELAY_TUN} lookup main",
            "rule add pref 110 iif lo lookup main",
            f"route add default dev {DELAY_TUN} table {DELAY_TABLE}",
            f"rule add pref 120 lookup {DELAY_TABLE}",
        ]) + "\n"
        _run(["ip", "-n", self.router.ns, "-batch", "-"], input=batch)

    # --- looking things up --------------------------------------------------------------------------

    def host(self, name: str) -> Host:
        return self.hosts[name]

    def region_hosts(self, region: str, kind: str = "host") -> list[Host]:
        return [h for h in self.hosts.values() if h.region == region and h.kind == kind]

    def expected_rtt_ms(self, a: Host, b: Host) -> float:
        """The RTT the router adds between two hosts (NAT LAN hops add none)."""
        if a.kind == "private" and b.kind == "private" and a.gateway is b.gateway:
            return 0.0
        return self.rtt_ms.get((a.region, b.region), self.rtt_ms.get((b.region, a.region), 0.0))

    # --- faults -------------------------------------------------------------------------------------

    def set_rtt(self, a: str, b: str, rtt_ms: float) -> None:
        """Change the RTT between regions a and b (or inside a, with a == b) on the running router."""
        self.rtt_ms[(a, b)] = rtt_ms
        if (b, a) in self.rtt_ms and a != b:
            self.rtt_ms[(b, a)] = rtt_ms
        self._write_router_config()
        assert self.router_proc is not None
        self.router_proc.send_signal(signal.SIGHUP)

    def _loss_rules(self, host: Host, p: float) -> list[list[str]]:
        link = host.gateway.router_if if host.kind == "private" and host.gateway else host.router_if
        assert link is not None  # every host's veth is wired when the lab starts
        stat = ["-m", "statistic", "--mode", "random", "--probability", f"{p:.4f}", "-j", "DROP"]
        return [["-i", link, *stat], ["-o", link, *stat]]

    def _edge(self, host: Host) -> Host:
        """The namespace holding the far end of this host's link to the router."""
        assert self.router is not None
        return self.router

    def set_loss(self, host: Host, p: float) -> None:
        """Drop packets at random with probability p in each direction of host's link to the router
        (for a NATed host: of its NAT gateway's uplink). p = 0 removes it."""
        if host.kind == "private" and host.gateway:
            host = host.gateway
        self.clear_loss(host)
        if p > 0:
            for rule in self._loss_rules(host, p):
                self._edge(host).exec(["iptables", "-I", "FORWARD", *rule])
            self._loss[host.name] = p

    def clear_loss(self, host: Host) -> None:
        p = self._loss.pop(host.name, None)
        if p is not None:
            for rule in self._loss_rules(host, p):
                self._edge(host).exec(["iptables", "-D", "FORWARD", *rule], check=False)

    def _cut_rules(self, region: str) -> list[list[str]]:
        net = f"10.77.{list(self.regions).index(region) + 1}.0/24"
        return [["-s", net, "!", "-d", net, "-j", "DROP"], ["-d", net, "!", "-s", net, "-j", "DROP"]]

    def cut_region(self, region: str) -> None:
        """Drop everything between `region` (its hosts and NAT gateways) and every other region."""
        assert self.router is not None
        if region in self._cut:
            return
        for rule in self._cut_rules(region):
            self.router.exec(["iptables", "-A", "PLK_CUT", *rule])
        self._cut.add(region)

    def heal_region(self, region: str) -> None:
        assert self.router is not None
        if region not in self._cut:
            return
        for rule in self._cut_rules(region):
            self.router.exec(["iptables", "-D", "PLK_CUT", *rule], check=False)
        self._cut.discard(region)

    def set_rate(self, host: Host, rate: str | None, burst: str = "64kb", latency: str = "100ms") -> None:
        """Limit host's link to `rate` (tc syntax, e.g. "10mbit") in both directions; None removes it."""
        assert self.router is not None
        hub = host.gateway if host.kind == "private" and host.gateway else self.router
        assert host.router_if is not None  # every host's veth is wired when the lab starts
        ends = [(host, "eth0"), (hub, host.router_if)]
        for ns_host, dev in ends:
            _run(["tc", "-n", ns_host.ns, "qdisc", "del", "dev", dev, "root"], check=False)
            if rate:
                _run(["tc", "-n", ns_host.ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                      "burst", burst, "latency", latency])

    # --- measuring ----------------------------------------------------------------------------------

    def router_stats(self, timeout: float = 3.0) -> dict:
        """The delay router's counters and lateness percentiles (µs after each packet's due time)."""
        assert self.router_proc is not None
        path = self.workdir / "router-stats.json"
        path.unlink(missing_ok=True)
        self.router_proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists():
                return json.loads(path.read_text())
            time.sleep(0.02)
        raise LabError("delay router wrote no stats")

    def start_echo(self, host: Host, port: int = 7000, lifetime: float = 600.0) -> subprocess.Popen:
        proc = host.popen([sys.executable, "-m", "netlab.probe", "serve", str(port), "--lifetime", str(lifetime)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=str(REPO_ROOT), bufsize=0)
        self.procs.append(proc)
        if _read_line(proc, 15.0).strip() != "ready":
            raise LabError(f"echo server in {host.name} did not start")
        return proc

    def tcp_rtt(self, src: Host, dst: Host, *, count: int = 20, size: int = 64, port: int = 7000,
                interval: float = 0.0, timeout: float = 5.0, echo: bool = True) -> dict:
        """Round trips of `size` bytes over one TCP connection from src to dst (an echo server is
        started in dst first unless echo=False)."""
        server = self.start_echo(dst, port) if echo else None
        try:
            out = src.exec([sys.executable, "-m", "netlab.probe", "rtt", dst.ip, str(port), "--count", str(count),
                            "--size", str(size), "--interval", str(interval), "--timeout", str(timeout)],
                           timeout=timeout + count * (interval + timeout) + 10)
            return json.loads(out.stdout)
        finally:
            if server is not None:
                server.kill()
                server.wait(timeout=5)
                self.procs.remove(server)

    def tcp_bulk(self, src: Host, dst: Host, *, nbytes: int = 8 << 20, port: int = 7002, timeout: float = 60.0) -> dict:
        """TCP throughput src -> dst -> src through an echo server (mb_per_s counts both directions)."""
        server = self.start_echo(dst, port)
        try:
            out = src.exec([sys.executable, "-m", "netlab.probe", "bulk", dst.ip, str(port), "--bytes", str(nbytes),
                            "--timeout", str(timeout)], timeout=timeout + 20)
            return json.loads(out.stdout)
        finally:
            server.kill()
            server.wait(timeout=5)
            self.procs.remove(server)

    def udp_delivery(self, src: Host, dst: Host, *, count: int = 400, port: int = 7001, interval: float = 0.002,
                     wait: float = 1.5) -> dict:
        """Fraction of `count` UDP datagrams from src that dst echoes back (loss in both directions counts)."""
        server = dst.popen([sys.executable, "-m", "netlab.probe", "udp-serve", str(port), "--lifetime", "120"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=str(REPO_ROOT), bufsize=0)
        self.procs.append(server)
        try:
            if _read_line(server, 15.0).strip() != "ready":
                raise LabError(f"udp echo server in {dst.name} did not start")
            out = src.exec([sys.executable, "-m", "netlab.probe", "udp-echo", dst.ip, str(port), "--count", str(count),
                            "--interval", str(interval), "--wait", str(wait)],
                           timeout=count * (interval + 0.01) + wait + 20)
            return json.loads(out.stdout)
        finally:
            server.kill()
            server.wait(timeout=5)
            self.procs.remove(server)

    def tcp_connect(self, src: Host, dst_ip: str, port: int, timeout: float = 3.0) -> dict:
        out = src.exec([sys.executable, "-m", "netlab.probe", "connect", dst_ip, str(port), "--timeout", str(timeout)],
                       timeout=timeout + 10)
        return json.loads(out.stdout)

    # --- potluck peers ------------------------------------------------------------------------------

    def peer_process(self, host: Host, *args: str, port: int = 4001, data_dir: Path | None = None,
                     env: dict | None = None, region: str | None = None) -> NetnsPeer:
        """A not yet started `potluck serve --listen /ip4/<host ip>/tcp/<port> --region <host region> *args`
        for host's namespace, owned by the lab (killed when it closes)."""
        data_dir = Path(data_dir) if data_dir else self.workdir / "peers" / f"{host.name}-{port}"
        full = ["--listen", f"/ip4/{host.ip}/tcp/{port}", "--region", region if region is not None else host.region,
                *args]
        peer = NetnsPeer(host, data_dir, *full, env=env)
        self.peers.append(peer)
        return peer

    def spawn_peer(self, host: Host, *args: str, timeout: float = 60.0, **kwargs) -> NetnsPeer:
        """Start one peer (see `peer_process` for the arguments) and wait until it listens."""
        return self.peer_process(host, *args, **kwargs).start(timeout=timeout)

    def spawn_peers(self, hosts: list[Host], *args: str, timeout: float = 90.0, **kwargs) -> list[NetnsPeer]:
        """Start one peer on each host concurrently (same extra args for all); wait until all listen."""
        peers = [self.peer_process(h, *args, **kwargs).launch() for h in hosts]
        deadline = time.monotonic() + timeout
        return [p.wait_ready(max(1.0, deadline - time.monotonic())) for p in peers]

    def swarm(self, hosts: list[Host] | None = None, *args: str, **kwargs) -> list[NetnsPeer]:
        """A swarm: the first host's peer starts alone, the rest bootstrap from it (started concurrently)."""
        hosts = list(hosts if hosts is not None else [h for h in self.hosts.values() if h.kind == "host"])
        first = self.spawn_peer(hosts[0], *args, **kwargs)
        return [first, *self.spawn_peers(hosts[1:], *args, "--bootstrap", first.addr, **kwargs)]

    def peer_by_id(self, peer_id: str) -> NetnsPeer | None:
        return next((p for p in self.peers if p.peer_id == peer_id), None)
