"""Command line for training: a LightningCLI that wires data to model and scores the test split.

- ``model.vocab`` comes from the data module (built from its training captions, or ``data.vocabulary``
  when that is set); ``model.image_size``, ``model.mean`` and ``model.std`` from its preprocessing, so
  the checkpoint carries them.
- ``fit`` ends by testing the best checkpoint and writing ``test_metrics.json`` in the run
  directory, whose path is printed.
- ``fit --ckpt_path`` (a path, or "last" for the newest ``runs/**/last.ckpt``; the flag or the config
  key) continues the run the checkpoint belongs to, in its run directory: the best score so far and
  ``best.ckpt`` carry on (a worse validation does not replace it), and ``metrics.csv`` keeps the rows
  of the steps before the checkpoint.
- ``validate``/``test --ckpt_path`` use the checkpoint's vocabulary (``data.vocabulary``), not one built from
  the data's training captions, so a model can be scored on another dataset.
- With ``--ckpt_path`` (fit, validate, test) the model's options come from the checkpoint, over those of
  the config files, so a run's checkpoint is read with the model it was trained as; ``--model.*`` flags
  on the command line still win over both (``test --ckpt_path best.ckpt --model.beam_size 5``). An
  architecture flag the checkpoint's weights do not have is refused, naming both sides.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import json
import os
import re
import shutil
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytorch_lightning as pl
from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import CSVLogger

from captioning.checkpoint_io import CheckpointError, atomic_torch_save, load_weights_only
from captioning.data.datamodule import CaptionDataModule
from captioning.errors import InputError, NonFiniteLossError
from captioning.lit_module import FIT_END_EPOCH, FIT_END_STEP, SIGTERM_EXIT, CaptionModule, check_model_options
from captioning.options import check_ranges

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "shapes.yaml"

#: Trainer options where an int counts batches and a float is a fraction of them. Lightning types them
#: ``Optional[Union[int, float]]``, but typing caches unions as equal whatever their order, so the
#: parser may get an earlier ``Union[float, int, None]``; jsonargparse tries the types in order, and
#: ``--trainer.limit_val_batches 1`` (one batch), in a config file too, became 1.0 (every batch).
COUNT_OR_FRACTION = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")


class SafeCheckpointIO(CheckpointIO):
    """Lightning checkpoint plugin: atomic saves, ``weights_only=True`` loads (see captioning.checkpoint_io)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> Any:
        return load_weights_only(path, map_location=map_location or "cpu")

    def remove_checkpoint(self, path: str | Path) -> None:
        Path(path).unlink(missing_ok=True)


