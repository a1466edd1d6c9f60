"""Options shared by the commands: one definition each, so the same option
means the same thing, with the same short form, on every command.

``-w/--weights``   model weights: a path, a hub id or a short name (train: the
                   checkpoint to fine-tune from)
``--imgsz``        shorter side the model sees at inference; train also uses it
                   as its largest multi-scale training size
``--max-size``     cap on the longer side after resizing
``--batch-size``   images per batch (train: per process and step)
``--device``       auto | cpu | cuda | cuda:N
``--amp``          off | auto | bf16 | fp16 mixed precision
``--workers``      DataLoader worker processes
"""

from __future__ import annotations

import click

from ..engine.parts.amp import AMP_MODES

DEVICE_HELP = "auto | cpu | cuda | cuda:N"
IMGSZ_HELP = "Shorter side the images are resized to (default: the size the model was trained at, else 800)."
MAX_SIZE_HELP = "Cap on the longer side after resizing (default: the training value, else 1333)."


# ddetr_cli.checkpoints.hub.SHORT_NAMES, spelled out: importing it would load torch
# on `ddetr --help` (tests/test_hub.py checks the two agree).
SHORT_NAMES = ("r50", "r50-refine", "r50-two-stage")
WEIGHTS_SOURCES = (f"a Hugging Face hub id (owner/name[@revision]) or a short name: {', '.join(SHORT_NAMES)} "
                   "(the official COCO models, fetched into the Hugging Face cache)")


def weights(help: str, required: bool = False):
    """``-w/--weights``; ``help`` says what the weights are for, the accepted
    hub ids and short names are appended."""
    return click.option("-w", "--weights", required=required, default=None, metavar="W",
                        help=f"{help.rstrip('.')}; or {WEIGHTS_SOURCES}.")


def device(default: str | None = "auto"):
    return click.option("--device", default=default, show_default=default is not None, help=DEVICE_HELP)


def imgsz(help: str = IMGSZ_HELP):
    return click.option("--imgsz", type=click.IntRange(16), default=None, metavar="PIXELS", help=help)


def max_size(help: str = MAX_SIZE_HELP):
    return click.option("--max-size", "max_size", type=click.IntRange(16), default=None, metavar="PIXELS", help=help)


def batch_size(default: int | None, help: str = "Images per batch."):
    return click.option("--batch-size", "batch_size", type=click.IntRange(1), default=default,
                        show_default=default is not None, help=help)  # fmt: skip


def amp(default: str | None = "off"):
    return click.option("--amp", type=click.Choice(AMP_MODES), default=default, show_default=default is not None,
                        help="Mixed precision (autocast dtype). On a CPU fp16 means bf16, which runs only where the "
                             "CPU has native bf16 (else float32, with a warning; DDETR_CPU_BF16=1 forces bf16); "
                             "auto: bf16 on such CPUs, else off.")  # fmt: skip


def workers(default: int | None):
    return click.option("--workers", type=click.IntRange(0), default=default, show_default=default is not None,
                        help="DataLoader worker processes.")  # fmt: skip


class LazyChoice(click.Choice):
    """A ``click.Choice`` whose values are read from their home on first use
    (``ddetr_cli.models`` loads torch: ``ddetr --help`` must not)."""

    def __init__(self, load) -> None:
        self._load = load
        self.case_sensitive = True

    @property
    def choices(self):
        return tuple(self._load())


def _variants():
    from ..models.config import VARIANTS

    return VARIANTS


def variant():
    return click.option("--variant", type=LazyChoice(_variants), default=None,
                        help="Deformable DETR variant (default: the preset's).")  # fmt: skip
