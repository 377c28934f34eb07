"""Readable rendering of a peer's status (rich tables)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text


def _bar(replicas: list[int], width: int = 60) -> Text:
    """One character per block (blocks grouped when there are more than `width`): the replica count."""
    text = Text()
    n = len(replicas)
    group = max(1, -(-n // width))
    for a in range(0, n, group):
        r = min(replicas[a:a + group])
        style = "bold red" if r == 0 else "yellow" if r == 1 else "green"
        text.append("·" if r == 0 else str(min(r, 9)), style=style)
    return text


def _label(label: str) -> str:
    """A cluster label, short (they are often the anchor's peer id)."""
    return "…" + label[-8:] if len(label) > 16 else label or "-"


def _blocks(a: int, b: int) -> str:
    return f"block {a}" if b - a == 1 else f"blocks {a}-{b - 1}"


def render_status(status: dict, console: Console | None = None) -> None:
    console = console or Console()
    console.print(f"[bold]peer[/bold] {status['peer_id']}  region: {status['region'] or '-'}"
                  f"{'  (private swarm)' if status.get('private_swarm') else ''}")
    for addr in status["addrs"]:
        console.print(f"  {addr}")
    clusters = (status.get("dht") or {}).get("clusters") or {}
    if clusters:
        console.print("  clusters: " + "  ".join(f"L{lv} {_label(label)}" for lv, label in sorted(clusters.items()) if label))
    if status.get("api"):
        console.print(f"  HTTP API: {status['api']}/v1   dashboard: {status['api']}/")

    server = status.get("server")
    if server:
        span = "choosing blocks…" if server.get("start") is None else _blocks(server["start"], server["end"])
        tps = (server.get("throughput") or {}).get("decode_tps")
        cache = server.get("cache_tokens_left")
        console.print(f"[bold]serving[/bold] {span} of model {str(server.get('model_id') or '?')[:12]}: "
                      f"{server.get('sessions', 0)} open session(s), {server.get('sessions_opened', 0)} opened so far, "
                      f"{server.get('tokens', 0)} tokens computed"
                      + (f", {tps:,.0f} tok/s per block" if isinstance(tps, (int, float)) else "")
                      + (f", room for {cache:,} more cached tokens" if isinstance(cache, int) else ""))
    else:
        console.print("[bold]serving[/bold] no blocks (a client-only peer; `potluck serve --blocks auto` serves)")

    table = Table(title=f"known peers ({sum(p['alive'] for p in status['peers'])} alive of {len(status['peers'])})")
    # Ids and addresses are copied into other commands, so they wrap rather than being cut short.
    table.add_column("peer id", overflow="fold")
    table.add_column("address", overflow="fold")
    for column in ("RTT", "region", "serves", "state"):
        table.add_column(column, no_wrap=True)
    serves = {}
    for m in status.get("models") or []:
        for srv in (m.get("coverage") or {}).get("servers", []):
            serves[srv["peer_id"]] = f"{srv['start']}-{srv['end'] - 1}"
    for p in status["peers"]:
        rtt = "-" if p["rtt_ms"] is None else f"{p['rtt_ms']:.1f} ms"
        state = "[green]alive[/green]" if p["alive"] else "[red]dead[/red]"
        table.add_row(p["peer_id"], p["addr"] or "-", rtt, p["region"] or "-", serves.get(p["peer_id"], "-"), state)
    console.print(table)

    for m in status.get("models") or []:
        cov = m.get("coverage")
        head = f"[bold]coverage of {m['name']}[/bold] (model {m['model_id'][:12]}, {m['num_blocks']} blocks)"
        if cov is None:
            console.print(head + ": unknown (the DHT did not answer in time)")
            continue
        state = "[green]complete[/green]" if cov["complete"] else (
            "[red]missing " + ", ".join(_blocks(a, b) for a, b in cov["missing"]) + "[/red]")
        console.print(f"{head}: {cov['covered_blocks']}/{cov['num_blocks']} covered, {state}")
        line = Text("  ")
        line.append_text(_bar(cov["replicas"]))
        line.append("  (replicas per block)", style="dim")
        console.print(line)
        spans = Table(show_header=True, box=None, padding=(0, 2, 0, 2))
        for column in ("server", "blocks", "tok/s per block", "cache tokens", "cluster"):
            spans.add_column(column, overflow="fold")
        for srv in cov["servers"]:
            cl = srv.get("clusters") or {}
            spans.add_row(srv["peer_id"], f"{srv['start']}-{srv['end'] - 1}", f"{srv['decode_tps']:,.0f}",
                          f"{srv['cache_tokens']:,}", _label(cl[min(cl)]) if cl else "-")
        console.print(spans)
    if not status.get("models"):
        console.print("[dim]no model loaded yet: coverage shows once this peer serves blocks or has generated[/dim]")

    gen = status.get("last_generation")
    if gen and gen.get("route"):
        route = " → ".join(f"{_blocks(h['start'], h['end'])} on …{h['peer_id'][-8:]}" for h in gen["route"])
        tps = gen.get("tokens_per_s")
        console.print(f"[bold]last request[/bold] {gen['tokens']} tokens"
                      + (f", {tps:.1f} tok/s" if tps else "") + f": {route}")

    credits = status.get("credits")
    if credits and "error" not in credits:
        console.print(f"[bold]credits[/bold] balance {_amount(credits['balance'])}   earned {_amount(credits['earned'])}   "
                      f"spent {_amount(credits['spent'])}   ({credits['unit'].split(' (')[0]}; `potluck credits` for details)")


def _amount(value: float) -> str:
    return f"{value:,.1f}"


def render_credits(summary: dict, console: Console | None = None) -> None:
    console = console or Console()
    frozen = "  [red]FROZEN (forked chain)[/red]" if summary["frozen"] else ""
    console.print(f"[bold]credits of[/bold] {summary['peer_id']}{frozen}")
    console.print(f"  balance {_amount(summary['balance'])}   earned {_amount(summary['earned'])}   "
                  f"spent {_amount(summary['spent'])}   granted {_amount(summary['granted'])}   "
                  f"({summary['unit']})")
    recent = Table(title=f"recent entries (own chain: {summary['chain_length']})")
    for column in ("peer id", "seq", "kind"):
        recent.add_column(column, overflow="fold")
    for e in summary["recent"]:
        recent.add_row(e["peer_id"], str(e["seq"]), e["kind"])
    console.print(recent)
    peers = Table(title=f"balances as this peer sees them (total {_amount(summary['total'])})")
    peers.add_column("peer id", overflow="fold")
    for column in ("balance", "earned", "spent", "granted", "state"):
        peers.add_column(column, justify="right" if column != "state" else "left", no_wrap=True)
    for b in summary["peers"]:
        state = "[red]frozen[/red]" if b["frozen"] else "ok"
        peers.add_row(b["peer_id"], _amount(b["balance"]), _amount(b["earned"]), _amount(b["spent"]),
                      _amount(b["granted"]), state)
    console.print(peers)
