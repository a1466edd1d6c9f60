"""Safe, atomic checkpoint file I/O.

Writes go to a temporary file in the destination folder (``.NAME.XXXXXXXX.tmp``),
are flushed to disk and renamed over the target, so a crash mid-save never
leaves a corrupt file; the file gets the permissions the umask gives a new file
(0644 under the usual 022). A temp file that a kill -9 left behind is removed
by :func:`remove_stale_temps` on the next start. A full disk is one line that
says the previous file is intact. Reads use ``torch.load(weights_only=True)``:
no arbitrary unpickling.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, OutputError

_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # what tempfile.mkstemp(prefix=".NAME.", suffix=".tmp") makes
_umask_lock = threading.Lock()


def file_mode() -> int:
    """The mode the umask gives a new file (0o644 under umask 022)."""
    with _umask_lock:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Calls ``write(tmp_path)`` then renames tmp_path over ``path``. A full
    disk (or any other OS error) raises :class:`OutputError` naming ``path``;
    the previous file is left as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise _output_error(path, exc) from None
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode())  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, (OSError, RuntimeError)) and _is_write_failure(exc):
            raise _output_error(path, exc) from None
        raise
    return path


def _is_write_failure(exc: BaseException) -> bool:
    """An OSError, or torch.save's RuntimeError from its C++ file writer."""
    if isinstance(exc, OSError):
        return True
    text = str(exc)
    return "No space left" in text or "inline_container" in text or "file write failed" in text


def _output_error(path: Path, exc: BaseException) -> OutputError:
    no_space = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc) \
        or "file write failed" in str(exc)
    keep = "; the previous file is intact" if path.exists() else ""
    if path.suffix in (".pt", ".pth") and keep:
        keep = "; the previous checkpoint is intact"
    if no_space:
        return OutputError(f"no space left on device while writing {path}{keep}")
    if isinstance(exc, PermissionError):
        return OutputError(f"cannot write {path}: permission denied")
    reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return OutputError(f"cannot write {path}: {reason}{keep}")


def check_writable(path: str | os.PathLike) -> None:
    """Raises :class:`OutputError` unless a file can be written as ``path``
    (its folder is created; a probe file is written there and removed)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise _output_error(path, exc) from None


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Removes the temp files an interrupted :func:`atomic_write` left in
    ``folder`` (``.NAME.XXXXXXXX.tmp``); returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for f in folder.iterdir():
        if _TEMP_NAME.match(f.name) and f.is_file():
            try:
                f.unlink()
                removed.append(f)
            except OSError:
                pass
    return removed


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    return atomic_write(path, _write)


def safe_torch_load(path: str | os.PathLike, *, allow: tuple = ()) -> Any:
    """``torch.load(weights_only=True)`` on the CPU; ``allow`` adds classes to the
    unpickling allow-list for this call only. Errors name the file."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        if allow:
            with torch.serialization.safe_globals(list(allow)):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: {_unpickling_message(str(exc))}") from None
    except Exception as exc:  # noqa: BLE001 - random bytes fail inside the unpickler in many ways (IndexError, KeyError, ...)
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_cause(exc)})") from None


_GLOBAL = re.compile(r"unsupported (?:global: )?GLOBAL ([\w.]+)", re.I)
_ADVICE = re.compile(r"weights_only|Re-running|torch\.load|safe_globals|add_safe_globals|trust", re.I)


def _unpickling_message(text: str) -> str:
    """torch's weights_only refusal -> one line naming the rejected global, with
    none of torch's advice to load with weights_only=False."""
    found = _GLOBAL.search(text)
    if found:
        return (f"refused to load (safe weights_only loading): the file asks for {found.group(1)}, and a checkpoint "
                "may only hold tensors and plain data; nothing in it was run")
    detail = next((line.strip() for line in text.splitlines() if line.strip() and not _ADVICE.search(line)), "")
    return "not a readable PyTorch checkpoint" + (f" ({detail})" if detail else " (corrupt or not a checkpoint)")


def _first_cause(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not _ADVICE.search(line)]
    return lines[0] if lines else type(exc).__name__
