"""The fused additive attention score (captioning/models/fused_attention.py) against its eager float64 definition:
forward and gradients, in float32 and half precision, with tiles that do not divide the shapes.

Without a GPU the kernels run in Triton's interpreter, which must be switched on before Triton defines them: one
child interpreter (this file run as a script, with TRITON_INTERPRET=1) measures every case once and prints the
errors as JSON; the tests below assert on them. The interpreter is slow, so shapes are small, and small tiles make
them span several tiles along N and A with a partial last one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")
from triton.runtime.errors import OutOfResources  # noqa: E402

from captioning.models.fused_attention import (  # noqa: E402
    additive_scores,
    additive_scores_reference,
    fused_available,
)

ROOT = Path(__file__).resolve().parent.parent

# name: (B, M, N, A, block_n, block_a); None picks the tile from the shape as in training
FLOAT32_CASES = {
    "default-tiles": (2, 3, 13, 70, None, None),  # A over 2 tiles of 64, N in 1 tile of 16
    "small-tiles": (2, 5, 13, 70, 4, 16),  # N over 4 tiles, A over 5, the last of each partial
    "one-query": (2, 1, 7, 40, 4, 16),  # M = 1: one caption or one beam per image
    "small-a": (2, 5, 7, 10, None, None),  # one partial tile along each of N and A
    "non-contiguous": (2, 3, 7, 40, 4, 16),  # keys a transposed view, q a strided slice
}
# name: (keys dtype, q dtype); v stays float32, a parameter under autocast
HALF_CASES = {
    "bfloat16": (torch.bfloat16, torch.bfloat16),
    "float16": (torch.float16, torch.float16),
    "bfloat16-keys-float32-q": (torch.bfloat16, torch.float32),
}
HALF_SHAPE = (2, 5, 13, 70, 4, 16)
NO_AUTOGRAD_SHAPE = (2, 3, 13, 40, 4, 16)


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute error over the reference's largest magnitude."""
    return ((x.double() - ref).abs().max() / ref.abs().max()).item()


def make_inputs(b, m, n, a, *, gen, keys_dtype=torch.float32, q_dtype=torch.float32, contiguous=True):
    """keys (B,N,A), q (B,M,A), v (A,) at the scale a trained model sees: keys + q of order 1 (tanh neither
    linear nor saturated), v as nn.Linear(A, 1) initialises it (scores of order 1)."""
    if contiguous:
        keys = torch.randn(b, n, a, generator=gen)
        q = torch.randn(b, m, a, generator=gen)
    else:
        keys = torch.randn(b, a, n, generator=gen).transpose(1, 2)  # (B,N,A), strides (A*N,1,N)
        q = torch.randn(b, m, 2 * a, generator=gen)[..., ::2]  # (B,M,A), stride 2 along A
    v = (torch.rand(a, generator=gen) * 2 - 1) / a**0.5
    keys, q = keys.to(keys_dtype), q.to(q_dtype)
    return [t.requires_grad_() for t in (keys, q, v)]


def gradients_against_reference(keys, q, v, out, gen) -> dict:
    """Errors of the fused scores ``out`` and their gradients against float64 autograd of the eager definition,
    on the same (already rounded) inputs and one random upstream gradient."""
    ref_inputs = [t.detach().double().requires_grad_() for t in (keys, q, v)]
    ref = additive_scores_reference(*ref_inputs)
    upstream = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, (keys, q, v), upstream)
    ref_grads = torch.autograd.grad(ref, ref_inputs, upstream.double())
    result = {
        "forward_abs": (out.double() - ref).abs().max().item(),
        "forward_rel": rel_error(out, ref),
        "dtype": str(out.dtype),
        "grad_dtypes": [str(g.dtype) for g in grads],
    }
    for name, grad, ref_grad in zip(("dkeys", "dq", "dv"), grads, ref_grads):
        result[name] = rel_error(grad, ref_grad)
    return result


