"""Training and beam-search throughput at the COCO-scale configuration, for both decoders.

    python benchmarks/throughput.py --device cuda --precision bf16
    python benchmarks/throughput.py [--device cpu|cuda] [--precision auto|bf16|fp16|fp32]
        [--decoders lstm,transformer] [--modes frozen,finetune,cached,search,search1]
        [--images-per-batch B] [--captions-per-image 5] [--iters N] [--warmup N] [--search-images B]
        [--single-images N] [--encoder resnet101] [--image-size 256] [--grid 14] [--hidden 512]
        [--heads 8] [--layers 3] [--vocab 9490] [--beam 5] [--steps 16] [--compile] [--compile-encoder]
        [--compile-mode M]
        [--cuda-graph] [--channels-last] [--eager-attention] [--threads N]
        [--seed 0]

The COCO-scale model (the defaults on cuda): ResNet-101 (random weights: speed does not depend on
them) at 256x256, pooled to a 14x14 grid of 2048 channels (N = 196, C = 2048); embedding, attention
and hidden width 512 (the Transformer: width 512, 8 heads, 3 layers); a vocabulary of 9,490 tokens
(COCO Karpathy train at min count 5). All inputs are synthetic tensors made on the chosen device.

Modes, each timed for every decoder with a freshly built :class:`CaptionModule` (no Lightning Trainer:
a plain loop of ``module.loss`` -> ``backward`` -> AdamW, fused on cuda):

- ``frozen``: training from images (B,3,H,W), frozen encoder (runs without autograd) -> captions/s.
- ``finetune``: training from images, the encoder fine-tuned at the decoder's learning rate -> captions/s.
- ``cached``: training from cached features (B,N,C), stored float16 as the feature cache stores
  them (``CaptionModule.features`` casts them) -> captions/s.
- ``search``: encoder + batched beam search, K = ``--beam``, exactly ``--steps`` steps
  (min_len = max_len, so every image costs the same), ``--search-images`` images at once -> images/s.
- ``search1``: the same search one image at a time over ``--single-images`` images -> images/s; the
  ratio search / search1 is printed after the table.

Not in the default run: ``encode``, ``encode_folded`` (the frozen encoder alone) and ``frozen_overlap``: the
``frozen`` step with the encoder one batch ahead, encoding the next batch on a second CUDA stream while the decoder
trains on the batch before, so that the decoder's small kernels can run beside the encoder's (an experiment for the
frozen-encoder target; the training loop itself does not do this yet).

``--cuda-graph`` (cuda): each training step (loss, backward, AdamW) is captured once as a CUDA graph and replayed,
so the host launches none of its kernels one by one; what that leaves is the GPU's own time for the step.
``--compile --compile-mode reduce-overhead`` gets CUDA graphs for the decoder alone, as a Lightning run can
(``model.compile_decoder``, ``model.compile_mode``). ``--compile-encoder`` compiles the encoder
(``model.compile_encoder``; the one-off compile time falls in the warm-up iterations, not in the rates).

Both searches run under the ``--precision`` autocast, as the validation of a ``bf16-mixed`` Lightning run
decodes; ``Captioner`` and ``infer.py`` decode in float32 (no autocast), so on a GPU their rate is not this one.

Each training batch is B images x M captions (grouped batches: the encoder runs once per image, the
decoder reads an image's features once for its M captions). Caption lengths follow a COCO-like distribution
(8-16 words and a tail to 30, an assumed 4% past 16), cut at ``--max-caption-len`` words (default 16, as the
COCO recipes' ``data.max_caption_len``; mean about 10.7, 10.8 uncut), and every batch is padded to the longest
possible caption (16 words + <start> + <end>: L = 18, T = 17 decoder steps), as a batch of hundreds of such
captions padded to its longest would be; fixed shapes also keep ``--compile`` from recompiling. The training
loop takes one decoder step per padded word: with the cut at 30 words, ``--max-caption-len 30``, T = 31.

Timings: ``--warmup`` untimed iterations, then ``--iters`` timed ones (synchronised on cuda); the
rate is the work of the timed iterations over their total time. Peak memory: on cuda
``torch.cuda.max_memory_allocated`` over the timed iterations (reset when the warm-up ends, with the
model built and its optimizer state made, so it counts weights, optimizer state and activations, and
not the one-off workspaces that cuDNN's autotuner, ``cudnn.benchmark``, allocates in the first
iterations to try convolution algorithms; with ``--cuda-graph``, from before the warm-up, since the graph's
memory is taken while it is captured and its replays allocate nothing); on CPU the growth of the process's peak
resident set (VmHWM, reset through /proc/self/clear_refs) over its RSS when the mode starts, i.e. activations and
optimizer state, not weights; "n/a" where the kernel does not offer that.

On a CPU the defaults are small (4 images per batch, 2 timed iterations) and the run uses one thread:
on a machine shared with other jobs, two OpenMP threads stall at every barrier that waits for a
descheduled thread, which made the LSTM's many small per-step ops up to 70x slower in our runs
(``--threads 0`` keeps torch's default).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import checkout  # first: this checkout's captioning, not an installed one
import torch
from data_throughput import calibrate_batchnorm  # benchmarks/ is on sys.path when run as a script

from captioning.decoding import beam_search
from captioning.lit_module import CaptionModule
from captioning.models.attention import AdditiveAttention
from captioning.models.fused_attention import chosen_configs
from captioning.vocab import SPECIALS, Vocabulary

# words per caption, COCO-like (Karpathy train captions: mean ~10.5 words, most 8-13), with a tail past 16 words
# (an assumed ~4%, thinning out to 30; not counted from the data set) that --max-caption-len cuts, as the data
# module's max_caption_len does: the tail sets how long a batch pads to
CAPTION_WORDS = {8: 0.13, 9: 0.22, 10: 0.22, 11: 0.15, 12: 0.10, 13: 0.06, 14: 0.04, 15: 0.025, 16: 0.015}
CAPTION_WORDS.update({n: 0.04 * 0.8 ** (n - 17) / sum(0.8**k for k in range(14)) for n in range(17, 31)})
MODES = {
    "frozen": "train, frozen encoder, from images",
    "finetune": "train, fine-tuned encoder, from images",
    "cached": "train, from cached features (fp16)",
    "search": "beam search, batched, encoder incl.",
    "search1": "beam search, one image at a time",
}
#: not in the default run: the frozen encoder's forward alone, the ceiling it puts on a frozen-encoder training step
#: (as ``CaptionModule.features`` runs it in training) and on a search (BatchNorm folded into the convolutions, as
#: ``Captioner`` and the search modes run it)
ENCODER_MODES = {
    "encode": "frozen encoder alone, as training runs it",
    "encode_folded": "frozen encoder alone, BatchNorm folded",
}
#: not in the default run: a frozen-encoder training step that encodes the next batch while its decoder trains on
#: the batch before (on a GPU, the encoder on a second CUDA stream): whether the decoder's small kernels fit into the
#: encoder's time, for the frozen-encoder target. Each step still encodes one batch and trains on one
PIPELINE_MODES = {
    "frozen_overlap": "train, frozen encoder, next batch encoded alongside",
}
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
# defaults that differ by device; on a CPU, small enough for a 2-core machine to finish in minutes
DEVICE_DEFAULTS = {
    "cuda": dict(images_per_batch=256, iters=10, warmup=3, single_images=32, precision="bf16", threads=0),
    "cpu": dict(images_per_batch=4, iters=2, warmup=1, single_images=4, precision="fp32", threads=1),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _autocast(device: torch.device, precision: str, cache: bool = True) -> contextlib.AbstractContextManager:
    """``cache``: autocast's cache of weights cast to the low precision; off for a step captured as a CUDA
    graph, as PyTorch asks (a cached cast made outside the capture would be read from memory the graph does
    not own)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


