"""The main job: a small local swarm serving the default model answers a prompt.

Three `potluck serve --blocks` processes split SmolLM2-135M-Instruct's 30 blocks between them; this
process is the user's peer: it joins through them, streams the answer token by token, then shows
which peer served which blocks, the tokens/s, and the swarm as it sees it. The model is converted
once per machine into the shared cache (`pipeline.convert.cache_dir`) and reused; the peers' state
lives in the data dir (`.data/` in the repository unless --data-dir says otherwise).
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from pathlib import Path
from typing import cast

import trio
from rich.console import Console
from rich.table import Table

from pipeline.client import Finished, Generation, GenerationFailed
from pipeline.convert import ensure_default_model
from pipeline.sampling import SamplingParams

from .localswarm import PeerProcess, wait_until
from .peer import Peer, PeerConfig, run_peer
from .status import render_status

DEFAULT_PROMPT = "What is a potluck dinner? Answer in two sentences."
REPO_DATA = Path(__file__).resolve().parent.parent / ".data"


def _spans(num_blocks: int, servers: int) -> list[tuple[int, int]]:
    cuts = [math.floor(i * num_blocks / servers) for i in range(servers + 1)]
    return list(zip(cuts, cuts[1:]))


def start_servers(console: Console, data_dir: Path, model_dir: Path, servers: int) -> list[PeerProcess]:
    procs: list[PeerProcess] = []
    for i, (a, b) in enumerate(_spans(30, servers)):
        boot = ["--bootstrap", procs[0].addr] if procs else []
        proc = PeerProcess(data_dir / f"server{i}", "--model", str(model_dir), "--blocks", f"{a}:{b}",
                           "--threads", "1", "--region", "local", *boot)
        procs.append(proc.start(timeout=180))
        console.print(f"server {i}: blocks {a:>2}:{b:<2}  {proc.peer_id}")
    console.print("waiting for the servers to load their blocks and announce them ...")
    wait_until(lambda: all((p.status().get("server") or {}).get("start") is not None for p in procs), 180,
               message="servers to announce their blocks")
    return procs


async def ask(peer: Peer, console: Console, prompt: str, max_tokens: int) -> Generation:
    """Stream the answer to `prompt` through the swarm; returns the generation."""
    client = await peer.client()
    params = SamplingParams(max_new_tokens=max_tokens)
    messages = [{"role": "user", "content": prompt}]
    with trio.fail_after(120):
        while True:  # the first announcements may take a moment to reach this peer's DHT
            try:
                console.print(f"\n[bold]you:[/bold] {prompt}\n[bold]swarm:[/bold] ", end="")
                async for event in client.stream(messages, params):
                    console.print(event.text, end="", highlight=False, soft_wrap=True)
                    if isinstance(event, Finished):
                        console.print()
                        return event.generation
            except GenerationFailed as e:
                console.print(f"[yellow](no full route yet: {e}; retrying)[/yellow]")
                await trio.sleep(2)


def local_baseline(model_dir: Path, prompt: str, max_tokens: int) -> float:
    """Tokens/s of the same greedy generation in one local process (the baseline the swarm is measured against)."""
    import torch
    from transformers import AutoTokenizer, BatchEncoding

    from pipeline.loading import load_local_model

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)
    ids = cast(BatchEncoding, encoded)["input_ids"]  # return_dict=True: its annotation lists every mode's type
    model = load_local_model(model_dir)
    model.generate_greedy(ids, 4)  # warm-up
    start = time.perf_counter()
    out = model.generate_greedy(ids, max_tokens, eos_token_id=2)
    return len(out) / (time.perf_counter() - start)


def show_route(console: Console, g: Generation, procs: list[PeerProcess]) -> None:
    names = {p.peer_id: f"server{i}" for i, p in enumerate(procs)}
    table = Table(title="which peers served which blocks")
    for column in ("blocks", "peer", "peer id"):
        table.add_column(column, overflow="fold")
    for peer_id, start, end in g.route:
        table.add_row(f"{start}:{end}", names.get(peer_id, "?"), peer_id)
    console.print(table)
    console.print(f"{len(g.token_ids)} tokens, first after {g.ttft_s:.2f} s, then {g.tokens_per_s:.1f} tokens/s "
                  f"(compute {g.compute_s:.2f} s, network {g.network_s:.2f} s)")


async def run_user_peer(config: PeerConfig, console: Console, args: argparse.Namespace, procs) -> Generation:
    send, receive = trio.open_memory_channel(1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_peer, config, send.send_nowait)
        peer: Peer = await receive.receive()
        answer = await ask(peer, console, args.prompt, args.max_tokens)
        show_route(console, answer, procs)
        console.print()
        render_status(peer.status(), console)
        nursery.cancel_scope.cancel()
    return answer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m potluck.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--data-dir", type=Path, default=REPO_DATA / "demo")
    parser.add_argument("--no-baseline", action="store_true", help="skip the local single-process comparison")
    args = parser.parse_args(argv)
    console = Console()
    import torch

    torch.set_num_threads(1)  # four peers share this machine's cores; one thread each, like the baseline

    console.print("[bold]potluck demo[/bold]: converting the default model on first use ...")
    model_dir = ensure_default_model(args.data_dir, progress=True)
    procs: list[PeerProcess] = []
    try:
        procs = start_servers(console, args.data_dir, model_dir, args.servers)
        config = PeerConfig(data_dir=args.data_dir / "user", bootstrap=[procs[0].addr], model=str(model_dir),
                            region="local")
        answer = trio.run(run_user_peer, config, console, args, procs)
    finally:
        for p in procs:
            if p.proc and p.proc.poll() is None:
                p.stop(signal.SIGINT)
            p.close()
    if not args.no_baseline:
        local = local_baseline(model_dir, args.prompt, args.max_tokens)
        swarm = answer.tokens_per_s
        console.print(f"local single process: {local:.1f} tokens/s; swarm of {args.servers}: {swarm:.1f} tokens/s "
                      f"({swarm / local:.2f}× local)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
