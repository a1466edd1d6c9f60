"""Run folders: one allocator and one naming for ``train`` and ``predict``.

A run goes to ``project/name``; when that folder already holds something, to
``name2``, ``name3``, ... (``name-2``, ``name-3`` when ``name`` ends in a
digit, so ``run1`` never becomes ``run12``). An existing empty folder is
used as is. Nothing is ever overwritten::

    runs/train/exp   runs/train/exp2   runs/predict/exp   runs/predict/exp2

A folder is claimed at once, before any work, by creating ``.ddetr-run`` in it
with O_EXCL (the writability check too): two runs started together never share
a folder. :func:`release_run_dir` removes the claim when the run is done, and
the folder too when nothing was written to it. A claim left by a killed
process on this machine is taken over.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from ...errors import OutputError

DEFAULT_NAME = "exp"
CLAIM = ".ddetr-run"


def allocate_run_dir(project: str | os.PathLike, name: str = DEFAULT_NAME) -> Path:
    """Creates, claims and returns the first free folder of ``project/name``,
    ``project/name2``, ... (see the module docstring). Raises
    :class:`OutputError` when the folder cannot be created or written."""
    project = Path(project).expanduser()
    sep = "-" if name[-1:].isdigit() else ""
    for n in range(1, 100_000):
        candidate = project / (name if n == 1 else f"{name}{sep}{n}")
        try:
            candidate.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # a file of that name
            continue
        except OSError as exc:
            raise OutputError(f"cannot create the run folder {candidate}: {exc.strerror or exc}") from None
        if any(f.name != CLAIM for f in candidate.iterdir()):
            continue
        if claim_run_dir(candidate):
            return candidate
    raise OutputError(f"{project / name}: no free run folder name left")


def claim_run_dir(folder: Path) -> bool:
    """Claims ``folder`` (which must exist): True when this process now owns it,
    False when another live run does. Raises :class:`OutputError` when the
    folder is not writable."""
    path = Path(folder) / CLAIM
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _owner_alive(path):
                return False
            try:  # left by a killed run on this machine: take it over
                path.unlink()
            except FileNotFoundError:
                pass
            continue
        except OSError as exc:
            reason = "permission denied" if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else exc.strerror
            raise OutputError(f"cannot write to the run folder {folder}: {reason or exc}") from None
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{socket.gethostname()} {os.getpid()}\n")
        return True
    return False


def release_run_dir(folder: Path) -> None:
    """Drops this process's claim on ``folder``, and the folder itself when
    nothing else was written to it."""
    folder = Path(folder)
    try:
        (folder / CLAIM).unlink()
    except FileNotFoundError:
        pass
    try:
        folder.rmdir()  # only succeeds when empty
    except OSError:
        pass


def _owner_alive(claim: Path) -> bool:
    """Whether the process named in ``claim`` may still run (True unless it is
    on this machine and gone)."""
    try:
        host, pid = claim.read_text().split()
        pid_n = int(pid)
    except (OSError, ValueError):
        return True  # being written, or not ours to judge
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid_n, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def split_out(out: str | os.PathLike) -> tuple[Path, str]:
    """``--out DIR`` as (project, name): ``DIR`` itself when free, else ``DIR2``..."""
    path = Path(out).expanduser()
    return path.parent, path.name
