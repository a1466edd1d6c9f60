"""`ddetr eval` (being built)."""

from __future__ import annotations

import click


@click.command("eval")
def command() -> None:
    """Not available yet."""
    raise click.ClickException("ddetr eval is not implemented yet")
