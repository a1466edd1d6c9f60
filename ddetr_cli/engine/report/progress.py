"""Progress reporting of the three loops.

The engine calls a :class:`Reporter`; :class:`NullReporter` ignores everything
(library use, non-main ranks); :class:`RichReporter` draws a per-epoch progress
bar and tables on a rich console (stderr), with the bar off when the console is
not interactive (one line per epoch instead). Prediction reports each image or
frame (``predict_record``) and each unreadable input (``predict_error``); the
CLI prints them.
"""

from __future__ import annotations

import time
from typing import Any


class Reporter:
    def info(self, message: str) -> None: ...
    def warn(self, message: str) -> None: ...
    def epoch_start(self, epoch: int, epochs: int, iters: int, done: int = 0) -> None: ...
    def step(self, values: dict[str, float]) -> None: ...
    def epoch_end(self, epoch: int, values: dict[str, float]) -> None: ...
    def eval_start(self, num_images: int) -> None: ...
    def eval_step(self, num_images: int) -> None: ...
    def eval_end(self, result: Any) -> None: ...
    def predict_start(self, num_items: int) -> None: ...
    def predict_record(self, record: Any) -> None: ...
    def predict_error(self, message: str) -> None: ...
    def close(self) -> None: ...


class NullReporter(Reporter):
    pass


_SHOW = ("loss", "loss_ce", "loss_bbox", "loss_giou")


class RichReporter(Reporter):
    """Rich progress on ``console``; ``interactive`` False -> plain lines."""

    def __init__(self, console, interactive: bool, quiet: bool = False) -> None:
        self.console = console
        self.interactive = interactive
        self.quiet = quiet
        self._progress = None
        self._task = None
        self._t0 = 0.0
        self._epoch_label = ""
        self._done = 0
        self._total = 0
        self._last_line = time.perf_counter()
        self.line_every_s = 60.0

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message)

    def warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/] {message}")

    def _start(self, label: str, total: int, done: int = 0) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.close()
        if not self.interactive or self.quiet:
            return
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[stats]}"),
            console=self.console,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(label, total=total, completed=done, stats="")

    def epoch_start(self, epoch: int, epochs: int, iters: int, done: int = 0) -> None:
        self._epoch_label = f"epoch {epoch + 1}/{epochs}"
        self._t0 = time.perf_counter()
        self._done, self._total = done, iters
        self._start(self._epoch_label, iters, done)

    def step(self, values: dict[str, float]) -> None:
        self._done += 1
        if self._progress is None:
            # plain mode (logs, pipes): one line a minute
            now = time.perf_counter()
            if not self.quiet and now - self._last_line >= self.line_every_s:
                self._last_line = now
                parts = [f"{k} {values[k]:.4f}" for k in _SHOW if k in values]
                rate = values.get("it_s", 0.0)
                self.console.print(f"{self._epoch_label} [{self._done}/{self._total}] " + "  ".join(parts)
                                   + (f"  lr {values['lr']:.1e}" if "lr" in values else "") + f"  {rate:.2f} it/s", highlight=False)
            return
        parts = [f"{k.removeprefix('loss_') if k != 'loss' else 'loss'} {values[k]:.3f}" for k in _SHOW if k in values]
        if "lr" in values:
            parts.append(f"lr {values['lr']:.1e}")
        if "it_s" in values:
            parts.append(f"{values['it_s']:.2f} it/s")
        if "data_share" in values:
            parts.append(f"data {values['data_share'] * 100:.0f}%")
        if values.get("mem_gb"):
            parts.append(f"mem {values['mem_gb']:.1f}G")
        self._progress.update(self._task, advance=1, stats="  ".join(parts))

    def epoch_end(self, epoch: int, values: dict[str, float]) -> None:
        self.close()
        if self.quiet:
            return
        parts = [f"{k} {values[k]:.4f}" for k in _SHOW if k in values]
        self.console.print(f"{self._epoch_label}: " + "  ".join(parts) + f"  ({time.perf_counter() - self._t0:.0f}s)", highlight=False)

    def eval_start(self, num_images: int) -> None:
        self._start("  validating", num_images)

    def eval_step(self, num_images: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=num_images)

    def eval_end(self, result: Any) -> None:
        self.close()
        if result is None or self.quiet:
            return
        for message in getattr(result, "unreadable", ()):
            self.warn(f"unreadable image scored with no detections: {message}")
        self.console.print(result.coverage, markup=False, highlight=False)
        self.console.print(result.summary, markup=False, highlight=False)
        self.console.print(stats_table(result))

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._task = None


def stats_table(result, title: str = "COCO bbox"):
    """A compact rich table of the first six COCO numbers (-1, "no ground truth of that size", as "n/a")."""
    from rich.table import Table

    from .metrics import STAT_NAMES

    table = Table(title=title, show_header=True, header_style="bold")
    for name in STAT_NAMES[:6]:
        table.add_column(name, justify="right")
    table.add_row(*[f"{v:.3f}" if v >= 0 else "n/a" for v in result.stats[:6]])  # -1: no objects of that size
    return table
