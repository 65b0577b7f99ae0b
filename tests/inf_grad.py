"""Test helper callback: one gradient becomes inf just before the optimizer step of a given global step, as
an overflowing backward would make it. The loss of that step is finite; AdamW then writes NaN weights."""

from pytorch_lightning import Callback


class InfGradAtStep(Callback):
    def __init__(self, step: int = 11):
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            p = next(p for p in pl_module.parameters() if p.grad is not None)
            p.grad.view(-1)[0] = float("inf")
