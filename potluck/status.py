"""Readable rendering of a peer's status (rich tables)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def render_status(status: dict, console: Console | None = None) -> None:
    console = console or Console()
    console.print(f"[bold]peer[/bold] {status['peer_id']}  region: {status['region'] or '-'}"
                  f"{'  (private swarm)' if status.get('private_swarm') else ''}")
    for addr in status["addrs"]:
        console.print(f"  {addr}")
    table = Table(title=f"known peers ({sum(p['alive'] for p in status['peers'])} alive of {len(status['peers'])})")
    # Ids and addresses are copied into other commands, so they wrap rather than being cut short.
    table.add_column("peer id", overflow="fold")
    table.add_column("address", overflow="fold")
    for column in ("RTT", "region", "state"):
        table.add_column(column, no_wrap=True)
    for p in status["peers"]:
        rtt = "-" if p["rtt_ms"] is None else f"{p['rtt_ms']:.1f} ms"
        state = "[green]alive[/green]" if p["alive"] else "[red]dead[/red]"
        table.add_row(p["peer_id"], p["addr"] or "-", rtt, p["region"] or "-", state)
    console.print(table)


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
