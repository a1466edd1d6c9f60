"""The metrics log of a training run: one CSV row per epoch (losses, lr, the
first six COCO numbers, time) in ``metrics.csv``, redrawn as ``results.png``
after every row. The training loop keeps the rows in ``last.pt`` and rewrites
the whole file from them (:meth:`MetricsLog.write`), atomically: a kill never
leaves a half row, and a resume drops rows written after its checkpoint."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...checkpoints.io import atomic_write_text

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")  # COCOeval order
LOSS_COLUMNS = ("loss", "loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error")
CSV_COLUMNS = ("epoch", *LOSS_COLUMNS, "lr", *STAT_NAMES[:6], "time")


def _default_plot() -> Callable[[Path, Path], Any] | None:
    try:
        from .plots import plot_results
    except ImportError:
        return None
    return plot_results


class MetricsLog:
    """``append(row)`` adds a row to ``run_dir/metrics.csv`` (atomically) and
    redraws ``results.png``; a plot that fails is reported through ``warn``,
    never raised."""

    def __init__(self, run_dir: Path, *, plot: bool = True, warn: Callable[[str], None] | None = None) -> None:
        self.path = Path(run_dir) / "metrics.csv"
        self.png = Path(run_dir) / "results.png"
        self.plot_fn = _default_plot() if plot else None
        self.warn = warn or (lambda message: None)

    def append(self, row: dict[str, Any]) -> None:
        old = self.path.read_text(encoding="utf-8") if self.path.is_file() else ""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        if not old:
            writer.writeheader()
        writer.writerow({k: _fmt(row.get(k, "")) for k in CSV_COLUMNS})
        atomic_write_text(self.path, old + buf.getvalue())
        self._plot()

    def read(self) -> list[dict[str, Any]]:
        """The rows of ``metrics.csv`` (values as text), [] when there is none."""
        if not self.path.is_file():
            return []
        return list(csv.DictReader(io.StringIO(self.path.read_text(encoding="utf-8"))))

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Writes ``metrics.csv`` as exactly ``rows`` (header first), atomically."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k, "")) for k in CSV_COLUMNS})
        atomic_write_text(self.path, buf.getvalue())
        if rows:
            self._plot()

    def _plot(self) -> None:
        if self.plot_fn is not None:
            try:
                self.plot_fn(self.path, self.png)
            except Exception as exc:  # a plot must never stop training
                self.warn(f"could not draw {self.png.name}: {exc}")


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v