class RunConfigCallback(SaveConfigCallback):
    """Writes a fit's ``config.yaml`` without its ``ckpt_path``: a resumed run writes into the run directory it
    continues, and ``python train.py fit -c runs/.../config.yaml`` must still train that configuration
    again, not resume the run a second time."""

    #: what a run directory holds before the run has done anything: a run refused then leaves no folder behind
    _SET_UP_ONLY = frozenset(["config.yaml", "hparams.yaml"])

    started = False
    #: a fit resumed from a checkpoint (set by CaptionCLI.before_fit, which also takes ckpt_path out of the config)
    resuming = False
    #: (trainer, module, stage) of a resume whose config.yaml waits for the checkpoint's restore (see setup)
    _deferred: tuple | None = None

    def forget_ckpt_path(self) -> None:
        """Take ``ckpt_path`` out of the config this writes, for every stage of a fit command: under ddp_spawn the
        test after fit is set up from the main process's copy of this callback, whose fit stage never ran here, and
        its config.yaml kept the ckpt_path (so ``fit -c`` of it resumed the run again)."""
        if self.config.get("ckpt_path") is not None:
            self.config = self.config.clone()
            self.config.ckpt_path = None
            self.resuming = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.resuming:
            if self.save_to_log_dir and not self.already_saved:
                # a resume into the run's own directory writes its config.yaml once the checkpoint is restored and a
                # loop starts: written now, a resume then refused (another decoder, other data) left config.yaml
                # saying what was refused, and `fit -c runs/.../config.yaml` trained that
                log_dir = trainer.log_dir  # a collective under DDP: every rank asks
                continued = bool(log_dir) and os.path.isfile(os.path.join(log_dir, self.config_filename))
                if trainer.strategy.broadcast(continued):  # rank 0's file system decides, for every rank
                    self._deferred = (trainer, pl_module, stage)
                    return
        super().setup(trainer, pl_module, stage)

    def _started(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = True
        deferred, self._deferred = self._deferred, None
        if deferred is not None:
            super().setup(*deferred)
        if trainer.is_global_zero:  # a resume's metrics.csv as it was: no longer needed once a loop runs
            for path in _metrics_files(trainer):
                _resume_rows_file(path).unlink(missing_ok=True)

    on_sanity_check_start = on_train_start = on_validation_start = on_test_start = _started

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # a run refused as it starts (a checkpoint prepared for other images, cosine without an end, ...) left a
        # runs/<name>/version_N holding its config.yaml alone, and moved every later run's version number. Only
        # before any loop began: a run stopped later keeps its folder, with whatever its loggers still write
        # one process only: under ddp_spawn this is the main process's copy, which never sees a loop start
        if self.started:
            return
        # a resume refused before any loop: the run's metrics.csv back as it was, with the rows of the steps from the
        # checkpoint's on (the test after fit's among them), which the resume had dropped to log them again. Under
        # ddp_spawn too: rank 0 deletes the file aside as its loop starts, so it is there only if none started
        if trainer.is_global_zero:
            put_back_resume_rows(trainer)
        if trainer.world_size > 1:
            return
        for new in getattr(self, "new_run_dirs", ()):
            if new.is_dir() and {p.name for p in new.iterdir()} <= self._SET_UP_ONLY:
                shutil.rmtree(new, ignore_errors=True)


def put_back_resume_rows(trainer: pl.Trainer) -> None:
    """A resume that ran no loop: each CSV logger's ``metrics.csv`` back as it was before the resume (kept aside by
    :func:`_keep_metrics_before` until a loop starts)."""
    for path in _metrics_files(trainer):
        if _resume_rows_file(path).is_file():
            os.replace(_resume_rows_file(path), path)


def _metrics_files(trainer: pl.Trainer) -> list[Path]:
    """The ``metrics.csv`` of each of the trainer's CSV loggers that has a folder."""
    return [Path(lg.log_dir) / "metrics.csv" for lg in trainer.loggers if isinstance(lg, CSVLogger) and lg.log_dir]


class CaptionCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # fit, validate and test; captioning new images is infer.py's job (the module has no
        # predict_step, and Lightning's predict would fail after loading everything)
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=True, help="score the test split after fit")
        for target, source in LINKED_FROM_DATA.items():
            parser.link_arguments(source, f"model.{target}", apply_on="instantiate" if target == "vocab" else "parse")
        counts = {f"trainer.{name}" for name in COUNT_OR_FRACTION}
        for action in parser._actions:  # jsonargparse has no public way to retype an added option
            if action.dest in counts and hasattr(action, "_typehint"):
                action._typehint = int | float | None  # ints first: see COUNT_OR_FRACTION

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # after parsing, ckpt_path is the same whether a flag or a config file gave it; and before LightningCLI
        # reads the checkpoint's hyperparameters into the config (its own torch.load, which would meet an
        # untrusted file first, and would skip "last", which is no file)
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else self.config
        self._resume_step = None  # the checkpoint's global step, when it is a file
        for option in ("optimizer", "lr_scheduler"):
            # the module's optimizer (AdamW, its groups, warmup and schedule) is the only one: --optimizer SGD
            # replaced it, model.lr, encoder_lr, weight_decay and the schedule then ignored, behind one warning.
            # Still parsed (null), so that the config.yaml of every earlier run, which lists both, reads back
            if config is not None and config.get(option) is not None:
                parser.error(f"--{option} is not supported: the optimizer is AdamW, set by the model.* options")
        if config is None or "ckpt_path" not in config:
            return
        if subcommand in ("validate", "test") and config.ckpt_path is None:
            # it ran, and wrote test_metrics.json, for weights no one trained
            print(f"warning: {subcommand} without --ckpt_path scores an untrained model", file=sys.stderr)
        config.ckpt_path, ckpt = resolve_ckpt_path(config.ckpt_path, subcommand, runs_folder(config))
        if ckpt is None:
            self._check_model_options_before_the_data(config)
            return
        self._resume_step = int(ckpt.get("global_step", 0))
        hparams = checkpoint_model_options(ckpt)
        if hparams and (args is None or isinstance(args, list)):
            # LightningCLI's own _parse_ckpt_path (skipped below) merges the checkpoint's options over the
            # finished config, so over the command line too: `test --ckpt_path best.ckpt --model.beam_size 5`
            # searched with the checkpoint's beam, silently, and a resume's architecture flags never reached
            # the check that refuses them. Parsed again with the checkpoint's options as one more config,
            # after the config files and before the flags, each keeps its place.
            argv = list(sys.argv[1:] if args is None else args)
            resolved = config.ckpt_path
            self.config = parser.parse_args(with_checkpoint_options(argv, subcommand, hparams))
            self.config[subcommand].ckpt_path = resolved
        vocab = (ckpt.get("captioning") or {}).get("vocab")
        data = self.config[subcommand].get("data")
        if subcommand in ("validate", "test") and vocab and data is not None and data.get("vocabulary") is None:
            # the model reads and writes the checkpoint's words, whatever data it is scored on: a vocabulary
            # built from this data's training captions refused a model tested on another dataset (the
            # references are scored as text, so they need no ids). A resume (fit) still refuses other data.
            data.vocabulary = list(vocab)
        self._check_model_options_before_the_data(self.config[subcommand])

    @staticmethod
    def _check_model_options_before_the_data(config) -> None:
        """The module's own option checks, on the parsed config: the module is made after the data module has read
        the data (its vocabulary comes from it), so a bad model option stopped a run only after a scan of every
        image. With a checkpoint, on the config with its options merged in."""
        model = config.get("model")
        if model is not None:
            check_model_options({k: v for k, v in dict(model).items() if k not in LINKED_FROM_DATA})
        trainer = config.get("trainer") or {}
        # Lightning takes both at (int) 0, then divides by them: ZeroDivisionError tracebacks, in the schedule and in
        # the validation interval (after the data scan)
        accumulate, interval = trainer.get("accumulate_grad_batches"), trainer.get("val_check_interval")
        check_ranges(
            "trainer",
            accumulate_grad_batches=(accumulate, not isinstance(accumulate, int) or accumulate >= 1, ">= 1"),
            # an int: a float is a fraction of the epoch, and Lightning rounds 0.0 up to one batch
            val_check_interval=(interval, not isinstance(interval, int) or interval >= 1, ">= 1 (an int)"),
        )

    def _parse_ckpt_path(self) -> None:
        # done in parse_arguments, in the order of the command line (see there)
        pass

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
        ckpt_path = self.config.fit.get("ckpt_path")
        for callback in self.trainer.callbacks:
            if isinstance(callback, RunConfigCallback):
                callback.forget_ckpt_path()
        if ckpt_path and self._resume_step is not None:
            self._continue_run(Path(ckpt_path), self._resume_step)
        # fix the logger's version (its run directory) now: with a spawning strategy (ddp_spawn)
        # each spawn would otherwise pick the next free version, and the test after fit would
        # write its results into a new folder instead of beside the checkpoints
        for logger in self.trainer.loggers:
            _ = logger.version
        self._note_new_run_dirs()

    def before_validate(self) -> None:
        self._note_new_run_dirs()

    def before_test(self) -> None:
        self._note_new_run_dirs()

    def _note_new_run_dirs(self) -> None:
        """Tell RunConfigCallback which run directories this command creates (on rank 0), so that a run refused as
        it starts removes its own, never one it continues."""
        if not self.trainer.is_global_zero:
            return
        new = [Path(lg.log_dir) for lg in self.trainer.loggers if lg.log_dir and not Path(lg.log_dir).exists()]
        for callback in self.trainer.callbacks:
            if isinstance(callback, RunConfigCallback):
                callback.new_run_dirs = new

    def _continue_run(self, ckpt: Path, step: int) -> None:
        """Resuming from ``<save_dir>/<name>/<version>/checkpoints/<file>`` of this run's logger: log into that
        version again. In a new version, ModelCheckpoint's folder would change, and Lightning then drops
        the best score it restores, so the first validation after the resume would write ``best.ckpt``
        whatever its score."""
        ckpt = ckpt.resolve()
        run = ckpt.parent.parent
        continued = []
        for logger in self.trainer.loggers:
            root = getattr(logger, "root_dir", None)
            # CSVLogger and TensorBoardLogger take a version only in their constructor, built from the config
            # before the checkpoint is known; ``_version`` is what their ``version`` reads
            if ckpt.parent.name == "checkpoints" and root and Path(root).resolve() == run.parent:
                if hasattr(logger, "_version"):
                    logger._version = run.name
                    continued.append(logger)
        if not continued:
            print(
                f"{ckpt} is not in a run directory of this run's logger: the resumed run logs to a new one, "
                "and its best.ckpt starts again from its own validations",
                file=sys.stderr,
            )
            return
        if self.trainer.is_global_zero:
            print(f"continuing the run in {continued[0].log_dir}", file=sys.stderr)
            for logger in continued:
                if isinstance(logger, CSVLogger):
                    _keep_metrics_before(logger, step)

    def _print_run(self, best: str = "") -> None:
        """Where the run's files are: each command writes into a run directory of its own (a new version for
        ``validate`` and ``test``, not the checkpoint's)."""
        trainer = self.trainer
        run = Path(trainer.log_dir or ".").resolve()  # log_dir is a collective under DDP: every rank asks
        if trainer.is_global_zero:
            print(f"\nrun directory: {run}")
            if best:
                print(f"best checkpoint: {Path(best).resolve()}")
            if (run / "test_metrics.json").exists():
                print(f"test metrics: {run / 'test_metrics.json'}")

    def after_validate(self) -> None:
        self._print_run()

    def after_test(self) -> None:
        self._print_run()

    def after_fit(self) -> None:
        trainer = self.trainer
        ckpt = trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_path", "") if ckpt else ""
        if best and not Path(best).is_file():  # e.g. a path restored from another run's checkpoint
            print(f"best checkpoint {best} is not there; testing the final weights instead", file=sys.stderr)
            best = ""
        elif not best and self.config.fit.test_after_fit and trainer.is_global_zero:  # e.g. no 'val' split
            print("no checkpoint has a validation score: testing the final weights", file=sys.stderr)
        if self.config.fit.test_after_fit and not trainer.interrupted:
            with _metrics_kept_across_spawned_test(trainer):
                trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None, verbose=True)
        elif trainer.is_global_zero:
            # a resume of a finished run ran no loop (its max_steps reached): metrics.csv as it was, its test row
            # included (one that runs a loop has dropped the file aside; a test after fit logs its row again)
            put_back_resume_rows(trainer)
        self._print_run(best)


