"""``python -m ddetr_cli`` is the ``ddetr`` command."""

from .cli.main import cli

cli(prog_name="ddetr")
