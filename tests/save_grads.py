"""Test helper callback: save the gradients of the first optimizer step (after the accumulation window, before
clipping and the step) to ``path``, as {parameter name: gradient}."""

import torch
from pytorch_lightning import Callback


class SaveGrads(Callback):
    def __init__(self, path: str = "grads.pt"):
        self.path = path

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0 and trainer.is_global_zero:
            grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
            torch.save(grads, self.path)