def measure() -> dict:
    """Every case once, in this (interpreted) process: what the child prints."""
    import captioning.models.fused_attention as fused

    gen = torch.Generator().manual_seed(0)
    results = {"available": fused_available(torch.zeros(1)), "file": fused.__file__}
    for name, (b, m, n, a, block_n, block_a) in FLOAT32_CASES.items():
        keys, q, v = make_inputs(b, m, n, a, gen=gen, contiguous=name != "non-contiguous")
        out = additive_scores(keys, q, v, block_n=block_n, block_a=block_a)
        results[name] = gradients_against_reference(keys, q, v, out, gen)
    b, m, n, a, block_n, block_a = HALF_SHAPE
    for name, (keys_dtype, q_dtype) in HALF_CASES.items():
        keys, q, v = make_inputs(b, m, n, a, gen=gen, keys_dtype=keys_dtype, q_dtype=q_dtype)
        out = additive_scores(keys, q, v, block_n=block_n, block_a=block_a)
        results[name] = gradients_against_reference(keys, q, v, out, gen)
    b, m, n, a, block_n, block_a = NO_AUTOGRAD_SHAPE
    keys, q, v = make_inputs(b, m, n, a, gen=gen)
    ref = additive_scores_reference(keys.double(), q.double(), v.double())
    for name, mode in (("no_grad", torch.no_grad), ("inference_mode", torch.inference_mode)):
        with mode():
            out = additive_scores(keys, q, v, block_n=block_n, block_a=block_a)
        results[name] = {"forward_abs": (out.double() - ref).abs().max().item(), "requires_grad": out.requires_grad}
    results["module"] = attention_module_fused_vs_eager()
    # the default configuration (no tile given) ran above, in the "default-tiles" case and the module: in the
    # interpreter nothing is timed or chosen
    results["chosen"] = len(fused.chosen_configs())
    results["tuned"] = tuned_as_on_a_gpu(gen)
    results["double_backward"] = second_derivatives(gen)
    results["nan_filled"] = unwritten_gradients(gen)
    results["available_float64"] = fused_available(torch.zeros(1, dtype=torch.float64))
    del os.environ["TRITON_INTERPRET"]  # the kernels stay interpreted, but the switch is read again at each call
    results["available_without_env"] = fused_available(torch.zeros(1))
    return results


#: second-derivative cases: (keys dtype, q dtype, contiguous inputs)
SECOND_DERIVATIVE_CASES = {
    "float32": (torch.float32, torch.float32, True),
    "non-contiguous": (torch.float32, torch.float32, False),  # the forward copies keys and q before the kernels
    "bfloat16-keys-float32-q": (torch.bfloat16, torch.float32, True),  # and casts q to keys' dtype
}


def second_derivatives(gen: torch.Generator) -> dict:
    """A gradient penalty through the fused scores (create_graph=True, then the gradient of the gradient's norm)
    against float64 eager, for each input: autograd cannot differentiate the kernels' writes, so before the
    backward took the eager definition under create_graph there were no second derivatives (an error), and before
    it saved the inputs as given, a copy made by the forward (non-contiguous inputs, q cast to keys' dtype) had no
    history to differentiate."""
    results = {}
    for name, (keys_dtype, q_dtype, contiguous) in SECOND_DERIVATIVE_CASES.items():
        keys, q, v = make_inputs(2, 3, 7, 40, gen=gen, keys_dtype=keys_dtype, q_dtype=q_dtype, contiguous=contiguous)
        weights = torch.randn(2, 3, 7, generator=gen)

        def penalty_grads(fn, inputs, weights=weights):
            first = torch.autograd.grad((fn(*inputs) * weights.to(inputs[0].dtype)).sum(), inputs, create_graph=True)
            return torch.autograd.grad(sum(g.float().square().sum() for g in first), inputs)

        try:
            fused = penalty_grads(additive_scores, [keys, q, v])
        except RuntimeError as e:
            results[name] = {"error": str(e)}
            continue
        ref = penalty_grads(additive_scores_reference, [t.detach().double().requires_grad_() for t in (keys, q, v)])
        results[name] = {n: rel_error(f, r) for n, f, r in zip(("keys", "q", "v"), fused, ref)}
        results[name]["dtypes"] = [str(f.dtype) for f in fused]
    return results


