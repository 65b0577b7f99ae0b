"""Test helper callback: send a signal (SIGKILL by default) to the training process right after a
given global step."""

import os
import signal

from pytorch_lightning import Callback


class KillAtStep(Callback):
    def __init__(self, step: int = 7, signal_name: str = "SIGKILL"):
        self.step, self.signal = step, getattr(signal, signal_name)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signal)
