"""Engine errors as CLI errors: the one place parameter names become flags.

The engine raises :class:`~ddetr_cli.errors.DdetrError` with the name of the
parameter at fault (``exc.param``) and writes other parameters it mentions in
backticks (```lr```). :func:`user_errors` catches that one type and turns it
into click's errors: a parameter at fault -> ``BadParameter`` on its flag (with
the usage), a wrong combination of arguments -> ``UsageError``, anything else
-> a one-line ``Error: ...`` with exit code 1.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import click

from ..errors import DdetrError

# Python parameter names whose flag is not simply --name-with-dashes.
FLAGS = {
    "data": "DATA",
    "sources": "SOURCE...",
    "config_path": "--config",
    "save_every_iters": "--save-every",
    "model_bench": "--model",
    "train_bench": "--train",
}

_PARAM = re.compile(r"`([a-z][a-z0-9_]*)`")


def flag(param: str) -> str:
    """``"batch_size"`` -> ``"--batch-size"`` (``FLAGS`` for the exceptions)."""
    return FLAGS.get(param, "--" + param.replace("_", "-"))


def render(message: str) -> str:
    """An engine message with its backticked parameter names as flags."""
    return _PARAM.sub(lambda m: flag(m.group(1)), message)


def to_click(exc: DdetrError) -> click.ClickException:
    message = render(str(exc))
    if exc.param is not None:
        return click.BadParameter(message, param_hint=f"'{flag(exc.param)}'")
    if getattr(exc, "usage", False):
        return click.UsageError(message)
    return click.ClickException(message)


@contextmanager
def user_errors() -> Iterator[None]:
    """Runs an engine call; a :class:`DdetrError` leaves as a click error."""
    try:
        yield
    except DdetrError as exc:
        raise to_click(exc) from None
