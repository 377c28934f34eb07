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
