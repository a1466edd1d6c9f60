"""``ddetr``: the root command group. Each subcommand lives in its own module
and imports torch inside its body, so ``ddetr --help`` stays instant."""

from __future__ import annotations

import click

from .. import __version__
from .app import App


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ddetr")
@click.option("-v", "--verbose", count=True, help="More output (repeatable).")
@click.option("-q", "--quiet", is_flag=True, help="Only results and errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Deformable DETR object detection: train, evaluate, predict, benchmark."""
    ctx.obj = App(verbose=verbose, quiet=quiet)
    if verbose:
        from rich.traceback import install

        install(console=ctx.obj.err, suppress=[click], show_locals=verbose > 1)


def _register() -> None:
    from . import bench, eval, export, predict, train  # noqa: A004  (module names mirror the commands)

    for module in (train, eval, predict, export, bench):
        cli.add_command(module.command)


_register()


if __name__ == "__main__":
    cli()