@contextlib.contextmanager
def _metrics_kept_across_spawned_test(trainer: pl.Trainer) -> Iterator[None]:
    """Under ``ddp_spawn`` the test after fit runs in new processes, whose CSV loggers deleted the ``metrics.csv``
    the fit wrote (every training and validation row), then logged their test row at step 0 (the fit's step counts
    do not come back from the ranks); after a resume, the main process's copy of the writer (holding the rows from
    before the checkpoint, and only their columns) made the test fail. Here, in the main process, for every CSV
    logger: the fit's file is moved aside (``metrics.fit.csv``, so that nothing is lost if this process dies), the
    ranks make writers of their own, and afterwards the file is the fit's rows, then the test's, stamped with the
    fit's final epoch and step as one process stamps them (the rank's ``on_fit_end`` sends them back in
    callback_metrics). The ranks' warning that old log files will be deleted is silenced: they are not lost. One
    process, or plain ddp (whose ranks go on to the test themselves), keeps its writers and their rows."""
    from pytorch_lightning.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    loggers = [lg for lg in trainer.loggers if isinstance(lg, CSVLogger)]
    if not isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher) or not loggers:
        yield
        return
    aside = []
    for logger in loggers:
        logger._experiment = None  # the ranks make their own writer, not a copy of this process's stale one
        path = Path(logger.log_dir) / "metrics.csv"
        _recover_fit_rows(path)
        if path.is_file():
            os.replace(path, _fit_rows_file(path))
            aside.append(path)
    before = os.environ.get("PYTHONWARNINGS")
    # read by each rank's interpreter at its start
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [before, "ignore:Experiment logs directory"]))
    try:
        yield
    finally:  # a failed test keeps the fit's rows too
        if before is None:
            os.environ.pop("PYTHONWARNINGS", None)
        else:
            os.environ["PYTHONWARNINGS"] = before
        end = trainer.callback_metrics  # without them (a fit that never reached its end), Lightning's stamp
        stamp = {k: str(int(end[key])) for k, key in (("epoch", FIT_END_EPOCH), ("step", FIT_END_STEP)) if key in end}
        for path in aside:
            _rewrite_with_test_rows(path, stamp)


