"""benchmarks/throughput.py, the script the one-shot GPU check runs (benchmarks/gpu_check.sh): what it leaves
behind when it is stopped or a mode fails, at tiny sizes on the CPU; and every benchmark script's imports."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import finish

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
# the smallest model the script builds: a few seconds on a CPU for every mode; --threads 0 leaves torch's
# thread count (of this test process) as it is
TINY = [
    "--device", "cpu", "--precision", "fp32", "--threads", "0", "--encoder", "small_cnn", "--image-size", "32",
    "--hidden", "16", "--heads", "2", "--layers", "1", "--vocab", "40", "--images-per-batch", "1",
    "--captions-per-image", "2", "--iters", "1", "--warmup", "0", "--single-images", "1", "--steps", "2",
]  # fmt: skip


@pytest.fixture
def throughput(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as when run as a script: it imports data_throughput
    monkeypatch.setattr(sys, "argv", ["benchmarks/throughput.py"])
    import throughput

    return throughput


def test_each_mode_reports_its_numbers_before_the_next_starts(throughput, monkeypatch, capsys):
    """gpu_check.sh stops the script at its time limit: the modes measured by then must be in the log, not
    only in the table printed after the last mode."""

    def killed(*args, **kwargs):
        raise SystemExit("stopped by the time limit")  # what a kill looks like: no table at the end

    monkeypatch.setattr(throughput, "search_mode", killed)
    with pytest.raises(SystemExit):
        throughput.main([*TINY, "--decoders", "lstm", "--modes", "frozen,search"])
    err = capsys.readouterr().err
    done = [line for line in err.splitlines() if line.strip().startswith("done lstm frozen")]
    assert done and "captions/s" in done[0] and "ms/iter" in done[0] and "peak memory" in done[0], err


def test_the_overlapped_frozen_step_trains_on_the_batch_before_while_the_next_is_encoded(throughput):
    """frozen_overlap: each step encodes one batch and trains on the one encoded before it; the features the step
    trains on stay as they were until its block ends (its backward reads them), and take the next batch's after."""

    class Encoder:
        calls = 0

        def features(self, images):
            self.calls += 1
            return torch.full((1, 2, 3), float(self.calls))  # (B,N,C): batch i's features are all i

    encoder = Encoder()
    args = throughput.parse_args(TINY)
    encode_next = throughput._pipeline(encoder, torch.zeros(1, 3, 8, 8), args, torch.device("cpu"))
    assert encoder.calls == 1  # the first batch, before any step
    for step in range(1, 4):
        with encode_next() as features:
            assert encoder.calls == step + 1  # the next batch is encoded (on a GPU: alongside the block)
            assert (features == step).all()  # this step trains on the batch before
            held = features
        assert (held == step + 1).all()  # the next step's batch


def test_the_overlapped_step_forks_the_encoder_onto_a_second_stream_and_joins_it_back(throughput, monkeypatch):
    """With (stand-in) CUDA streams: the first batch is encoded on the current stream; at each step the second
    stream waits for the current one (whatever stream that is: the warm-up's, the capture's), the encoder runs on
    it, the decoder's step on the current one, and the current one waits for the second before the next batch's
    features are taken, even when the step fails (else a CUDA graph capture ends with a stream unjoined)."""
    log = []

    class Stream:
        def __init__(self, name="second"):
            self.name = name

        def wait_stream(self, other):
            log.append(f"{self.name} waits for {other.name}")

    current = [Stream("current")]

    @contextlib.contextmanager
    def stream(s):
        current.append(s)
        try:
            yield
        finally:
            current.pop()

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.cuda, "stream", stream)

    class Encoder:
        def features(self, images):
            log.append(f"encode on {current[-1].name}")
            return torch.zeros(1, 2, 3)  # (B,N,C)

    args = throughput.parse_args(TINY)
    encode_next = throughput._pipeline(Encoder(), torch.zeros(1, 3, 8, 8), args, torch.device("cuda"))
    assert log == ["encode on current"]
    for name in ("current", "capture"):
        current[0] = Stream(name)
        log.clear()
        with encode_next():
            log.append(f"step on {current[-1].name}")
        assert log == [f"second waits for {name}", "encode on second", f"step on {name}", f"{name} waits for second"]
    log.clear()
    with pytest.raises(RuntimeError, match="out of memory"), encode_next():
        raise RuntimeError("out of memory")
    assert log[-1] == "capture waits for second"


def test_the_overlapped_mode_reports_a_rate(throughput, capsys):
    throughput.main([*TINY, "--decoders", "lstm", "--modes", "frozen_overlap"])
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if "next batch encoded alongside" in line]
    assert row and "captions/s" in row[0] and "failed" not in row[0], out


