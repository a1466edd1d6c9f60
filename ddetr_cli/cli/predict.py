"""`ddetr predict` (being built)."""

from __future__ import annotations

import click


@click.command("predict")
def command() -> None:
    """Not available yet."""
    raise click.ClickException("ddetr predict is not implemented yet")
