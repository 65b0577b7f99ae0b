"""Test helper callback: the module checks its loss one step late, as it does on a GPU (see
``CaptionModule._check_loss``), here on the CPU."""

from pytorch_lightning import Callback


class DeferLossCheck(Callback):
    def setup(self, trainer, pl_module, stage):
        pl_module._DEFERRED_LOSS_CHECK = (pl_module.device.type,)