def test_a_failing_mode_leaves_its_traceback(throughput, monkeypatch, capsys):
    """A mode that fails shows one line of its error in the table; the log must hold where it came from."""

    def deep_in_the_decoder():
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")

    monkeypatch.setattr(throughput, "train_mode", lambda *args: deep_in_the_decoder())
    throughput.main([*TINY, "--decoders", "lstm", "--modes", "frozen"])
    out, err = capsys.readouterr()
    assert "failed: RuntimeError: CUDA error: an illegal memory access was encountered |" in out
    assert "Traceback" in err and "deep_in_the_decoder" in err, err


@pytest.mark.parametrize("mode", ["frozen", "search", "search1"])
def test_cuda_peak_memory_counts_the_timed_iterations_only(throughput, monkeypatch, mode):
    """With cudnn.benchmark, cuDNN's first call of each convolution allocates trial workspaces through the
    caching allocator (it empties the cache after them, but the peak counter keeps them): the peak must
    be reset when the warm-up is over, not only before it. Run on the CPU, with a CUDA PeakMemory whose
    torch.cuda calls are recorded."""
    import torch

    events = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: events.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 0)
    cuda_memory = throughput.PeakMemory
    monkeypatch.setattr(throughput, "PeakMemory", lambda device: cuda_memory(torch.device("cuda")))
    loss, search = throughput.CaptionModule.loss, throughput.beam_search

    def counted(fn):
        def wrapper(*args, **kwargs):
            events.append("step")
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(throughput.CaptionModule, "loss", counted(loss))
    monkeypatch.setattr(throughput, "beam_search", counted(search))
    args = throughput.parse_args([*TINY, "--warmup", "2", "--iters", "1", "--single-images", "1"])
    run = throughput.search_mode if mode.startswith("search") else throughput.train_mode
    row = run(args, "lstm", mode, torch.device("cpu"))
    assert row["mem"] == "0.00 GiB"
    last_reset = len(events) - 1 - events[::-1].index("reset")
    warmup = 1 if mode == "search1" else 2  # search1 warms up on one image itself
    assert events[:last_reset].count("step") == warmup, events
    assert events[last_reset + 1 :] == ["step"], events  # the one timed iteration


