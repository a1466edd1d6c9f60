"""`ddetr bench` (being built)."""

from __future__ import annotations

import click


@click.command("bench")
def command() -> None:
    """Not available yet."""
    raise click.ClickException("ddetr bench is not implemented yet")