def unwritten_gradients(gen: torch.Generator) -> dict:
    """The backward allocates its outputs without clearing them (the kernel writes every element): with every
    allocation filled with NaN first, the gradients must still be finite and right, for tiles that do and do not
    divide the shapes."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        return real_empty(*args, **kwargs).fill_(float("nan"))

    torch.empty = nan_empty
    try:
        results = {}
        for name, (b, m, n, a, block_n, block_a) in {**FLOAT32_CASES, "tiny": (2, 7, 3, 3, None, None)}.items():
            keys, q, v = make_inputs(b, m, n, a, gen=gen, contiguous=name != "non-contiguous")
            out = additive_scores(keys, q, v, block_n=block_n, block_a=block_a)
            results[name] = gradients_against_reference(keys, q, v, out, gen)
        return results
    finally:
        torch.empty = real_empty


def tuned_as_on_a_gpu(gen: torch.Generator) -> dict:
    """The choice by timing that a GPU makes, run here with the interpreter's wall time: every candidate of both
    kernels launched with its own tiles and warps, one chosen for each, and the results right."""
    import time

    import captioning.models.fused_attention as fused

    timed = []

    def wall_ms(launch):
        timed.append(1)
        t0 = time.perf_counter()
        launch()
        return 1e3 * (time.perf_counter() - t0)

    may_tune, defaults = fused._may_tune, fused._choose.__defaults__
    fused._may_tune = lambda t: True
    fused._choose.__defaults__ = (wall_ms,)
    try:
        keys, q, v = make_inputs(2, 3, 13, 40, gen=gen)
        out = additive_scores(keys, q, v)
        result = gradients_against_reference(keys, q, v, out, gen)
    finally:
        fused._may_tune, fused._choose.__defaults__ = may_tune, defaults
    chosen = fused.chosen_configs()
    result["kinds"] = sorted(key[0] for key in chosen)
    candidates = {"forward": fused.FORWARD_CONFIGS, "backward": fused.BACKWARD_CONFIGS}
    result["in_candidates"] = all(
        config in [fused._fit(c, 13, 40) for c in candidates[key[0]]] for key, config in chosen.items()
    )
    # every distinct candidate of both kernels timed once (tiles cut to the shape can coincide)
    result["timed"] = len(timed)
    result["distinct"] = sum(len({fused._fit(c, 13, 40) for c in configs}) for configs in candidates.values())
    return result


def attention_module_fused_vs_eager() -> dict:
    """AdditiveAttention with ``fused`` on (the kernels; counted, so a silently skipped fused path shows) and off
    (eager): context, weights and every parameter's gradient, M = 4 queries per image."""
    import captioning.models.attention as attention

    calls = []
    kernels = attention.additive_scores
    attention.additive_scores = lambda *a, **k: calls.append(1) or kernels(*a, **k)
    torch.manual_seed(0)
    module = attention.AdditiveAttention(feature_dim=24, query_dim=16, attention_dim=40)
    features, query = torch.randn(3, 13, 24), torch.randn(3 * 4, 16)  # (B,N,C), (B*M,Q)
    weights = torch.randn(3 * 4, 13)  # a loss that depends on alpha itself, not only on the context

    def run(fused: bool) -> list[torch.Tensor]:
        module.fused = fused
        module.zero_grad()
        context, alpha = module(features, module.precompute(features), query)
        (context.square().sum() + (alpha * weights).sum()).backward()
        return [context.detach(), alpha.detach(), *(p.grad.clone() for p in module.parameters())]

    fused, eager = run(True), run(False)
    return {
        "fused_calls": len(calls),
        "max_rel": max(rel_error(f, e.double()) for f, e in zip(fused, eager) if e.abs().max() > 0),
        # the score's bias only shifts every score: its gradient is exactly 0 either way (shift_only)
        "bias_grads": [fused[-1].abs().max().item(), eager[-1].abs().max().item()],
    }


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    # the kernels measured are this checkout's (not an installed copy's)
    assert Path(results["file"]).resolve() == ROOT / "captioning" / "models" / "fused_attention.py"
    return results


@pytest.mark.parametrize("case", sorted(FLOAT32_CASES))
def test_forward_equals_float64_reference(interpreted, case):
    result = interpreted[case]
    assert result["dtype"] == "torch.float32"
    assert result["forward_abs"] < 1e-5, result


