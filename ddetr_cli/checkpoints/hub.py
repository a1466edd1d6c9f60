"""Weights by name: Hugging Face hub ids and ddetr's short names.

A weights *source* is one of

* a local path (file or folder), as before;
* a short name for an official COCO model (:data:`SHORT_NAMES`: ``r50``,
  ``r50-refine``, ``r50-two-stage``);
* a hub id ``owner/name``, optionally ``owner/name@revision`` (a branch, tag or
  commit).

Hub files go through ``huggingface_hub`` into the standard Hugging Face cache
(``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``),
with its progress bars on stderr; ``HF_HUB_OFFLINE=1`` uses the cache only. The
environment is read at each call, not at import. Only ``config.json`` and one
weights file are fetched: ``model.safetensors`` when the revision has it, else
``pytorch_model.bin`` (read with ``weights_only=True``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import HubError

SHORT_NAMES: dict[str, str] = {
    "r50": "SenseTime/deformable-detr",
    "r50-refine": "SenseTime/deformable-detr-with-box-refine",
    "r50-two-stage": "SenseTime/deformable-detr-with-box-refine-two-stage",
}
"""The three official COCO models (R50 backbone, 300 queries), as published by
the paper's authors on the Hugging Face hub: 43.8, 45.4 and 46.2 box AP on COCO
val2017 (the paper's Table 1)."""

DEFAULT_MODEL = "r50-two-stage"
"""What ``ddetr predict`` uses without ``weights``: the most accurate of the
three (46.2 AP) at nearly the same cost (the two-stage head adds a linear layer
over the encoder tokens and a top-k)."""

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_LOCAL_SUFFIXES = {".pt", ".pth", ".bin", ".safetensors", ".onnx", ".json", ".ckpt", ".tar"}
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")


# A fetch that fails (offline, network, gated) carries no parameter: the value is
# fine, the machine is not; the CLI shows one `Error:` line (exit 1), not usage.
# A repository or revision that does not exist is a bad `weights` value.


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None = None
    short_name: str | None = None

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        name = f"{self.repo_id}{rev}"
        return f"{self.short_name} ({name})" if self.short_name else name


@dataclass(frozen=True)
class Resolved:
    """Where a weights source lives on disk, and where it came from."""

    path: Path
    hub: HubRef | None = None

    def describe(self) -> str:
        if self.hub is None:
            return str(self.path)
        return f"{self.hub} from {self.path}"


def parse_source(source: str | os.PathLike) -> HubRef | None:
    """The hub reference ``source`` names, or None when it is a local path.

    A path that exists always wins. Otherwise a short name or ``owner/name[@rev]``
    is a hub reference, unless it looks like a file path (``./``, ``~``, ``..``,
    absolute, more than one ``/``, or a weights suffix such as ``.pt``)."""
    text = os.fspath(source)
    if Path(text).expanduser().exists():
        return None
    name, _, rev = text.partition("@")
    if name in SHORT_NAMES:
        return HubRef(SHORT_NAMES[name], rev or None, name)
    if text.startswith((".", "~", "/")) or Path(name).suffix.lower() in _LOCAL_SUFFIXES:
        return None
    m = _HUB_ID.match(text)
    if m is None:
        return None
    return HubRef(m.group("repo"), m.group("rev"), None)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def is_offline() -> bool:
    return _truthy(os.environ.get("HF_HUB_OFFLINE"))


def cache_dir() -> Path:
    """The hub cache folder as ``huggingface_hub`` resolves it, read now."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def manual_hint(ref: HubRef) -> str:
    rev = f" --revision {ref.revision}" if ref.revision else ""
    return (f"get the files by hand with `hf download {ref.repo_id} config.json pytorch_model.bin{rev}` "
            f"(into the cache, then it works offline), or download them to a folder DIR and pass `weights` DIR")


def download(ref: HubRef) -> Path:
    """The local snapshot folder holding ``config.json`` and a weights file of
    ``ref``, downloading what the cache lacks. Raises :class:`HubError`."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:  # pragma: no cover - a declared dependency
        raise HubError(f"{ref}: loading weights by name needs huggingface_hub (pip install huggingface_hub); "
                       "or download the files to a folder DIR and pass `weights` DIR") from None
    offline = is_offline()
    where = "the cache" if offline else "the hub"

    def fetch(filename: str) -> Path | None:
        try:
            return Path(hf_hub_download(ref.repo_id, filename, revision=ref.revision, cache_dir=cache_dir(),
                                        local_files_only=offline))
        except LocalEntryNotFoundError:
            if offline:
                return None
            raise
        except EntryNotFoundError:  # the revision has no such file (remote 404)
            return None

    try:
        config = fetch("config.json")
        if config is None:
            raise LocalEntryNotFoundError("config.json")
        for name in WEIGHT_FILES:
            weights = fetch(name)
            if weights is not None:
                if weights.parent != config.parent:  # one revision, one snapshot folder
                    raise HubError(f"{ref}: config.json and {name} resolved to different snapshots "
                                   f"({config.parent} vs {weights.parent}); remove the cache entry and retry")
                return config.parent
        raise HubError(f"{ref}: {where} has config.json but none of {', '.join(WEIGHT_FILES)} "
                       f"in {cache_dir()}; {manual_hint(ref)}")
    except HubError:
        raise
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set and the files are not" if offline else "the hub could not be reached and the files are not"
        raise HubError(f"{ref}: {why} in the cache {cache_dir()}; {manual_hint(ref)}") from None
    except GatedRepoError:
        raise HubError(f"{ref}: the repository is gated; accept its terms on huggingface.co and log in "
                       f"(`hf auth login`), or {manual_hint(ref)}") from None
    except RepositoryNotFoundError:
        raise HubError(f"{ref}: no such repository on the hub (or it is private); check the id, "
                       f"or pass a local file or folder as `weights`; short names: {', '.join(SHORT_NAMES)}",
                       param="weights") from None
    except RevisionNotFoundError:
        raise HubError(f"{ref}: no such revision {ref.revision!r}; {manual_hint(ref)}", param="weights") from None
    except (OSError, ValueError) as exc:  # network errors, HTTP errors, a bad id
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HubError(f"{ref}: download failed ({first}); {manual_hint(ref)}") from None


def resolve(source: str | os.PathLike) -> Resolved:
    """``source`` as a local path: itself, or the cache snapshot of the hub model
    it names (fetched if needed)."""
    ref = parse_source(source)
    if ref is None:
        return Resolved(Path(source).expanduser())
    return Resolved(download(ref), ref)