def _rewrite_with_test_rows(path: Path, stamp: dict[str, str]) -> None:
    """``path`` (a ``metrics.csv``) as the fit's rows (from ``metrics.fit.csv`` beside it, then removed), then the
    test's (what ``path`` holds now, if anything), stamped ``stamp``."""
    fit = _fit_rows_file(path)
    fit_rows, header = _csv_rows(fit)
    test_rows, test_header = _csv_rows(path)
    for row in test_rows:
        row.update(stamp)
    header = header + [k for k in test_header if k not in header]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(fit_rows + test_rows)
    os.replace(tmp, path)
    fit.unlink()


def _recover_fit_rows(path: Path) -> None:
    """Put back the fit's rows that a test after fit under ddp_spawn moved aside (``metrics.fit.csv``) and was
    stopped before it could join them again (SIGTERM, a killed process): the file becomes ``path`` again, and what
    ``path`` held, the interrupted test's rows if any, is dropped (the run's next test writes its own)."""
    fit = _fit_rows_file(path)
    if fit.is_file():
        os.replace(fit, path)
        print(f"{path}: the fit's rows put back from {fit.name} (a test after fit was stopped)", file=sys.stderr)


def _fit_rows_file(path: Path) -> Path:
    """Where the fit's rows of ``path`` (a ``metrics.csv``) wait while a spawned test after fit runs."""
    return path.with_name("metrics.fit.csv")


