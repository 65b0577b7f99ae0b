"""LightningModule: teacher-forced training with the doubly stochastic attention loss, and free
-running (no teacher forcing) validation and test with beam search.

Loss (Xu et al. 2015, eq. 14): cross-entropy (optionally label-smoothed) over the caption words
plus ``alpha_c * mean_n (1 - sum_t alpha_tn)^2``, which asks every grid cell to be looked at
over the course of a caption.
"""

from __future__ import annotations

import atexit
import errno
import inspect
import json
import math
import os
import random
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn

from captioning.checkpoint_io import CheckpointError, load_weights_only
from captioning.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from captioning.decoding import beam_search
from captioning.errors import InputError, NonFiniteLossError
from captioning.metrics import score_captions, shapes_scores
from captioning.models.encoders import ENCODERS, load_encoder_weights
from captioning.models.net import CaptionNet, ignored_options
from captioning.options import LENGTH_PENALTY_RANGE, check_ranges, length_penalty_ok
from captioning.vocab import Vocabulary, detokenize

CHECKPOINT_FORMAT = 1

# the architecture arguments are CaptionNet's own, so they are read from its signature
_ARCH_PARAMS = inspect.signature(CaptionNet.__init__).parameters
_ARCH_DEFAULTS = {k: p.default for k, p in _ARCH_PARAMS.items() if k not in ("self", "vocab_size")}
_ARCH_KEYS = tuple(_ARCH_DEFAULTS)


#: exit status of a run stopped by SIGTERM (128 + the signal's number): each DDP rank's, and the run's
SIGTERM_EXIT = 128 + signal.SIGTERM
#: ``torch.compile`` modes that ``compile_mode`` takes
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_model_options(options: dict[str, object]) -> None:
    """The range and consistency checks of CaptionModule's options (those left out take the module's defaults),
    raising one InputError naming the bad ones. Run by the module, and by train.py before the data is read (the
    module is made after it, its vocabulary coming from the data: a negative model.lr stopped a COCO run only
    after a scan of every image)."""
    defaults = {k: p.default for k, p in inspect.signature(CaptionModule.__init__).parameters.items() if k != "self"}
    o = {**defaults, **options}
    compile_mode, init_weights, encoder_weights, lr_schedule = (
        o["compile_mode"], o["init_weights"], o["encoder_weights"], o["lr_schedule"]
    )  # fmt: skip
    lr, encoder_lr, weight_decay, warmup_steps = o["lr"], o["encoder_lr"], o["weight_decay"], o["warmup_steps"]
    lr_decay, lr_decay_epochs, label_smoothing, alpha_c = (
        o["lr_decay"], o["lr_decay_epochs"], o["label_smoothing"], o["alpha_c"]
    )  # fmt: skip
    beam_size, max_decode_len, length_penalty = o["beam_size"], o["max_decode_len"], o["length_penalty"]
    encoder, encoder_stage, encoder_grid = o["encoder"], o["encoder_stage"], o["encoder_grid"]
    embed_dim, hidden_dim, attention_dim = o["embed_dim"], o["hidden_dim"], o["attention_dim"]
    num_heads, num_layers, ffn_dim, dropout = o["num_heads"], o["num_layers"], o["ffn_dim"], o["dropout"]
    decoder, max_len = o["decoder"], o["max_len"]
    if compile_mode not in COMPILE_MODES:
        raise InputError(f"model.compile_mode must be one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}")
    # names: a typo here stopped a COCO run only after its data scan, in words that named no option ("encoder arch
    # must be ..."), and an unknown decoder first warned that it ignores the LSTM's options
    for option, value, names in (
        ("decoder", decoder, ("lstm", "transformer")),
        ("encoder", encoder, ENCODERS),
        ("attention", o["attention"] if decoder == "lstm" else "additive", ("additive", "dot")),  # the LSTM's only
    ):
        if value not in names:
            raise InputError(f"model.{option} must be one of {', '.join(names)}, got {value!r}")
    if init_weights and encoder_weights:
        raise InputError(
            f"model.init_weights ({init_weights}) and model.encoder_weights ({encoder_weights}) are both set: the "
            "checkpoint holds the encoder's weights, so unset encoder_weights (--model.encoder_weights null, "
            "where a config sets it)"
        )
    if lr_schedule not in ("cosine", "step", "constant"):
        raise InputError(f"model.lr_schedule must be 'cosine', 'step' or 'constant', got {lr_schedule!r}")
    # AdamW checks only its default lr, not a group's, so a negative model.lr trained (uphill) without a word, a
    # negative warmup was no warmup, and beam_size 0 or label_smoothing 1.5 stopped the run only at the first
    # validation or step
    check_ranges(
        "model",
        lr=(lr, lr > 0, "> 0"),
        # 0 keeps the weights, but an encoder that is not frozen trains in train mode: its BatchNorm
        # statistics still follow the data (freeze_encoder keeps those too)
        encoder_lr=(encoder_lr, encoder_lr is None or encoder_lr >= 0, ">= 0"),
        weight_decay=(weight_decay, weight_decay >= 0, ">= 0"),
        warmup_steps=(warmup_steps, warmup_steps >= 0, ">= 0"),
        lr_decay=(lr_decay, 0 < lr_decay <= 1, "in (0, 1]"),
        lr_decay_epochs=(lr_decay_epochs, lr_decay_epochs >= 1, ">= 1"),
        label_smoothing=(label_smoothing, 0 <= label_smoothing < 1, "in [0, 1)"),
        alpha_c=(alpha_c, alpha_c >= 0, ">= 0"),
        beam_size=(beam_size, beam_size >= 1, ">= 1"),
        max_decode_len=(max_decode_len, max_decode_len >= 1, ">= 1"),
        length_penalty=(length_penalty, length_penalty_ok(length_penalty), LENGTH_PENALTY_RANGE),
        encoder_grid=(encoder_grid, encoder_grid is None or encoder_grid >= 0, ">= 0 (0 or null: no pooling)"),
        # widths and depths: 0 heads was a bare ZeroDivisionError, 0 layers blamed attention_layer, ffn_dim 0
        # became 4 x the width and hidden_dim 0 built a decoder of no width, silently
        embed_dim=(embed_dim, embed_dim >= 1, ">= 1"),
        hidden_dim=(hidden_dim, hidden_dim >= 1, ">= 1"),
        attention_dim=(attention_dim, attention_dim >= 1, ">= 1"),
        num_heads=(num_heads, num_heads >= 1, ">= 1"),
        num_layers=(num_layers, num_layers >= 1, ">= 1"),
        ffn_dim=(ffn_dim, ffn_dim is None or ffn_dim >= 1, ">= 1 (null: 4 x hidden_dim)"),
        dropout=(dropout, 0 <= dropout < 1, "in [0, 1)"),
    )
    if encoder == "small_cnn" and (encoder_stage != 4 or encoder_grid):
        # SmallCNN has neither stages nor pooling: model.encoder_grid 4 trained on the 8x8 grid, silently
        raise InputError(
            f"model.encoder_stage ({encoder_stage}) and model.encoder_grid ({encoder_grid}) shape a torchvision "
            "ResNet's grid; small_cnn has none of either (its grid is the image size / 8; model.encoder_channels "
            "sets its widths): leave them at 4 and null (--model.encoder_stage 4 --model.encoder_grid null, also "
            "for a checkpoint that was trained with them, which they never changed), or choose a ResNet encoder"
        )
    if decoder == "transformer" and hidden_dim % num_heads:
        raise InputError(
            f"model.hidden_dim ({hidden_dim}), the transformer's width, is not divisible by model.num_heads "
            f"({num_heads})"
        )
    if decoder == "transformer" and max_decode_len > max_len:
        # the search feeds word t at position t: past the position table it would stop the first
        # validation, after a whole epoch of training, so the two are checked here instead
        raise InputError(
            f"model.max_decode_len ({max_decode_len}) is more than model.max_len ({max_len}), the positions "
            f"the transformer decoder's table covers: lower model.max_decode_len or raise model.max_len"
        )


