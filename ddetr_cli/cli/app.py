"""The small object every command receives: consoles and verbosity. Results
go to stdout (``app.out``); progress, tables meant for people and warnings go
to stderr (``app.err``)."""

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


pass_app = click.make_pass_decorator(App, ensure=True)
