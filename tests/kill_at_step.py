"""Test helper callback: send a signal (SIGKILL by default) to the training process right after a
given global step; with ``mid_window``, after the first batch at that step that only accumulated
gradients (no optimizer step), i.e. inside a gradient-accumulation window. Under DDP every rank
signals itself (as a scheduler signals every task), or with ``rank`` only that global rank."""

import os
import signal

from pytorch_lightning import Callback


class KillAtStep(Callback):
    def __init__(self, step: int = 7, signal_name: str = "SIGKILL", mid_window: bool = False, rank: int | None = None):
        self.step, self.signal, self.mid_window, self.rank = step, getattr(signal, signal_name), mid_window, rank
        self._step_before = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        stepped = trainer.global_step != self._step_before
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        if trainer.global_step == self.step and not (self.mid_window and stepped):
            os.kill(os.getpid(), self.signal)