def _csv_rows(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    """The rows and the header of a CSV file; none if it is not there."""
    if not path.is_file():
        return [], []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader), list(reader.fieldnames or [])


def _keep_metrics_before(logger: CSVLogger, step: int) -> None:
    """Lightning's CSV writer deletes the ``metrics.csv`` it finds in its folder: a resumed run keeps the rows
    of the steps before its checkpoint and appends its own after them (the rows of later steps are the
    interrupted part of the run, which it logs again).

    The kept rows are written back at once, and the file as it was waits aside (``metrics.resume.csv``) until a loop
    starts (:class:`RunConfigCallback`): the writer held the rows in memory until its first save, after the data
    set-up (an image scan, a feature cache build), and a run stopped before that lost every row of the run; and a
    resume refused as it restores the checkpoint puts the file back whole (its test row included)."""
    path = Path(logger.log_dir) / "metrics.csv"
    aside = _resume_rows_file(path)
    if aside.is_file():  # a resume stopped before it wrote the rows back: the file as it was before that resume
        os.replace(aside, path)
    _recover_fit_rows(path)
    rows = [r for r in _csv_rows(path)[0] if (r.get("step") or "").isdecimal() and int(r["step"]) < step]
    if path.is_file():
        os.replace(path, aside)  # so the writer deletes nothing
    with warnings.catch_warnings():  # "Previous log files in this directory will be deleted": not so here
        warnings.filterwarnings("ignore", message="Experiment logs directory")
        writer = logger.experiment
    for row in rows:
        writer.log_metrics({k: v for k, v in row.items() if k not in ("step", None) and v != ""}, int(row["step"]))
    writer.save()


def _resume_rows_file(path: Path) -> Path:
    """Where a resumed run's ``metrics.csv`` (``path``) waits until the rows it keeps are written back."""
    return path.with_name("metrics.resume.csv")


#: model options set from the data module (see ``add_arguments_to_parser``): what the data says wins over
#: any checkpoint, so these never come from one
LINKED_FROM_DATA = {
    "image_size": "data.image_size",
    "mean": "data.mean",
    "std": "data.std",
    "vocab": "data.vocab_tokens",
}


def checkpoint_model_options(ckpt: dict) -> dict[str, Any]:
    """The model options a Lightning checkpoint was trained with (its ``hyper_parameters``), less the ones
    linked from the data and Lightning's private keys."""
    hparams = ckpt.get("hyper_parameters") or {}
    return {k: v for k, v in hparams.items() if not k.startswith("_") and k not in LINKED_FROM_DATA}


def with_checkpoint_options(argv: list[str], subcommand: str, hparams: dict[str, Any]) -> list[str]:
    """``argv`` with ``--model <the checkpoint's options>`` right after the subcommand's last config file
    (or the subcommand itself): later arguments override earlier ones, so the checkpoint's options win
    over the config files. An option that a ``--model.*`` flag sets, before or after the config files, is
    left out of them: the flag wins over the checkpoint wherever it stands (one given before ``-c`` was
    overridden by the checkpoint's value, silently)."""
    start = argv.index(subcommand) + 1 if subcommand in argv else 0
    flagged = {
        arg[len("--model.") :].split("=", 1)[0].split(".", 1)[0] for arg in argv[start:] if arg.startswith("--model.")
    }
    hparams = {k: v for k, v in hparams.items() if k not in flagged}
    at = start
    i = start
    while i < len(argv):
        if argv[i] in ("-c", "--config"):
            at = i = i + 2
            continue
        if argv[i].startswith("--config="):
            at = i + 1
        i += 1
    return [*argv[:at], "--model", json.dumps(hparams), *argv[at:]]


def runs_folder(config) -> Path:
    """Where this command's runs go, for ``ckpt_path last``: its CSV logger's ``save_dir/name`` (as
    ``configs/tiny.yaml`` gives ``runs/tiny``), else ``runs``."""
    logger = (config.get("trainer") or {}).get("logger")
    for lg in logger if isinstance(logger, list) else [logger]:
        init = lg.get("init_args") if hasattr(lg, "get") else None
        if init is not None and init.get("save_dir") is not None:
            name = init.get("name", "lightning_logs")  # CSVLogger's default; "" or null: save_dir itself
            return Path(init.get("save_dir")) / str(name) if name else Path(init.get("save_dir"))
    return Path("runs")