def make_tokens(
    images: int,
    per_image: int,
    vocab_size: int,
    generator: torch.Generator,
    device: torch.device,
    max_words: int = 16,
) -> torch.Tensor:
    """Random captions (B,M,L): <start>, COCO-like random words cut at ``max_words``, <end>, then <pad> up to
    L = ``max_words`` + 2, as a batch pads to its longest caption (a batch of a few hundred COCO-like captions
    holds one of ``max_words`` or more words whenever ``max_words`` <= 20; fixed shapes also keep --compile from
    recompiling)."""
    words = torch.tensor(list(CAPTION_WORDS), dtype=torch.long).clamp(max=max_words)
    probs = torch.tensor(list(CAPTION_WORDS.values()))
    r, length = images * per_image, int(words.max()) + 2  # (no caption runs past the table's 30 words)
    n = words[torch.multinomial(probs, r, replacement=True, generator=generator)]  # (R,) words per caption
    pos = torch.arange(length).unsqueeze(0)  # (1,L)
    tokens = torch.randint(len(SPECIALS), vocab_size, (r, length), generator=generator)  # (R,L)
    tokens = tokens.masked_fill(pos > n.unsqueeze(1) + 1, Vocabulary.pad_id)
    tokens = tokens.masked_fill(pos == n.unsqueeze(1) + 1, Vocabulary.end_id)
    tokens[:, 0] = Vocabulary.start_id
    return tokens.view(images, per_image, length).to(device)  # (R,L) -> (B,M,L)


