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
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> torch.device, or a one-line error."""
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise click.BadParameter("CUDA was requested but no CUDA GPU is available to PyTorch", param_hint=option)
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise click.BadParameter(f"{name}: only {torch.cuda.device_count()} CUDA device(s) visible", param_hint=option)
        return dev
    raise click.BadParameter(f"unknown device {name!r} (auto, cpu, cuda, cuda:N)", param_hint=option)


pass_app = click.make_pass_decorator(App, ensure=True)