def resolve_ckpt_path(
    ckpt_path: str | None, subcommand: str | None = "fit", runs: Path = Path("runs")
) -> tuple[str | None, dict | None]:
    """``ckpt_path`` as the command line or a config file gave it, resolved and checked before anything else
    touches it (the data, the model, the run directory): "last" ("best") is the newest ``last.ckpt``
    (``best.ckpt``) under ``runs`` (this config's runs folder), and a missing, truncated or untrusted file ends the
    program with an error naming it.

    Returns the path and the checkpoint it holds (None for no path or Lightning's "hpc", "registry").
    """
    if ckpt_path is not None:
        ckpt_path = str(ckpt_path)
    if ckpt_path in ("last", "best"):
        # Lightning would look for "last" only in the new run's folder and, finding nothing, start afresh in
        # silence; here it means the newest last.ckpt of this config's runs (any of runs/ took another
        # experiment's, a Transformer's under an LSTM config, and trained it in a new folder). Its "best" is the
        # best model of a fit in the same process: a fresh test or validate stopped, after the data scan, in a
        # traceback saying no ModelCheckpoint saved the best model; here it is the newest best.ckpt, likewise
        # best-v1.ckpt ...: a ModelCheckpoint with its version counter on writes such a name beside an older best.ckpt
        named = re.compile(rf"{ckpt_path}(-v\d+)?\.ckpt")
        found = [p for p in runs.glob("**/checkpoints/*.ckpt") if named.fullmatch(p.name)]
        found.sort(key=lambda p: p.stat().st_mtime)
        if not found:
            sys.exit(f"error: ckpt_path {ckpt_path}: no {ckpt_path}.ckpt under {runs}/")
        ckpt_path = str(found[-1])
        print(f"{'resuming from' if subcommand == 'fit' else 'using'} {ckpt_path}", file=sys.stderr)
    if not ckpt_path or ckpt_path in ("hpc", "registry"):
        return ckpt_path, None
    try:
        ckpt = load_weights_only(ckpt_path)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "pytorch-lightning_version" not in ckpt:
        # a plain state dict (a weights file) stopped inside Lightning's restore with a KeyError naming neither
        sys.exit(
            f"error: {ckpt_path}: not a training checkpoint (no Lightning state: a weights file?); ckpt_path takes a "
            "run's last.ckpt or best.ckpt (model.init_weights starts a fresh fit from a checkpoint's weights)"
        )
    return ckpt_path, ckpt


def with_default_config(argv: list[str]) -> list[str]:
    """A subcommand without ``-c``/``--config`` gets ``configs/shapes.yaml`` as its base, so
    ``python train.py fit --trainer.max_epochs 5`` is the default recipe with one change (its runs
    folder, checkpoints and seed), not Lightning's bare defaults. Flags after it still override it."""
    given = any(a in ("-c", "--config") or a.startswith("--config=") for a in argv)
    if argv and argv[0] in SUBCOMMANDS and not given:
        return [argv[0], "--config", str(DEFAULT_CONFIG), *argv[1:]]
    return argv


SUBCOMMANDS = ("fit", "validate", "test")


def with_subcommand(argv: list[str]) -> list[str]:
    """Flags without a subcommand are ``fit``'s, as ``python train.py`` alone is ``fit``: ``python train.py -c
    configs/tiny.yaml`` or ``python train.py --trainer.max_epochs 5`` failed as "invalid choice: '5' (choose from
    'fit', 'validate', 'test')". Left alone: help (``-h``), and a command line that names a subcommand (a word that
    is not the value of the flag before it: ``--trainer.logger.init_args.name test`` names none).

    A config file whose top level is subcommands (LightningCLI's root config, ``fit: {trainer: ...}``) picks its
    one subcommand itself when it is all that is given; with flags too, ``-c root.yaml --trainer.max_epochs 3``
    failed the same way, so its subcommand is named after the root configs and before the rest, where they come
    first. Where the root configs name several subcommands, or follow other arguments, an InputError says so."""
    if not argv or not argv[0].startswith("-") or argv[0] in ("-h", "--help"):
        return argv
    for before, word in zip(argv, argv[1:]):
        if word in SUBCOMMANDS and not (before.startswith("-") and "=" not in before):  # not a flag's value
            return argv
    roots: list[int] = []  # positions in argv of the root configs' arguments (the flag and its value, or one)
    sections: set[str] = set()
    for positions, path in _config_args(argv):
        if named := _subcommand_sections(path):
            roots += positions
            sections |= named
    if not roots:
        return ["fit", *argv]
    # the root parser's own arguments, the root configs and --print_config, lead in any order: the subcommand goes
    # after them
    own = {*roots, *(i for i, a in enumerate(argv) if a == "--print_config" or a.startswith("--print_config="))}
    lead = 0
    while lead in own:
        lead += 1
    if lead == len(argv):
        return argv

    def named(i: int) -> str:  # the file of the root config at argv[i] (its -c, or --config=FILE)
        return argv[i + 1] if argv[i] in ("-c", "--config") else argv[i].removeprefix("--config=")

    if len(sections) > 1:  # the parser said "invalid choice: '3' (choose from 'fit', ...)" for the flag's value
        raise InputError(
            f"{named(min(roots))}: the root configs name {' and '.join(sorted(sections))}: give the subcommand after "
            "them (train.py -c ROOT.yaml fit ...)"
        )
    # moving a root config ahead of what was written before it would reverse which of the two wins (later
    # arguments override earlier ones)
    late = [i for i in roots if i >= lead]
    if late:
        raise InputError(
            f"{named(min(late))}: a root config (its top level {next(iter(sections))}:) goes before any other argument"
        )
    return [*argv[:lead], *sections, *argv[lead:]]