def build(
    args: argparse.Namespace, decoder: str, freeze: bool, compile_decoder: bool, device: torch.device
) -> CaptionModule:
    """A randomly initialised CaptionModule at the benchmark's sizes on ``device``, its encoder's BatchNorm
    statistics set from one batch of random images: with torchvision's initial statistics (mean 0, variance 1) a
    random ResNet's activations grow block after block to features of mean ~10^4, which saturate the
    LSTM and make its backward run on denormal numbers, many times slower than on real features. (On the
    device: ResNet-101 over 8 images on the host took ~15 s per mode on 2 cores.)"""
    vocab = [*SPECIALS, *(f"w{i}" for i in range(args.vocab - len(SPECIALS)))]
    module = CaptionModule(
        vocab=vocab,
        encoder=args.encoder,
        encoder_grid=None if args.encoder == "small_cnn" else args.grid,  # small_cnn's grid is the image size / 8
        freeze_encoder=freeze,
        decoder=decoder,
        embed_dim=args.hidden,
        hidden_dim=args.hidden,
        attention_dim=args.hidden,
        num_heads=args.heads,
        num_layers=args.layers,
        dropout=0.5 if decoder == "lstm" else 0.1,
        image_size=args.image_size,
        channels_last=args.channels_last,
        compile_decoder=compile_decoder,
        compile_encoder=args.compile_encoder,
        compile_mode=args.compile_mode,
    )
    for part in module.modules():  # the LSTM's additive attention: Triton kernels (default) or eager
        if isinstance(part, AdditiveAttention):
            part.fused = not args.eager_attention
    module.to(device)
    with torch.no_grad():
        calibrate_batchnorm(module.net.encoder, torch.randn(8, 3, args.image_size, args.image_size, device=device))
    module.net.encoder.train(not freeze)
    return module


# -- memory ---------------------------------------------------------------------------------------


def _proc_status(field: str) -> int | None:
    """A /proc/self/status size field (VmRSS, VmHWM) in bytes, or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of one mode: CUDA allocator peak, or on CPU the growth of the peak RSS."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start: int | None = None
        #: a step replayed from a CUDA graph allocates nothing: its memory was taken from the allocator while the
        #: graph was captured, into the graph's own pool, so the peak must count from before the capture
        self.graphed = False

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so RSS is what is live
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.start = _proc_status("VmRSS")
        except OSError:
            self.start = None

    def warmed_up(self) -> None:
        """The warm-up is over: on cuda the peak starts again from what is allocated now (weights, optimizer
        state, inputs), so the autotuner's trial workspaces of the first iterations do not count. On CPU
        nothing changes: the RSS growth counts from the mode's start (optimizer state included)."""
        if self.device.type == "cuda" and not self.graphed:
            torch.cuda.reset_peak_memory_stats(self.device)  # no empty_cache: the timed steps reuse the blocks

    def report(self) -> str:
        if self.device.type == "cuda":
            peak = f"{torch.cuda.max_memory_allocated(self.device) / 2**30:.2f} GiB"
            return f"{peak} (warm-up and capture incl.)" if self.graphed else peak
        peak = _proc_status("VmHWM")
        if self.start is None or peak is None:
            return "n/a"
        return f"+{(peak - self.start) / 2**30:.2f} GiB RSS"


# -- the modes ------------------------------------------------------------------------------------