def test_each_benchmark_times_the_checkout_beside_it_not_an_installed_captioning(tmp_path):
    """Run as `python benchmarks/x.py`, a benchmark imported whichever `captioning` pip had installed (here an
    editable install of another clone), and timed that code under this checkout's commit. Here another
    `captioning` comes first on the path, before the installed one."""
    other = tmp_path / "captioning"
    other.mkdir()
    (other / "__init__.py").write_text("raise ImportError('another captioning, not this checkout')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}  # side by side: a thread each
    scripts = ["beam_search.py", "beam_step_profile.py", "cell_centres.py", "data_throughput.py", "throughput.py",
               "train_step_profile.py", "fused_attention.py"]  # fmt: skip
    # not conftest's start_script, which puts this checkout first on the path; its finish collects them
    started = [
        subprocess.Popen([sys.executable, str(BENCHMARKS / s), "--help"], cwd=tmp_path, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        for s in scripts
    ]  # fmt: skip
    for script, proc in zip(scripts, finish(*started, timeout=120)):
        assert proc.returncode == 0 and "usage:" in proc.stdout, (script, proc.stderr[-2000:])


def test_cuda_peak_memory_of_a_graphed_step_counts_from_before_its_capture(throughput, monkeypatch):
    """A step replayed from a CUDA graph allocates nothing: its memory was taken while the graph was captured,
    in the warm-up. Reset at the warm-up's end (as for eager steps), the peak showed 0.13 GiB for an LSTM step
    of ~4 GiB on an H200; for graphed steps the peak counts from before the warm-up and says so."""
    import torch

    events = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: events.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 2**30)
    memory = throughput.PeakMemory(torch.device("cuda"))
    memory.reset()
    memory.graphed = True
    throughput._time(lambda: events.append("step"), 2, 1, torch.device("cpu"), memory)
    assert events == ["reset", "step", "step", "step"]
    assert memory.report() == "1.00 GiB (warm-up and capture incl.)"


def test_fused_attention_benchmark_checks_every_tile_it_times():
    """benchmarks/fused_attention.py, run in Triton's interpreter at tiny sizes (how it is checked without a GPU):
    a row per tile and warp count plus eager and the kernels' own choice, each with its error against float64, small
    for float32."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    tiny = ["--device", "cpu", "--dtype", "fp32", "--images", "2", "--queries", "3", "--cells", "13", "--width", "40"]
    tiles = ["--blocks-n", "4,16", "--blocks-a", "16", "--warps", "4"]
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "fused_attention.py"), *tiny, *tiles],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    names = [cells[0].strip() for cells in rows[1:]]
    expected = ["eager (B,M,N,A) tensor", "fused, tuned, exact tanh"]  # no timed choice nor fast tanh interpreted
    expected += ["fused 4 x 16, 4 warps, exact tanh", "fused 16 x 16, 4 warps, exact tanh"]
    assert names == expected, proc.stdout
    assert all(float(cells[-1]) < 1e-5 for cells in rows[1:]), proc.stdout


def test_gpu_check_keeps_out_dir_within_what_a_lent_machine_returns(tmp_path):
    """gpu_check.sh with every step (a stand-in interpreter, `echo`, makes each step instant): 19 files could not
    all come back from a machine that returns 8, so each log goes into OUT_DIR/gpu_check.tar as it is complete;
    with room for them all they stay files; and a folder that already holds files is refused (packing at the end
    once deleted an earlier run's tar and, given the repo root, the repo's own files)."""
    script = BENCHMARKS / "gpu_check.sh"
    env = {**os.environ, "PYTHON": "echo", "DEVICE": "cpu"}
    steps = "env gputest throughput encoder beam train infer overlap overlap_graph kernels profile graph compile_enc "
    steps += "compile_enc_graph "
    steps += "compile compile_ro "
    steps += "search_big"

    def run(out, **extra):
        return subprocess.run(["bash", str(script), str(out)], env={**env, **extra}, capture_output=True, text=True,
                              timeout=120, check=False)  # fmt: skip

    packed = run(tmp_path / "packed")
    assert packed.returncode == 1, packed.stderr  # no training with `echo`: infer is skipped, and says so
    assert [p.name for p in (tmp_path / "packed").iterdir()] == ["gpu_check.tar"]
    listed = subprocess.run(["tar", "-tf", str(tmp_path / "packed" / "gpu_check.tar")], capture_output=True, text=True)
    cuda_only = ("graph", "compile_enc_graph", "overlap_graph", "kernels")  # kernels: Triton, it failed with DEVICE=cpu
    assert sorted(listed.stdout.split()) == sorted(f"{s}.txt" for s in steps.split() if s not in cuda_only)
    assert "== summary" in packed.stdout and "== infer: skipped" in packed.stdout
    again = run(tmp_path / "packed")
    assert again.returncode == 2 and "holds files already" in again.stderr
    assert [p.name for p in (tmp_path / "packed").iterdir()] == ["gpu_check.tar"]
    roomy = run(tmp_path / "roomy", MAX_FILES="100", STEPS="env beam")
    assert sorted(p.name for p in (tmp_path / "roomy").iterdir()) == ["beam.txt", "env.txt"], roomy.stderr


def test_search_fold_ab_times_every_variant_of_both_decoders():
    """benchmarks/search_fold_ab.py at its CPU sizes: a rate for folded and kept BatchNorm, under inference_mode
    and no_grad, for each decoder."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "search_fold_ab.py"), "--repeats", "1"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.endswith("images/s per round")]
    variants = [line.split(":")[0] for line in lines]
    modes = ("inference_mode", "no_grad")
    expected = [f"{d} {f} {m}" for d in ("lstm", "transformer") for f in ("folded", "kept BN") for m in modes]
    assert variants == expected, proc.stdout
    assert all(float(line.split(":")[1].split()[0].replace(",", "")) > 0 for line in lines), proc.stdout


def test_the_step_profiles_options_are_its_own_and_throughputs_beside_them(throughput, monkeypatch, capsys):
    """train_step_profile.py took --steps for its profiled steps, so throughput.py's --steps (the search's length)
    could not be set, and its --help printed throughput.py's usage alone."""
    monkeypatch.setattr(sys, "argv", ["benchmarks/train_step_profile.py"])
    import train_step_profile

    seen = {}
    monkeypatch.setattr(train_step_profile, "profile_mode", lambda args, *rest: seen.update(args=args, rest=rest))
    train_step_profile.main([*TINY, "--decoders", "lstm", "--modes", "search", "--steps", "4", "--profile-steps", "2"])
    assert seen["args"].steps == 4 and seen["rest"][-2:] == (2, 12)  # search length 4; 2 profiled steps, 12 rows
    with pytest.raises(SystemExit):
        train_step_profile.main(["--help"])
    usage = capsys.readouterr().out
    assert "usage: train_step_profile.py" in usage and "--profile-steps" in usage and "--max-caption-len" in usage


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("script", ["throughput.py", "beam_search.py", "data_throughput.py"])
def test_device_cuda_without_a_gpu_is_one_line_before_any_work(script):
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--device", "cuda"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "--device cuda needs a CUDA GPU, and torch finds none here" in proc.stderr