def _config_args(argv: list[str]) -> list[tuple[list[int], str]]:
    """The config files of a command line: (their arguments' positions in ``argv``, the path) for each ``-c FILE``,
    ``--config FILE`` and ``--config=FILE``, in order."""
    found = []
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            found.append(([i, i + 1], argv[i + 1]))
        elif arg.startswith("--config="):
            found.append(([i], arg.split("=", 1)[1]))
    return found


def _read_config(path: str) -> object:
    """The YAML document of the config file ``path``, None where it cannot be read (not there: the parser's to say);
    InputError naming it where it is not UTF-8 or not YAML."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return None
    except UnicodeDecodeError as e:  # a 64-line traceback from the parser, naming no file
        raise InputError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at position {e.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.reader.ReaderError as e:  # a character YAML refuses: it has no line mark
        char = f"#x{e.character:04x}" if isinstance(e.character, int) else repr(e.character)
        raise InputError(f"{path}: not valid YAML: character {char} at position {e.position}: {e.reason}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise InputError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None


def check_config_files(argv: list[str]) -> None:
    """Raise InputError naming the config file (``-c``/``--config``) that is not valid YAML, or holds no mapping of
    options (empty, only comments, a scalar or a list): jsonargparse said
    "Problems parsing config: while parsing a flow sequence in "<unicode string>", line 2", over several lines and
    naming no file, so with two -c files it was not said which. Files that are not there are the parser's to say."""
    for _, path in _config_args(argv):
        config = _read_config(path)
        if not Path(path).is_file():
            continue  # the parser's to say
        # jsonargparse said "Unexpected config: <the file's text>", naming neither the file nor the cause
        if config is None:
            raise InputError(f"{path}: holds no options (it is empty, or only comments): leave out its -c")
        if not isinstance(config, dict):
            shown = repr(config) if len(repr(config)) <= 60 else repr(config)[:57] + "..."
            raise InputError(f"{path}: not a config: its YAML is a {type(config).__name__} ({shown}), not options")


def _subcommand_sections(path: str) -> set[str]:
    """The subcommands at the top level of the config file ``path`` (LightningCLI's root config form), if any."""
    try:
        config = _read_config(path)
    except InputError:
        return set()  # not a readable config: check_config_files says so
    return set(config) & set(SUBCOMMANDS) if isinstance(config, dict) else set()