def _time(fn: Callable[[], None], warmup: int, iters: int, device: torch.device, memory: PeakMemory) -> float:
    """Seconds per call of ``fn`` over ``iters`` timed calls, after ``warmup`` untimed ones (``memory`` is told
    when they are over)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    memory.warmed_up()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters


def train_step(
    args: argparse.Namespace, decoder: str, mode: str, device: torch.device, memory: PeakMemory | None = None
) -> Callable[[], None]:
    """One mode's training step (loss, backward, AdamW) on a fresh model, as a function of no arguments that
    alternates between two token batches; with ``--cuda-graph`` captured (after its warm-up) and replayed.
    ``memory`` is reset once the model and its inputs are made."""
    module = build(args, decoder, freeze=mode != "finetune", compile_decoder=args.compile, device=device)
    module.setup("fit")  # channels_last, torch.compile of the decoder
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    cuda = device.type == "cuda"
    # capturable: the optimizer's step count and bias corrections stay on the GPU, as a CUDA graph needs
    opt = torch.optim.AdamW(params, lr=module.hparams.lr, fused=cuda, capturable=args.cuda_graph)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    b, m = args.images_per_batch, args.captions_per_image
    gen = torch.Generator().manual_seed(args.seed)
    token_batches = [make_tokens(b, m, args.vocab, gen, device, args.max_caption_len) for _ in range(2)]
    if mode == "cached":
        gh, gw = module.grid
        c = module.net.encoder.out_dim
        inputs = torch.randn(b, gh * gw, c, device=device).to(torch.float16)  # (B,N,C), the cache's dtype
    else:
        inputs = torch.randn(b, 3, args.image_size, args.image_size, device=device)  # (B,3,H,W)
    step_no = 0
    encode_next = None  # frozen_overlap: made after the memory's reset, as the other modes' first encode runs

    def step() -> None:
        nonlocal step_no
        tokens = token_batches[step_no % len(token_batches)]
        step_no += 1
        # frozen_overlap: the batch before's features (B,N,C), while the next batch is encoded; else the inputs
        with encode_next() if encode_next is not None else contextlib.nullcontext(inputs) as batch:
            with _autocast(device, args.precision, cache=not args.cuda_graph):
                loss, _ = module.loss(batch, tokens)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)

    if memory is not None:
        memory.reset()
        memory.graphed = args.cuda_graph
    if mode in PIPELINE_MODES:
        encode_next = _pipeline(module, inputs, args, device)
    return _graphed(step, token_batches, args.warmup) if args.cuda_graph else step


def _pipeline(
    module: CaptionModule, images: torch.Tensor, args: argparse.Namespace, device: torch.device
) -> Callable[[], contextlib.AbstractContextManager[torch.Tensor]]:
    """A frozen encoder one batch ahead of the decoder: each ``with encode_next() as features:`` starts encoding the
    next batch (``images`` again: synthetic data) and gives the features of the one before (B,N,C), for the
    decoder's training step (loss, backward, optimizer) in the block; the next batch's features take their place
    after it.

    On a GPU the encoder runs on a second CUDA stream, so its kernels and the decoder's can run at the same time;
    it starts after everything queued before the block (the previous step's read of the features). Its output goes
    into a buffer of that stream's own, copied over the decoder's features once both are done (two copies of
    256 x 196 x 2048 bf16 a step, ~0.1 ms each on an H200, estimated from its copy rate), so that no tensor is
    freed on one stream while the other may still read it, and so that a CUDA graph of the whole step
    (``--cuda-graph``, which replays no Python) moves the features too."""
    with torch.no_grad(), _autocast(device, args.precision, cache=not args.cuda_graph):
        held = module.features(images)  # (B,N,C): the first batch, encoded before any step
    upcoming = torch.empty_like(held)  # (B,N,C), written on the encoder's stream
    side = torch.cuda.Stream(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def encode_next() -> Iterator[torch.Tensor]:
        main = torch.cuda.current_stream(device) if side is not None else None
        if side is not None:
            side.wait_stream(main)
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            with torch.no_grad(), _autocast(device, args.precision, cache=not args.cuda_graph):
                upcoming.copy_(module.features(images))
        try:
            yield held
        finally:
            # rejoined even when the step fails: a capture left with a stream unjoined would report that, not
            # the step's own error
            if side is not None:
                main.wait_stream(side)
        with torch.no_grad():
            held.copy_(upcoming)

    return encode_next


def train_mode(args: argparse.Namespace, decoder: str, mode: str, device: torch.device) -> dict:
    """Training steps (loss, backward, AdamW) of one mode -> rate in captions/s, ms per step, peak memory."""
    memory = PeakMemory(device)
    step = train_step(args, decoder, mode, device, memory)
    seconds = _time(step, args.warmup, args.iters, device, memory)
    b, m = args.images_per_batch, args.captions_per_image
    return dict(batch=f"{b} x {m}", rate=b * m / seconds, unit="captions/s", ms=1e3 * seconds, mem=memory.report())


def encode_mode(args: argparse.Namespace, decoder: str, mode: str, device: torch.device) -> dict:
    """The frozen encoder's forward alone on a batch of images (``encode``: ``CaptionModule.features``, as a
    frozen-encoder training step runs it; ``encode_folded``: the same with the BatchNorm folded, as a search runs
    it) -> rate in images/s, ms per batch, peak memory."""
    module = build(args, decoder, freeze=True, compile_decoder=False, device=device)
    module.setup("fit")  # channels_last
    module.train()  # a frozen encoder stays in eval mode
    if mode == "encode_folded":
        module.net.encoder.optimize_for_inference()
    b = args.images_per_batch
    images = torch.randn(b, 3, args.image_size, args.image_size, device=device)  # (B,3,H,W)
    memory = PeakMemory(device)

    def encode() -> None:
        with _autocast(device, args.precision):
            module.features(images)  # (B,N,C)

    memory.reset()
    seconds = _time(encode, args.warmup, args.iters, device, memory)
    return dict(batch=f"{b} images", rate=b / seconds, unit="images/s", ms=1e3 * seconds, mem=memory.report())


def _graphed(step: Callable[[], None], token_batches: list[torch.Tensor], warmup: int) -> Callable[[], None]:
    """``step`` (loss, backward, optimizer step) captured once as a CUDA graph -> a function that replays it on
    the next token batch: every kernel of the step launched by one call, none by the host one at a time.

    A graph reads its inputs from fixed addresses: the images or features stay one tensor, and each replay first
    copies the next token batch into the one buffer the capture read. Warm-up runs on a side stream first
    (cuDNN's autotuner, the optimizer's state), as capture requires; the step ends by setting the gradients to
    None, so the captured backward allocates them from the graph's own memory and every replay writes them.
    """
    batches = list(token_batches)
    static = batches[0].clone()
    token_batches[:] = [static]  # the step reads this buffer from now on
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 3)):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    replays = 0

    def replay() -> None:
        nonlocal replays
        static.copy_(batches[replays % len(batches)])
        replays += 1
        graph.replay()

    return replay


def searcher(args: argparse.Namespace, decoder: str, device: torch.device) -> Callable[[torch.Tensor], None]:
    """A fresh model's encoder + beam search (exactly ``--steps`` steps) as a function of the images (B,3,H,W). The
    seed is set again here, whatever ran before, so every search of a decoder has the same weights."""
    torch.manual_seed(args.seed)
    module = build(args, decoder, freeze=True, compile_decoder=False, device=device)
    module.setup("validate")  # channels_last
    module.eval()
    net = module.net
    net.encoder.optimize_for_inference()  # BatchNorm folded, as Captioner.from_checkpoint runs it

    def search(images: torch.Tensor) -> None:
        with torch.inference_mode(), _autocast(device, args.precision):
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            feats = net.encode(images).features  # (B,3,H,W) -> (B,N,C)
            beam_search(net.decoder, feats, beam_size=args.beam, max_len=args.steps, min_len=args.steps)

    return search


def search_mode(args: argparse.Namespace, decoder: str, mode: str, device: torch.device) -> dict:
    """Encoder + beam search (exactly ``--steps`` steps) -> rate in images/s, ms per call, peak memory. ``search``
    and ``search1`` of a decoder search with the same weights and images (the first ``--single-images`` of the
    batched search's, one by one)."""
    search = searcher(args, decoder, device)
    k = args.beam
    size = args.image_size
    memory = PeakMemory(device)
    pool = torch.randn(max(args.search_images, args.single_images), 3, size, size, device=device)  # (P,3,H,W)
    if mode == "search":
        b = args.search_images
        images = pool[:b]  # (B,3,H,W)
        memory.reset()
        seconds = _time(lambda: search(images), args.warmup, args.iters, device, memory)
        return dict(batch=f"{b} x K={k}", rate=b / seconds, unit="images/s", ms=1e3 * seconds, mem=memory.report())
    n = args.single_images
    images = pool[:n]  # (n,3,H,W), searched one by one
    memory.reset()
    search(images[:1])  # warm-up
    seconds = _time(lambda: [search(images[i : i + 1]) for i in range(n)], 0, 1, device, memory)
    return dict(batch=f"1 x K={k} ({n} images)", rate=n / seconds, unit="images/s", ms=1e3 * seconds / n,
                mem=memory.report())  # fmt: skip


# -- main -----------------------------------------------------------------------------------------


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"CPU {model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """This script's options, in a parser other scripts extend with their own (``train_step_profile.py``)."""
    p = argparse.ArgumentParser(description=description or __doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS], help="auto: bf16 on cuda, fp32 on cpu")
    p.add_argument("--decoders", default="lstm,transformer")
    p.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"comma-separated, of {', '.join([*MODES, *ENCODER_MODES, *PIPELINE_MODES])}",
    )
    p.add_argument("--images-per-batch", type=int, default=None, help="training batch in images (cuda 256, cpu 4)")
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument("--search-images", type=int, default=None, help="images per batched search (default: the batch)")
    p.add_argument("--single-images", type=int, default=None, help="images searched one by one (cuda 32, cpu 4)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per mode (cuda 10, cpu 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (cuda 3, cpu 1)")
    p.add_argument("--encoder", default="resnet101", help="resnet18 ... resnet152 or small_cnn")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--grid", type=int, default=14, help="pool a ResNet's output to grid x grid")
    p.add_argument("--hidden", type=int, default=512, help="embed = hidden = attention width; Transformer width")
    p.add_argument("--heads", type=int, default=8, help="Transformer heads")
    p.add_argument("--layers", type=int, default=3, help="Transformer layers")
    p.add_argument("--vocab", type=int, default=9490, help="tokens, the 4 specials included (COCO Karpathy: 9,490)")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--steps", type=int, default=16, help="beam search steps (min_len = max_len)")
    p.add_argument(
        "--max-caption-len",
        type=int,
        default=16,
        help="training captions cut to this many words, as data.max_caption_len (the COCO recipes: 16); batches "
        "pad to it",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the decoder (CaptionModule.compile_decoder)")
    p.add_argument(
        "--compile-encoder", action="store_true", help="torch.compile the encoder (CaptionModule.compile_encoder)"
    )
    p.add_argument("--compile-mode", default="default", help="torch.compile mode with --compile (e.g. reduce-overhead)")
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="training modes: replay each whole step (loss, backward, AdamW) from one CUDA graph (cuda, bf16/fp32)",
    )
    p.add_argument("--channels-last", action="store_true", help="encoder in channels-last memory format")
    p.add_argument(
        "--eager-attention",
        action="store_true",
        help="the LSTM's additive score in eager PyTorch, not the fused Triton kernels (used where Triton runs)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads, 0 = torch's default (cpu default 1)")
    p.add_argument("--seed", type=int, default=0)
    return p


