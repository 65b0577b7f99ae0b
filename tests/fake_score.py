"""Test helper callback: the module logs ``value`` for a validation metric (default ``val/cider_d``) instead
of the score it measured, to make a validation worse or better than the best so far on purpose."""

from pytorch_lightning import Callback


class FakeScore(Callback):
    def __init__(self, value: float, name: str = "val/cider_d"):
        self.value, self.name = value, name

    def setup(self, trainer, pl_module, stage):
        log = pl_module.log

        def faked(name, value, *args, **kwargs):
            return log(name, self.value if name == self.name else value, *args, **kwargs)

        pl_module.log = faked
