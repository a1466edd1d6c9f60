"""The small object every command receives: consoles, verbosity and helpers
for choosing a device. Results go to stdout (``app.out``); progress, tables
meant for people and warnings go to stderr (``app.err``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import click
from rich.console import Console


def _console(stderr: bool) -> Console:
    console = Console(stderr=stderr)
    if not console.is_terminal:  # pipes and files: wide enough for the result tables
        console = Console(stderr=stderr, width=160)
    return console


@dataclass
class App:
    verbose: int = 0
    quiet: bool = False
    out: Console = field(default_factory=lambda: _console(stderr=False))
    err: Console = field(default_factory=lambda: _console(stderr=True))

    def info(self, message: str) -> None:
        if not self.quiet:
            self.err.print(message)

    def warn(self, message: str) -> None:
        self.err.print(f"[yellow]warning:[/] {message}")

    @property
    def interactive(self) -> bool:
        return self.err.is_terminal and not self.quiet


def resolve_device(name: str, option: str = "--device"):
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> torch.device, or a one-line usage error."""
    from ..engine.device import DeviceError
    from ..engine.device import resolve_device as resolve

    try:
        return resolve(name, option)
    except DeviceError as exc:
        raise click.BadParameter(str(exc), param_hint=exc.option) from None


pass_app = click.make_pass_decorator(App, ensure=True)
