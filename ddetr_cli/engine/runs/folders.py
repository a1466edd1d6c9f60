"""Run folders: one allocator and one naming for ``train`` and ``predict``.

A run goes to ``project/name``; when that folder already holds something, to
``name2``, ``name3``, ... (``name-2``, ``name-3`` when ``name`` ends in a
digit, so ``run1`` never becomes ``run12``). An existing empty folder is
used as is. Nothing is ever overwritten::

    runs/train/exp   runs/train/exp2   runs/predict/exp   runs/predict/exp2
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_NAME = "exp"


def allocate_run_dir(project: str | os.PathLike, name: str = DEFAULT_NAME) -> Path:
    """Creates and returns the first free folder of ``project/name``,
    ``project/name2``, ... (see the module docstring)."""
    project = Path(project).expanduser()
    sep = "-" if name[-1:].isdigit() else ""
    for n in range(1, 100_000):
        candidate = project / (name if n == 1 else f"{name}{sep}{n}")
        if candidate.is_dir() and not any(candidate.iterdir()):
            return candidate
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return candidate
        except FileExistsError:
            continue
    raise OSError(f"{project / name}: no free run folder name left")


def split_out(out: str | os.PathLike) -> tuple[Path, str]:
    """``--out DIR`` as (project, name): ``DIR`` itself when free, else ``DIR2``..."""
    path = Path(out).expanduser()
    return path.parent, path.name