class CheckpointOnSigterm(pl.Callback):
    """A pre-empted run (SIGTERM) writes ``last.ckpt`` before it exits, so no work is lost.

    Lightning turns SIGTERM into ``SIGTERMException`` at the next batch boundary, where the state
    is consistent; the checkpoint goes next to the run's other checkpoints.

    With gradient accumulation (``accumulate_grad_batches`` > 1) a batch boundary inside a window is not
    enough: the gradients accumulated so far are in no checkpoint, so a resume from there would take the
    window's optimizer step without them. Lightning is told of the signal only when the window ends (at
    most ``accumulate_grad_batches - 1`` more batches), so the checkpoint is at an optimizer step and a
    resume continues exactly as the uninterrupted run.

    Under DDP (more than one process) Lightning's own path does not hold: its handler broadcasts from
    inside the signal handler, wherever the rank is, and forwards the signal to the ranks ``ddp``
    started, so a rank could meet another collective there and wait forever; under ``ddp_spawn`` the
    workers never call ``on_exception``, and a ``SIGTERMException`` ends them with exit status 0, which
    leaves the main process waiting for a result that never comes. So under DDP the signal is only
    recorded; at each optimizer step the ranks agree (one small all-reduce) whether any of them holds
    one, and if so all of them write ``last.ckpt`` there, together, after the step is logged and stop
    at the next hook with exit status 143 (128 + SIGTERM). They agree at each batch of a validation too
    (but its last: that validation is then scored and logged), so a long one does not hold the signal
    back past a scheduler's grace period; the resumed run runs that validation again, whole.
    """

    def __init__(self) -> None:
        self._lightning_handler = None  # Lightning's SIGTERM handler while ours stands in front of it
        self._in_window = False  # a window's batches have begun and its optimizer step has not been taken
        self._pending: tuple | None = None  # (signum, frame) of a SIGTERM held back until the window ends
        self._announced = False
        self._step_before = -1
        self._distributed = False  # more than one process: the ranks decide together at each optimizer step
        self._stop = False  # under DDP: last.ckpt is written, the run stops at the next hook
        self._saving = False  # inside our own save
        self._stop_on_resume: list | None = None  # _stop_settings of our checkpoint resumed from, saved after a stop
        self._patience: dict[int, int] = {}  # id -> patience of each EarlyStopping, as this run set it (see setup)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # the run had decided to stop (EarlyStopping at the validation the signal came in): trainer.should_stop is
        # in no checkpoint, and the resumed run trained on past that decision. Only our save records it, with the
        # settings that decided it: the end of a run stopped early is the user's to extend
        if self._saving and trainer.should_stop:
            checkpoint["sigterm_after_stop"] = _stop_settings(trainer)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from pytorch_lightning.callbacks import EarlyStopping

        # before a checkpoint is restored: Lightning's EarlyStopping restores its patience from the checkpoint, over
        # this run's setting, so a run resumed with more patience (to train on after an early stop) stopped as
        # soon as before, silently. Set back in on_train_start; the rest of its state (best score, epochs waited)
        # is the checkpoint's, as it should be
        self._patience = {id(cb): cb.patience for cb in trainer.callbacks if isinstance(cb, EarlyStopping)}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._stop_on_resume = checkpoint.get("sigterm_after_stop")

    def _patience_of_this_run(self, trainer: pl.Trainer) -> None:
        from pytorch_lightning.callbacks import EarlyStopping

        for cb in trainer.callbacks:
            ours = self._patience.get(id(cb))
            if isinstance(cb, EarlyStopping) and ours is not None and cb.patience != ours:
                if trainer.is_global_zero:
                    print(
                        f"EarlyStopping: patience {ours} (this command's; its default where none is given), "
                        f"not the checkpoint's {cb.patience}",
                        file=sys.stderr,
                    )
                cb.patience = ours

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._patience_of_this_run(trainer)  # first: the stop settings below compare it
        if self._stop_on_resume is not None:
            if self._stop_on_resume == _stop_settings(trainer):  # read before the first epoch: the run ends there
                trainer.should_stop = True
            elif trainer.is_global_zero:
                print(
                    "the run had decided to stop (early stopping) when SIGTERM saved it; its limits or stopping "
                    "callbacks differ now, so it trains on",
                    file=sys.stderr,
                )
        self._distributed = trainer.world_size > 1
        # Lightning has installed its handler by now (a signal handler is the main thread's to set)
        hold = trainer.accumulate_grad_batches > 1 or self._distributed
        if hold and threading.current_thread() is threading.main_thread():
            handler = signal.getsignal(signal.SIGTERM)
            if callable(handler):
                self._lightning_handler = handler
                signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame) -> None:
        if self._in_window or self._distributed:
            self._pending = (signum, frame)  # no print here: a handler may interrupt a print to the same stream
        else:
            self._lightning_handler(signum, frame)

    def _stop_here(self) -> None:
        if self._stop:
            from pytorch_lightning.utilities.exceptions import SIGTERMException

            raise SIGTERMException(SIGTERM_EXIT)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._stop_here()
        self._in_window, self._step_before = True, trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step_before:  # gradients accumulated, no optimizer step yet
            if self._pending is not None and not self._announced:
                print("SIGTERM: finishing the gradient accumulation window before saving", flush=True)
                self._announced = True
            return
        self._in_window = False
        if self._distributed:
            # every rank takes part, at the same batch: the decision and the save are collectives
            if trainer.strategy.reduce_boolean_decision(self._pending is not None, all=False):
                self._save(trainer)
                self._stop = True  # after this batch is logged: at the next batch, validation or epoch end
            return
        if self._pending is not None:
            # Lightning raises SIGTERMException at the end of this same batch, after this hook
            pending, self._pending = self._pending, None
            self._lightning_handler(*pending)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_here()

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        self._stop_here()

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        # _distributed is set when training starts, so the sanity check never decides (nor a plain validate)
        if not self._distributed or trainer.sanity_checking or self._stop or self._in_window:
            return  # inside an accumulation window (val_check_interval mid-window) the window's end decides
        if trainer.fit_loop.epoch_loop.val_loop.batch_progress.is_last_batch:
            return  # the same batch on every rank (their shards are evened out): the next step decides
        if trainer.strategy.reduce_boolean_decision(self._pending is not None, all=False):
            self._save(trainer)  # a checkpoint inside the validation: the resume runs it again (see on_load_checkpoint)
            self._stop = True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_here()

    def _restore_handler(self) -> None:
        # once the ranks stop together, a late SIGTERM must not reach Lightning's handler and its broadcast
        if self._lightning_handler is not None and not self._stop:
            signal.signal(signal.SIGTERM, self._lightning_handler)
            self._lightning_handler = None
        self._in_window, self._pending, self._announced = False, None, False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handler()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        self._restore_handler()
        # under DDP the ranks have saved together already (_stop), before stopping here
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit" or self._stop:
            return
        self._save(trainer)

    def _save(self, trainer: pl.Trainer) -> None:
        ckpt = trainer.checkpoint_callback
        folder = (
            Path(ckpt.dirpath) if ckpt is not None and ckpt.dirpath else Path(trainer.log_dir or ".") / "checkpoints"
        )
        self._saving = True
        try:
            trainer.save_checkpoint(folder / "last.ckpt", weights_only=False)  # the full state: a resume needs it
        finally:
            self._saving = False
        if trainer.is_global_zero:
            last = folder / "last.ckpt"
            print(f"SIGTERM: saved {last} at step {trainer.global_step}; resume with --ckpt_path {last}", flush=True)


def _stop_settings(trainer: pl.Trainer) -> list:
    """What decides when a run stops: its epoch and step limits and the settings of its EarlyStopping and Timer
    callbacks (primitives only: a checkpoint loads with weights_only)."""
    from pytorch_lightning.callbacks import EarlyStopping, Timer

    loop = trainer.fit_loop
    settings: list = [["limits", loop.max_epochs, loop.max_steps, loop.min_epochs, loop.min_steps]]
    for cb in trainer.callbacks:
        if isinstance(cb, EarlyStopping):
            thresholds = [None if t is None else float(t) for t in (cb.stopping_threshold, cb.divergence_threshold)]
            settings.append(["EarlyStopping", cb.monitor, cb.mode, cb.patience, float(cb.min_delta), *thresholds])
        elif isinstance(cb, Timer):
            settings.append(["Timer", getattr(cb, "_duration", None)])
    return settings


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _destroy_gloo_group_at_exit() -> None:
    """Destroy this process's gloo process group (CPU DDP) when the interpreter exits. Lightning registers that
    for NCCL only; left to the interpreter's finalization, gloo's threads could outlive it, and a CPU DDP run that
    had finished and written everything sometimes ended with "terminate called without an active exception"
    and SIGABRT (exit status -6), which a scheduler reports as a failed job."""
    if torch.distributed.get_backend() != "nccl":
        atexit.unregister(_destroy_process_group)  # once per process, however many stages are set up
        atexit.register(_destroy_process_group)


def _results_id(image_id: str) -> int | str:
    """A record's id as the COCO results format wants it: numeric ids (COCO's cocoid) as integers, any
    other name (a Flickr or CSV file name, or "0007", which would collide with "7") as written.

    ``isdecimal``, not ``isdigit``: superscripts such as "²" are digits that ``int`` refuses."""
    return int(image_id) if image_id.isdecimal() and str(int(image_id)) == image_id else image_id