@pytest.mark.parametrize("case", sorted(FLOAT32_CASES))
def test_gradients_equal_float64_reference(interpreted, case):
    result = interpreted[case]
    assert result["grad_dtypes"] == ["torch.float32"] * 3
    for name in ("dkeys", "dq", "dv"):
        assert result[name] < 1e-5, (name, result)


@pytest.mark.parametrize("case", sorted(HALF_CASES))
def test_half_precision_scores_in_keys_dtype_and_gradients_in_each_inputs(interpreted, case):
    """As eager autocast: the scores in keys' (bf16) dtype, each gradient in its own input's."""
    keys_dtype, q_dtype = HALF_CASES[case]
    result = interpreted[case]
    assert result["dtype"] == str(keys_dtype)
    assert result["grad_dtypes"] == [str(keys_dtype), str(q_dtype), "torch.float32"]
    assert result["forward_rel"] < 2e-2, result
    for name in ("dkeys", "dq", "dv"):
        assert result[name] < 2e-2, (name, result)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_forward_without_autograd(interpreted, mode):
    result = interpreted[mode]
    assert not result["requires_grad"]
    assert result["forward_abs"] < 1e-5, result


def test_additive_attention_takes_the_fused_path_and_agrees_with_eager(interpreted):
    """The decoder's attention module with the kernels (Triton available: here interpreted) against its eager
    score, forward and gradients of every parameter."""
    result = interpreted["module"]
    assert result["fused_calls"] == 1, result  # the fused run only
    assert result["max_rel"] < 1e-5, result
    assert result["bias_grads"] == [0.0, 0.0], result


def test_the_interpreter_times_no_configuration(interpreted):
    assert interpreted["chosen"] == 0


def test_the_choice_by_timing_launches_every_candidate_and_keeps_one_per_kernel(interpreted):
    result = interpreted["tuned"]
    assert result["kinds"] == ["backward", "forward"], result
    assert result["in_candidates"], result
    assert result["timed"] == result["distinct"] > 2, result
    for name in ("forward_rel", "dkeys", "dq", "dv"):
        assert result[name] < 1e-5, (name, result)


def test_fused_available_on_a_cpu_tensor_only_when_interpreted(interpreted):
    assert interpreted["available"]
    assert not interpreted["available_without_env"]


def test_a_float64_tensor_keeps_the_eager_score(interpreted):
    """The kernels compute in float32: a float64 model would get float32 precision labelled float64."""
    assert not interpreted["available_float64"]


@pytest.mark.parametrize("case", sorted(SECOND_DERIVATIVE_CASES))
def test_second_derivatives_through_the_fused_scores_equal_eager(interpreted, case):
    """With create_graph=True the first derivatives came from the kernels, which autograd cannot differentiate: a
    gradient penalty raised; and where the forward had copied an input, its copy had no history to differentiate."""
    result = interpreted["double_backward"][case]
    assert "error" not in result, result
    keys_dtype, q_dtype, _ = SECOND_DERIVATIVE_CASES[case]
    assert result["dtypes"] == [str(keys_dtype), str(q_dtype), "torch.float32"], result
    tol = 1e-5 if keys_dtype == q_dtype == torch.float32 else 3e-2  # q rounded to bf16 before the kernels
    assert max(result[name] for name in ("keys", "q", "v")) < tol, result


@pytest.mark.parametrize("case", [*sorted(FLOAT32_CASES), "tiny"])
def test_every_gradient_element_is_written(interpreted, case):
    result = interpreted["nan_filled"][case]
    for name in ("dkeys", "dq", "dv"):
        assert result[name] < 1e-5, (name, result)  # NaN compares False: an unwritten element fails


