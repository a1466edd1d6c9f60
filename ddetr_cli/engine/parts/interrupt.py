"""Deferred Ctrl-C: the training loop stops between two optimizer steps.

Inside ``with GracefulInterrupt(device):`` the first SIGINT only sets a flag
(the loop then saves a checkpoint and stops); a second SIGINT raises
KeyboardInterrupt at once. Under DDP the flag is OR-ed over processes so every
rank stops at the same step. Outside the main thread it does nothing.
"""

from __future__ import annotations

import signal
import threading

import torch

from . import distributed as dist_utils


class GracefulInterrupt:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.flag = False
        self._previous = None
        self._installed = False

    def _handler(self, signum, frame) -> None:
        if self.flag:  # second Ctrl-C: give up waiting for the step
            raise KeyboardInterrupt
        self.flag = True

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def requested(self) -> bool:
        """True on every rank when any rank got a Ctrl-C (a collective under DDP)."""
        if not dist_utils.is_initialized():
            return self.flag
        t = torch.tensor([1.0 if self.flag else 0.0], device=self.device)
        dist_utils.all_reduce_sum(t)
        return bool(t.item() > 0)