def _rank_items_done(resume: dict, batches_done: int, batch_size: int, world_size: int, source: str) -> int:
    """The items of its epoch's order this rank skips on a resume of ``batches_done`` batches: the interrupted run's
    items (all ranks) shared out among this run's ``world_size`` ranks, so that a resume with another batch size
    or number of processes goes on where the run stopped (it counted this run's batches of this run's size, and
    retrained or skipped images); a checkpoint from before ``items_done`` was stored counts this run's batches.
    CheckpointError where the ranks cannot share the items evenly or a rank's share is not a whole number of this
    run's batches: the epoch's order would come apart, or the batches done, as Lightning counts them (and the next
    checkpoint stores them), would not be the items trained."""
    if not batches_done:
        return 0
    items = resume.get("items_done")
    if items is None:
        return batches_done * batch_size
    if items % world_size or (items // world_size) % batch_size:
        raise CheckpointError(
            f"{source}: written {items} training items into epoch {resume['epoch']}, which {world_size} "
            f"process(es) with data.batch_size {batch_size} cannot go on from evenly: resume it with a number of "
            f"processes times a batch size that divides {items} (as the interrupted run's did), or resume from a "
            "checkpoint written at an epoch's end"
        )
    return items // world_size


def _resume_after_epoch_end(checkpoint: dict, max_steps: bool) -> bool:
    """Make a checkpoint written at an epoch's end (``on_train_epoch_end``: that epoch processed, not yet
    completed; or just after, by a SIGTERM: completed too) read as one written when the next epoch starts (only
    where this run has ``max_steps``), or, where ``max_steps`` ended the epoch part-way, as one written inside it;
    True when it was such a checkpoint.

    Why: with ``max_steps`` set, Lightning 2.6 treats every resume as a restart inside an epoch
    (``_FitLoop.restarting``), and took this state for a restart inside the finished epoch: the resumed
    run drew that epoch's data order again, counted it twice against ``max_epochs`` (stopping one epoch
    early) and logged every step one too high. A checkpoint taken as the next epoch starts is a state
    it restores exactly. Without ``max_steps`` Lightning handles that checkpoint itself, but not one of an
    epoch that a step limit cut short: it skipped the rest of that epoch.
    """
    loop = checkpoint.get("loops", {}).get("fit_loop")
    if not loop:
        return False
    epochs, batches = loop["epoch_progress"], loop["epoch_loop.batch_progress"]
    t = epochs["total"]
    if not t["ready"] == t["started"] == t["processed"] in (t["completed"], t["completed"] + 1):
        return False
    if t["processed"] == t["completed"]:
        # written after the epoch's end hooks (a SIGTERM in the last validation batch or in those hooks is raised
        # there): with max_steps, Lightning resumed it as a restart at the end of that epoch's batches, ran the
        # next epoch with none of its own and so ended the run one epoch early
        if not (max_steps and batches.get("is_last_batch")):
            return False
    elif not batches.get("is_last_batch"):
        # written at on_train_epoch_end of an epoch max_steps stopped part-way (a run then extended with a
        # larger max_steps): Lightning took it for the epoch's end too and set the sampler to the next
        # epoch, so the rest of this epoch's batches were drawn from the next epoch's order. Read it as the
        # mid-epoch checkpoint it is: this epoch not yet processed, its batches continued where they stopped
        for part in ("total", "current"):
            epochs[part]["processed"] = epochs[part]["completed"]
        return True
    if not max_steps:
        return False
    for part in ("total", "current"):
        epochs[part]["completed"] = epochs[part]["processed"]
        epochs[part]["ready"] = epochs[part]["processed"] + 1  # the next epoch is ready, not yet started
    batches["current"] = {k: 0 for k in batches["current"]}  # and none of its batches
    batches["is_last_batch"] = False
    return True


def _finish_validation_past_max_steps(loop: pl.loops.fit_loop._FitLoop) -> None:
    """Let ``loop`` (the fit loop of a run resumed from a checkpoint written inside a validation) run that
    validation even where the run's ``max_steps`` is already reached.

    Why: the validation at the end of a run's last step was lost when a SIGTERM came during it: Lightning's fit loop
    stops at ``max_steps`` before its epoch loop is asked to finish anything, so the resumed run ended at once, with
    no metrics for that epoch and a best.ckpt that never weighed it (nor did the test that follows the fit). The
    epoch loop itself runs a restarted validation before it looks at the step limit.
    """
    # a loop of the user's own (trainer.fit_loop = ...) is left alone; ours again where a process fits twice
    if type(loop) in (pl.loops.fit_loop._FitLoop, _FitLoopFinishingValidation):
        loop.__class__ = _FitLoopFinishingValidation
        loop._validation_to_finish = True


class _FitLoopFinishingValidation(pl.loops.fit_loop._FitLoop):
    """Lightning's fit loop, not done before its first epoch loop has run (see _finish_validation_past_max_steps)."""

    _validation_to_finish = False

    @property
    def done(self) -> bool:
        # only where the epoch loop will run that validation: it asks the same question first (with a validation
        # every so many seconds or batches, or none, the resumed run may not), and where it does not, it trains
        # on, one batch past max_steps. (The fetcher only tells an iterator-style loader apart: None is fine.)
        if self._validation_to_finish:
            if self.trainer.enable_validation and self.epoch_loop._should_check_val_fx(self._data_fetcher):
                return False
            self._validation_to_finish = False  # the epoch loop would not run it: nothing to wait for, now or later
        return super().done

    def on_advance_end(self) -> None:
        self._validation_to_finish = False  # once: the epoch loop has run (and with it the validation)
        super().on_advance_end()


def _redo_interrupted_validation(checkpoint: dict) -> bool:
    """Make a checkpoint written part-way through a validation (a SIGTERM between its batches) run that whole
    validation again when resumed; True when it was such a checkpoint.

    Why: Lightning took the validation for done (or, had it counted it as restarted, would have run only its
    remaining batches, while the captions of the others, which the metrics need, are in no checkpoint): the
    resumed run logged no metrics for it, and best.ckpt never weighed that epoch. Marked instead as a
    validation whose first batch had started (Lightning's "restarted mid-evaluation"), it runs again from its
    first batch, before training goes on.
    """
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.val_loop.batch_progress")
    # "started", not "completed": under DDP the ranks save inside on_validation_batch_end, before Lightning counts
    # that batch completed, so a save at the first batch showed 0 completed
    if not progress or progress.get("is_last_batch") or not progress["current"]["started"]:
        return False
    before = progress["total"]["started"] - progress["current"]["started"]  # batches of earlier validations
    progress["current"] = {"ready": 1, "started": 1, "processed": 0, "completed": 0}
    progress["total"] = {"ready": before + 1, "started": before + 1, "processed": before, "completed": before}
    return True


def _close_redone_validation(progress) -> None:
    """At the end of a validation (all its batches run), make its epoch's batch counters read as a finished one.

    Why: the run of a validation again (``_redo_interrupted_validation``) counts its first batch as started twice
    (Lightning's own mark of a restart mid-evaluation), and a checkpoint written then carried that mark. Where the
    next epoch began, the counters were reset and nothing showed; but a checkpoint of the run's last validation
    (the end of a run resumed from a SIGTERM in it) read as interrupted again, and a run extended from it (more
    epochs or steps) started with that validation, once more, out of turn."""
    total = progress.total
    total.ready = total.started = total.processed = total.completed


def _split_decay(group: dict, weight_decay: float) -> list[dict]:
    """An optimizer group as (its weight matrices and kernels, decayed; its biases and norm gains and shifts,
    not decayed): decay pulls a BatchNorm or LayerNorm gain towards 0, which rescales the layer instead of
    regularising it, and a bias does not add capacity to regularise (the AdamW recipe of nanoGPT and timm:
    only tensors of 2 or more dimensions decay)."""
    matrices = [p for p in group["params"] if p.ndim >= 2]
    vectors = [p for p in group["params"] if p.ndim < 2]
    return [
        part
        for part in (
            {**group, "params": matrices, "weight_decay": weight_decay},
            {**group, "params": vectors, "weight_decay": 0.0},
        )
        if part["params"]
    ]


def _caption_ce_sum(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Summed cross-entropy of logits (..., V) against targets (...) where mask (...) is set.

    Label smoothing spreads its share ``smoothing`` evenly over the words a caption can hold (<end>,
    <unk> and the vocabulary's words), not over <pad> and <start>, which are never a target and which
    the search never writes: smoothed over all V classes (F.cross_entropy's label_smoothing), the loss
    taught the model to put probability on them, taken from the real words.
    """
    logits = logits.reshape(-1, logits.size(-1)).float()  # (R,V)
    targets, mask = targets.reshape(-1), mask.reshape(-1)  # (R,), (R,)
    if smoothing == 0:
        return F.cross_entropy(logits, targets, ignore_index=Vocabulary.pad_id, reduction="sum")
    logp = F.log_softmax(logits, dim=-1)  # (R,V)
    nll = -logp.gather(1, targets.unsqueeze(1)).squeeze(1)  # (R,)
    # the specials that are never a target are the first ids: <pad> 0, <start> 1
    words = -logp[:, Vocabulary.start_id + 1 :].mean(-1)  # (R,): mean over the classes a target can be
    # weighted by the mask, not indexed with it: a boolean index is a host read on a GPU (see _loss_sums)
    return (((1.0 - smoothing) * nll + smoothing * words) * mask).sum()


def validates_inside_window(every: int, window: int, batches: int, *, across_epochs: bool) -> bool:
    """Whether a validation every ``every`` training batches ever comes inside a gradient accumulation window of
    ``window`` batches, in epochs of ``batches`` batches. Lightning restarts the windows at each epoch and steps at
    its last batch, so a validation at an epoch's position p (1-based) ends a window when p % window == 0 or p is
    the last. With ``across_epochs`` (trainer.check_val_every_n_epoch null) the count runs on over epochs: the
    k-th validation is at total batch k * every, position ((k * every - 1) % batches) + 1, and the positions repeat
    after batches / gcd(every, batches) validations; else it restarts each epoch (every, 2 * every, ... up to
    batches, the last of which, where ``every`` divides it, ends a window)."""
    if across_epochs:
        cycle = range(1, batches // math.gcd(every, batches) + 1)
        positions = ((k * every - 1) % batches + 1 for k in cycle)
    else:
        positions = range(every, batches, every)
    return any(p % window and p != batches for p in positions)


#: callback_metrics keys of the fit's final epoch and logged step (``on_fit_end``)
FIT_END_EPOCH, FIT_END_STEP = "_fit_end/epoch", "_fit_end/step"


class CaptionModule(pl.LightningModule):
    """Trains a :class:`CaptionNet`.

    Args:
        vocab: token list (set from the data by the CLI).
        encoder ... max_len: architecture, see :class:`CaptionNet`.
        encoder_weights: pretrained encoder weights, a torchvision weights name or a local file;
            loaded when a fresh fit starts. A fit resumed from a checkpoint takes the encoder from
            the checkpoint and needs neither the file nor a download.
        init_weights: a checkpoint of this library (``best.ckpt``, ``last.ckpt``) whose weights a fresh fit starts
            from, with this run's own optimizer, schedule and options: the second stage of staged fine-tuning
            (a first fit with ``freeze_encoder`` true, then ``--model.init_weights <its best.ckpt>
            --model.freeze_encoder false``). Its vocabulary, architecture and preprocessing must be this run's
            (refused otherwise, naming both sides). Not with ``encoder_weights`` (the checkpoint holds the
            encoder's); a resumed fit (``--ckpt_path``) takes its weights from what it resumes instead.
        lr, encoder_lr, weight_decay: AdamW; ``encoder_lr`` (default ``lr``) for a fine-tuned encoder.
            ``weight_decay`` applies to weight matrices, embedding tables and convolution kernels only (every
            parameter of 2 or more dimensions): biases and the gains and shifts of BatchNorm and LayerNorm are not
            decayed. With ``weight_decay`` > 0 the decoder's (and a fine-tuned encoder's) group is split in two,
            decayed and not.
        warmup_steps: optimizer steps of the linear warmup, at most a tenth of the run's: a longer
            warmup is cut to that, with a warning (a run without an end keeps it whole).
        lr_schedule: after the warmup, "cosine" (to 0 at the run's end, after its last step, as Hugging
            Face's and timm's: the last step takes a small rate, not 0; needs a run with an end),
            "step" (times ``lr_decay`` every ``lr_decay_epochs`` epochs, the classic Show-Attend-Tell
            recipe; counted from the run's start, so a warmup longer than that is decayed too) or "constant".
        channels_last: run the encoder in channels-last memory format (faster convolutions on
            GPUs with tensor cores; same results).
        compile_decoder: ``torch.compile`` the decoder for training (one-off compile time; the
            weights and checkpoints are unchanged). Training captions are then padded to
            ``max_caption_len`` + 2 tokens, so one compiled graph serves every batch.
        compile_encoder: ``torch.compile`` the encoder, at the first ``setup`` of any stage (fit, validate, test,
            predict: the encoder's forward is the same in each). For a frozen ResNet on a GPU, where its BatchNorm,
            ReLU and residual additions each pass over the activations again (19 of a frozen ResNet-101's ~30 ms
            of kernels per 256 images on an H200, ``benchmarks/RESULTS.md``), the compiler can fuse them into
            fewer passes. One-off compile time; weights and checkpoints unchanged. Not measured on a GPU yet:
            ``python benchmarks/throughput.py --compile-encoder`` compares.
        compile_mode: ``torch.compile``'s mode for ``compile_decoder`` and ``compile_encoder``: "default",
            "reduce-overhead" (the compiled forward and backward replayed as CUDA graphs: the host no longer
            launches the LSTM's many small kernels one by one), "max-autotune" or "max-autotune-no-cudagraphs".
        label_smoothing, alpha_c: loss terms. ``label_smoothing`` spreads its share of each target over the
            classes a caption can hold (not <pad> or <start>). ``alpha_c`` weights the doubly stochastic term, the
            mean over cells of (1 - a cell's attention summed over the words)^2 per caption, added to the per-word
            mean loss (the paper's lambda weighs a sum over cells against a caption's summed word losses: its
            lambda = 1 is alpha_c = cells / words, about 17 for COCO at 14x14; 1 here is the common PyTorch
            tutorials'). On shapes (64 cells, ~10 words) 1 spreads attention so much that pointing accuracy falls
            from 0.98 to 0.63 (12-epoch runs), so the default is 0.1.
        beam_size, length_penalty: search used in validation and test.
        max_decode_len: the longest caption that search writes; with the transformer decoder at most
            ``max_len``, which its position table covers (checked here).
        val_meteor, test_meteor: compute METEOR (needs Java and pycocoevalcap; slow to start) in
            validation / test. The other coco-caption metrics are always computed.
        image_size, mean, std: preprocessing, set from the data by the CLI, stored for inference.
    """

    def __init__(
        self,
        vocab: list[str] | None = None,
        encoder: str = "small_cnn",
        encoder_stage: int = 4,
        encoder_grid: int | None = None,
        encoder_channels: tuple[int, ...] = (32, 64, 96, 128),
        freeze_encoder: bool = False,
        encoder_weights: str | None = None,
        init_weights: str | None = None,
        decoder: str = "lstm",
        embed_dim: int = 128,
        hidden_dim: int = 256,
        attention_dim: int = 128,
        attention: str = "additive",
        dropout: float = 0.3,
        num_heads: int = 4,
        num_layers: int = 2,
        ffn_dim: int | None = None,
        tie_embeddings: bool = True,
        attention_layer: int = -1,
        max_len: int = 64,
        lr: float = 2e-3,
        encoder_lr: float | None = None,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        lr_schedule: str = "cosine",
        lr_decay: float = 0.8,
        lr_decay_epochs: int = 8,
        channels_last: bool = False,
        compile_decoder: bool = False,
        compile_encoder: bool = False,
        compile_mode: str = "default",
        label_smoothing: float = 0.0,
        alpha_c: float = 0.1,
        beam_size: int = 3,
        max_decode_len: int = 24,
        length_penalty: float = 0.0,
        val_meteor: bool = False,
        test_meteor: bool = True,
        image_size: int = 64,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        if not vocab:
            raise InputError("model.vocab is empty: it is set from the data module's training captions")
        check_model_options({k: v for k, v in locals().items() if k not in ("self", "__class__")})
        self.save_hyperparameters()
        # accepted, as a config may serve either decoder, but said: `--model.attention dot` for a transformer
        # (or `--model.num_layers 4` for the LSTM) changed nothing, silently
        hp = self.hparams
        ignored = [f"model.{k} ({hp[k]!r})" for k in ignored_options(decoder) if hp[k] != _ARCH_DEFAULTS[k]]
        if ignored:
            rank_zero_warn(f"the {decoder} decoder ignores {', '.join(ignored)}: options of the other decoder")
        self._skipped_images = 0  # images of this epoch the loader could not read, on this rank (training_step)
        self._restored_skipped: tuple[int, int] | None = None  # (epoch, count) a resume takes it up from
        self.vocab = Vocabulary(vocab)
        self.arch = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.hparams.items() if k in _ARCH_KEYS}
        self.net = CaptionNet(len(self.vocab), **self.arch)
        self.cell_centres = self.net.encoder.cell_centres(image_size, image_size)  # where grounding puts each cell
        self.grid = self.cell_centres.grid  # (h,w) for image_size x image_size images
        self._eval_outputs: list[tuple[int, list[int], torch.Tensor]] = []

    # -- set-up -----------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # every rank, after its join
            _destroy_gloo_group_at_exit()
        words = getattr(self.trainer.datamodule, "max_caption_len", None) if self._trainer is not None else None
        if stage == "fit" and self.hparams.decoder == "transformer" and words is not None:
            # teacher forcing feeds <start> and up to max_caption_len words: one position each. Checked here,
            # not at the first batch with a long caption, which stopped the run naming model.max_len only
            if words + 1 > self.hparams.max_len:
                raise InputError(
                    f"data.max_caption_len ({words}) needs {words + 1} positions (<start> and the words), more "
                    f"than model.max_len ({self.hparams.max_len}) the transformer decoder's table covers: lower "
                    f"data.max_caption_len or raise model.max_len"
                )
        if self.hparams.channels_last:
            self.net.encoder.to(memory_format=torch.channels_last)
        if stage == "fit" and self.hparams.compile_decoder and not getattr(self, "_compiled", False):
            # in place: parameter names (and checkpoints) stay as they are
            self.net.decoder.compile(mode=self.hparams.compile_mode)
            self._compiled = True
        if self.hparams.compile_encoder and not getattr(self, "_encoder_compiled", False):
            self.net.encoder.compile(mode=self.hparams.compile_mode)  # in place, as the decoder
            self._encoder_compiled = True

    def _load_pretrained_encoder(self) -> None:
        """``encoder_weights`` into the encoder, or ``init_weights`` into the whole model, once, unless a checkpoint
        was restored: a resumed fit (or a module loaded from a checkpoint) already holds its weights, which these
        would overwrite, and needs neither the file nor a download."""
        hp = self.hparams
        if getattr(self, "_weights_loaded", False) or getattr(self, "_restored", False):
            return
        if hp.encoder_weights:
            load_encoder_weights(self.net.encoder, hp.encoder_weights)
        if hp.init_weights:
            self._load_init_weights(hp.init_weights)
        self._weights_loaded = True

    def _load_init_weights(self, path: str) -> None:
        """The weights of the checkpoint ``path`` into this model, after the checks a resume makes (vocabulary,
        architecture, preprocessing), each error naming the file."""
        ckpt = load_weights_only(path)  # a CheckpointError naming the file when missing or unreadable
        meta = ckpt.get("captioning") if isinstance(ckpt, dict) else None
        if not isinstance(meta, dict) or not isinstance(ckpt.get("state_dict"), dict):
            raise CheckpointError(f"{path}: not a checkpoint of this library (no 'captioning' metadata or state_dict)")
        # what a second stage may change: whether the encoder trains, dropout, which layer's map is shown
        self._check_matches(meta, source=path, free=("freeze_encoder", "dropout", "attention_layer"))
        self.load_state_dict(ckpt["state_dict"])

    def configure_optimizers(self):
        # the first hook after Lightning restores a checkpoint (setup() runs before the restore, so it cannot
        # tell a resume), and before anything reads the encoder: estimated_stepping_batches below builds
        # the feature cache with it
        self._load_pretrained_encoder()
        hp = self.hparams
        enc = [p for p in self.net.encoder.parameters() if p.requires_grad]
        dec = list(self.net.decoder.parameters())
        groups = [{"params": dec, "lr": hp.lr}]
        if enc:
            # `is None`, not `or`: an encoder_lr of 0 is a value (keep the encoder's weights), not "unset"
            groups.append({"params": enc, "lr": hp.lr if hp.encoder_lr is None else hp.encoder_lr})
        elif hp.encoder_lr is not None:  # said, so a frozen encoder is never mistaken for a fine-tuned one
            rank_zero_warn(
                f"model.encoder_lr ({hp.encoder_lr}) is unused: model.freeze_encoder is true, so no encoder "
                "weight trains (set --model.freeze_encoder false to fine-tune the encoder)"
            )
        if hp.weight_decay > 0:
            groups = [part for group in groups for part in _split_decay(group, hp.weight_decay)]
        opt = torch.optim.AdamW(groups, weight_decay=hp.weight_decay)
        self._check_resumable(opt)
        # what this run's options give each group, for a resume to apply over the checkpoint's (on_train_start)
        self._group_options = [(g["lr"], g["weight_decay"]) for g in opt.param_groups]
        total = self.trainer.estimated_stepping_batches  # inf: no trainer.max_steps and max_epochs -1
        if math.isfinite(total):
            total = max(int(total), 1)
        elif hp.lr_schedule == "cosine":
            # int(inf) stopped such a run with a bare OverflowError, whatever its schedule
            raise InputError(
                "model.lr_schedule 'cosine' decays to 0 at the run's end, but this run has no end "
                "(trainer.max_epochs -1 and no trainer.max_steps): set one of them, or use lr_schedule 'step' or "
                "'constant' (e.g. with early stopping)"
            )
        # a warmup longer than a tenth of the run would leave short runs (smoke tests, a few epochs with the
        # default 100 steps) mostly warming up; cut, but said, so a longer one is never a silent surprise.
        # A run without an end has no tenth: its warmup is taken as given
        warmup = min(hp.warmup_steps, total // 10) if math.isfinite(total) else hp.warmup_steps
        if warmup < hp.warmup_steps:
            rank_zero_warn(
                f"model.warmup_steps ({hp.warmup_steps}) is more than a tenth of this run's {total} optimizer "
                f"steps: the warmup is cut to {warmup} steps"
            )
        # optimizer steps per epoch, from the loader: total // max_epochs was wrong whenever max_steps ends
        # training first, or max_epochs is -1. estimated_stepping_batches sets the loader up only when it needs
        # it: with max_epochs -1 it returns max_steps (or inf) first, and the step schedule, reading the unset
        # inf here, decayed never (or, in an endless run, turned every LR into NaN after the warmup)
        if hp.lr_schedule == "step" and self.trainer.train_dataloader is None:
            self.trainer.fit_loop.setup_data()  # as estimated_stepping_batches does when it needs the loader
        batches = self.trainer.num_training_batches
        if math.isfinite(batches) and batches > 0:
            steps_per_epoch = max(math.ceil(batches / self.trainer.accumulate_grad_batches), 1)
        elif math.isfinite(total):
            epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
            steps_per_epoch = max(total // epochs, 1)
        elif hp.lr_schedule == "step":
            raise InputError("model.lr_schedule 'step' needs the length of an epoch, and this run's loader has none")
        else:
            steps_per_epoch = 1  # unused: only the step schedule reads it

        def schedule(step: int) -> float:
            # the step decay runs from the start, under the warmup's ramp too: a warmup past a decay boundary rose to
            # the full rate and then dropped at once to the decayed one
            decay = hp.lr_decay ** (step // (steps_per_epoch * hp.lr_decay_epochs)) if hp.lr_schedule == "step" else 1
            if step < warmup:
                return (step + 1) / warmup * decay
            if hp.lr_schedule == "step":
                return decay
            if hp.lr_schedule == "constant":
                return 1.0
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(total - warmup, 1))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- training ---------------------------------------------------------------------------

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        """Images (B,3,H,W) through the encoder, or cached features (B,N,C) as they are -> (B,N,C).

        A frozen encoder runs without autograd: nothing of it is trained, so no activations are kept.
        """
        if inputs.dim() == 3:
            # cached features: cast once, to the autocast dtype under mixed precision (else every
            # step's attention would re-cast the whole (B,N,C) tensor), or to the weights' dtype
            dev = inputs.device.type
            if torch.is_autocast_enabled(dev):
                return inputs.to(torch.get_autocast_dtype(dev))
            return inputs.to(next(self.net.decoder.parameters()).dtype)
        if self.hparams.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        if not self.net.encoder.freeze:
            return self.net.encode(inputs).features
        with torch.no_grad():
            return self.net.encode(inputs).features

    def loss(self, inputs: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs: images (B,3,H,W) or features (B,N,C); tokens (B,L) or (B,M,L), M captions per image,
        each <start> ... <end> <pad>... (an all-<pad> row is no caption) -> (total loss, CE).

        Every caption word weighs the same, whichever image or rank it is on: the cross-entropy is
        summed and divided by the number of target words of the whole batch, counted across DDP
        ranks (DDP then averages gradients over ranks), so N processes compute exactly the gradient
        of one process on their union. The doubly stochastic term is likewise a mean over captions.
        """
        _, total, ce = self._objective(inputs, tokens)
        return total, ce

    def _objective(
        self, inputs: torch.Tensor, tokens: torch.Tensor, window: tuple[float, float, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(what to differentiate, the batch's total loss, its CE) for :meth:`loss`'s inputs.

        ``window`` = (target words, captions, A) of a gradient accumulation window of A batches (all ranks):
        what to differentiate is then normalised by the window's counts, times A (Lightning divides each batch's
        loss by A), so the window's accumulated gradient is that of one batch holding all of its words. The
        total and CE stay this batch's own means, for the logs: the differentiated value is the batch's share of
        its window's loss times A, which read as a loss was off by the batch's share (twice the loss in a last
        window of 2 batches of A = 4). Without a window the first two are the same.
        """
        ce_sum, dsa_sum, words, captions, nan_if_any = self._loss_sums(inputs, tokens)
        scale = float(torch.distributed.get_world_size()) if self._distributed() else 1.0
        ce = ce_sum * scale / words.clamp(min=1) + nan_if_any  # this batch's mean
        total = ce + self.hparams.alpha_c * dsa_sum * scale / captions.clamp(min=1)
        if window is None:
            return total, total, ce
        words, captions, a = window
        objective = ce_sum * (scale * a) / max(words, 1) + nan_if_any
        return objective + self.hparams.alpha_c * dsa_sum * (scale * a) / max(captions, 1), total, ce

    def _loss_sums(
        self, inputs: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sums the loss normalises (see :meth:`loss`): this rank's CE and doubly stochastic sums, the batch's
        target words and captions over all ranks, and 0 (or NaN where any rank's loss is not finite)."""
        if tokens.dim() == 2:
            tokens = tokens.unsqueeze(1)  # (B,L) -> (B,1,L)
        inputs_t, targets = tokens[..., :-1], tokens[..., 1:]  # (B,M,T) each, T = L-1
        logits, alpha = self.net.decoder(self.features(inputs), inputs_t)  # (B,M,T,V), (B,M,T,N)
        mask = targets != Vocabulary.pad_id  # (B,M,T)
        ce_sum = _caption_ce_sum(logits, targets, mask, self.hparams.label_smoothing)
        real = mask.any(-1)  # (B,M): captions that exist
        coverage = (alpha.float() * mask.unsqueeze(-1)).sum(2)  # (B,M,N): total attention each cell received
        # weighted by ``real``, not indexed with it: a boolean index (and its backward) is a nonzero(), which on
        # a GPU copies the count to the host and waits for every queued kernel, at every step
        dsa_sum = (((1.0 - coverage) ** 2).mean(-1) * real).sum()  # (B,M) -> ()
        # one all-reduce: the words and captions of the whole batch, and whether any rank's loss is not finite
        bad = ~torch.isfinite(ce_sum + dsa_sum)
        words, captions, non_finite = self._global_sums(torch.stack([mask.sum(), real.sum(), bad]))
        # a rank whose loss is not finite stops the run (training_step); made NaN on every rank, so all stop
        # together instead of the others waiting for its gradients in DDP's all-reduce until the timeout
        nan_if_any = torch.where(non_finite > 0, float("nan"), 0.0)  # ()
        return ce_sum, dsa_sum, words, captions, nan_if_any

    def _accumulation_window(self, batch_idx: int) -> tuple[float, float, int] | None:
        """(target words, captions, A) of the gradient accumulation window of A batches that ``batch_idx`` is in,
        over all ranks, for :meth:`loss`; None without accumulation (A = 1) or without our data module.

        Why: Lightning averages a window's batches, and normalised each by its own word count, a word of a batch
        with fewer words weighed more than in one batch as large as the window. The window's counts come from
        the data module before its batches are loaded (Lightning's windows: batches [kA, (k+1)A) of each
        epoch, the last one cut at the epoch's end, whose batches Lightning still divides by A)."""
        trainer = self._trainer
        a = getattr(trainer, "accumulate_grad_batches", 1)
        data = getattr(trainer, "datamodule", None)
        if a <= 1 or not hasattr(data, "window_counts"):
            return None
        first = batch_idx - batch_idx % a
        end = trainer.num_training_batches  # the epoch's last batch ends its window early
        counts = data.window_counts(range(first, first + a if math.isinf(end) else min(first + a, int(end))))
        return None if counts is None else (*map(float, counts), a)

    def _global_sums(self, counts: torch.Tensor) -> torch.Tensor:
        """Counts (3,) summed over DDP ranks (the local counts in one process), as float32."""
        counts = counts.to(torch.float32)
        if self._distributed():
            torch.distributed.all_reduce(counts)
        return counts

    def _fixed_length(self, tokens: torch.Tensor) -> torch.Tensor:
        """With ``compile_decoder``, tokens (B,M,L) padded to the longest caption the data can give:
        the LSTM's loop over words is unrolled into the compiled graph, so every new batch length
        would compile again (and past torch's recompile limit run uncompiled, silently). The padding
        is ignored by the loss, so the loss is the same."""
        if not self.hparams.compile_decoder or self._trainer is None:
            return tokens
        max_words = getattr(self.trainer.datamodule, "max_caption_len", None)
        if max_words is None or tokens.size(-1) >= max_words + 2:
            return tokens
        return F.pad(tokens, (0, max_words + 2 - tokens.size(-1)), value=Vocabulary.pad_id)  # <start> w.. <end>

    # devices where a loss is checked one step late: reading it back at once would wait for the GPU at every step
    _DEFERRED_LOSS_CHECK = ("cuda",)

    def _check_loss(self, loss: torch.Tensor) -> None:
        """Stop the run on a non-finite loss, naming the step; on a GPU at the next step (or validation, save, end).

        Why deferred there: ``bool(isfinite(loss))`` copies the flag to the host, which waits for the GPU to finish
        everything queued so far, and the GPU then idles while the host queues the backward and the next step. Its
        copy goes to pinned memory instead, with an event behind it, and is read when the next step begins (by then
        the forward that made it has long run). The update of the step whose loss was not finite is then taken
        (its weights not finite), but never saved: ``on_save_checkpoint`` reads the pending loss first, and refuses
        weights that are not finite anyway. Under DDP every rank's loss is NaN together (see :meth:`loss`), so all
        stop at the same step."""
        if loss.device.type not in self._DEFERRED_LOSS_CHECK:
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"loss is {loss.item()} at step {self.global_step}")
            return
        if loss.device.type == "cuda":
            host = torch.empty((), dtype=loss.dtype, pin_memory=True)
            host.copy_(loss.detach(), non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(loss.device))
        else:  # another device told to defer (a test does so on the CPU): a copy, read at the same points
            host, ready = loss.detach().clone(), None
        self._unread_loss = (host, ready, self.global_step)

    def _raise_if_loss_not_finite(self) -> None:
        unread, self._unread_loss = getattr(self, "_unread_loss", None), None
        if unread is None:
            return
        host, ready, step = unread
        if ready is not None:
            ready.synchronize()  # the copy has landed (waits for the GPU only up to the step that made it)
        value = float(host)
        if not math.isfinite(value):
            raise NonFiniteLossError(f"loss is {value} at step {step}")

    def on_validation_start(self) -> None:
        self._raise_if_loss_not_finite()

    def on_train_end(self) -> None:
        self._raise_if_loss_not_finite()

    def on_fit_end(self) -> None:
        # the fit's final epoch and step, which a test after fit stamps its metrics.csv rows with: under ddp_spawn
        # that test runs in new processes and only callback_metrics come back to the main process (cli.py)
        trainer = self.trainer
        steps = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step Lightning stamps logged rows with
        trainer.callback_metrics.update(
            {FIT_END_EPOCH: torch.tensor(trainer.current_epoch), FIT_END_STEP: torch.tensor(steps)}
        )

    def training_step(self, batch, batch_idx):
        self._raise_if_loss_not_finite()  # the step before's, where it is read one step late
        inputs, tokens, skipped = batch if len(batch) == 3 else (*batch, 0)
        self._skipped_images += int(skipped)  # a count from the loader (no device sync); logged at the epoch's end
        if inputs.size(0) == 0:
            # every image of this batch failed to load: a zero loss that still touches every parameter
            # (DDP's gradient all-reduce), and the same collectives as loss() and the logs below, which
            # the other ranks are waiting in: without them they would wait forever (or, on NCCL, pair
            # with the wrong collective)
            zero = sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
            _, _, non_finite = self._global_sums(torch.zeros(3, device=zero.device))  # words, captions, non-finite
            if non_finite > 0:
                # another rank's loss is not finite: it stops, so this rank must too (see loss())
                raise NonFiniteLossError(f"loss is nan at step {self.global_step} (on another rank)")
            if self._distributed():  # the other ranks' logs sync with these (each rank logs its share: 0 here)
                self.log("train/loss", zero, prog_bar=True, batch_size=1, sync_dist=True)
                self.log("train/ce", zero, batch_size=1, sync_dist=True)
            # one process: nothing to log, a batch of no image has no loss (its 0.0 rows read as a perfect fit)
            return zero
        objective, loss, ce = self._objective(inputs, self._fixed_length(tokens), self._accumulation_window(batch_idx))
        self._check_loss(objective)
        # each rank's loss is its share of the batch's (see loss()); their mean over ranks is the batch's loss,
        # with gradient accumulation too (what is differentiated then is not a loss to read: see _objective)
        self.log("train/loss", loss, prog_bar=True, batch_size=inputs.size(0), sync_dist=True)
        self.log("train/ce", ce, batch_size=inputs.size(0), sync_dist=True)
        return objective

    # -- free-running evaluation ----------------------------------------------------------------

    def _decode_batch(self, batch) -> None:
        inputs, index = batch
        if inputs.size(0) == 0:  # every image of the batch failed to load (and was reported)
            return
        features = self.features(inputs)
        hyps = beam_search(
            self.net.decoder,
            features,
            beam_size=self.hparams.beam_size,
            max_len=self.hparams.max_decode_len,
            length_penalty=self.hparams.length_penalty,
        )
        for i, h in zip(index.tolist(), hyps):
            self._eval_outputs.append((i, h[0].tokens, h[0].attention))

    def validation_step(self, batch, batch_idx):
        self._decode_batch(batch)

    def test_step(self, batch, batch_idx):
        self._decode_batch(batch)

    def _distributed(self) -> bool:
        if self._trainer is None or self.trainer.world_size <= 1:
            return False
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    def _gathered_outputs(self) -> list[tuple[int, list[int], torch.Tensor]]:
        """This rank's decoded captions, or every rank's under DDP, deduplicated by image index
        (a distributed sampler repeats images to even out the shards) and in index order."""
        outputs, self._eval_outputs = self._eval_outputs, []
        if self._distributed():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, outputs)
            outputs = [o for part in gathered for o in part]
        unique = {i: (i, toks, att) for i, toks, att in outputs}
        return [unique[i] for i in sorted(unique)]

    def _score(self, split: str, meteor: bool) -> tuple[dict[str, float], list[dict]]:
        """Metrics and captions of ``split``: gathered from all ranks, scored once on rank 0 and
        shared, so every rank logs (and checkpoints on) the same numbers."""
        outputs = self._gathered_outputs()
        result = self._score_outputs(split, outputs, meteor) if self.trainer.is_global_zero else None
        if self._distributed():
            box = [result]
            torch.distributed.broadcast_object_list(box, src=0)
            result = box[0]
        return result

    def _image_size(self, split: str, records: list, i: int) -> tuple[int, int]:
        """(W,H) of an evaluation image, read from its header once per run, not at every validation."""
        cache = self.__dict__.setdefault("_image_sizes", {})
        if (split, i) not in cache:
            from PIL import Image

            with Image.open(records[i].image_path) as im:
                cache[(split, i)] = im.size
        return cache[(split, i)]

    def _score_outputs(
        self, split: str, outputs: list[tuple[int, list[int], torch.Tensor]], meteor: bool
    ) -> tuple[dict[str, float], list[dict]]:
        records = self.trainer.datamodule.records(split)
        if not outputs:
            if records and not self.trainer.sanity_checking:  # the sanity check sees only a few batches
                # otherwise no metric is logged, and the checkpoint callback fails on a missing key instead
                raise RuntimeError(
                    f"{split} split: none of its {len(records)} images could be loaded (see the 'skipping image' "
                    "warnings above), so there is nothing to score"
                )
            return {}, []
        words = [self.vocab.decode(toks) for _, toks, _ in outputs]
        texts = [detokenize(w) for w in words]  # what is scored is what the results file holds
        ids = [records[i].image_id for i, _, _ in outputs]
        metrics = score_captions(
            {image_id: records[i].captions for image_id, (i, _, _) in zip(ids, outputs)},
            dict(zip(ids, texts)),
            meteor=meteor,
        )
        if all(records[i].objects is not None for i, _, _ in outputs):
            sizes = [self._image_size(split, records, i) for i, _, _ in outputs]
            objects = [records[i].objects for i, _, _ in outputs]
            metrics.update(shapes_scores(words, [a for _, _, a in outputs], self.cell_centres, objects, sizes))
        # COCO's results format (what pycocotools' loadRes reads) has the annotation file's integer ids
        captions = [{"image_id": _results_id(image_id), "caption": text} for image_id, text in zip(ids, texts)]
        return metrics, captions

    def on_validation_epoch_end(self) -> None:
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            _close_redone_validation(self.trainer.fit_loop.epoch_loop.val_loop.batch_progress)
        metrics, _ = self._score("val", self.hparams.val_meteor)
        for k, v in metrics.items():
            # every rank scored the same gathered captions, so the max over ranks is each rank's value, exactly (a
            # mean over 3 ranks could round). Synced all the same: unsynced epoch-level values under DDP each
            # brought Lightning's advice to sync them, two lines per metric
            shown = k in ("bleu4", "cider_d", "object_accuracy")
            self.log(f"val/{k}", v, prog_bar=shown, sync_dist=True, reduce_fx="max")

    def on_test_epoch_end(self) -> None:
        metrics, captions = self._score("test", self.hparams.test_meteor)
        for k, v in metrics.items():
            self.log(f"test/{k}", v, sync_dist=True, reduce_fx="max")  # the same on every rank (as val/ above)
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank must ask
        if self.trainer.is_global_zero and log_dir:
            run = Path(log_dir)
            run.mkdir(parents=True, exist_ok=True)
            _write_whole(
                {
                    run / "test_metrics.json": json.dumps(metrics, indent=2) + "\n",
                    run / "test_captions.json": json.dumps(captions, indent=1) + "\n",
                }
            )

    # -- checkpoints carry what inference needs ---------------------------------------------------

    def configure_callbacks(self) -> list[pl.Callback]:
        return [CheckpointOnSigterm()]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resuming: continue the epoch's data order where it stopped and the random numbers
        (dropout) where they were, so the run goes on exactly as if it had never stopped."""
        meta = checkpoint.get("captioning")
        if meta is not None:
            self._check_matches(meta, source=getattr(self._trainer, "ckpt_path", None) if self._trainer else None)
            self._warn_if_other_data(meta)
        self._restored = True  # the encoder's weights come from the checkpoint (_load_pretrained_encoder)
        states = checkpoint.get("optimizer_states")
        if states:  # its optimizer's group sizes and weight decay, for configure_optimizers to compare
            hparams = checkpoint.get("hyper_parameters") or {}
            self._ckpt_groups = ([len(g["params"]) for g in states[0]["param_groups"]], hparams.get("weight_decay"))
        # read before _resume_after_epoch_end rewrites the loops' state
        loop = checkpoint.get("loops", {}).get("fit_loop", {})
        epoch_ended = bool(loop.get("epoch_loop.batch_progress", {}).get("is_last_batch"))
        # and the epoch's end hooks ran too (a SIGTERM's checkpoint then): resume["epoch"] is already the next one
        epochs = loop.get("epoch_progress", {}).get("total", {})
        epoch_closed = bool(epochs) and epochs.get("started") == epochs.get("completed")
        if self._trainer is not None and self.trainer.state.fn == "fit":
            # Lightning then counts the logged steps from a restart's rule; the first batch sets them right
            self._align_logged_step = _resume_after_epoch_end(checkpoint, self.trainer.max_steps != -1)
            if _redo_interrupted_validation(checkpoint):
                _finish_validation_past_max_steps(self.trainer.fit_loop)
        resume = checkpoint.get("resume")
        if not resume or self._trainer is None or self.trainer.state.fn != "fit":
            return
        self._pending_rng = resume["rng"]
        self._restored_skipped = (resume["epoch"], int(resume.get("skipped_images", 0)))
        ranks = resume.get("rng_ranks")
        if ranks and len(ranks) == self.trainer.world_size:  # the same number of processes: each its own
            self._pending_rng = ranks[self.trainer.global_rank]
        epoch, batches_done = resume["epoch"], resume["batches_done"]
        after_last_batch = bool(batches_done) and epoch_ended
        if after_last_batch:
            # written after the epoch's last batch: the next epoch, from its start. The sampler tells so only where
            # the epoch took all of its items; with trainer.limit_train_batches it took fewer, and a resume then
            # trained on the rest of that epoch's order, the loader's workers having drawn it before set_epoch.
            # Said to the sampler even where the epoch number stays (a closed epoch's): its workers draw at once
            epoch, batches_done = (epoch if epoch_closed else epoch + 1), 0
        dm = self.trainer.datamodule
        if (batches_done or after_last_batch or "data_seed" in resume) and dm is not None:
            source = getattr(self.trainer, "ckpt_path", None) or "the checkpoint"
            items = _rank_items_done(resume, batches_done, dm.batch_size, self.trainer.world_size, source)
            dm.resume_at(epoch, items, resume.get("data_seed"))
            progress = loop.get("epoch_loop.batch_progress", {}).get("current")
            if items != batches_done * dm.batch_size and progress:
                # another batch size or number of processes: the epoch's batches done, in this run's batches (a whole
                # number: see _rank_items_done). Lightning ends an epoch when its count reaches the loader's length,
                # which the old count could reach with items left (2 processes where there was 1: half the epoch's
                # rest was never trained)
                for key in ("ready", "started", "processed", "completed"):
                    progress[key] = items // dm.batch_size
            # Lightning's "your dataloader is not resumable ... unreliable results": it is, through resume_at
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")

    def _warn_if_other_data(self, meta: dict) -> None:
        """A test or validation of a checkpoint on data other than it was trained on (another training split): said,
        not refused (scoring a model on another set is a use), but a run trained on one's own data from
        configs/shapes.yaml and tested with ``--ckpt_path best`` and no config was scored on the shapes set without a
        word."""
        trained = meta.get("data")
        dm = self.trainer.datamodule if self._trainer is not None else None
        if not isinstance(trained, dict) or dm is None or self.trainer.state.fn not in ("test", "validate"):
            return
        # (a set of test images alone is another set on purpose)
        if dm.records("train") and dm.train_fingerprint() != trained.get("train_images"):
            ckpt, stage = getattr(self.trainer, "ckpt_path", None) or "the checkpoint", self.trainer.state.fn.value
            rank_zero_warn(
                f"{ckpt} was trained on other data ({trained.get('file')}); this {stage} scores it on "
                f"{Path(dm.source).resolve()} (the run's config, -c <run folder>/config.yaml, gives its data)"
            )

    def _check_matches(self, meta: dict, source: str | None = None, free: tuple[str, ...] = ()) -> None:
        """Refuse a checkpoint whose vocabulary, architecture or image preprocessing differs from this
        run's, naming both sides (and the checkpoint file ``source``, where known), before any weights are copied
        or any step is taken; the options ``free`` may differ."""

        def refuse(message: str) -> CheckpointError:
            return CheckpointError(f"{source}: {message}" if source else message)

        # image size, mean and std come from the data options, not from the checkpoint: a model tested (or
        # resumed) on images prepared otherwise than it was trained on scores lower, silently. Checked first: on the
        # shapes set another image size draws other scenes, hence another vocabulary, which was said instead
        pre = meta.get("preprocess") or {}
        # both sides come from _preprocess(): the same float() of the same options, so == is exact
        differ = {k: (pre[k], v) for k, v in self._preprocess().items() if k in pre and pre[k] != v}
        if differ:
            sides = ", ".join(f"{k}: checkpoint {a!r} vs data {b!r}" for k, (a, b) in differ.items())
            flags = " ".join(f"--data.{k} {json.dumps(a)}" for k, (a, _) in differ.items())
            raise refuse(f"image preprocessing mismatch ({sides}); to match the checkpoint pass {flags}")
        ours, theirs = list(self.vocab.tokens), list(meta["vocab"])
        if ours != theirs:
            diff = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            raise refuse(
                f"vocabulary mismatch: the checkpoint has {len(theirs)} tokens, the data gives {len(ours)}; "
                f"first difference at index {diff}: "
                f"checkpoint {theirs[diff : diff + 3]} vs data {ours[diff : diff + 3]}"
            )
        # options this decoder ignores change nothing, so they cannot mismatch
        unused = ignored_options(self.arch["decoder"])
        arch = {k: v for k, v in meta["model"].items() if k in self.arch and k not in unused and k not in free}
        differ = {k: (arch[k], self.arch[k]) for k in arch if arch[k] != self.arch[k]}
        if differ:
            sides = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in differ.items())
            raise refuse(f"model configuration mismatch ({sides})")

    def _preprocess(self) -> dict:
        """How this model's images are prepared, as checkpoints store it (and inference reads it back)."""
        hp = self.hparams
        return {
            "image_size": int(hp.image_size),
            "mean": [float(m) for m in hp.mean],
            "std": [float(s) for s in hp.std],
        }

    def _check_resumable(self, opt: torch.optim.Optimizer) -> None:
        """Refuse, naming the cause, a resume whose optimizer groups differ from the checkpoint's: Lightning
        would stop at the restore with only "loaded state dict has a different number of parameter groups".
        Weight decay > 0 splits each group in two (decayed and not), so switching it on or off changes them."""
        ckpt = getattr(self, "_ckpt_groups", None)  # set by on_load_checkpoint, which runs before this
        if ckpt is None:
            return
        (theirs, their_decay), ours = ckpt, [len(g["params"]) for g in opt.param_groups]
        if theirs == ours:
            return
        why = (
            f"model.weight_decay: checkpoint {their_decay} vs this run {self.hparams.weight_decay}; weight decay > 0 "
            "splits each group into decayed weight matrices and undecayed biases and norms"
            if their_decay is not None and (their_decay > 0) != (self.hparams.weight_decay > 0)
            else "a checkpoint written before weight decay left biases and norms alone, or other trainable parameters"
        )
        raise InputError(
            f"cannot resume: the checkpoint's optimizer has parameter groups of {theirs} tensors, this run's options "
            f"give {ours} ({why}); resume with the checkpoint's options, or start a new fit"
        )

    def on_train_start(self) -> None:
        """A resume restores the optimizer's groups from the checkpoint, their lr and weight_decay with them, over
        this run's options: a ``--model.lr``, ``encoder_lr`` or ``weight_decay`` flag given with ``--ckpt_path``
        (which wins over the checkpoint's options, see cli.py) was not applied, silently, while the checkpoints
        the run then wrote recorded it. Set here, after the restore and before the first step; the schedule's
        position (and the optimizer's moments) are kept. Without such a flag the values are the same."""
        self._warn_if_validations_split_accumulation_windows()
        self._warn_if_no_validation_comes()
        wanted = getattr(self, "_group_options", None)
        if not getattr(self, "_restored", False) or not wanted or not self.trainer.lr_scheduler_configs:
            return
        opt, sched = self.trainer.optimizers[0], self.trainer.lr_scheduler_configs[0].scheduler
        for i, (group, (lr, weight_decay)) in enumerate(zip(opt.param_groups, wanted)):
            group["weight_decay"] = weight_decay
            group["initial_lr"] = sched.base_lrs[i] = lr
            # the LR of the step it resumes at, by this run's schedule: the checkpoint's own was for its options
            # (another model.lr_schedule, warmup_steps, lr_decay, or a longer trainer.max_steps, which stretches the
            # cosine), and the first step took it before the schedule's next step set the new one
            group["lr"] = lr * sched.lr_lambdas[i](sched.last_epoch)
        sched._last_lr = [group["lr"] for group in opt.param_groups]

    def _warn_if_no_validation_comes(self) -> None:
        """trainer.check_val_every_n_epoch past trainer.max_epochs: no validation ran, and the run said so only at its
        end ("no checkpoint has a validation score"), and infer.py then found no best.ckpt. Also where the last
        epochs are left unvalidated (best.ckpt cannot come from them). Said as the training starts."""
        trainer = self.trainer
        every, epochs = getattr(trainer, "check_val_every_n_epoch", None), getattr(trainer, "max_epochs", None)
        if not every or not epochs or epochs < 0:
            return
        # num_val_batches is known here after a sanity check only (empty otherwise): none there, or none asked for
        if trainer.limit_val_batches == 0 or (trainer.num_val_batches and not any(trainer.num_val_batches)):
            return
        if epochs < every:
            rank_zero_warn(
                f"trainer.check_val_every_n_epoch ({every}) is more than trainer.max_epochs ({epochs}): no validation "
                "runs, so no best.ckpt is written (last.ckpt is); lower check_val_every_n_epoch or train longer"
            )
        elif epochs % every and trainer.max_steps == -1:  # (a step limit may end the run before those epochs)
            rank_zero_warn(
                f"trainer.max_epochs ({epochs}) is not a multiple of trainer.check_val_every_n_epoch ({every}): the "
                f"last {epochs % every} epoch(s) are not validated, so best.ckpt cannot come from them"
            )

    def _warn_if_validations_split_accumulation_windows(self) -> None:
        """A validation inside an epoch (trainer.val_check_interval) every N batches, with gradients accumulated
        over A batches and N not a multiple of A, writes its checkpoints inside a window: the gradient summed so far
        is in no checkpoint, so a run resumed from one takes that window's step on its remaining batches alone.
        (SIGTERM's checkpoint waits for the window's end; a validation's cannot.)"""
        trainer = self.trainer
        window, batches = trainer.accumulate_grad_batches, trainer.num_training_batches
        if window < 2 or not trainer.checkpoint_callbacks or not any(n > 0 for n in trainer.num_val_batches):
            return
        every = getattr(trainer, "val_check_batch", None)
        across = trainer.check_val_every_n_epoch is None
        if (seconds := getattr(trainer, "_val_check_time_interval", None)) is not None:
            when, fix = f"every {seconds:g} s (a time), at any batch, so also", "a number of batches"
        elif not isinstance(every, int) or not isinstance(batches, int):
            return  # once an epoch (at its last batch, which always steps), or an epoch of unknown length
        elif validates_inside_window(every, window, batches, across_epochs=across):
            # across epochs the windows restart at each epoch: multiples of A meet their ends only if epochs are too
            unit = batches if across and batches % window else window
            when = f"every {every} batches{' (counted across epochs)' if across else ''}, at times"
            fix = f"a multiple of {unit}"
        else:
            return
        rank_zero_warn(
            f"validation runs {when} inside the accumulation windows of {window} batches "
            f"(trainer.accumulate_grad_batches): a run resumed from a checkpoint written then loses the gradient its "
            f"window had summed so far. Make trainer.val_check_interval {fix} for exact resumes"
        )

    def on_train_epoch_start(self) -> None:
        # images the loader could not read this epoch, on this rank; a resumed epoch starts from the checkpoint's
        # count (all ranks', given to rank 0), so the epoch logs what an uninterrupted one does
        restored, self._restored_skipped = self._restored_skipped, None
        same_epoch = restored is not None and restored[0] == self.current_epoch and self.global_rank == 0
        self._skipped_images = restored[1] if same_epoch else 0

    def on_train_epoch_end(self) -> None:
        # summed over the ranks (every rank logs, 0 when none: the all-reduce needs all of them). Counted per step
        # and logged with on_epoch, it was lost for an epoch resumed mid-way (Lightning keeps no partial epoch sums
        # in checkpoints), or whole where a SIGTERM came in the validation at the epoch's end
        total = torch.full((), float(self._skipped_images), device=self.device)
        self.log("train/skipped_images", total, reduce_fx="sum", sync_dist=True)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        encoder = self.net.encoder
        if not encoder.freeze and encoder.training != self.training:
            # released during the run (set_frozen(False) in a callback): Lightning never calls train() in a fit (it
            # writes each module's flag back after a validation), so the encoder stayed in the eval mode it was
            # held in while frozen, its BatchNorm statistics fixed for the rest of the run
            encoder.train(self.training)
        if not encoder.freeze and not getattr(self, "_release_checked", False):
            self._release_checked = True  # once: a fine-tuned encoder is in the optimizer from the start
            optimized = {id(p) for opt in self.trainer.optimizers for g in opt.param_groups for p in g["params"]}
            if any(id(p) not in optimized for p in encoder.parameters()):
                # the optimizer was built with the encoder frozen (its weights left out): released now, it takes
                # gradients and its BatchNorm statistics follow the data, but no step ever changes its weights
                rank_zero_warn(
                    "the encoder was released during the fit (set_frozen(False)), but the optimizer was built with it "
                    "frozen: its weights will not change. For staged fine-tuning, start a second fit from this one's "
                    "checkpoint: --model.init_weights <best.ckpt> --model.freeze_encoder false"
                )
        if getattr(self, "_align_logged_step", False):
            # the step loggers write (batches that took an optimizer step) is the optimizer's step count in
            # an uninterrupted run of one optimizer; Lightning's restart rule was made for another checkpoint
            self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.trainer.global_step
            self._align_logged_step = False
        rng = getattr(self, "_pending_rng", None)
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and self.device.type == "cuda":  # dropout on a GPU draws from the GPU's generator
                torch.cuda.set_rng_state(rng["cuda"], self.device)
            random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
            self._pending_rng = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self._raise_if_loss_not_finite()  # a non-finite loss read one step late (see _check_loss) is named first
        # the loss check in training_step sees a step's loss, not what its update did: an inf gradient under a
        # finite loss makes AdamW write NaN weights, which an epoch's end would then save over the last good
        # checkpoint. Refused here, before anything is written, so the files on disk stay finite.
        bad = [
            k for k, v in checkpoint.get("state_dict", {}).items() if v.is_floating_point() and not v.isfinite().all()
        ]
        if bad:
            raise NonFiniteLossError(
                f"weights are not finite at step {self.global_step} ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}): checkpoint not written, the one on disk is kept"
            )
        # any checkpoint written during fit, also by a validation inside it (val_check_interval, best.ckpt)
        if self._trainer is not None and self.trainer.state.fn == "fit":
            # a resume's RNG state waits for its first batch (on_train_batch_start); until then (a validation run
            # again, the end of the epoch it closed) this process's own state is not the run's, and a checkpoint
            # written there made a run resumed from it draw other dropout than the uninterrupted run
            rng = getattr(self, "_pending_rng", None)
            if rng is None:
                state = random.getstate()
                rng = {"torch": torch.get_rng_state(), "python": [state[0], list(state[1]), state[2]]}
                if self.device.type == "cuda":
                    rng["cuda"] = torch.cuda.get_rng_state(self.device)
            batches_done = int(self.trainer.fit_loop.epoch_loop.batch_progress.current.processed)
            checkpoint["resume"] = {"epoch": int(self.current_epoch), "batches_done": batches_done, "rng": rng}
            batch_size = getattr(self.trainer.datamodule, "batch_size", None)
            if isinstance(batch_size, int):  # the epoch's items all ranks took, whatever a resume's batch or ranks
                checkpoint["resume"]["items_done"] = batches_done * batch_size * self.trainer.world_size
            data_seed = getattr(self.trainer.datamodule, "data_seed", None)
            if data_seed is not None:  # the epoch's order: a resume goes on in it, whatever its own seed
                checkpoint["resume"]["data_seed"] = int(data_seed)
            skipped = self._skipped_images  # this epoch's so far
            if self._distributed():
                # each rank's own: the ranks' captions differ in length, so their dropout draws and RNG states
                # part; a resume that gave every rank rank 0's state changed rank 1's dropout. Every rank
                # writes a checkpoint's contents (only rank 0 saves them), so all of them are here.
                ranks: list = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(ranks, (checkpoint["resume"]["rng"], skipped))
                checkpoint["resume"]["rng_ranks"] = [rng for rng, _ in ranks]
                skipped = sum(count for _, count in ranks)
            checkpoint["resume"]["skipped_images"] = skipped
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        checkpoint["captioning"] = {
            "format": CHECKPOINT_FORMAT,
            "vocab": list(self.vocab.tokens),
            "model": dict(self.arch),
            "preprocess": self._preprocess(),
            "grid": list(self.grid),
            "search": {
                "beam_size": int(self.hparams.beam_size),
                "max_len": int(self.hparams.max_decode_len),
                "length_penalty": float(self.hparams.length_penalty),  # what validation picked best.ckpt with
            },
        }
        if hasattr(dm, "train_fingerprint") and self.trainer.state.fn == "fit":  # the data it was trained on
            # the file as the config gives it (not resolved: a shared checkpoint need not show the trainer's folders)
            data = {"file": str(dm.source), "train_images": dm.train_fingerprint()}
            checkpoint["captioning"]["data"] = data


def _write_whole(texts: dict[Path, str]) -> None:
    """Write each text to its path, all of them or none (temporary files beside them, renamed over them once all are
    written): on a full disk ``test_captions.json`` was left empty beside a complete ``test_metrics.json``, or one of
    the pair could come from an earlier test than the other. An OSError that names no file (a full disk) is raised
    naming the file, which train.py prints as one line."""
    temps = {path: path.with_name(f".{path.name}.tmp") for path in texts}
    try:
        for path, text in texts.items():
            if path.is_dir():  # the renames below would fail there, after the first had replaced its file
                raise IsADirectoryError(errno.EISDIR, "a folder, not a file: not written", str(path))
            try:
                temps[path].write_text(text, encoding="utf-8")
            except OSError as e:
                if e.filename is not None and e.filename != str(temps[path]):
                    raise
                raise OSError(e.errno, f"{e.strerror}: not written", str(path)) from e
        for path, tmp in temps.items():
            os.replace(tmp, path)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