def test_kernels_that_fail_to_compile_warn_once_and_leave_the_eager_score(monkeypatch):
    """A GPU where Triton cannot build its launcher (no C compiler, say): the first fused call fails, the module
    warns once and every instance takes the eager score from then on, with the same results."""
    import captioning.models.attention as attention

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("failed to compile the launcher: no C compiler")

    monkeypatch.setattr(attention, "additive_scores", broken)
    monkeypatch.setattr(attention, "fused_available", lambda t: True)
    monkeypatch.setattr(attention.AdditiveAttention, "_fused_ran", False)
    monkeypatch.setattr(attention.AdditiveAttention, "_fused_broken", False)
    torch.manual_seed(0)
    module = attention.AdditiveAttention(feature_dim=24, query_dim=16, attention_dim=40)
    other = attention.AdditiveAttention(feature_dim=24, query_dim=16, attention_dim=40)
    features, query = torch.randn(3, 13, 24), torch.randn(3 * 4, 16)  # (B,N,C), (B*M,Q)
    with pytest.warns(RuntimeWarning, match="failed to compile.*eager score"):
        context, alpha = module(features, module.precompute(features), query)
    module.fused = False
    expected = module(features, module.precompute(features), query)
    torch.testing.assert_close((context, alpha), expected)
    other(features, other.precompute(features), query)  # no second try, no second warning
    assert calls == [1]


def test_running_out_of_memory_in_the_first_fused_call_is_raised_not_taken_for_a_compile_failure(monkeypatch):
    """Taken for a failed compile, an OOM turned the kernels off for the whole process (the eager score needs twice
    the memory) and never reached a caller that shrinks its batch on OOM."""
    import captioning.models.attention as attention

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(attention, "additive_scores", oom)
    monkeypatch.setattr(attention, "fused_available", lambda t: True)
    monkeypatch.setattr(attention.AdditiveAttention, "_fused_ran", False)
    monkeypatch.setattr(attention.AdditiveAttention, "_fused_broken", False)
    module = attention.AdditiveAttention(feature_dim=24, query_dim=16, attention_dim=40)
    features = torch.randn(3, 13, 24)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        module(features, module.precompute(features), torch.randn(3 * 4, 16))
    assert not attention.AdditiveAttention._fused_broken


def test_kernels_that_ran_once_raise_their_errors(monkeypatch):
    """Once the kernels have run, an error in them is a real one, not a missing compiler: it is raised."""
    import captioning.models.attention as attention

    monkeypatch.setattr(attention, "additive_scores", lambda *a, **k: (_ for _ in ()).throw(ValueError("bad")))
    monkeypatch.setattr(attention, "fused_available", lambda t: True)
    monkeypatch.setattr(attention.AdditiveAttention, "_fused_ran", True)
    monkeypatch.setattr(attention.AdditiveAttention, "_fused_broken", False)
    module = attention.AdditiveAttention(feature_dim=24, query_dim=16, attention_dim=40)
    features = torch.randn(3, 13, 24)
    with pytest.raises(ValueError, match="bad"):
        module(features, module.precompute(features), torch.randn(3 * 4, 16))


