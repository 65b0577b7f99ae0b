"""DDP: two processes (ddp_spawn, gloo, CPU) train, validate and checkpoint like one process.

The two ranks together see exactly the batches of the single run (EpochSampler shards the same
order), the loss is normalised by the word count of the whole batch, and the encoder is frozen
with dropout off, so the only differences left are floating-point summation order.
"""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch

from conftest import ROOT, TINY, finish, free_port, run_script, start_script, stop

COMMON = [
    "fit",
    "-c",
    str(TINY),
    "--trainer.accelerator",
    "cpu",
    "--trainer.max_steps",
    "6",
    "--model.dropout",
    "0",
    "--model.freeze_encoder",
    "true",
    "--model.max_decode_len",
    "8",
    "--data.captions_per_image",
    "2",
]


def _start(folder, *extra):
    folder.mkdir()
    return start_script(str(ROOT / "train.py"), *COMMON, *extra, cwd=folder)


def _fitted(folder, proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run = next(folder.glob("runs/tiny/*/"))
    losses = [float(r["train/loss"]) for r in csv.DictReader(open(run / "metrics.csv")) if r.get("train/loss")]
    return run, losses


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    # the single-process run and the two-rank run are independent: they run side by side
    one = _start(tmp / "one", "--data.batch_size", "8")
    two = _start(tmp / "two", "--data.batch_size", "4", "--trainer.devices", "2", "--trainer.strategy", "ddp_spawn")
    one, two = finish(one, two, timeout=600)
    (tmp / "two" / "stderr.txt").write_text(two.stderr)
    return _fitted(tmp / "one", one), _fitted(tmp / "two", two)


def test_two_ranks_take_the_same_steps_as_one_process(runs):
    (_, one), (_, two) = runs
    assert len(one) == len(two) == 6
    assert two == pytest.approx(one, rel=1e-4, abs=1e-5)


def test_checkpoints_are_written_once_and_hold_the_same_weights(runs):
    (run1, _), (run2, _) = runs
    for run in (run1, run2):
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    a = torch.load(run1 / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(run2 / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 6
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert a["captioning"] == b["captioning"]


def test_validation_agrees(runs):
    (run1, _), (run2, _) = runs
    v1 = [r for r in csv.DictReader(open(run1 / "metrics.csv")) if r.get("val/cider_d")]
    v2 = [r for r in csv.DictReader(open(run2 / "metrics.csv")) if r.get("val/cider_d")]
    assert len(v1) == len(v2) == 1
    for k in ("val/cider_d", "val/bleu4", "val/rouge_l", "val/object_accuracy", "val/pointing_accuracy"):
        assert float(v2[0][k]) == pytest.approx(float(v1[0][k]), abs=1e-6), k


def test_the_test_after_fit_agrees_and_keeps_the_fits_metrics_rows(runs):
    """Under ddp_spawn the test after fit runs in new processes, whose CSV logger deleted the metrics.csv of the
    fit (every training and validation row: the comparisons above had to turn the test off) and stamped its row at
    epoch 0, step 0. Now the file holds the fit's rows and then the test's, stamped as one process stamps it."""
    (run1, _), (run2, _) = runs
    rows1, rows2 = (list(csv.DictReader(open(run / "metrics.csv"))) for run in (run1, run2))
    assert [r["step"] for r in rows2] == [r["step"] for r in rows1]
    t1, t2 = ([r for r in rows if r.get("test/cider_d")] for rows in (rows1, rows2))
    assert len(t1) == len(t2) == 1 and (t2[0]["epoch"], t2[0]["step"]) == (t1[0]["epoch"], t1[0]["step"]) == ("1", "6")
    for k in ("test/cider_d", "test/bleu4", "test/object_accuracy", "test/pointing_accuracy"):
        assert float(t2[0][k]) == pytest.approx(float(t1[0][k]), abs=1e-6), k
    m1, m2 = (json.loads((run / "test_metrics.json").read_text()) for run in (run1, run2))
    assert m2 == pytest.approx(m1, abs=1e-6)


def test_the_scores_every_rank_computes_alike_bring_no_advice_to_sync_them(runs):
    """Every rank scores the same gathered captions; logged unsynced, each val/ and test/ metric brought Lightning's
    advice to sync it (two lines per metric, at the first validation and the test). Now synced by their max, the
    value itself (the tests above compare the values with one process's)."""
    _, (run2, _) = runs
    stderr = (run2.parents[2] / "stderr.txt").read_text()
    assert "self.log('val/" not in stderr and "self.log('test/" not in stderr, stderr[-3000:]


def test_plain_ddp_relaunches_train_py_and_tests_once(tmp_path):
    """``--trainer.strategy ddp`` (what several GPUs get): Lightning starts rank 1 by running
    train.py again; both ranks fit, the test after fit runs on both and is written once, beside
    the checkpoints, with the training rows of metrics.csv kept."""
    args = [*COMMON, "--data.batch_size", "4"]
    args += ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    proc = run_script(str(ROOT / "train.py"), *args, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in proc.stderr
    runs = list(tmp_path.glob("runs/tiny/*/"))
    assert len(runs) == 1, runs
    run = runs[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert (run / "test_metrics.json").is_file() and (run / "test_captions.json").is_file()
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert len([r for r in rows if r.get("train/loss")]) == 6
    assert len([r for r in rows if r.get("test/cider_d")]) == 1
    assert proc.stdout.count("run directory:") == 1


def _on_two_ranks(rank_fn, *args) -> dict:
    """``rank_fn(rank, port, out, *args)`` on two ranks of a gloo group; returns what they put in ``out``.

    The ranks are forked from this process, which has imported torch and the module already: spawned, each
    spent most of its ~6 s importing them again. Each rank is still a process of its own (its own
    process group, collectives and exceptions), which is all these tests are about."""
    import torch.multiprocessing as mp

    import captioning.lit_module  # noqa: F401  (imported here, before the fork, for the ranks to inherit)

    port = free_port()
    out = mp.Manager().dict()
    mp.start_processes(rank_fn, args=(port, out, *args), nprocs=2, start_method="fork")
    return dict(out)


def _forked_rank_setup(rank: int, port: int) -> None:
    import datetime
    import os

    # one thread, as DataLoader's forked workers do: GNU OpenMP does not support a fork after the parent
    # ran parallel regions (a child that runs one may hang)
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))


def _rank_with_an_empty_batch(rank: int, port: int, out: dict) -> None:
    """Rank 1's batch lost every image; rank 0's did not. Both must get through the step."""
    import types

    from captioning.lit_module import CaptionModule
    from captioning.vocab import SPECIALS

    _forked_rank_setup(rank, port)
    torch.manual_seed(0)
    m = CaptionModule(vocab=[*SPECIALS, *"abcdefgh"], encoder_channels=(8, 8, 8, 8), embed_dim=8, hidden_dim=8)
    m._trainer = types.SimpleNamespace(world_size=2)  # what _distributed() reads
    logged = {}

    def log(name, value, sync_dist=False, **kw):  # Lightning's sync_dist=True is an all-reduce per value
        if sync_dist:
            value = torch.as_tensor(value).detach().clone()
            torch.distributed.all_reduce(value)  # a sum (Lightning divides by the ranks for a mean)
            logged[name] = float(value)

    m.log = log
    tokens = torch.tensor([[[1, 5, 6, 7, 2], [1, 8, 9, 2, 0]]]).repeat(2, 1, 1)  # (2 images, 2 captions, L)
    if rank == 1:
        loss = m.training_step((torch.empty(0, 3, 64, 64), torch.empty(0, 2, 5, dtype=torch.long), 2), 0)
    else:
        loss = m.training_step((torch.randn(2, 3, 64, 64), tokens, 0), 0)
    loss.backward()  # a zero loss that touches every weight: DDP's gradient all-reduce sees all of them
    m.on_train_epoch_end()  # the epoch's count of images the loader could not read, summed over the ranks
    grads = all(p.grad is not None for p in m.parameters() if p.requires_grad)
    out[rank] = (float(loss), sorted(logged), grads, logged["train/skipped_images"])
    torch.distributed.destroy_process_group()


def test_a_rank_whose_batch_lost_every_image_stays_in_step_with_the_others():
    """A rank with an empty batch still joins the word/caption counts and the synced logs; before, it
    skipped them and the other rank waited in its all-reduce until the timeout."""
    out = _on_two_ranks(_rank_with_an_empty_batch)
    (loss0, logs0, grads0, skipped0), (loss1, logs1, grads1, skipped1) = out[0], out[1]
    assert loss1 == 0.0 and loss0 > 0.0
    # the skipped-image count too: logged by rank 1 alone, and unsynced, it was rank 0's count under DDP
    assert logs0 == logs1 == ["train/ce", "train/loss", "train/skipped_images"]
    assert skipped0 == skipped1 == 2.0  # rank 1's 2 unreadable images, on both ranks
    assert grads0 and grads1


def _rank_with_a_nan_batch(rank: int, port: int, out: dict, rank0_empty: bool = False) -> None:
    """Rank 1's images are NaN (its loss is NaN); rank 0's are fine, or (``rank0_empty``) all failed to load.
    Records what training_step did on each."""
    import types

    from captioning.lit_module import CaptionModule
    from captioning.vocab import SPECIALS

    _forked_rank_setup(rank, port)
    torch.manual_seed(0)
    m = CaptionModule(vocab=[*SPECIALS, *"abcdefgh"], encoder_channels=(8, 8, 8, 8), embed_dim=8, hidden_dim=8)
    m._trainer = types.SimpleNamespace(world_size=2, global_step=3)  # what _distributed() and the message read
    m.log = lambda *a, sync_dist=False, **kw: None  # the epoch-end syncs of these logs are Lightning's
    tokens = torch.tensor([[[1, 5, 6, 7, 2], [1, 8, 9, 2, 0]]]).repeat(2, 1, 1)  # (2 images, 2 captions, L)
    images = torch.full((2, 3, 64, 64), float("nan")) if rank == 1 else torch.randn(2, 3, 64, 64)
    batch = (images, tokens, 0)
    if rank == 0 and rank0_empty:
        batch = (torch.empty(0, 3, 64, 64), torch.empty(0, 2, 5, dtype=torch.long), 2)
    try:
        m.training_step(batch, 0)
        out[rank] = "went on"
    except FloatingPointError as e:
        out[rank] = str(e)
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("rank0_empty", [False, True], ids=["rank-0-fine", "rank-0-lost-every-image"])
def test_a_nan_loss_on_one_rank_stops_every_rank(rank0_empty):
    """Before, only the rank with the NaN loss raised; the others went on to the backward, where DDP's gradient
    all-reduce waited for the stopped rank until the timeout (30 minutes on NCCL by default). A rank whose batch
    lost every image takes another path through the step, and must stop too."""
    out = _on_two_ranks(_rank_with_a_nan_batch, rank0_empty)
    assert out[1] == "loss is nan at step 3", out
    assert out[0] == ("loss is nan at step 3 (on another rank)" if rank0_empty else out[1]), out


# 2 ranks of 4 images: 6 batches an epoch, 2 per optimizer step, so 3 steps an epoch
ACCUMULATE = """
trainer:
  devices: 2
  strategy: ddp_spawn
  max_steps: 4
  max_epochs: 10
  accumulate_grad_batches: 2
  limit_val_batches: 0
  num_sanity_val_steps: 0
  log_every_n_steps: 1
data:
  batch_size: 4
"""


def _start_accumulating(cwd, *extra, config: str = ACCUMULATE):
    """Starts train.py with ``config`` (ACCUMULATE), the test helpers importable in both ranks."""
    (cwd / "ddp.yaml").write_text(config)
    args = ["fit", "-c", str(TINY), "-c", "ddp.yaml", "--test_after_fit", "false", *extra]
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(ROOT / "tests") + (os.pathsep + old if old else "")
    try:
        return start_script(str(ROOT / "train.py"), *args, cwd=cwd)
    finally:
        os.environ.pop("PYTHONPATH") if old is None else os.environ.update(PYTHONPATH=old)


def _fit_accumulating(cwd, *extra):
    """train.py with ACCUMULATE; killed after 120 s (a hang)."""
    return finish(_start_accumulating(cwd, *extra), timeout=120)


def _rows(run) -> list[tuple[int, float]]:
    """(step, loss) of every training row, in order (a step logged twice would show)."""
    rows = csv.DictReader(open(run / "metrics.csv"))
    return [(int(r["step"]), float(r["train/loss"])) for r in rows if r.get("train/loss")]


@pytest.fixture(scope="module")
def accumulating_reference(tmp_path_factory):
    """The uninterrupted run's rows, as a function: the run starts here and is waited for at the first call, so
    that it goes side by side with the first test's own (independent) run."""
    whole = tmp_path_factory.mktemp("whole")
    started, rows = _start_accumulating(whole), []

    def reference():
        if not rows:
            proc = finish(started, timeout=120)
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
            rows.extend(_rows(whole / "runs" / "tiny" / "version_0"))
            assert [s for s, _ in rows] == list(range(4))  # one row per optimizer step
        return rows

    yield reference
    if started.returncode is None:  # no test asked for it (an error before): do not leave it running
        stop(started)
        started.communicate()


# slow tests (each a minute of ddp_spawn start-ups): the default suite keeps the one-process case
# (test_resume.py) and stays near ~10 minutes on 2 cores
@pytest.mark.slow
@pytest.mark.parametrize("rank", [pytest.param(None, id="every-rank"), pytest.param(0, id="rank-0-only")])
def test_sigterm_inside_an_accumulation_window_under_ddp_saves_at_its_end_and_resumes_exactly(
    tmp_path, accumulating_reference, rank
):
    """Two ranks, 2 batches per optimizer step, SIGTERM after the first batch of step 1's window: to every
    rank (a scheduler signals every task) or to rank 0 alone (Lightning broadcasts rank 0's flag). The run
    exits, last.ckpt is written once, at step 2 (the window's end), and the resume takes the uninterrupted
    run's steps 2 and 3 with its losses."""
    term = ["--trainer.callbacks+=kill_at_step.KillAtStep", "--trainer.callbacks.step=1"]
    term += ["--trainer.callbacks.signal_name=SIGTERM", "--trainer.callbacks.mid_window=true"]
    if rank is not None:
        term.append(f"--trainer.callbacks.rank={rank}")
    proc = _fit_accumulating(tmp_path, *term)
    reference = accumulating_reference()  # ran alongside the run above
    out = proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("SIGTERM: saved") == 1, out
    # as one process ends: 143 and a line, not the spawn launcher's traceback ("process 0 terminated with exit
    # code 143", exit status 1)
    assert proc.returncode == 143 and "stopped by SIGTERM" in proc.stderr and "Traceback" not in proc.stderr, out
    run = tmp_path / "runs" / "tiny" / "version_0"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"], out
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert [s for s, _ in _rows(run)] == [0, 1]

    proc = _fit_accumulating(tmp_path, "--ckpt_path", str(last))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert _rows(run) == reference


# 2 ranks: 3 optimizer steps an epoch, a validation after each of 4 batches a rank
VALIDATING = """
trainer:
  devices: 2
  strategy: ddp_spawn
  max_steps: 9
  max_epochs: 3
  num_sanity_val_steps: 0
  log_every_n_steps: 1
data:
  eval_batch_size: 2
"""


@pytest.mark.slow
def test_sigterm_during_a_validation_under_ddp_stops_there_and_the_resume_runs_it_again(tmp_path):
    """Before, the ranks held a SIGTERM that came during a validation until the next optimizer step: the rest of
    the validation (on COCO, beam search over 5,000 images), the epoch's end and a step, maybe past the
    scheduler's grace period. Now they stop at the next validation batch, write last.ckpt once, and the resumed
    run runs that validation again: every epoch's val/cider_d and every loss as in the uninterrupted run."""
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    whole.mkdir(), stopped.mkdir()

    def start(cwd, *extra):
        return _start_accumulating(cwd, *extra, config=VALIDATING)

    def logged(cwd) -> tuple[dict, list]:
        run = cwd / "runs" / "tiny" / "version_0"
        val = {r["epoch"]: r["val/cider_d"] for r in csv.DictReader(open(run / "metrics.csv")) if r.get("val/cider_d")}
        return val, _rows(run)

    term = ["--trainer.callbacks+=kill_at_step.KillAtStep", "--trainer.callbacks.step=3"]
    term += ["--trainer.callbacks.signal_name=SIGTERM", "--trainer.callbacks.val_batch=0"]  # epoch 0's first of 4
    whole_proc, proc = finish(start(whole), start(stopped, *term), timeout=240)
    assert whole_proc.returncode == 0, whole_proc.stdout[-2000:] + whole_proc.stderr[-3000:]
    out = proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.returncode == 143 and proc.stdout.count("SIGTERM: saved") == 1, out
    last = stopped / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    assert logged(stopped)[0] == {}  # stopped inside the first validation
    proc = finish(start(stopped, "--ckpt_path", str(last)), timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    val, rows = logged(whole)
    assert sorted(val) == ["0", "1", "2"] and [s for s, _ in rows] == list(range(9))
    assert logged(stopped) == (val, rows)


GLOO_AT_EXIT = """
import atexit, os, socket
import torch.distributed as dist
from captioning.lit_module import CaptionModule
from captioning.vocab import SPECIALS

with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
# atexit runs last-registered first: this runs after any handler that setup() registers below
atexit.register(lambda: print("process group at exit:", dist.is_initialized(), flush=True))
dist.init_process_group("gloo", rank=0, world_size=1)
module = CaptionModule(vocab=[*SPECIALS, "a"], encoder_channels=(8, 8, 8, 8), embed_dim=8, hidden_dim=8)
module.setup("fit")
module.setup("test")  # a second stage registers nothing more
"""


def test_a_gloo_process_group_is_destroyed_before_the_interpreter_exits(tmp_path):
    """Lightning destroys an NCCL group at exit, not a gloo one: left to the interpreter's finalization, gloo's
    threads could outlive it, and a plain-ddp CPU run that had finished and written everything ended once in
    CI with "terminate called without an active exception" and exit status -6."""
    proc = run_script("-c", GLOO_AT_EXIT, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines() == ["process group at exit: False"], proc.stdout + proc.stderr[-2000:]


def test_an_input_error_inside_a_ddp_spawn_rank_is_one_line(tmp_path):
    """A bad checkpoint given as model.init_weights is read inside the ranks (configure_optimizers): under ddp_spawn
    the launcher re-raised the rank's traceback text, about 60 lines with the message at the end; now it is the
    one line that one process prints."""
    torch.save({"state_dict": {}}, tmp_path / "junk.ckpt")
    args = ["fit", "-c", str(TINY), "--trainer.accelerator", "cpu", "--trainer.devices", "2"]
    args += ["--trainer.strategy", "ddp_spawn", "--model.init_weights", str(tmp_path / "junk.ckpt")]
    proc = run_script(str(ROOT / "train.py"), *args, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: {tmp_path / 'junk.ckpt'}: not a checkpoint of this library (no 'captioning' metadata or state_dict)"
    ], proc.stderr[-3000:]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("Traceback:\n  File x\ncaptioning.checkpoint_io.CheckpointError: a.ckpt: bad\nits data.x: y line",
         "error: a.ckpt: bad\nits data.x: y line"),
        ("Traceback:\n  File x\ncaptioning.errors.InputFileNotFoundError: b.json: not found\n",
         "error: b.json: not found"),
        ("Traceback:\n  File x\nlightning_fabric.utilities.exceptions.MisconfigurationException: No gpu\n",
         "error: trainer: No gpu"),
        ("Traceback:\n  File x\nValueError: not ours", None),
        ("Traceback:\n  File x\ntorch.OutOfMemoryError: CUDA out of memory", None),
        # an InputError while handling which another exception came: the last one is not the user's
        ("captioning.errors.InputError: a\n\nDuring handling...:\n\nTraceback (most recent call last):\nKeyError: 1",
         None),
    ],
)  # fmt: skip
def test_rank_error_line_reads_the_last_exception_of_a_rank_traceback(text, line):
    from captioning.cli import rank_error_line

    assert rank_error_line(text) == line


def _rank_training_items(rank: int, port: int, out: dict, data_dir: str) -> None:
    """This rank's epoch-0 training images, its process seeded apart from the other's (as ranks started apart,
    plain ddp with seed_everything false or torchrun, are)."""
    import types

    from captioning.data.datamodule import CaptionDataModule

    _forked_rank_setup(rank, port)
    torch.manual_seed(1000 + rank)

    def broadcast(obj, src=0):  # Lightning's DDPStrategy.broadcast
        box = [obj]
        torch.distributed.broadcast_object_list(box, src)
        return box[0]

    dm = CaptionDataModule(data_dir=data_dir, num_train=48, num_val=16, num_test=16, batch_size=4)
    strategy = types.SimpleNamespace(root_device=torch.device("cpu"), broadcast=broadcast)
    dm.trainer = types.SimpleNamespace(world_size=2, global_rank=rank, is_global_zero=rank == 0, strategy=strategy)
    out[rank] = [i for i, _ in dm.train_dataloader().sampler]
    torch.distributed.destroy_process_group()


def test_ranks_seeded_apart_still_share_one_training_order(tmp_path):
    """The training order and caption draws are seeded by rank 0's seed on every rank. Each rank's own
    torch.initial_seed() gave each its own order, so their shards overlapped: a review's two ranks of 24 images
    each shared 12, and 12 of the 48 were never trained on in the epoch."""
    from captioning.data.datamodule import CaptionDataModule

    CaptionDataModule(data_dir=str(tmp_path), num_train=48, num_val=16, num_test=16).prepare_data()  # generated once
    out = _on_two_ranks(_rank_training_items, str(tmp_path))
    assert len(out[0]) == len(out[1]) == 24
    assert sorted(out[0] + out[1]) == list(range(48))


@pytest.mark.slow  # two ddp_spawn fits, ~40 s
def test_a_ddp_spawn_resume_tests_after_fit_and_keeps_every_csv_loggers_rows(tmp_path):
    """A resume under ddp_spawn with the test after fit failed in the test ("dict contains fields not in
    fieldnames": the test's ranks got a copy of the main process's CSV writer, holding the rows from before the
    checkpoint and only their columns); a second CSV logger's rows were deleted by the test's ranks. Now each
    logger's metrics.csv holds every step once and the test's row at the fit's end."""
    (tmp_path / "two.yaml").write_text(
        "trainer:\n  logger:\n"
        + "".join(
            f"    - class_path: pytorch_lightning.loggers.CSVLogger\n      init_args: {{save_dir: runs, name: {n}}}\n"
            for n in ("tiny", "second")
        )
    )
    args = [*COMMON, "-c", "two.yaml", "--trainer.devices", "2", "--trainer.strategy", "ddp_spawn"]
    args += ["--data.batch_size", "4", "--trainer.max_epochs", "3"]
    first = run_script(
        str(ROOT / "train.py"), *args, "--trainer.max_steps", "3", "--test_after_fit", "false", cwd=tmp_path
    )
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = tmp_path / "runs/tiny/version_0/checkpoints/last.ckpt"
    resumed = run_script(str(ROOT / "train.py"), *args, "--ckpt_path", str(ckpt), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the checkpoint's run goes on in its folder; the other logger's resumed run gets a folder of its own
    for run, steps in (("tiny/version_0", range(6)), ("second/version_1", range(3, 6))):
        rows = list(csv.DictReader(open(tmp_path / "runs" / run / "metrics.csv")))
        assert [int(r["step"]) for r in rows if r.get("train/loss")] == list(steps), (run, rows)
        tests = [r for r in rows if r.get("test/cider_d")]
        assert len(tests) == 1 and tests[0]["step"] == "6", (run, tests)
        assert not (tmp_path / "runs" / run / "metrics.fit.csv").exists()
        assert not (tmp_path / "runs" / run / "metrics.resume.csv").exists()
    # the test after fit, set up from the main process's copy of the config callback, wrote the resume's ckpt_path
    # into config.yaml: `fit -c` of it resumed the run again
    assert "ckpt_path: null" in (tmp_path / "runs/tiny/version_0/config.yaml").read_text()
    # a resume refused as it restores the checkpoint leaves metrics.csv as it was (the test row included)
    before = (tmp_path / "runs/tiny/version_0/metrics.csv").read_bytes()
    refused = run_script(
        str(ROOT / "train.py"), *args, "--ckpt_path", str(ckpt), "--model.hidden_dim", "48", cwd=tmp_path
    )
    assert refused.returncode != 0 and "model configuration mismatch" in refused.stderr, refused.stderr[-3000:]
    assert (tmp_path / "runs/tiny/version_0/metrics.csv").read_bytes() == before
    assert not (tmp_path / "runs/tiny/version_0/metrics.resume.csv").exists()
