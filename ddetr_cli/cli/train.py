"""`ddetr train` (being built)."""

from __future__ import annotations

import click


@click.command("train")
def command() -> None:
    """Not available yet."""
    raise click.ClickException("ddetr train is not implemented yet")