class TestChoose:
    """The choice of a kernel configuration by timing (``_choose``), with a fake timer: no GPU needed."""

    @pytest.fixture(autouse=True)
    def fresh(self, monkeypatch):
        import captioning.models.fused_attention as fused

        monkeypatch.setattr(fused, "_CHOSEN", {})
        self.fused = fused

    def test_the_fastest_working_configuration_is_chosen_once_and_kept(self):
        times = {(16, 64, 1): 3.0, (32, 64, 4): 1.0, (8, 64, 1): 2.0}
        launched, timed = [], []

        def launch(config):
            launched.append(config)
            if config == (64, 64, 4):
                raise OutOfResources(300_000, 232_448, "shared memory")

        def timer(call):
            call()
            timed.append(launched[-1])
            return times[launched[-1]]

        candidates = [(16, 64, 1), (64, 64, 4), (32, 64, 4), (8, 64, 1), (16, 64, 1)]
        chosen = self.fused._choose(("k",), candidates, launch, (2, 2, 4), True, timer=timer)
        assert chosen == (32, 64, 4)
        assert timed == [(16, 64, 1), (32, 64, 4), (8, 64, 1)]  # each once, the one that failed skipped
        assert self.fused.chosen_configs() == {("k",): (32, 64, 4)}
        # chosen before: no more timing, even where tuning is not allowed now (a CUDA graph being captured)
        assert self.fused._choose(("k",), candidates, launch, (2, 2, 4), False, timer=timer) == (32, 64, 4)
        assert len(timed) == 3

    def test_without_tuning_the_default_runs_and_nothing_is_kept(self):
        def timer(call):
            raise AssertionError("timed")

        assert self.fused._choose(("k",), [(16, 64, 1)], lambda c: None, (2, 2, 4), False, timer=timer) == (2, 2, 4)
        assert self.fused.chosen_configs() == {}

    def test_no_configuration_running_is_an_error_naming_them(self):
        def launch(config):
            raise OutOfResources(300_000, 232_448, "shared memory")

        with pytest.raises(RuntimeError, match=r"no configuration.*\(16, 64, 1\): OutOfResources: out of resource"):
            self.fused._choose(("k",), [(16, 64, 1)], launch, (2, 2, 4), True, timer=lambda call: call())
        assert self.fused.chosen_configs() == {}

    @pytest.mark.parametrize(
        "error",
        [torch.cuda.OutOfMemoryError("CUDA out of memory"), RuntimeError("CUDA error: an illegal memory access"),
         TypeError("launch() takes 1 argument")],
    )  # fmt: skip
    def test_errors_other_than_a_tile_that_does_not_fit_are_raised_not_skipped(self, error):
        """Skipped, a CUDA error or a bug became "no configuration built", and the model then turned the kernels
        off for the whole process as if Triton could not compile."""

        def launch(config):
            raise error

        with pytest.raises(type(error)):
            self.fused._choose(("k",), [(16, 64, 1), (8, 64, 1)], launch, (2, 2, 4), True, timer=lambda call: call())
        assert self.fused.chosen_configs() == {}

    def test_tiles_are_cut_to_the_shape(self):
        assert self.fused._fit((64, 128, 4), 13, 70) == (16, 128, 4)
        assert self.fused._fit((64, 128, 2), 196, 40) == (64, 64, 2)
        assert self.fused._fit((16, 32, 1), 196, 512) == (16, 32, 1)

    def test_tuning_only_on_a_gpu_and_not_while_a_graph_is_captured(self, monkeypatch):
        gpu_tensor = SimpleNamespace(is_cuda=True)  # what _may_tune reads of a tensor
        assert not self.fused._may_tune(torch.zeros(1))
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
        assert self.fused._may_tune(gpu_tensor)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        assert not self.fused._may_tune(gpu_tensor)

    def test_deterministic_algorithms_take_the_default_even_after_a_choice(self):
        keys = torch.zeros(2, 13, 40)
        default = self.fused._fit((self.fused.MAX_BLOCK_N, self.fused.MAX_BLOCK_A, 4), 13, 40)
        self.fused._CHOSEN[self.fused._key("forward", keys, 3, (), False)] = (8, 64, 1)

        def configure():
            return self.fused._configure(None, "forward", keys, 3, (), False, self.fused.FORWARD_CONFIGS, None)

        assert configure() == (8, 64, 1)
        torch.use_deterministic_algorithms(True)
        try:
            assert configure() == default == (16, 64, 4)
        finally:
            torch.use_deterministic_algorithms(False)
        assert self.fused._configure((4, 16, 2), "forward", keys, 3, (), False, (), None) == (4, 16, 2)  # given

    def test_a_choice_is_kept_per_kernel_batch_size_gradients_asked_and_tanh(self):
        key = self.fused._key
        keys, bigger = torch.zeros(5, 13, 40), torch.zeros(9, 13, 40)
        base = key("backward", keys, 3, (True, True, True), False)
        assert base == ("backward", -1, "float32", 8, 3, 13, 40, (True, True, True), False)
        others = [
            key("forward", keys, 3, (True, True, True), False),
            key("backward", bigger, 3, (True, True, True), False),  # 16 after rounding up
            key("backward", keys, 2, (True, True, True), False),
            key("backward", keys, 3, (False, True, True), False),
            key("backward", keys, 3, (True, True, True), True),
            key("backward", keys.double(), 3, (True, True, True), False),
        ]
        assert len({base, *others}) == 7
        assert key("backward", torch.zeros(7, 13, 40), 3, (True, True, True), False) == base  # 5 and 7: 8

    def test_no_fast_tanh_off_an_nvidia_gpu(self, monkeypatch):
        assert not self.fused._use_fast_tanh(torch.zeros(1, dtype=torch.bfloat16), None)
        with pytest.raises(ValueError, match="fast_tanh=True needs an NVIDIA GPU"):
            self.fused._use_fast_tanh(torch.zeros(1), True)
        monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm: the instruction is NVIDIA's PTX
        rocm_tensor = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
        assert not self.fused._use_fast_tanh(rocm_tensor, None)
        with pytest.raises(ValueError, match="fast_tanh=True needs an NVIDIA GPU"):
            self.fused._use_fast_tanh(rocm_tensor, True)

    @pytest.mark.parametrize("warps", [0, 3, -4])
    def test_a_warp_count_that_is_not_a_power_of_2_is_refused(self, warps):
        with pytest.raises(ValueError, match="num_warps must be a power of 2"):
            additive_scores(torch.zeros(1, 3, 4), torch.zeros(1, 2, 4), torch.zeros(4), num_warps=warps)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernels_on_cuda_at_training_sizes(dtype):
    """The compiled kernels (not the interpreter) at the sizes of a training step: 196 cells, A = 512."""
    gen = torch.Generator().manual_seed(0)
    keys, q, v = make_inputs(4, 5, 196, 512, gen=gen, keys_dtype=dtype, q_dtype=dtype)
    keys, q, v = [t.detach().cuda().requires_grad_() for t in (keys, q, v)]
    result = gradients_against_reference(keys, q, v, additive_scores(keys, q, v), gen)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert result["dtype"] == str(dtype)
    for name in ("forward_rel", "dkeys", "dq", "dv"):
        assert result[name] < tol, (name, result)


