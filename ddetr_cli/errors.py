"""One error root for everything a user can get wrong.

Every expected failure (a missing file, a malformed config, an impossible
option, a model that cannot be mapped onto a dataset) raises a subclass of
:class:`DdetrError`, which is a ``ValueError``. The message is one line and
names the file or entry at fault. ``param`` names the offending parameter of
the Python entry point (``"device"``, ``"weights"``, ``"epochs"``...) when
there is one; messages that mention other parameters write them in backticks
(```lr```). The CLI catches this one type and turns parameter names into its
flags in one place (:mod:`ddetr_cli.cli.errors`); nothing below the CLI
names a flag.

Imports nothing, so every layer may use it.
"""

from __future__ import annotations


class DdetrError(ValueError):
    """An expected, user-facing error: a one-line message and, optionally, the
    name of the parameter at fault."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ConfigError(DdetrError):
    """A configuration file (dataset YAML, training or model config) that is
    missing, malformed or names things that do not exist."""


class DatasetError(DdetrError):
    """A dataset (annotation file or image folder) that cannot be used as is."""


class ImageReadError(DdetrError):
    """An image that is missing, unreadable or not decodable."""


class CheckpointError(DdetrError):
    """A weights file that is missing, corrupt or of an unexpected layout."""


class HubError(CheckpointError):
    """Weights named by hub id or short name that could not be fetched or found
    in the Hugging Face cache. One line naming the repository and how to get
    the files by hand."""


class OnnxRuntimeMissing(CheckpointError):
    """An ``.onnx`` model was given but onnxruntime is not installed."""


class ExportError(DdetrError):
    """An export (or its onnxruntime self-check) that failed or cannot start."""


class DeviceError(DdetrError):
    """The requested device does not exist here."""


class MatchingError(DdetrError):
    """The matching cost matrix holds NaN/inf values (usually: the model diverged)."""


class ClassMismatchError(DdetrError):
    """A model's classes cannot be mapped onto a dataset's categories."""


class TrainConfigError(ConfigError):
    """A training option with a bad value or an unknown name."""


class RunError(DdetrError):
    """A run request that cannot start: arguments that do not fit together, no
    checkpoint to resume, a finished run, an occupied run folder. ``usage``:
    the arguments themselves are wrong (the CLI shows its usage)."""

    def __init__(self, message: str, *, param: str | None = None, usage: bool = False) -> None:
        super().__init__(message, param=param)
        self.usage = usage


class OutputError(DdetrError):
    """An output that cannot be written: a folder that is not writable, a full
    disk. The message names the path; what was there before is kept."""


class TrainingError(DdetrError):
    """Training cannot continue (diverged, out of memory, ...)."""
