"""Readable rendering of a peer's status (rich tables).

Text that came from other peers (model names, regions, cluster labels) is escaped: it is shown, never
read as rich markup.
"""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.markup import escape
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
    return escape("…" + label[-8:] if len(label) > 16 else label or "-")


def short_id(peer_id: str) -> str:
    """The last 8 characters of a peer id: distinct within a swarm, and what the logs print."""
    return "…" + peer_id[-8:]


def span(a: int, b: int) -> str:
    """Blocks [a, b) as `--blocks` takes them."""
    return f"{a}:{b}"


def _model_names(status: dict) -> dict[str, str]:
    return {m["model_id"]: escape(m["name"]) for m in status.get("models") or []}


def _model_name(model_id: str | None, names: dict[str, str]) -> str:
    if not model_id:
        return "?"
    return names.get(model_id) or f"model {model_id[:12]}"


def render_status(status: dict, console: Console | None = None, *, wide: bool = False) -> None:
    """The peer, what it serves, the swarm's servers and coverage, credits — within 80 columns
    (peer ids shortened to their last 8 characters; `wide` adds full ids and addresses)."""
    console = console or Console()
    names = _model_names(status)
    console.print(f"[bold]peer[/bold] {status['peer_id']}")
    facts = [f"region {status['region'] or '-'}"]
    if status.get("private_swarm"):
        facts.append("private swarm")
    reachability = (status.get("reachability") or {}).get("status")
    if reachability in ("public", "private"):
        facts.append("dialable (public)" if reachability == "public" else "not dialable (behind NAT)")
    relays = ((status.get("autorelay") or {}).get("relays") or {}).values()
    if relays:
        facts.append(f"reachable through {sum(1 for r in relays if r['reserved'])} relays it chose")
    clusters = (status.get("dht") or {}).get("clusters") or {}
    labels = [f"L{lv} {_label(label)}" for lv, label in sorted(clusters.items()) if label]
    if labels:
        facts.append("clusters " + " ".join(labels))
    console.print("  " + ", ".join(facts))
    for addr in status["addrs"]:  # unindented: a full address is about 80 characters
        console.print(addr, overflow="fold")
    if status.get("api"):
        console.print(f"  HTTP API {status['api']}/v1, dashboard {status['api']}/")

    server = status.get("server")
    if server:
        where = "choosing blocks…" if server.get("start") is None else f"blocks {span(server['start'], server['end'])}"
        tps = (server.get("throughput") or {}).get("decode_tps")
        cache = server.get("cache_tokens_left")
        console.print(f"[bold]serving[/bold] {where} of {_model_name(server.get('model_id'), names)}")
        console.print(f"  {server.get('sessions', 0)} open session(s), {server.get('sessions_opened', 0)} opened, "
                      f"{server.get('tokens', 0):,} tokens computed")
        speed = [f"{tps:,.0f} tok/s per block"] if isinstance(tps, (int, float)) else []
        speed += [f"room for {cache:,} cached tokens"] if isinstance(cache, int) else []
        tier = server.get("tier")
        if isinstance(tier, dict) and isinstance(tier.get("milli"), int):
            speed += [f"tier {tier.get('name')} ({tier['milli'] / 1000:g}×)"]
        if speed:
            console.print("  " + ", ".join(speed))
    else:
        console.print("[bold]serving[/bold] no blocks (`potluck serve --blocks auto` serves)")

    serves: dict[str, list[str]] = {}
    for m in status.get("models") or []:
        for srv in (m.get("coverage") or {}).get("servers", []):
            serves.setdefault(srv["peer_id"], []).append(span(srv["start"], srv["end"]))
    alive = sum(p["alive"] for p in status["peers"])
    table = Table(title=f"known peers ({alive} alive of {len(status['peers'])})", box=box.SIMPLE_HEAD, show_edge=False,
                  title_justify="left", pad_edge=False)
    table.add_column("peer", no_wrap=not wide, overflow="fold")
    for column in ("RTT", "region", "serves", "state"):
        table.add_column(column, no_wrap=True)
    if wide:
        table.add_column("address", overflow="fold")
    for p in status["peers"]:
        rtt = "-" if p["rtt_ms"] is None else f"{p['rtt_ms']:.1f} ms"
        state = "[green]alive[/green]" if p["alive"] else "[red]dead[/red]"
        row = [p["peer_id"] if wide else short_id(p["peer_id"]), rtt, escape(p["region"] or "-"),
               ", ".join(serves.get(p["peer_id"], [])) or "-", state]
        table.add_row(*row, *([p["addr"] or "-"] if wide else []))
    console.print(table)

    for m in status.get("models") or []:
        cov = m.get("coverage")
        context = f", context {m['context_length']:,}" if m.get("context_length") else ""
        console.print(f"[bold]{escape(m['name'])}[/bold] (model {m['model_id'][:12]}, {m['num_blocks']} blocks{context})")
        versions = [f"supersedes {', '.join(old[:12] for old in m.get('supersedes') or [])}"] if m.get("supersedes") else []
        versions += [f"superseded by {m['superseded_by'][:12]}"] if m.get("superseded_by") else []
        if versions:
            console.print("  " + "; ".join(versions))
        if cov is None:
            console.print("  coverage unknown (the DHT did not answer in time)")
            continue
        state = "[green]complete[/green]" if cov["complete"] else (
            "[red]missing " + ", ".join(span(a, b) for a, b in cov["missing"]) + "[/red]")
        console.print(f"  {cov['covered_blocks']}/{cov['num_blocks']} blocks covered, {state}")
        line = Text("  ")
        line.append_text(_bar(cov["replicas"], width=min(60, console.width - 24)))
        line.append(" replicas per block", style="dim")
        console.print(line)
        spans = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        spans.add_column("server", no_wrap=not wide, overflow="fold")
        for column in ("blocks", "tok/s/block", "cache tokens", "cluster"):
            spans.add_column(column, no_wrap=True, justify="right" if column in ("tok/s/block", "cache tokens") else "left")
        for srv in cov["servers"]:
            cl = srv.get("clusters") or {}
            spans.add_row(srv["peer_id"] if wide else short_id(srv["peer_id"]), span(srv["start"], srv["end"]),
                          f"{srv['decode_tps']:,.0f}", f"{srv['cache_tokens']:,}", _label(cl[min(cl)]) if cl else "-")
        console.print(spans)
    if not status.get("models"):
        console.print("[dim]no model seen yet: coverage shows once a server announces one[/dim]")

    gen = status.get("last_generation")
    if gen and gen.get("route"):
        tps = gen.get("tokens_per_s")
        console.print(f"[bold]last request[/bold] {gen['tokens']} tokens" + (f", {tps:.1f} tok/s" if tps else ""))
        console.print("  route " + " → ".join(f"{span(h['start'], h['end'])} {short_id(h['peer_id'])}"
                                             for h in gen["route"]), overflow="fold")

    credits = status.get("credits")
    if credits and "error" not in credits:
        console.print(f"[bold]credits[/bold] balance {_amount(credits['balance'])}, earned {_amount(credits['earned'])}, "
                      f"spent {_amount(credits['spent'])}")
        console.print(f"  {credits['unit'].split(' (')[0]}; `potluck credits` for details")