def cuda_inputs(dtype, b=4, m=5, n=196, a=512, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys, q, v = make_inputs(b, m, n, a, gen=gen, keys_dtype=dtype, q_dtype=dtype)
    return [t.detach().cuda().requires_grad_() for t in (keys, q, v)], gen


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("dtype", "fast", "tol"), [(torch.float32, True, 2e-3), (torch.bfloat16, False, 2e-2)])
def test_fast_tanh_either_way_on_cuda(dtype, fast, tol):
    """The GPU's tanh instruction forced on float32 (where it is off by default) is within its 2^-10 error of the
    definition; exact tanh forced on bfloat16 (where the instruction is the default) is within bfloat16's."""
    (keys, q, v), gen = cuda_inputs(dtype)
    result = gradients_against_reference(keys, q, v, additive_scores(keys, q, v, fast_tanh=fast), gen)
    for name in ("forward_rel", "dkeys", "dq", "dv"):
        assert result[name] < tol, (name, result)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_configuration_timed_is_correct_on_cuda():
    """Each configuration the tuner may choose for either kernel, fixed for both, with cell and channel counts that
    no tile divides."""
    import captioning.models.fused_attention as fused

    for config in dict.fromkeys(fused.FORWARD_CONFIGS + fused.BACKWARD_CONFIGS):
        (keys, q, v), gen = cuda_inputs(torch.bfloat16, b=3, n=67, a=200)
        block_n, block_a, warps = config
        out = additive_scores(keys, q, v, block_n=block_n, block_a=block_a, num_warps=warps)
        result = gradients_against_reference(keys, q, v, out, gen)
        for name in ("forward_rel", "dkeys", "dq", "dv"):
            assert result[name] < 2e-2, (config, name, result)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_tuned_kernels_are_chosen_once_per_shape_and_correct():
    import captioning.models.fused_attention as fused

    (keys, q, v), gen = cuda_inputs(torch.bfloat16, b=6, m=3, n=49, a=96, seed=1)
    before = fused.chosen_configs()
    result = gradients_against_reference(keys, q, v, additive_scores(keys, q, v), gen)
    new = {k: c for k, c in fused.chosen_configs().items() if k not in before}
    assert sorted(k[0] for k in new) == ["backward", "forward"], new
    for name in ("forward_rel", "dkeys", "dq", "dv"):
        assert result[name] < 2e-2, (name, result)
    additive_scores(keys, q, v).sum().backward()  # the same shape again: nothing new timed
    assert len(fused.chosen_configs()) == len(before) + 2


if __name__ == "__main__":
    print(json.dumps(measure()))
