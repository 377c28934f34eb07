#!/usr/bin/env bash
# Install what the network-namespace tests (tests/test_netns_*.py, bench/netns.py, netlab/) need:
# `ip` (iproute2: netns, veth, policy routing), `tc` (iproute2: tbf rate limits) and `iptables`
# (nft backend: loss, partitions, NAT). Idempotent: installs only what is missing. Needs root (or
# sudo) for apt-get; the tests themselves also need root and skip with the reason otherwise.
# The kernel must offer network namespaces, veth, TUN (/dev/net/tun), nf_tables with the
# `statistic`, `conntrack` and MASQUERADE matches/targets, and the tbf qdisc; netem is NOT needed.
set -euo pipefail

missing=()
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v tc >/dev/null 2>&1 || { [[ " ${missing[*]-} " == *" iproute2 "* ]] || missing+=(iproute2); }
command -v iptables >/dev/null 2>&1 || missing+=(iptables)

if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "installing ${missing[*]} ..."
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Report what the kernel offers (does not fail: the tests skip with a reason where something is absent).
if [ "$(id -u)" -eq 0 ]; then
    [ -e /dev/net/tun ] || echo "warning: /dev/net/tun is missing; the delay router needs TUN" >&2
    probe="plk-setup-$$"
    if ip netns add "$probe" 2>/dev/null; then
        ip netns exec "$probe" iptables -L -n >/dev/null 2>&1 || echo "warning: iptables does not work in a namespace" >&2
        ip netns del "$probe"
    else
        echo "warning: cannot create network namespaces here; netns tests will skip" >&2
    fi
fi
echo "netns test tools ready: $(ip -V 2>&1 | head -1); $(iptables --version 2>&1 | head -1)"
