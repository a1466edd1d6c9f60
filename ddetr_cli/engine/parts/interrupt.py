"""Deferred stop requests: the training loop stops between two optimizer steps.

Inside ``with GracefulInterrupt(device):`` the first SIGINT (Ctrl-C), SIGTERM
(what SLURM and Kubernetes send before killing a job) or SIGUSR1 (SLURM's
``--signal`` warning) only sets a flag; the loop then saves a checkpoint and
stops. A second signal raises KeyboardInterrupt at once. Under DDP the flag is
OR-ed over processes so every rank stops at the same step and they agree on
the save. Outside the main thread it does nothing.

Outside the training loop (start-up, final evaluation) :func:`stop_signals_raise`
turns SIGTERM / SIGUSR1 into :class:`StopSignal`, so a command can end with
its own one-line message instead of being killed silently.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import torch

from . import distributed as dist_utils

# The signals that ask for a save-and-stop (SIGUSR1 does not exist on Windows).
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name)
)


class GracefulInterrupt:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.flag = False
        self.signal_name: str | None = None  # the first stop signal received ("SIGTERM", ...)
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        if self.flag:  # second signal: give up waiting for the step
            raise KeyboardInterrupt
        self.flag = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def requested(self) -> bool:
        """True on every rank when any rank got a stop signal (a collective under DDP)."""
        if not dist_utils.is_initialized():
            return self.flag
        t = torch.tensor([1.0 if self.flag else 0.0], device=self.device)
        dist_utils.all_reduce_sum(t)
        return bool(t.item() > 0)


class StopSignal(KeyboardInterrupt):
    """SIGTERM or SIGUSR1 outside the training loop (nothing to save there)."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Inside: SIGTERM and SIGUSR1 raise :class:`StopSignal` (main thread only)."""
    def _raise(signum, frame) -> None:
        raise StopSignal(signal.Signals(signum).name)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            if sig != signal.SIGINT:
                previous[sig] = signal.signal(sig, _raise)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
