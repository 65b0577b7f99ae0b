"""Command line for training: a LightningCLI that wires data to model and scores the test split.

- ``model.vocab`` comes from the data module's training captions; ``model.image_size``,
  ``model.mean`` and ``model.std`` from its preprocessing, so the checkpoint carries them.
- ``fit`` ends by testing the best checkpoint and writing ``test_metrics.json`` in the run
  directory, whose path is printed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
from pytorch_lightning.cli import LightningCLI

from captioning.checkpoint_io import CheckpointError, atomic_torch_save, load_weights_only
from captioning.data.datamodule import CaptionDataModule
from captioning.lit_module import CaptionModule

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "shapes.yaml"


class SafeCheckpointIO(CheckpointIO):
    """Lightning checkpoint plugin: atomic saves, ``weights_only=True`` loads (see captioning.checkpoint_io)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> Any:
        return load_weights_only(path, map_location=map_location or "cpu")

    def remove_checkpoint(self, path: str | Path) -> None:
        Path(path).unlink(missing_ok=True)


class CaptionCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # fit, validate and test; captioning new images is infer.py's job (the module has no
        # predict_step, and Lightning's predict would fail after loading everything)
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=True, help="score the test split after fit")
        parser.link_arguments("data.image_size", "model.image_size")
        parser.link_arguments("data.mean", "model.mean")
        parser.link_arguments("data.std", "model.std")
        parser.link_arguments("data.vocab_tokens", "model.vocab", apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # after parsing, ckpt_path is the same whether a flag or a config file gave it; and before LightningCLI
        # reads the checkpoint's hyperparameters into the config (its own torch.load, which would meet an
        # untrusted file first, and would skip "last", which is no file)
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else self.config
        if config is not None and "ckpt_path" in config:
            config.ckpt_path = resolve_ckpt_path(config.ckpt_path, subcommand)

    def instantiate_trainer(self, **kwargs: Any):
        # the checkpoint plugin joins here, not through ``trainer_defaults``: a default is written into
        # the run's config.yaml, where an instance becomes "Unable to serialize instance ...", and
        # `python train.py fit -c runs/.../config.yaml` could then not read the run's own config back
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(SafeCheckpointIO())
        return super().instantiate_trainer(**{**kwargs, "plugins": plugins})

    def before_fit(self) -> None:
        # fix the logger's version (its run directory) now: with a spawning strategy (ddp_spawn)
        # each spawn would otherwise pick the next free version, and the test after fit would
        # write its results into a new folder instead of beside the checkpoints
        for logger in self.trainer.loggers:
            _ = logger.version

    def after_fit(self) -> None:
        trainer = self.trainer
        ckpt = trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_path", "") if ckpt else ""
        if best and not Path(best).is_file():  # e.g. a path restored from another run's checkpoint
            print(f"best checkpoint {best} is not there; testing the final weights instead", file=sys.stderr)
            best = ""
        if self.config.fit.test_after_fit and not trainer.interrupted:
            trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None, verbose=True)
        run = Path(trainer.log_dir or ".").resolve()  # log_dir is a collective under DDP: every rank asks
        if trainer.is_global_zero:
            print(f"\nrun directory: {run}")
            if best:
                print(f"best checkpoint: {Path(best).resolve()}")
            if (run / "test_metrics.json").exists():
                print(f"test metrics: {run / 'test_metrics.json'}")


def resolve_ckpt_path(ckpt_path: str | None, subcommand: str | None = "fit") -> str | None:
    """``ckpt_path`` as the command line or a config file gave it, resolved and checked before anything else
    touches it (the data, the model, the run directory): "last" is the newest ``last.ckpt`` under ./runs, and
    a missing, truncated or untrusted file ends the program with an error naming it."""
    if ckpt_path is not None:
        ckpt_path = str(ckpt_path)
    if ckpt_path == "last":
        # Lightning would look for "last" only in the new run's folder and, finding nothing, start
        # afresh in silence; here it means the newest last.ckpt of any run under ./runs.
        found = sorted(Path("runs").glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            sys.exit("error: ckpt_path last: no last.ckpt under runs/ to resume from")
        ckpt_path = str(found[-1])
        print(f"{'resuming from' if subcommand == 'fit' else 'using'} {ckpt_path}", file=sys.stderr)
    if ckpt_path and ckpt_path not in ("best", "hpc", "registry"):
        try:
            load_weights_only(ckpt_path)
        except CheckpointError as e:
            sys.exit(f"error: {e}")
    return ckpt_path


def with_default_config(argv: list[str]) -> list[str]:
    """A subcommand without ``-c``/``--config`` gets ``configs/shapes.yaml`` as its base, so
    ``python train.py fit --trainer.max_epochs 5`` is the default recipe with one change (its runs
    folder, checkpoints and seed), not Lightning's bare defaults. Flags after it still override it."""
    given = any(a in ("-c", "--config") or a.startswith("--config=") for a in argv)
    if argv and argv[0] in ("fit", "validate", "test") and not given:
        return [argv[0], "--config", str(DEFAULT_CONFIG), *argv[1:]]
    return argv


def main(args: list[str] | None = None) -> CaptionCLI:
    """``python train.py`` alone = ``fit`` with ``configs/shapes.yaml``; a subcommand without a config
    starts from it too (:func:`with_default_config`)."""
    if args is None and not sys.argv[1:]:
        args = ["fit", "--config", str(DEFAULT_CONFIG)]
    argv = list(sys.argv[1:] if args is None else args)
    based = with_default_config(argv)
    if based != argv:
        print(f"no --config given: {DEFAULT_CONFIG.name} is the base, the flags change it", file=sys.stderr)
        argv = based
        if args is None:  # in sys.argv, which LightningCLI reads, and DDP's relaunch of rank 1 runs again
            sys.argv[1:] = argv
        else:
            args = argv
    # args=None: LightningCLI reads sys.argv itself (passing both makes it warn)
    return CaptionCLI(
        CaptionModule,
        CaptionDataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
    )
