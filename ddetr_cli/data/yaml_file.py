"""The one YAML reader: dataset YAMLs, training configs and model configs all
go through :func:`read_yaml`, so a malformed file reads the same everywhere:
``PATH: line L, column C: malformed YAML: PROBLEM``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError


def read_yaml(path: str | os.PathLike, *, what: str = "YAML file", error: type[ConfigError] = ConfigError) -> Any:
    """The parsed content of ``path`` (None for an empty file). Raises ``error``
    (a :class:`ConfigError`) naming the file and, for syntax errors, the line
    and column."""
    path = Path(path).expanduser()
    if not path.exists():
        raise error(f"{path}: {what} not found")
    if path.is_dir():
        raise error(f"{path}: is a directory; expected a {what}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read ({exc})") from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""
        problem = exc.problem or exc.context or "syntax error"
        raise error(f"{path}:{where} malformed YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise error(f"{path}: malformed YAML: {exc}") from None