def main(args: list[str] | None = None) -> CaptionCLI:
    """``python train.py`` alone = ``fit`` with ``configs/shapes.yaml``; flags without a subcommand are ``fit``'s
    (:func:`with_subcommand`); a subcommand without a config starts from it too (:func:`with_default_config`)."""
    if args is None and not sys.argv[1:]:
        args = ["fit", "--config", str(DEFAULT_CONFIG)]
    argv = list(sys.argv[1:] if args is None else args)
    try:
        sub = with_subcommand(argv)
    except InputError as e:
        sys.exit(_error_line(type(e), str(e)))
    if sub != argv:
        (added,) = Counter(sub) - Counter(argv)  # the one word with_subcommand put in
        print(f"no subcommand given: {added}", file=sys.stderr)
    based = with_default_config(sub)
    if based != sub:
        print(f"no --config given: {DEFAULT_CONFIG.name} is the base, the flags change it", file=sys.stderr)
    if based != argv:
        argv = based
        if args is None:  # in sys.argv, which LightningCLI reads, and DDP's relaunch of rank 1 runs again
            sys.argv[1:] = argv
        else:
            args = argv
    from lightning_fabric.utilities.exceptions import MisconfigurationException
    from pytorch_lightning.utilities.exceptions import SIGTERMException
    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

    try:
        check_config_files(argv)
        # args=None: LightningCLI reads sys.argv itself (passing both makes it warn)
        return CaptionCLI(
            CaptionModule,
            CaptionDataModule,
            args=args,
            save_config_callback=RunConfigCallback,
            save_config_kwargs={"overwrite": True},
            # argparse's usage lists every option (~110 lines) above the one line saying what was wrong
            parser_kwargs={
                name: {"usage": f"train.py {name} [-c CONFIG] [--<section>.<option> VALUE ...] (options: --help)"}
                for name in SUBCOMMANDS
            },
        )
    except (InputError, MisconfigurationException, NonFiniteLossError) as e:  # named with its cause: one line
        sys.exit(_error_line(type(e), str(e)))
    except SIGTERMException:  # one process (Lightning's own exit status: 0), or rank 0 of plain ddp (143)
        _stopped_by_sigterm()
    except ProcessExitedException as e:  # ddp_spawn: a rank ended so (CheckpointOnSigterm), after saving
        if e.exit_code != SIGTERM_EXIT:
            raise
        _stopped_by_sigterm()
    except ProcessRaisedException as e:  # ddp_spawn: a rank raised; the errors above are one line there too
        line = rank_error_line(str(e))
        if line is None:
            raise
        sys.exit(line)
    except (ValueError, OSError) as e:
        line = _lightning_refusal(e)
        if line is None:
            raise
        sys.exit(line)


def _lightning_refusal(e: BaseException) -> str | None:
    """One line for Lightning refusing an option once the run starts (a ValueError raised in its own code:
    `val_check_interval` (1000) must be less than or equal to the number of the training batches (6), ...), or
    failing on a folder it was given (an OSError naming a file, raised under its code: a logger's save_dir that is
    a file); 30-45-line tracebacks before. None for anything else: a traceback is the right report there."""
    files = []
    tb = e.__traceback__
    while tb is not None:
        files.append(set(Path(tb.tb_frame.f_code.co_filename).parts))
        tb = tb.tb_next
    lightning = [bool(parts & {"pytorch_lightning", "lightning_fabric"}) for parts in files]
    if isinstance(e, OSError):
        named = e.filename is not None and e.strerror
        return f"error: {e.filename}: {e.strerror}" if named and any(lightning) else None
    return f"error: trainer: {str(e).strip()}" if lightning and lightning[-1] else None


_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*)\.([A-Za-z_]\w*): ", re.MULTILINE)


def rank_error_line(traceback_text: str) -> str | None:
    """The one line ``main`` prints for an InputError or a Lightning MisconfigurationException that a ``ddp_spawn``
    rank raised, from the traceback text the spawn launcher sends back (the exception itself does not cross the
    process boundary); None if the rank raised anything else. The exception raised last is the text's last
    ``module.Class: message`` line whose class resolves (a message's own lines could look like one); chained
    exceptions come before it."""
    text = traceback_text.rstrip()
    for line in reversed(list(_EXCEPTION_LINE.finditer(text))):
        try:
            cls = getattr(importlib.import_module(line[1]), line[2])
        except (ImportError, AttributeError):
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            continue
        message = text[line.end() :]
        return None if "Traceback (most recent call last)" in message else _error_line(cls, message)
    return None


def _error_line(cls: type[BaseException], message: str) -> str | None:
    """The line ``main`` prints for an error of class ``cls``: an InputError's message names the file or option and
    the cause; a MisconfigurationException is Lightning's refusal of trainer options ("No supported gpu backend");
    None for anything else (a traceback is the right report there)."""
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    if issubclass(cls, InputError):
        return f"error: {message}"
    if issubclass(cls, MisconfigurationException):
        return f"error: trainer: {message}"
    if issubclass(cls, NonFiniteLossError):
        return (
            f"error: {message}: the run stopped, its checkpoints are from before that step (resume one with a lower "
            "model.lr or trainer.gradient_clip_val, or another seed)"
        )
    return None


def _stopped_by_sigterm() -> NoReturn:
    """End a run that SIGTERM stopped with exit status 143 and one line: not 0 (Lightning's status for one
    process), which told a scheduler or ``train.py && ...`` that the run had finished, and not the spawn
    launcher's traceback with status 1 under ``ddp_spawn``. ``CheckpointOnSigterm`` has said where it saved
    (a SIGTERM before training started saves nothing)."""
    if os.environ.get("LOCAL_RANK", "0") == "0":  # once, not once per process of plain ddp
        print(f"stopped by SIGTERM before the run ended (exit status {SIGTERM_EXIT})", file=sys.stderr)
    sys.exit(SIGTERM_EXIT)