def _amount(value: float) -> str:
    return f"{value:,.1f}"


def render_credits(summary: dict, console: Console | None = None, *, wide: bool = False) -> None:
    """This peer's credits and every known peer's balance and standing, within 80 columns unless `wide`."""
    console = console or Console()
    who = (lambda peer_id: peer_id) if wide else short_id
    frozen = "  [red]FROZEN (forked chain)[/red]" if summary["frozen"] else ""
    console.print(f"[bold]credits of[/bold] {summary['peer_id']}{frozen}")
    console.print(f"  balance {_amount(summary['balance'])}, earned {_amount(summary['earned'])}, "
                  f"spent {_amount(summary['spent'])}, granted {_amount(summary['granted'])}")
    console.print(f"  unit: {summary['unit']}")
    console.print("  standing: a peer's work that reached me (served me, or those who served me);")
    console.print("  busy servers admit and queue by standing: a farmed balance buys nothing")
    mine = summary.get("my_standing")
    if mine is not None:
        if mine["peers"]:
            console.print(f"  my standing as the {mine['peers']} peers I served likely see it:")
            console.print(f"    min {_amount(mine['min'])}, median {_amount(mine['median'])}, max {_amount(mine['max'])}")
        else:
            console.print("  my standing: none yet (`potluck serve --blocks auto` earns it)")
    recent = Table(title=f"recent entries (own chain: {summary['chain_length']})", box=box.SIMPLE_HEAD, show_edge=False,
                   title_justify="left", pad_edge=False)
    for column in ("peer", "seq", "kind"):
        recent.add_column(column, overflow="fold")
    for e in summary["recent"]:
        recent.add_row(who(e["peer_id"]), str(e["seq"]), e["kind"])
    console.print(recent)
    peers = Table(title=f"peers as this one sees them (balances total {_amount(summary['total'])})",
                  box=box.SIMPLE_HEAD, show_edge=False, title_justify="left", pad_edge=False)
    peers.add_column("peer", overflow="fold")
    # balance: the shared fold; earned from / spent with: the receipts between that peer and me;
    # standing: this peer's own view (credits.standing), "-" for itself or from a peer that sends none
    for column in ("balance", "I earned", "I spent", "standing", "state"):
        peers.add_column(column, justify="right" if column != "state" else "left", no_wrap=True)
    for b in summary["peers"]:
        state = "[red]frozen[/red]" if b["frozen"] else "ok"
        standing = b.get("standing")
        peers.add_row(who(b["peer_id"]), _amount(b["balance"]), _amount(b["earned_from"]),
                      _amount(b["spent_with"]), "-" if standing is None else _amount(standing), state)
    console.print(peers)
