"""Test helper callback: send a signal (SIGKILL by default) to the training process right after a
given global step; with ``mid_window``, after the first batch at that step that only accumulated
gradients (no optimizer step), i.e. inside a gradient-accumulation window; with ``val_batch``, after
that batch of the first validation at that step instead. Under DDP every rank signals itself (as a
scheduler signals every task), or with ``rank`` only that global rank."""

import os
import signal

from pytorch_lightning import Callback


class KillAtStep(Callback):
    def __init__(
        self,
        step: int = 7,
        signal_name: str = "SIGKILL",
        mid_window: bool = False,
        rank: int | None = None,
        val_batch: int | None = None,
    ):
        self.step, self.signal, self.mid_window, self.rank = step, getattr(signal, signal_name), mid_window, rank
        self.val_batch = val_batch
        self._step_before = -1

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.val_batch is None or trainer.sanity_checking or trainer.global_step != self.step:
            return
        if batch_idx == self.val_batch and (self.rank is None or trainer.global_rank == self.rank):
            os.kill(os.getpid(), self.signal)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.val_batch is not None:
            return
        stepped = trainer.global_step != self._step_before
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        if trainer.global_step == self.step and not (self.mid_window and stepped):
            os.kill(os.getpid(), self.signal)