def parse_args(argv: list[str] | None = None, p: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The options of ``argv``, checked, with the device's defaults filled in; ``p``: :func:`build_parser`'s parser,
    or one a caller extended."""
    p = p or build_parser()
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA GPU, and torch finds none here")  # not a driver traceback from deep inside
    if args.max_caption_len < 1:
        p.error(f"--max-caption-len must be at least 1, got {args.max_caption_len}")
    for key, value in DEVICE_DEFAULTS[args.device].items():
        if getattr(args, key) is None or (key == "precision" and args.precision == "auto"):
            setattr(args, key, value)
    if args.cuda_graph and (args.device != "cuda" or args.precision == "fp16"):
        p.error("--cuda-graph needs --device cuda and bf16 or fp32 (fp16's loss scaling is not captured)")
    graphs_inside = args.compile_mode in ("reduce-overhead", "max-autotune")
    if args.cuda_graph and (args.compile or args.compile_encoder) and graphs_inside:
        # those modes make CUDA graphs of the compiled modules themselves
        p.error(f"--cuda-graph captures the whole step: --compile-mode {args.compile_mode} would capture graphs in it")
    if args.search_images is None:
        args.search_images = args.images_per_batch
    args.decoders = [d.strip() for d in args.decoders.split(",") if d.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES and m not in ENCODER_MODES and m not in PIPELINE_MODES]
    if unknown:
        p.error(f"unknown modes {unknown}; choose from {[*MODES, *ENCODER_MODES, *PIPELINE_MODES]}")
    return args


def _rate(row: dict) -> str:
    """A row's rate column: ``1,234.5 captions/s``, or why the mode failed."""
    return f"{row['rate']:,.1f} {row['unit']}" if "error" not in row else f"failed: {row['error']}"


def prepare(args: argparse.Namespace) -> torch.device:
    """The run's device, with the seed, thread count and cuDNN autotuning set as every mode expects."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its convolution algorithms
    return device


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = prepare(args)
    when = datetime.datetime.now().isoformat(timespec="seconds")
    print(f"throughput, {when}, {_device_name(device)}, torch {torch.__version__}, precision {args.precision}")
    print(f"command: python {' '.join(sys.argv)}")
    print(checkout.describe())
    if device.type == "cpu":  # the machine may be shared: the load average says how much of it this run had
        print("load average (1, 5, 15 min) at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    mean_words = sum(min(n, args.max_caption_len) * p for n, p in CAPTION_WORDS.items())
    longest = min(args.max_caption_len, max(CAPTION_WORDS))
    side = -(-args.image_size // 8) if args.encoder == "small_cnn" else args.grid  # small_cnn: no pooling (--grid)
    print(
        f"model: {args.encoder} (random weights) at {args.image_size}x{args.image_size} -> "
        f"grid {side}x{side}; "
        f"LSTM E=H=A={args.hidden}; Transformer D={args.hidden}, {args.heads} heads, {args.layers} layers; "
        f"V={args.vocab}; captions {min(min(CAPTION_WORDS), args.max_caption_len)}-{longest} words (mean "
        f"{mean_words:.1f}), padded to L={longest + 2}; search K={args.beam}, {args.steps} steps; "
        f"compile={args.compile}, compile_encoder={args.compile_encoder} (mode {args.compile_mode}), "
        f"cuda_graph={args.cuda_graph}, "
        f"additive score: {'eager' if args.eager_attention else 'fused where Triton runs'}, "
        f"channels_last={args.channels_last}"
    )
    rows = []
    for decoder in args.decoders:
        for mode in args.modes:
            run = search_mode if mode.startswith("search") else encode_mode if mode in ENCODER_MODES else train_mode
            t0 = time.perf_counter()
            try:
                row = run(args, decoder, mode, device)
            except Exception as e:  # one failing mode (OOM, a decoder bug) must not hide the others
                # the whole traceback, not only the table's first line of the message: on a machine lent
                # for one run, the log is all there is to find the cause from
                print(f"  {decoder} {mode} failed:", file=sys.stderr)
                traceback.print_exc(file=sys.stderr)
                row = dict(batch="-", rate=float("nan"), unit="-", ms=float("nan"), mem="-",
                           error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")  # fmt: skip
            row.update(decoder=decoder, mode=mode, wall=time.perf_counter() - t0)
            rows.append(row)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            # the row's numbers now, not only in the table at the end: a run stopped by a time limit (the
            # GPU check's) still leaves every mode measured before it
            print(
                f"  done {decoder} {mode} in {row['wall']:.0f} s: {_rate(row)}, {row['ms']:.1f} ms/iter, "
                f"peak memory {row['mem']}",
                file=sys.stderr,
                flush=True,
            )

    print()
    print("| decoder | mode | batch (images x captions) | rate | ms/iter | peak memory |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        name = MODES.get(r["mode"]) or ENCODER_MODES.get(r["mode"]) or PIPELINE_MODES[r["mode"]]
        print(f"| {r['decoder']} | {name} | {r['batch']} | {_rate(r)} | {r['ms']:.1f} | {r['mem']} |")
    print("(ms/iter: per training step or batched search; per image for one-at-a-time search)")
    for decoder in args.decoders:
        rate = {r["mode"]: r["rate"] for r in rows if r["decoder"] == decoder and "error" not in r}
        if "search" in rate and "search1" in rate:
            print(f"{decoder}: batched search {rate['search'] / rate['search1']:.1f}x the one-image-at-a-time rate")
    for key, (bn, ba, warps) in chosen_configs().items():  # what the fused attention kernels timed and chose
        kind, index, dtype, batch, m, n, a, needs, fast = key
        grads = f", gradients of (keys, q, v) {needs}" if kind == "backward" else ""
        print(f"fused kernel chosen: {kind} cuda:{index} B~{batch} M={m} N={n} A={a} {dtype}{grads}, fast tanh {fast}: "
              f"{bn} x {ba}, {warps} warps")  # fmt: skip
    if device.type == "cpu":
        print("load average (1, 5, 15 min) at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
