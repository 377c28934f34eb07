"""`potluck` command line: id | serve | chat | status | credits | swarm new-key."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from pathlib import Path

import trio

DEFAULT_DATA_DIR = Path(os.environ.get("POTLUCK_DATA_DIR", Path.home() / ".potluck"))
LOCAL_FALLBACK = "local"  # `--fallback local`: this peer answers with its own copy of the model


def _data_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help=f"where the identity key and state live (default {DEFAULT_DATA_DIR}, or $POTLUCK_DATA_DIR)")


def _limit_args(parser: argparse.ArgumentParser) -> None:
    limits = parser.add_argument_group("limits", "what this peer grants other peers; the defaults suit a "
                                                 "volunteer's machine")
    limits.add_argument("--max-inbound-per-ip", type=int, metavar="N",
                        help="connections one IP address may hold open before their peer passes the "
                             "handshake (default 8)")
    limits.add_argument("--inflight-mb", type=float, metavar="MiB",
                        help="memory one peer's requests may hold here at once, as decoded (default 64; "
                             "at least 16, the largest message)")
    limits.add_argument("--request-rate", type=float, metavar="REQ/S",
                        help="one peer's requests (DHT, gossip, membership, credit sync) served a second, after "
                             "a burst of twice that; past it that peer's next requests wait (default 100)")
    limits.add_argument("--dht-store-mb", type=float, metavar="MiB",
                        help="DHT records stored for other peers (default 64)")
    limits.add_argument("--gossip-rate", type=float, metavar="MSGS/S",
                        help="gossip messages taken per second from one author on one topic, after a burst "
                             "of 100 (default 2)")
    limits.add_argument("--gossip-mb", type=float, metavar="MiB",
                        help="gossip messages held to relay to other peers (default 32)")


def peer_limits(args: argparse.Namespace):
    """The PeerLimits the limit flags ask for (a ValueError names a flag out of range)."""
    from dataclasses import replace

    from p2p import framing

    from .peer import PeerLimits

    for flag, value in (("--max-inbound-per-ip", args.max_inbound_per_ip), ("--dht-store-mb", args.dht_store_mb),
                        ("--request-rate", args.request_rate),
                        ("--gossip-rate", args.gossip_rate), ("--gossip-mb", args.gossip_mb)):
        if value is not None and not value > 0:
            raise ValueError(f"{flag} wants a positive number")
    mib = 1 << 20
    if args.inflight_mb is not None and not args.inflight_mb * mib >= framing.DEFAULT_MAX_FRAME:
        raise ValueError(f"--inflight-mb wants at least {framing.DEFAULT_MAX_FRAME // mib} (MiB): a request "
                         "may be that large")
    limits = PeerLimits()
    if args.max_inbound_per_ip is not None:
        limits = replace(limits, inbound=replace(limits.inbound, max_unadmitted_per_ip=args.max_inbound_per_ip))
    if args.inflight_mb is not None:
        limits = replace(limits, inflight_bytes_in=round(args.inflight_mb * mib))
    if args.request_rate is not None:
        limits = replace(limits, request_rate=args.request_rate)
    if args.dht_store_mb is not None:
        limits = replace(limits, dht_store=replace(limits.dht_store, max_bytes=round(args.dht_store_mb * mib)))
    if args.gossip_rate is not None:
        limits = replace(limits, gossip=replace(limits.gossip, rate=args.gossip_rate))
    if args.gossip_mb is not None:
        limits = replace(limits, gossip=replace(limits.gossip, max_total_bytes=round(args.gossip_mb * mib)))
    return limits


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="potluck", description="Peer-to-peer LLM inference: bring compute, share compute.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("id", help="print this peer's id (creating its key on first use)")
    _data_dir_arg(p)

    p = sub.add_parser("serve", help="run a peer until SIGINT/SIGTERM")
    _data_dir_arg(p)
    p.add_argument("--listen", action="append", metavar="MULTIADDR",
                   help="address to listen on (repeatable; default /ip4/127.0.0.1/tcp/0)")
    p.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR",
                   help="full multiaddr (with /p2p/ID) of a peer to join through (repeatable)")
    p.add_argument("--swarm-key", type=Path, metavar="FILE", help="join the private swarm that holds this key")
    p.add_argument("--relay-service", action="store_true",
                   help="relay connections (libp2p circuit relay v2) for members behind NAT; "
                        "for a peer others can dial directly")
    p.add_argument("--relay", action="append", default=[], metavar="MULTIADDR",
                   help="behind NAT: full multiaddr of a peer running --relay-service; this peer reserves a slot "
                        "there and is announced as reachable through it (repeatable). Without it, a peer found "
                        "behind NAT chooses relays itself from those the swarm announces")
    p.add_argument("--no-hole-punch", dest="hole_punch", action="store_false",
                   help="stay on the relay with peers met through one (no direct connection is tried)")
    p.add_argument("--starting-grant", type=float, metavar="CREDITS",
                   help="credit policy: GFLOP-credits each new identity grants itself (default 0: an open swarm "
                        "mints nothing; a private swarm may); a swarm's peers must all use the same policy")
    p.add_argument("--debt-limit", type=float, metavar="CREDITS",
                   help="credit policy: how much a newcomer may owe a busy server (default 10000 GFLOP-credits; "
                        "a client's standing there adds to it); the same for every peer of a swarm")
    p.add_argument("--pricing", choices=["flops", "tiered"], default="flops",
                   help="pricing policy: flops (default) prices pure FLOPs; tiered weights each step by the server's "
                        "hardware tier (edge 0.05x ... datacenter 8x, measured at start) and precision (float32 1, "
                        "bfloat16/float16 0.9); the same for every peer of a swarm")
    p.add_argument("--tier-quarantine", type=float, metavar="SECONDS",
                   help="after the blocks served change hardware tier under this identity, price at the lower of "
                        "the old and new tier this long (default 7 days)")
    p.add_argument("--region", default="", help="a hint for clustering, e.g. eu-west; measured RTT decides")
    p.add_argument("--model", action="append", default=[],
                   help="model to serve or use: a Hugging Face folder or hub id (default: SmolLM2-135M-Instruct, "
                        "converted once per machine into ~/.cache/potluck); repeated with --blocks, the candidates "
                        "to choose from: the peer serves the one the swarm asks for most per copy served; "
                        "repeated, versions of a family: a request for any runs on the newest complete one")
    p.add_argument("--supersedes", metavar="MODEL_ID",
                   help="announce the served model as a new version of this model id: requests for the old one "
                        "go to it once it is complete, and volunteers holding its weights move to it")
    p.add_argument("--blocks", metavar="a:b|auto",
                   help="serve blocks [a, b) of the model, or 'auto' to fill the swarm's gaps (default: serve none)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--cache-mb", type=int, metavar="MiB",
                   help="memory for the KV cache of the blocks served (default 256); bounds the sessions it holds")
    p.add_argument("--stranger-cache-tokens", type=int, metavar="N",
                   help="KV cache tokens of the blocks served one client without standing here may hold (default "
                        "4096; at most half the cache)")
    p.add_argument("--strangers-cache-tokens", type=int, metavar="N",
                   help="... all clients without standing together (default 16384; at most half the cache)")
    p.add_argument("--max-batch", type=int, metavar="N",
                   help="steps of different sessions the blocks served compute as one forward (default 8; 1: no "
                        "batching)")
    p.add_argument("--threads", type=int, help="torch threads for this peer (default: torch's choice); "
                                               "give 1 when several peers share a machine")
    p.add_argument("--spot-check-fraction", type=float, metavar="P",
                   help="re-check this fraction of every server's steps on another server (0: none; default: "
                        "adaptive — every step of a server new to this peer, fewer as it earns trust)")
    p.add_argument("--draft-model", metavar="FOLDER",
                   help="speculative decoding drafts with this small local model of the same tokenizer (an HF "
                        "folder; default: prompt lookup, no extra model)")
    p.add_argument("--grid-signal", metavar="FILE",
                   help="announce this JSON grid signal with the blocks served: {\"load\", \"carbon\", \"renewable\" "
                        "(each 0-1), \"timestamp\" (unix s)}; re-read at each announcement, keep it fresh")
    p.add_argument("--prefer", choices=["fast", "green", "cheap"], default="fast",
                   help="routes of this peer's generations: fastest, green (servers' grid signals weigh in, "
                        "at most 20%% slower than the fastest route), or cheap (lowest priced servers, see "
                        "--pricing; speed breaks ties); default fast")
    p.add_argument("--api", metavar="HOST:PORT",
                   help="serve the OpenAI-compatible HTTP API and the dashboard there, e.g. 127.0.0.1:8000")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get("POTLUCK_API_KEY"),
                   help="require `Authorization: Bearer KEY` on every HTTP request (needed for a non-loopback "
                        "--api; default $POTLUCK_API_KEY)")
    p.add_argument("--apps", type=Path, metavar="FILE",
                   help="serve many applications: a TOML/JSON table of apps with their API keys and quotas per "
                        "minute (tokens, credits); each is metered, refused with 429 past a quota, and sees its "
                        "usage at /api/usage")
    p.add_argument("--fallback", metavar="URL|local",
                   help="an OpenAI-compatible API (its base URL, e.g. https://host/v1) that answers when the swarm "
                        "cannot (no route, or a failure mid-answer); `local`: this peer loads the whole model and "
                        "answers itself when its memory allows; such answers are marked and cost no credits")
    p.add_argument("--fallback-key-env", metavar="VAR",
                   help="the environment variable that holds the fallback's API key")
    p.add_argument("--fallback-model", action="append", default=[], metavar="NAME|OURS=NAME",
                   help="the fallback's model for every request, or for one of ours (repeatable; default: the "
                        "request's model name)")
    _limit_args(p)

    p = sub.add_parser("chat", help="chat in the terminal through the running peer's API (or a fresh peer)")
    _data_dir_arg(p)
    p.add_argument("--url", help="base URL of a peer's API (default: ask the peer running with --data-dir; "
                                 "if none runs, start one)")
    p.add_argument("--api-key", default=os.environ.get("POTLUCK_API_KEY"), help="the API key, if the peer needs one")
    p.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR",
                   help="for a fresh peer: a peer of the swarm to join through (repeatable)")
    p.add_argument("--swarm-key", type=Path, metavar="FILE", help="for a fresh peer: the private swarm's key")
    p.add_argument("--model", help="the model to chat with (default: the peer's)")
    p.add_argument("--system", help="a system prompt")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int)

    p = sub.add_parser("status", help="show what the running peer knows")
    _data_dir_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--wide", action="store_true", help="full peer ids and addresses (lines may pass 80 columns)")

    p = sub.add_parser("credits", help="this peer's credits: the unit, balance, my standing as others likely see "
                                       "it; per peer: balance, what we earned from and spent with each other, "
                                       "standing in my view")
    _data_dir_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--wide", action="store_true", help="full peer ids (lines may pass 80 columns)")

    p = sub.add_parser("swarm", help="private swarms")
    swarm_sub = p.add_subparsers(dest="swarm_command", required=True)
    k = swarm_sub.add_parser("new-key", help="write a new swarm key to FILE (share it only with members)")
    k.add_argument("file", type=Path)
    return parser


def cmd_id(args: argparse.Namespace) -> int:
    from p2p.identity import Identity

    print(Identity.load_or_create(args.data_dir).peer_id)
    return 0


def _credit_policy(args: argparse.Namespace):
    """The CreditPolicy the flags ask for, or None for the defaults."""
    if args.starting_grant is None and args.debt_limit is None:
        return None
    from credits import CreditPolicy
    from credits.ledger import GFLOP

    default = CreditPolicy()
    grant = default.starting_grant if args.starting_grant is None else round(args.starting_grant * GFLOP)
    debt = default.debt_limit if args.debt_limit is None else round(args.debt_limit * GFLOP)
    return CreditPolicy(starting_grant=grant, debt_limit=debt)  # ValueError (exit 2) when negative


def _api_gateway(args: argparse.Namespace):
    """(the AppTable of --apps, the FallbackConfig of --fallback), each None when not asked for."""
    from .apps import load_apps
    from .fallback import FallbackConfig, parse_model_map

    if (args.apps or args.fallback) and args.api is None:
        raise ValueError("--apps and --fallback are the HTTP API's: give --api HOST:PORT too")
    if (args.fallback_key_env or args.fallback_model) and (not args.fallback or args.fallback == LOCAL_FALLBACK):
        raise ValueError("--fallback-key-env and --fallback-model need --fallback URL")
    key = None
    if args.fallback_key_env:
        key = os.environ.get(args.fallback_key_env)
        if not key:
            raise ValueError(f"--fallback-key-env {args.fallback_key_env}: that environment variable is not set")
    fallback = (FallbackConfig(args.fallback, key=key, models=parse_model_map(args.fallback_model))
                if args.fallback and args.fallback != LOCAL_FALLBACK else None)
    return (load_apps(args.apps) if args.apps else None), fallback


def cmd_serve(args: argparse.Namespace) -> int:
    from .startup import check_listen, check_peer_addr, check_port_free

    # every refusal before anything starts: exit 2 with one line saying what to do
    listen = args.listen or ["/ip4/127.0.0.1/tcp/0"]
    for addr in listen:
        check_listen(addr)
    for flag, addrs in (("--bootstrap", args.bootstrap), ("--relay", args.relay)):
        for addr in addrs:
            check_peer_addr(addr, flag)
    if args.api is not None:
        from .api import check_bind, parse_hostport

        host, port = parse_hostport(args.api)
        check_bind(host, args.api_key, apps=args.apps is not None)
        check_port_free(host, port, "--api", "choose another port, or stop the program that holds it")

    from p2p.errors import SwarmKeyMismatch
    from p2p.libp2p import RelayRefused

    from pipeline.server import parse_blocks

    from .peer import PeerConfig, run_peer

    if args.blocks is not None:
        parse_blocks(args.blocks)  # a malformed span is an error before anything starts
    if args.cache_mb is not None and args.cache_mb < 1:
        raise ValueError("--cache-mb wants a positive number of MiB")
    for flag, tokens in (("--stranger-cache-tokens", args.stranger_cache_tokens),
                         ("--strangers-cache-tokens", args.strangers_cache_tokens)):
        if tokens is not None and tokens < 1:
            raise ValueError(f"{flag} wants a positive number of tokens")
    if args.max_batch is not None and not 1 <= args.max_batch <= 256:
        raise ValueError("--max-batch wants a number of steps in [1, 256]")
    if args.tier_quarantine is not None and not 0.0 <= args.tier_quarantine <= 1e9:
        raise ValueError("--tier-quarantine wants a number of seconds in [0, 1e9]")
    if args.spot_check_fraction is not None and not 0.0 <= args.spot_check_fraction <= 1.0:
        raise ValueError("--spot-check-fraction wants a number in [0, 1]")
    apps, fallback = _api_gateway(args)
    if args.supersedes is not None and (args.blocks is None or len(args.model) > 1):
        raise ValueError("--supersedes is announced with the one model served: give --blocks and one --model")
    if args.draft_model is not None and not (Path(args.draft_model) / "config.json").is_file():
        raise ValueError(f"--draft-model {args.draft_model}: not a model folder (no config.json)")
    if args.grid_signal is not None:
        from pipeline.grid import read_signal_file

        if args.blocks is None:
            raise ValueError("--grid-signal is announced with the blocks served: give --blocks too")
        read_signal_file(args.grid_signal)  # GridSignalError (a ValueError) says what is wrong with it
    config = PeerConfig(
        data_dir=args.data_dir,
        listen=listen,
        bootstrap=args.bootstrap,
        swarm_key_file=args.swarm_key,
        relay_service=args.relay_service,
        relays=args.relay,
        hole_punch=args.hole_punch,
        region=args.region,
        model=args.model[0] if args.model else None,
        model_candidates=args.model,
        supersedes=args.supersedes,
        blocks=args.blocks,
        dtype=args.dtype,
        cache_mib=args.cache_mb,
        max_batch=args.max_batch,
        stranger_cache_tokens=args.stranger_cache_tokens,
        strangers_cache_tokens=args.strangers_cache_tokens,
        spot_check_fraction=args.spot_check_fraction,
        draft_model=args.draft_model,
        grid_signal=args.grid_signal,
        prefer=args.prefer,
        credit_policy=_credit_policy(args),
        pricing=args.pricing,
        tier_quarantine_s=args.tier_quarantine,
        api=args.api,
        api_key=args.api_key,
        apps=apps,
        fallback=fallback,
        local_fallback=args.fallback == LOCAL_FALLBACK,
        limits=peer_limits(args),
    )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    def on_ready(peer) -> None:
        print(f"potluck peer {peer.identity.peer_id}", flush=True)
        if peer.api_url:
            print(f"api on {peer.api_url}/v1 (dashboard: {peer.api_url}/)", flush=True)
        for addr in peer.network.listen_addrs():
            print(f"listening on {addr}", flush=True)

    try:
        trio.run(run_peer, config, on_ready)
    except SwarmKeyMismatch as e:
        print(f"potluck serve: cannot join the swarm: {e}", file=sys.stderr)
        return 2
    except RelayRefused as e:
        print(f"potluck serve: no relay would take us: {e}", file=sys.stderr)
        return 2
    print("stopped", flush=True)
    return 0


def _show(args: argparse.Namespace, fetch, render) -> int:
    """Run `fetch()` against the running peer and print its reply as JSON or through `render`."""
    from . import control

    try:
        reply = trio.run(fetch)
    except control.PeerNotRunning as e:
        print(e, file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(reply, indent=2))
    else:
        render(reply)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from . import control
    from .status import render_status

    async def both() -> dict:
        status = await control.call(args.data_dir, "status", models=True)
        try:
            status["credits"] = await control.call(args.data_dir, "credits")
        except RuntimeError as e:
            status["credits"] = {"error": str(e)}
        return status

    return _show(args, both, functools.partial(render_status, wide=args.wide))


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import main as chat_main

    return chat_main(args)


def cmd_credits(args: argparse.Namespace) -> int:
    from . import control
    from .status import render_credits

    return _show(args, functools.partial(control.call, args.data_dir, "credits"),
                 functools.partial(render_credits, wide=args.wide))


def cmd_swarm(args: argparse.Namespace) -> int:
    from p2p.swarm_key import new_key_file

    new_key_file(args.file)
    print(f"wrote a new swarm key to {args.file}; give it to the members, then start each peer with --swarm-key {args.file}")
    return 0


COMMANDS = {"id": cmd_id, "serve": cmd_serve, "chat": cmd_chat, "status": cmd_status, "credits": cmd_credits, "swarm": cmd_swarm}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"potluck {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
