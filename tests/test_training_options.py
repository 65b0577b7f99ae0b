"""Training options: learning-rate schedules through train.py (each optimizer step's learning rate),
and fixed-length captions for a compiled decoder."""

from __future__ import annotations

import csv
import math
import os
import warnings

import pytest

from conftest import ROOT, TINY, run_script

QUICK = ["--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0", "--test_after_fit", "false"]


def _lrs(tmp_path, *extra) -> tuple[dict[int, tuple[float, float]], str]:
    """step -> (decoder LR, encoder LR) of a tiny fit (6 batches per epoch), as LearningRateMonitor saw them,
    and the run's stderr."""
    monitor = "--trainer.callbacks+=LearningRateMonitor"
    proc = run_script(str(ROOT / "train.py"), "fit", "-c", str(TINY), *QUICK, monitor, *extra, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(next(tmp_path.glob("runs/tiny/version_*/metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("lr-AdamW/pg1")]
    return {int(r["step"]): (float(r["lr-AdamW/pg1"]), float(r["lr-AdamW/pg2"])) for r in rows}, proc.stderr


def test_step_decay_happens_at_epoch_ends_even_when_max_steps_ends_training(tmp_path):
    """Before, steps per epoch were max_steps-bound total // max_epochs = 4, not the loader's 6."""
    extra = ["--trainer.max_steps", "12", "--trainer.max_epochs", "3", "--model.lr_schedule", "step"]
    extra += ["--model.lr_decay_epochs", "1", "--model.lr_decay", "0.5", "--model.warmup_steps", "0"]
    lrs, stderr = _lrs(tmp_path, *extra, "--model.encoder_lr", "0.0005")
    assert sorted(lrs) == list(range(12))
    assert "warmup" not in stderr  # nothing was cut
    for step, (dec, enc) in lrs.items():
        factor = 0.5 ** (step // 6)
        assert dec == pytest.approx(0.002 * factor) and enc == pytest.approx(0.0005 * factor), step


def test_cosine_after_a_linear_warmup_which_is_cut_to_a_tenth_of_the_run_with_a_warning(tmp_path):
    """Before, the cut from 5 to 2 steps was silent."""
    lrs, stderr = _lrs(tmp_path, "--trainer.max_steps", "20", "--trainer.max_epochs", "-1", "--model.warmup_steps", "5")
    assert "model.warmup_steps (5) is more than a tenth of this run's 20 optimizer steps: " in stderr
    assert "the warmup is cut to 2 steps" in stderr
    warmup, total = 2, 20  # warmup is capped at a tenth of the run
    assert sorted(lrs) == list(range(total))
    for step, (dec, enc) in lrs.items():
        if step < warmup:
            factor = (step + 1) / warmup
        else:
            factor = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        assert dec == pytest.approx(0.002 * factor) and enc == dec, step


def test_a_compiled_decoder_trains_on_fixed_length_captions_with_the_same_loss():
    """The LSTM's word loop is unrolled into the compiled graph: each new batch length compiled again
    (8 graphs, then silently uncompiled). With compile_decoder the captions are padded to the longest
    the data can give, which the loss ignores."""
    import types

    import torch

    from captioning.lit_module import CaptionModule
    from captioning.vocab import SPECIALS

    torch.manual_seed(0)
    module = CaptionModule(vocab=[*SPECIALS, *"abcdefgh"], encoder_channels=(8, 8, 8, 8), embed_dim=8, hidden_dim=8)
    module.hparams.compile_decoder = True  # the padding only; setup() would compile
    module._trainer = types.SimpleNamespace(datamodule=types.SimpleNamespace(max_caption_len=6), world_size=1)
    module.log = lambda *a, **k: None
    seen = []
    decoder_forward = module.net.decoder.forward
    module.net.decoder.forward = lambda feats, toks: seen.append(toks.size(-1)) or decoder_forward(feats, toks)
    images = torch.randn(2, 3, 32, 32)
    module.eval()  # no dropout: the padded and unpadded losses must agree
    # (B,M,L) as collate_train pads each batch: to its own longest caption
    for tokens in (torch.tensor([[[1, 5, 2, 0]], [[1, 6, 7, 2]]]), torch.tensor([[[1, 5, 6, 7, 8, 2]]] * 2)):
        padded = module.training_step((images, tokens, 0), 0)
        plain, _ = module.loss(images, tokens)
        torch.testing.assert_close(padded, plain)
    assert seen == [7, 3, 7, 5]  # training steps: always 8 tokens -> 7 decoder inputs; plain: L - 1


def test_an_encoder_lr_of_zero_is_applied_not_taken_for_unset():
    """Before, ``encoder_lr or lr`` gave a fine-tuned encoder the decoder's LR when encoder_lr was 0."""
    import types

    from captioning.lit_module import CaptionModule
    from captioning.vocab import SPECIALS

    def group_lrs(encoder_lr, freeze_encoder=False):
        module = CaptionModule(
            vocab=[*SPECIALS, "a"],
            encoder_channels=(8, 8, 8, 8),
            embed_dim=8,
            hidden_dim=8,
            encoder_lr=encoder_lr,
            freeze_encoder=freeze_encoder,
        )
        module._trainer = types.SimpleNamespace(
            estimated_stepping_batches=100, num_training_batches=10, accumulate_grad_batches=1, max_epochs=10
        )
        opt = module.configure_optimizers()["optimizer"]
        return [g["initial_lr"] for g in opt.param_groups]  # (decoder, encoder), before the warmup's factor

    assert group_lrs(0.0) == [0.002, 0.0]
    assert group_lrs(None) == [0.002, 0.002] and group_lrs(1e-4) == [0.002, 1e-4]
    # a frozen encoder has no group: an encoder_lr given with it is said to be unused (it was silent)
    with pytest.warns(UserWarning, match=r"model.encoder_lr \(0.0001\) is unused: model.freeze_encoder is true"):
        assert group_lrs(1e-4, freeze_encoder=True) == [0.002]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert group_lrs(None, freeze_encoder=True) == [0.002]
    assert not [w for w in caught if "encoder_lr" in str(w.message)]


def test_a_transformer_whose_position_table_is_shorter_than_the_captions_is_refused_before_training(tmp_path):
    """data.max_caption_len 12 needs 13 positions; with model.max_len 8 the run used to start and stop at
    the first batch holding a long caption, naming model.max_len only."""
    args = ["fit", "-c", str(TINY), "--model.decoder", "transformer", "--model.hidden_dim", "16"]
    args += ["--model.num_heads", "2", "--model.num_layers", "1", "--model.max_len", "8"]
    args += ["--model.max_decode_len", "8", "--data.max_caption_len", "12"]
    # the progress bar (off in tiny.yaml) prints "Sanity Checking" and "Epoch 0" to stdout once they start:
    # without it, a refusal at the first training batch looked the same as one before training
    args += ["--trainer.enable_progress_bar", "true"]
    proc = run_script(str(ROOT / "train.py"), *args, cwd=tmp_path)
    assert proc.returncode != 0
    assert "data.max_caption_len (12) needs 13 positions" in proc.stderr
    assert "more than model.max_len (8)" in proc.stderr
    assert "Sanity Checking" not in proc.stdout and "Epoch 0" not in proc.stdout, proc.stdout[-2000:]


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("lr", -1e-3, "model.lr must be > 0, got -0.001"),
        ("encoder_lr", -1e-4, "model.encoder_lr must be >= 0"),
        ("weight_decay", -0.1, "model.weight_decay must be >= 0"),
        ("warmup_steps", -5, "model.warmup_steps must be >= 0, got -5"),
        ("lr_decay_epochs", 0, "model.lr_decay_epochs must be >= 1, got 0"),
        ("lr_decay", 0.0, "model.lr_decay must be in (0, 1]"),
        ("label_smoothing", 1.5, "model.label_smoothing must be in [0, 1), got 1.5"),
        ("alpha_c", -0.1, "model.alpha_c must be >= 0"),
        ("beam_size", 0, "model.beam_size must be >= 1, got 0"),
        ("max_decode_len", 0, "model.max_decode_len must be >= 1, got 0"),
        ("length_penalty", float("nan"), "model.length_penalty must be a finite number, got nan"),
        ("encoder_grid", -2, "model.encoder_grid must be >= 0 (0 or null: no pooling), got -2"),
        ("encoder_grid", 4, "model.encoder_stage (4) and model.encoder_grid (4) shape a torchvision ResNet's grid"),
        ("encoder_stage", 3, "small_cnn has none of either"),
        ("num_heads", 0, "model.num_heads must be >= 1, got 0"),
        ("num_layers", 0, "model.num_layers must be >= 1, got 0"),
        ("ffn_dim", 0, "model.ffn_dim must be >= 1 (null: 4 x hidden_dim), got 0"),
        ("hidden_dim", 0, "model.hidden_dim must be >= 1, got 0"),
        ("embed_dim", 0, "model.embed_dim must be >= 1, got 0"),
        ("attention_dim", 0, "model.attention_dim must be >= 1, got 0"),
        ("dropout", 1.0, "model.dropout must be in [0, 1), got 1.0"),
    ],
)
def test_nonsense_model_options_are_refused_when_the_module_is_built(option, value, message):
    """Before, AdamW (which checks only its default lr, not a group's) trained with a negative lr, uphill and
    silently; a negative warmup was no warmup; beam_size 0, label_smoothing 1.5 and lr_decay_epochs 0 stopped
    the run only at the first validation or step, the last with a bare ZeroDivisionError."""
    from captioning.lit_module import CaptionModule
    from captioning.vocab import SPECIALS

    with pytest.raises(ValueError) as info:
        small = dict(vocab=[*SPECIALS, "a"], encoder_channels=(8, 8, 8, 8), embed_dim=8, hidden_dim=8)
        CaptionModule(**{**small, option: value})
    assert message in str(info.value)


def test_an_accumulated_step_takes_the_gradient_of_one_batch_holding_all_of_its_words(tmp_path, monkeypatch):
    """Each batch of a window was normalised by its own word count and Lightning averaged them: a word of a
    batch with fewer words weighed more than in one batch as large as the window. Now 2 batches of 8 images
    accumulated, and 2 ddp_spawn ranks with 2 accumulated batches of 4 each, take the gradient of one batch of
    16 (frozen encoder, so BatchNorm does not see the batch, and no dropout)."""
    import torch

    from conftest import finish, start_script

    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    common = ["fit", "-c", str(TINY), "--model.freeze_encoder", "true", "--model.dropout", "0", "--trainer.max_steps"]
    common += ["1", "--test_after_fit", "false", "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps"]
    common += ["0", "--trainer.callbacks+=save_grads.SaveGrads", "--trainer.callbacks.path=grads.pt"]
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp_spawn", "--trainer.accelerator", "cpu"]
    runs = {
        "one batch of 16": ["--data.batch_size", "16"],
        "2 x 8 accumulated": ["--data.batch_size", "8", "--trainer.accumulate_grad_batches", "2"],
        "2 ranks x 2 x 4 accumulated": [*ddp, "--data.batch_size", "4", "--trainer.accumulate_grad_batches", "2"],
    }
    started = []
    for name, extra in runs.items():
        (tmp_path / name).mkdir()
        started.append(start_script(str(ROOT / "train.py"), *common, *extra, cwd=tmp_path / name))
    for proc in finish(*started):  # independent runs, side by side
        assert proc.returncode == 0, proc.stderr[-3000:]
    grads = {name: torch.load(tmp_path / name / "grads.pt", weights_only=True) for name in runs}
    whole = grads.pop("one batch of 16")
    assert whole and all(not k.startswith("net.encoder.") for k in whole)  # the decoder's, the encoder frozen
    for name, got in grads.items():
        assert got.keys() == whole.keys(), name
        for k in whole:
            torch.testing.assert_close(
                got[k], whole[k], rtol=1e-4, atol=1e-7, msg=lambda m, k=k, n=name: f"{n}: {k}: {m}"
            )


def test_options_of_the_other_decoder_are_said_to_be_ignored_and_never_mismatch_a_checkpoint():
    """`--model.attention dot` for a transformer, or `--model.num_layers 4` for the LSTM, changed nothing, silently;
    and `test --ckpt_path` with such a flag other than the checkpoint's was refused as an architecture mismatch."""
    import warnings

    from captioning.lit_module import CaptionModule
    from captioning.vocab import SPECIALS

    small = dict(vocab=[*SPECIALS, "a"], encoder_channels=(8, 8, 8, 8), hidden_dim=8)
    said = r"the transformer decoder ignores model\.embed_dim \(8\), model\.attention \('dot'\): options of the other"
    with pytest.warns(UserWarning, match=said):
        CaptionModule(**small, decoder="transformer", num_heads=2, embed_dim=8, attention="dot")
    with pytest.warns(UserWarning, match=r"the lstm decoder ignores model\.num_layers \(4\)"):
        CaptionModule(**small, num_layers=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lstm = CaptionModule(**small)  # every option of the other decoder at its default: nothing to say
    assert not [w for w in caught if "ignores" in str(w.message)]

    meta = {"vocab": list(lstm.vocab.tokens), "model": {**lstm.arch, "num_heads": 8}, "preprocess": lstm._preprocess()}
    lstm._check_matches(meta)  # the LSTM has no heads: nothing differs
    meta["model"]["hidden_dim"] = 16
    with pytest.raises(ValueError, match=r"model configuration mismatch \(hidden_dim: checkpoint 16 vs config 8\)"):
        lstm._check_matches(meta)


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("image_size", 0, "data.image_size must be >= 25 for the shapes set, got 0"),
        ("image_size", 5, "data.image_size must be >= 25 for the shapes set, got 5"),  # 1-5 failed as 0 did
        # 6-24: small and large objects shared widths, and at 6-7 px small circles were drawn with no pixel
        ("image_size", 24, "data.image_size must be >= 25 for the shapes set, got 24"),
        ("max_caption_len", 0, "data.max_caption_len must be >= 1, got 0"),
        ("captions_per_image", -1, "data.captions_per_image must be >= 0"),
        ("batch_size", 0, "data.batch_size must be >= 1, got 0"),
        ("std", (0.2, 0.0, 0.2), "data.std must be 3 values (R, G, B), each > 0"),
        # refused only after every image was scanned: as all images too large ("is data.image_root right?"), and
        # when the cache was opened
        ("max_pixels", 0, "data.max_pixels must be >= 1, got 0"),
        ("cache_dtype", "float64", "data.cache_dtype must be one of ['float16', 'float32'], got 'float64'"),
    ],
)
def test_nonsense_data_options_are_refused_before_any_data_is_read(tmp_path, option, value, message):
    """Before, image_size 0 failed inside the shapes generator (empty range for randrange()), and
    max_caption_len 0 or captions_per_image -1 trained on empty (or every) caption without a word."""
    from captioning.data.datamodule import CaptionDataModule

    with pytest.raises(ValueError) as info:
        CaptionDataModule(data_dir=str(tmp_path / "shapes"), **{option: value})
    assert message in str(info.value)
    assert not (tmp_path / "shapes").exists()


@pytest.mark.parametrize("max_steps", [20, -1])
def test_with_max_epochs_minus_one_the_step_schedule_decays_every_epoch_and_cosine_needs_an_end(max_steps):
    """trainer.max_epochs -1: Lightning's estimated_stepping_batches returns max_steps (or inf) without setting
    the loader up, so num_training_batches was still inf: with max_steps the step schedule took the whole run
    for one epoch and never decayed; without (an endless, early-stopped run) int(inf) stopped the run with a
    bare OverflowError, whatever model.lr_schedule said."""
    import types

    from captioning.lit_module import CaptionModule
    from captioning.vocab import SPECIALS

    def optimizers(**options):
        module = CaptionModule(
            vocab=[*SPECIALS, "a"], encoder_channels=(8, 8, 8, 8), embed_dim=8, hidden_dim=8, **options
        )
        # as Lightning's Trainer with max_epochs -1: num_training_batches stays inf until fit_loop.setup_data()
        trainer = types.SimpleNamespace(
            estimated_stepping_batches=float("inf") if max_steps == -1 else max_steps,
            num_training_batches=float("inf"),
            train_dataloader=None,
            accumulate_grad_batches=2,
            max_epochs=-1,
        )
        trainer.fit_loop = types.SimpleNamespace(setup_data=lambda: setattr(trainer, "num_training_batches", 6))
        module._trainer = trainer
        return module.configure_optimizers()

    def first_lrs(warmup: int, steps: int = 8) -> list[float]:
        step = optimizers(lr_schedule="step", warmup_steps=warmup, lr_decay=0.5, lr_decay_epochs=1)
        opt, sched = step["optimizer"], step["lr_scheduler"]["scheduler"]
        lrs = []
        for _ in range(steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return lrs

    # a warmup of 2 steps (a tenth of 20; an endless run's as given), then halved every epoch of 3 optimizer steps
    assert first_lrs(2) == pytest.approx([0.001, 0.002, 0.002, 0.001, 0.001, 0.001, 0.0005, 0.0005])
    if max_steps == -1:
        # a warmup (5 steps, as given) past a decay boundary (3 steps) is decayed too: it rose to the full 0.002 at
        # step 4 and dropped to 0.001 at step 5
        assert first_lrs(5) == pytest.approx([0.0004, 0.0008, 0.0012, 0.0008, 0.001, 0.001, 0.0005, 0.0005])
        with pytest.raises(
            ValueError, match="model.lr_schedule 'cosine' decays to 0 at the run's end, but this run has no end"
        ):
            optimizers(lr_schedule="cosine")


@pytest.mark.parametrize("decoder", ["lstm", "transformer"])
def test_weight_decay_shrinks_weight_matrices_but_not_biases_or_norm_gains(decoder):
    """Before, one weight_decay applied to every parameter: AdamW pulled the BatchNorm and LayerNorm gains and
    every bias towards 0 too. A step with zero gradients is decay alone: it must leave them as they were."""
    import types

    import torch
    from torch import nn

    from captioning.lit_module import CaptionModule
    from captioning.vocab import SPECIALS

    torch.manual_seed(0)
    module = CaptionModule(
        vocab=[*SPECIALS, "a", "b"],
        decoder=decoder,
        encoder_channels=(8, 8, 8, 8),
        embed_dim=8,
        hidden_dim=8,
        attention_dim=8,
        num_heads=2,
        weight_decay=0.5,
        encoder_lr=1e-3,
        warmup_steps=0,
    )
    module._trainer = types.SimpleNamespace(
        estimated_stepping_batches=100, num_training_batches=10, accumulate_grad_batches=1, max_epochs=10
    )
    opt = module.configure_optimizers()["optimizer"]
    norms = {id(p) for m in module.modules() if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) for p in m.parameters()}
    kept = {n for n, p in module.named_parameters() if id(p) in norms or n.endswith("bias") or ".bias_" in n}
    assert any(".bias" in n for n in kept) and len(norms) >= 2  # there is something of each kind to check
    # every trainable parameter in exactly one group, the encoder's at encoder_lr
    in_groups = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(in_groups) == sorted(id(p) for p in module.parameters())
    encoder = {id(p) for p in module.net.encoder.parameters()}
    for g in opt.param_groups:
        assert g["lr"] == (1e-3 if id(g["params"][0]) in encoder else 0.002)

    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in module.named_parameters():
        if n in kept:
            assert torch.equal(p, before[n]), n
        else:  # AdamW's decoupled decay: p * (1 - lr * weight_decay)
            lr = 1e-3 if id(p) in encoder else 0.002
            torch.testing.assert_close(p, before[n] * (1 - lr * 0.5), msg=n)


def _configured(**options):
    """A small module's optimizer and schedule for a 10-step run, without a Trainer."""
    import types

    from captioning.lit_module import CaptionModule
    from captioning.vocab import SPECIALS

    module = CaptionModule(
        vocab=[*SPECIALS, "a"], encoder_channels=(8, 8, 8, 8), embed_dim=8, hidden_dim=8, warmup_steps=0, **options
    )
    module._trainer = types.SimpleNamespace(
        estimated_stepping_batches=10, num_training_batches=10, accumulate_grad_batches=1, max_epochs=1
    )
    out = module.configure_optimizers()
    return module, out["optimizer"], out["lr_scheduler"]["scheduler"]


def _resumed_from(opt, sched, **options):
    """A module of ``options`` resumed from ``opt`` and ``sched``'s state as Lightning's restore writes it, up to
    its on_train_start -> (module, optimizer, schedule)."""
    import types

    module, resumed_opt, resumed_sched = _configured(**options)
    resumed_opt.load_state_dict(opt.state_dict())
    resumed_sched.load_state_dict(sched.state_dict())
    module._restored = True
    module._trainer.optimizers = [resumed_opt]
    module._trainer.lr_scheduler_configs = [types.SimpleNamespace(scheduler=resumed_sched)]
    module.on_train_start()
    return module, resumed_opt, resumed_sched


def test_lr_and_weight_decay_flags_given_with_a_resume_are_applied_at_the_schedules_position():
    """Lightning's restore writes the checkpoint's optimizer groups (lr, initial_lr, weight_decay) and the
    scheduler's base LRs over this run's: `fit --ckpt_path ... --model.lr 5e-4` trained on at the checkpoint's
    LR, silently, while its new checkpoints recorded 5e-4."""
    _, opt, sched = _configured(lr=2e-3, weight_decay=0.01)
    for _ in range(3):
        opt.step()
        sched.step()
    module, resumed_opt, resumed_sched = _resumed_from(opt, sched, lr=5e-4, encoder_lr=1e-4, weight_decay=0.1)
    cosine_at_3 = 0.5 * (1 + math.cos(math.pi * 3 / 10))
    encoder = {id(p) for p in module.net.encoder.parameters()}
    for group in resumed_opt.param_groups:
        base = 1e-4 if id(group["params"][0]) in encoder else 5e-4
        assert group["lr"] == pytest.approx(base * cosine_at_3) and group["initial_lr"] == base
        assert group["weight_decay"] in (0.0, 0.1)  # vectors are not decayed (see the test above)
    assert any(group["weight_decay"] == 0.1 for group in resumed_opt.param_groups)
    assert resumed_sched.get_last_lr() == [group["lr"] for group in resumed_opt.param_groups]
    assert resumed_sched.last_epoch == 3  # the schedule's position is the checkpoint's


def test_a_resume_with_another_schedule_takes_its_lr_from_the_first_step():
    """The LR of a resumed run's first step came from the checkpoint's schedule: resumed from a cosine run at step 3
    with model.lr_schedule constant, that step trained at the cosine's LR, the next ones at the constant one."""
    _, opt, sched = _configured(lr=2e-3, lr_schedule="cosine")
    for _ in range(3):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] < 2e-3  # the cosine has decayed
    module, resumed_opt, resumed_sched = _resumed_from(opt, sched, lr=2e-3, lr_schedule="constant")
    assert [group["lr"] for group in resumed_opt.param_groups] == [2e-3] * len(resumed_opt.param_groups)
    assert resumed_sched.get_last_lr() == [2e-3] * len(resumed_opt.param_groups)


def test_a_resume_that_switches_weight_decay_on_is_refused_naming_it():
    """Weight decay > 0 splits each optimizer group into decayed matrices and undecayed biases and norms, so a
    resume of a run trained without it cannot restore the optimizer: Lightning stopped with only "loaded state
    dict has a different number of parameter groups", naming no option."""
    import types

    from captioning.lit_module import CaptionModule
    from captioning.vocab import SPECIALS

    def module(weight_decay):
        return CaptionModule(
            vocab=[*SPECIALS, "a"], encoder_channels=(8, 8, 8, 8), embed_dim=8, hidden_dim=8, weight_decay=weight_decay
        )

    def configure(m):
        m._trainer = types.SimpleNamespace(
            estimated_stepping_batches=10, num_training_batches=10, accumulate_grad_batches=1, max_epochs=1
        )
        return m.configure_optimizers()

    trained = module(0.0)
    checkpoint = {
        "optimizer_states": [configure(trained)["optimizer"].state_dict()],
        "hyper_parameters": dict(trained.hparams),
    }
    same = module(0.0)
    same.on_load_checkpoint(checkpoint)  # what Lightning calls before configure_optimizers on a resume
    configure(same)  # the same groups: no complaint
    resumed = module(0.01)
    resumed.on_load_checkpoint(checkpoint)
    with pytest.raises(ValueError) as info:
        configure(resumed)
    assert "cannot resume: the checkpoint's optimizer has parameter groups of" in str(info.value)
    assert "model.weight_decay: checkpoint 0.0 vs this run 0.01" in str(info.value)


@pytest.mark.parametrize(
    "where, given, want",
    [("flag", "1", 1), ("flag", "3", 3), ("flag", "1.0", 1.0), ("flag", "0.25", 0.25), ("config", "1", 1)],
)
def test_an_int_batch_limit_counts_batches_and_a_float_is_a_fraction(tmp_path, monkeypatch, where, given, want):
    """`--trainer.limit_val_batches 1` (one batch), or `limit_val_batches: 1` in a config file, was parsed
    as 1.0, every batch: the parser tried float before int (see captioning.cli.COUNT_OR_FRACTION)."""
    from captioning.cli import COUNT_OR_FRACTION, CaptionCLI
    from captioning.data.datamodule import CaptionDataModule
    from captioning.lit_module import CaptionModule

    monkeypatch.chdir(tmp_path)  # the config's relative data and run folders
    if where == "flag":
        args = [f"--trainer.{name}={given}" for name in COUNT_OR_FRACTION]
    else:
        (tmp_path / "limits.yaml").write_text("trainer:\n" + "".join(f"  {n}: {given}\n" for n in COUNT_OR_FRACTION))
        args = ["--config", "limits.yaml"]
    cli = CaptionCLI(CaptionModule, CaptionDataModule, args=["--config", str(TINY), *args], run=False)
    for name in COUNT_OR_FRACTION:
        got = getattr(cli.trainer, name)
        assert got == want and type(got) is type(want), (name, got)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_label_smoothing_targets_only_the_classes_a_caption_can_hold(smoothing):
    """The loss's gradient on the logits is softmax - q, q the smoothed target: (1 - e) on the target word and
    e spread evenly over <end>, <unk> and the words; none on <pad> and <start>, never a target nor written
    (smoothed over all V classes, the model was taught to give them e / V each). Padded positions add nothing."""
    import torch

    from captioning.lit_module import _caption_ce_sum

    torch.manual_seed(0)
    v = 9
    logits = torch.randn(2, 3, v, requires_grad=True)  # (B,T,V)
    targets = torch.tensor([[4, 2, 0], [3, 8, 5]])  # (B,T): a caption "w <end> <pad>", one of <unk> w w
    mask = targets != 0
    _caption_ce_sum(logits, targets, mask, smoothing).backward()
    q = torch.zeros(2, 3, v)
    q[..., 2:] = smoothing / (v - 2)
    q.scatter_add_(-1, targets.unsqueeze(-1), torch.full((2, 3, 1), 1.0 - smoothing))
    want = (logits.detach().softmax(-1) - q) * mask.unsqueeze(-1)
    torch.testing.assert_close(logits.grad, want, rtol=1e-5, atol=1e-6)
    assert (logits.grad[..., :2][mask] > 0).all()  # probability on <pad>/<start> is only ever pushed down


def test_overfit_batches_runs_and_an_accumulated_window_is_normalised_by_its_own_words(tmp_path, monkeypatch):
    """Lightning's --trainer.overfit_batches swaps the training sampler for a SequentialSampler, whose plain
    indices the data set could not unpack: the run stopped at its first batch with a TypeError. And the
    accumulation window's word count must then come from those batches, not from our sampler's shuffled order:
    2 batches of 8 accumulated, and 2 ranks with 2 batches of 4 each, take the gradient of the one batch of the same
    16; with use_distributed_sampler off both ranks read the same 8, so they take the gradient of those 8 (frozen
    encoder, no dropout)."""
    import torch

    from conftest import finish, start_script

    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    common = ["fit", "-c", str(TINY), "--model.freeze_encoder", "true", "--model.dropout", "0", *QUICK]
    common += ["--trainer.max_steps", "1", "--trainer.callbacks+=save_grads.SaveGrads", "--trainer.callbacks.path=g.pt"]
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp_spawn", "--trainer.accelerator", "cpu"]
    two_of_4 = ["--trainer.overfit_batches", "2", "--data.batch_size", "4", "--trainer.accumulate_grad_batches", "2"]
    runs = {  # name: (its options, the run whose gradient it must take)
        "1 x 16": (["--trainer.overfit_batches", "1", "--data.batch_size", "16"], None),
        "1 x 8": (["--trainer.overfit_batches", "1", "--data.batch_size", "8"], None),
        "2 x 8": (
            ["--trainer.overfit_batches", "2", "--data.batch_size", "8", "--trainer.accumulate_grad_batches", "2"],
            "1 x 16",
        ),
        # Lightning shares its sequential order out between the ranks (items r, r+2, ...): the same 16 in all
        "2 ranks x 2 x 4": ([*ddp, *two_of_4], "1 x 16"),
        # not shared: each rank reads items 0-7
        "2 ranks x 2 x 4, not shared": ([*ddp, *two_of_4, "--trainer.use_distributed_sampler", "false"], "1 x 8"),
    }
    started = []
    for name, (extra, _) in runs.items():
        (tmp_path / name).mkdir()
        started.append(start_script(str(ROOT / "train.py"), *common, *extra, cwd=tmp_path / name))
    for proc in finish(*started):
        assert proc.returncode == 0, proc.stderr[-3000:]
    grads = {name: torch.load(tmp_path / name / "g.pt", weights_only=True) for name in runs}
    for name, (_, reference) in runs.items():
        if reference is None:
            continue
        got, want = grads[name], grads[reference]
        assert want and got.keys() == want.keys(), name
        for k in want:
            torch.testing.assert_close(
                got[k], want[k], rtol=1e-4, atol=1e-7, msg=lambda m, k=k, n=name: f"{n}: {k}: {m}"
            )


def test_an_encoder_released_by_a_callback_during_a_fit_is_in_train_mode_and_warns(tmp_path, monkeypatch):
    """Staged fine-tuning through Lightning: an encoder frozen at the start and released by a callback at the second
    epoch stayed in the eval mode it was held in while frozen (Lightning never calls train() in a fit; the sanity
    check and each validation write the modules' flags back), so its BatchNorm statistics never followed the data."""
    import pytorch_lightning as pl
    import torch

    from captioning.cli import CaptionCLI
    from captioning.data.datamodule import CaptionDataModule
    from captioning.lit_module import CaptionModule

    class Release(pl.Callback):
        def __init__(self):
            self.modes = []

        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch == 1:
                module.net.encoder.set_frozen(False)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            bn = next(m for m in module.net.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
            self.modes.append((trainer.current_epoch, module.net.encoder.training, bn.training))

    monkeypatch.chdir(tmp_path)  # the config's relative data and run folders
    args = ["--config", str(TINY), "--model.freeze_encoder", "true", "--trainer.max_epochs", "2"]
    args += ["--trainer.max_steps", "4", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
    cli = CaptionCLI(CaptionModule, CaptionDataModule, args=args, run=False)
    release = Release()
    cli.trainer.callbacks.append(release)
    # and it says that the released weights will not train: the optimizer was built without them
    with pytest.warns(UserWarning, match="released during the fit.*its weights will not change"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert release.modes == [(0, False, False), (0, False, False), (1, True, True), (1, True, True)]


@pytest.mark.parametrize(
    ("every", "epoch", "across", "warned"),
    [(3, 8, False, "every 3 batches, at times"), (4, 8, False, None)]
    # counted across epochs of 3 batches: the 4th batch is the next epoch's 1st, inside its first window; every 3
    # (each epoch's last batch) and every 4 in epochs of 4 are at windows' ends
    + [(4, 3, True, "every 4 batches (counted across epochs), at times"), (3, 3, True, None), (4, 4, True, None)]
    # by time: at whatever batch the clock says
    + [("00:00:10:00", 8, False, "every 600 s (a time), at any batch, so also")],
)
def test_validations_inside_accumulation_windows_warn_that_their_checkpoints_do_not_resume_exactly(
    tmp_path, monkeypatch, every, epoch, across, warned
):
    """A validation every 3 batches with windows of 2 writes its checkpoints mid-window: a resume from one loses the
    window's gradient so far (batch 2's), silently. Every 4 batches: at windows' ends, nothing to say."""
    import warnings

    from captioning.cli import CaptionCLI
    from captioning.data.datamodule import CaptionDataModule
    from captioning.lit_module import CaptionModule

    monkeypatch.chdir(tmp_path)  # the config's relative data and run folders
    args = ["--config", str(TINY), "--trainer.max_steps", "1", "--trainer.limit_train_batches", str(epoch)]
    args += ["--trainer.accumulate_grad_batches", "2", "--trainer.val_check_interval", str(every)]
    args += ["--trainer.limit_val_batches", "1"] + (["--trainer.check_val_every_n_epoch", "null"] if across else [])
    cli = CaptionCLI(CaptionModule, CaptionDataModule, args=args, run=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    said = [str(w.message) for w in caught if "inside the accumulation windows" in str(w.message)]
    assert len(said) == bool(warned), said
    if warned:
        assert said[0].startswith(f"validation runs {warned} inside the accumulation windows of 2 batches"), said


@pytest.mark.parametrize("across", [False, True])
def test_validates_inside_window_agrees_with_batch_by_batch_counting(across):
    """The closed form (one cycle of positions) against walking 40 epochs batch by batch the way Lightning's loop
    counts: windows restart at each epoch and its last batch steps; validation every N batches of the epoch, or of
    the run with check_val_every_n_epoch null."""
    from captioning.lit_module import validates_inside_window

    for batches in range(1, 13):
        for every in range(1, 3 * batches + 2):
            if not across and every > batches:
                continue  # Lightning refuses val_check_interval > an epoch's batches unless counted across
            for window in range(2, 6):
                walked, total = False, 0
                for _ in range(40):
                    for position in range(1, batches + 1):
                        total += 1
                        validates = (total if across else position) % every == 0
                        walked |= validates and position % window != 0 and position != batches
                got = validates_inside_window(every, window, batches, across_epochs=across)
                assert got == walked, (every, window, batches)


def test_staged_fine_tuning_starts_a_second_fit_from_the_first_ones_weights(tmp_path, monkeypatch):
    """model.init_weights: a fit with the encoder frozen, then a fresh fit from its checkpoint with the encoder
    fine-tuned: the second starts from exactly the first one's weights (decoder and encoder), and its encoder
    trains. A checkpoint of another architecture is refused naming the file and both sides; with
    encoder_weights as well, refused when the module is built."""
    import re

    import pytorch_lightning as pl
    import torch

    from captioning.checkpoint_io import CheckpointError
    from captioning.cli import CaptionCLI
    from captioning.data.datamodule import CaptionDataModule
    from captioning.errors import InputError
    from captioning.lit_module import CaptionModule

    monkeypatch.chdir(tmp_path)  # the config's relative data and run folders
    base = ["--config", str(TINY), "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"]
    first = CaptionCLI(CaptionModule, CaptionDataModule, args=[*base, "--model.freeze_encoder", "true"], run=False)
    first.trainer.fit(first.model, datamodule=first.datamodule)
    ckpt = next(tmp_path.glob("runs/tiny/version_*/checkpoints/last.ckpt"))
    trained = {k: v.clone() for k, v in first.model.state_dict().items()}

    class AtStart(pl.Callback):
        def on_train_start(self, trainer, module):
            self.weights = {k: v.clone() for k, v in module.state_dict().items()}

    flags = ["--model.init_weights", str(ckpt), "--model.freeze_encoder", "false"]
    second = CaptionCLI(CaptionModule, CaptionDataModule, args=[*base, *flags], run=False)
    at_start = AtStart()
    second.trainer.callbacks.append(at_start)
    second.trainer.fit(second.model, datamodule=second.datamodule)
    assert at_start.weights.keys() == trained.keys()
    for k, v in trained.items():
        torch.testing.assert_close(at_start.weights[k], v, rtol=0, atol=0, msg=k)
    moved = [
        k for k, v in second.model.net.encoder.state_dict().items() if not torch.equal(v, trained[f"net.encoder.{k}"])
    ]
    assert any(k.endswith("weight") for k in moved), moved  # the encoder trained in the second fit

    other = CaptionCLI(CaptionModule, CaptionDataModule, args=[*base, *flags, "--model.hidden_dim", "24"], run=False)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(ckpt))}: model configuration mismatch.*hidden_dim"):
        other.trainer.fit(other.model, datamodule=other.datamodule)
    with pytest.raises(InputError, match="init_weights .* and model.encoder_weights .* are both set"):
        CaptionModule(
            vocab=["<pad>", "<start>", "<end>", "<unk>", "a"], init_weights=str(ckpt), encoder_weights="x.pth"
        )


def test_compile_mode_reaches_torch_compile_and_an_unknown_mode_is_refused(monkeypatch):
    """``compile_mode`` is the mode the decoder is compiled with at fit (CUDA graphs with "reduce-overhead");
    a misspelt mode is refused when the module is built, not after the data is loaded."""
    import pytest

    from captioning.lit_module import CaptionModule
    from captioning.vocab import SPECIALS

    kwargs = dict(vocab=[*SPECIALS, *"abc"], encoder_channels=(8, 8, 8, 8), embed_dim=8, hidden_dim=8)
    with pytest.raises(ValueError, match="compile_mode.*reduce_overhead"):
        CaptionModule(**kwargs, compile_decoder=True, compile_mode="reduce_overhead")
    module = CaptionModule(**kwargs, compile_decoder=True, compile_mode="reduce-overhead")
    seen = []
    monkeypatch.setattr(type(module.net.decoder), "compile", lambda self, **kw: seen.append(kw))
    module.setup("validate")
    assert seen == []  # only training runs the compiled forward
    module.setup("fit")
    module.setup("fit")  # once
    assert seen == [{"mode": "reduce-overhead"}]


def test_compile_encoder_compiles_the_encoder_once_at_the_first_setup_of_any_stage(monkeypatch):
    """``compile_encoder``: the encoder's forward is the same in every stage, so a validate-only or test-only run
    gets it compiled too; once, with ``compile_mode``; and not at all without the option."""
    from captioning.lit_module import CaptionModule
    from captioning.vocab import SPECIALS

    kwargs = dict(vocab=[*SPECIALS, *"abc"], encoder_channels=(8, 8, 8, 8), embed_dim=8, hidden_dim=8)
    seen = []
    plain = CaptionModule(**kwargs)
    monkeypatch.setattr(type(plain.net.encoder), "compile", lambda self, **kw: seen.append(kw))
    plain.setup("fit")
    assert seen == []
    module = CaptionModule(**kwargs, compile_encoder=True, compile_mode="max-autotune-no-cudagraphs")
    module.setup("validate")
    module.setup("fit")
    module.setup("test")
    assert seen == [{"mode": "max-autotune-no-cudagraphs"}]


@pytest.mark.slow
def test_a_compiled_frozen_encoder_gives_the_features_of_the_eager_one():
    """A real torch.compile of a small frozen encoder (~40 s on the 2-core CPU): the same features, and the
    weights' names (what checkpoints store) unchanged."""
    import torch

    from captioning.lit_module import CaptionModule
    from captioning.vocab import SPECIALS

    torch.manual_seed(0)
    kwargs = dict(vocab=[*SPECIALS, *"abc"], encoder_channels=(8, 8, 8, 8), embed_dim=8, hidden_dim=8)
    module = CaptionModule(**kwargs, freeze_encoder=True, compile_encoder=True)
    names = list(module.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eager = module.features(images)
    module.setup("fit")
    with torch.no_grad():
        compiled = module.features(images)
    assert module.net.encoder._compiled_call_impl is not None  # the compiled forward ran
    torch.testing.assert_close(compiled, eager)
    assert list(module.state_dict()) == names


def test_the_logged_training_loss_is_the_batchs_own_under_gradient_accumulation(tmp_path, monkeypatch):
    """With accumulation, train/loss logged what is differentiated: each batch's share of its window's loss times
    A, which in an epoch's last window of 2 batches (6 a epoch, A = 4) read twice the loss. With no attention
    regulariser the batch's loss is its cross-entropy, which train/ce logs."""
    from captioning.cli import CaptionCLI
    from captioning.data.datamodule import CaptionDataModule
    from captioning.lit_module import CaptionModule

    monkeypatch.chdir(tmp_path)  # the config's relative data and run folders
    args = ["--config", str(TINY), "--trainer.max_steps", "4", "--trainer.max_epochs", "2", "--model.alpha_c", "0"]
    args += ["--trainer.accumulate_grad_batches", "4", "--trainer.limit_val_batches", "0"]
    cli = CaptionCLI(CaptionModule, CaptionDataModule, args=args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.num_training_batches == 6 and cli.trainer.global_step == 4  # windows of 4 and 2 batches
    with open(tmp_path / "runs" / "tiny" / "version_0" / "metrics.csv") as f:
        rows = [(float(r["train/loss"]), float(r["train/ce"])) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(rows) == 4, rows
    for loss, ce in rows:
        assert loss == pytest.approx(ce, rel=1e-6), rows


def test_a_run_whose_validation_never_comes_is_told_as_it_starts():
    """check_val_every_n_epoch past max_epochs: the run said "no checkpoint has a validation score" only at its end,
    and infer.py then found no best.ckpt. Also said: the last epochs of a run left unvalidated."""
    import types
    import warnings

    from captioning.lit_module import CaptionModule
    from captioning.vocab import SPECIALS

    module = CaptionModule(vocab=[*SPECIALS, "a"], encoder_channels=(8, 8, 8, 8), embed_dim=8, hidden_dim=8)

    def said(every, epochs, max_steps=-1, val_batches=(3,), limit=1.0):
        module._trainer = types.SimpleNamespace(
            check_val_every_n_epoch=every,
            max_epochs=epochs,
            max_steps=max_steps,
            num_val_batches=list(val_batches),
            limit_val_batches=limit,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module._warn_if_no_validation_comes()
        return [str(w.message) for w in caught]

    assert said(2, 1) == [
        "trainer.check_val_every_n_epoch (2) is more than trainer.max_epochs (1): no validation runs, so no best.ckpt "
        "is written (last.ckpt is); lower check_val_every_n_epoch or train longer"
    ]
    assert said(2, 5) == [
        "trainer.max_epochs (5) is not a multiple of trainer.check_val_every_n_epoch (2): the last 1 epoch(s) are not "
        "validated, so best.ckpt cannot come from them"
    ]
    assert said(2, 1, val_batches=()) == said(2, 1)  # no sanity check: the loader is not counted yet
    assert said(2, 20) == said(1, 3) == said(2, 5, max_steps=40) == said(None, 1) == said(2, 1, val_batches=(0,)) == []
    assert said(2, 1, val_batches=(), limit=0) == []


def test_data_paths_starting_with_a_tilde_are_in_the_home_folder(tmp_path, monkeypatch):
    """--data.data_dir '~/shapes' (or the same in YAML, where no shell expands it) made a folder named "~" in the
    working directory."""
    from captioning.data.datamodule import CaptionDataModule

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    dm = CaptionDataModule(data_dir="~/shapes", cache_dir="~/cache")
    assert (dm.data_dir, dm.cache_dir) == (str(tmp_path / "home" / "shapes"), str(tmp_path / "home" / "cache"))
    dm = CaptionDataModule(dataset="karpathy", annotations="~/coco/dataset.json", image_root="~/coco/images")
    assert dm.annotations == str(tmp_path / "home" / "coco" / "dataset.json")
    assert dm.image_root == str(tmp_path / "home" / "coco" / "images")


def test_a_checkpoint_for_other_images_is_said_to_be_so_before_its_vocabulary_is_compared():
    """On the shapes set another image size draws other scenes, hence another vocabulary: a resume with
    --data.image_size 32 of a 64 px checkpoint was refused as a vocabulary mismatch, not for its image size."""
    from captioning.lit_module import CaptionModule
    from captioning.vocab import SPECIALS

    module = CaptionModule(vocab=[*SPECIALS, "a", "b"], encoder_channels=(8, 8, 8, 8), hidden_dim=8, image_size=32)
    meta = {"vocab": [*SPECIALS, "b", "a"], "model": dict(module.arch), "preprocess": module._preprocess()}
    meta["preprocess"] = {**meta["preprocess"], "image_size": 64}
    with pytest.raises(ValueError, match=r"image preprocessing mismatch \(image_size: checkpoint 64 vs data 32\)"):
        module._check_matches(meta)
    meta["preprocess"]["image_size"] = 32
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        module._check_matches(meta)


def test_a_batch_that_lost_every_image_logs_no_loss_in_one_process():
    """Its zero loss (there to keep DDP's ranks in step) was logged as train/loss 0.0, a perfect fit in metrics.csv
    and the progress bar, when the images of the data folder had gone. Under DDP it is still logged: the ranks' logs
    sync (test_distributed)."""
    import types

    import torch

    from captioning.lit_module import CaptionModule
    from captioning.vocab import SPECIALS

    m = CaptionModule(vocab=[*SPECIALS, *"abc"], encoder_channels=(8, 8, 8, 8), embed_dim=8, hidden_dim=8)
    m._trainer = types.SimpleNamespace(world_size=1)
    logged = []
    m.log = lambda name, *a, **kw: logged.append(name)
    loss = m.training_step((torch.empty(0, 3, 32, 32), torch.empty(0, 2, 5, dtype=torch.long), 2), 0)
    loss.backward()
    assert float(loss) == 0.0 and logged == [] and m._skipped_images == 2
