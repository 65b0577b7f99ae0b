#!/usr/bin/env bash
# Every GPU check of the project in one command, for a session that has a CUDA machine for a short
# while: the GPU tests (the fused attention kernels compiled for the card), the COCO-scale throughput
# table (issue 6), the batched-vs-one-by-one beam search (issue 4), the default shapes recipe trained on
# the GPU in bf16-mixed for 3 epochs (fit, validation, test, checkpoints), then infer.py on it (the
# Lightning + CUDA path of train.py / infer.py, which the CPU test suite cannot cover); then, in what time
# is left, the frozen-encoder step with the encoder one batch ahead on a second stream, the fused attention
# kernels' tiles and warps timed against eager, a profile of the training step, the steps as CUDA graphs, the
# frozen encoder and the LSTM's decoder compiled, and the search on 1,024 images. Every step no longer fits one
# 570 s command: STEPS picks a subset (benchmarks/RESULTS.md names the one for the next GPU session).
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]      # default: $OUT, else ./gpu_check
#
# Each step has its own time limit, cut to what is left before DEADLINE (default 570 s, inside a 10-minute
# command limit), and writes its own log under OUT_DIR (an empty or new folder; 19 files with every step: where
# that could be more than MAX_FILES, default 8, each goes into OUT_DIR/gpu_check.tar as soon as it is complete), so
# one failing or slow step still leaves the others' results, and a summary of the numbers ends the output. On an H200
# (2026-12-04) the steps took: env 17-24 s, gputest 22, throughput 61-63, beam 33-36, train 39-49 (the
# shapes images generated first), infer 8-11, profile 31-37, graph 38-40, compile 65, compile_ro 71,
# search_big 28: about 7.5 minutes in all, before the kernels step was added. Run from the repository root; the
# repo does not need installing (PYTHONPATH is set here). train.py needs jsonargparse; where the machine lacks it
# and cannot reach a package index, carry its wheels in ./.whl (they are installed from there first):
#
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux2014_x86_64 -d .whl jsonargparse docstring-parser typeshed-client
#
# (.whl/ is git-ignored: a tool that copies the working tree to the GPU machine must be told to
# take it along, e.g. the device tool's carry=[".whl"].)
#
# STEPS (space-separated, default "env gputest throughput encoder beam train infer overlap overlap_graph kernels profile
# graph compile_enc compile_enc_graph compile compile_ro search_big")
# picks a subset; they run in that order, the throughput table right after the quick checks (issue 6's measurement;
# written mode by mode as it goes), so a command cut short loses the optional steps first. TRAIN_ARGS
# adds options to the train step (after its --trainer.max_epochs 3: "--trainer.max_epochs 20" trains the
# whole recipe); PYTHON (default python3) is the interpreter; DEVICE=cpu runs the same steps on the CPU in
# fp32 (to check this script itself on a machine without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."

out=${1:-${OUT:-gpu_check}}
if [[ -e $out ]] && [[ -n $(ls -A "$out") ]]; then
  echo "gpu_check.sh: $out holds files already; give an empty or new folder, so that no earlier run's log is mixed" \
    "in or overwritten" >&2
  exit 2
fi
mkdir -p "$out"
py=${PYTHON:-python3}
steps=" ${STEPS:-env gputest throughput encoder beam train infer overlap overlap_graph kernels profile graph compile_enc compile_enc_graph compile compile_ro search_big} "
# a machine that returns only MAX_FILES files (default 8) from OUT_DIR: where this run could write more (a log per
# step, the test metrics and the overlay), each file goes into OUT_DIR/gpu_check.tar as soon as it is complete, so
# OUT_DIR never holds more than that tar, even when the command is cut short
read -ra selected <<<"$steps"
pack=$(((${#selected[@]} + 2) > ${MAX_FILES:-8} ? 1 : 0))
device=${DEVICE:-cuda}
# on the GPU the shapes recipe is bound by the host: its images load in worker processes there; the throughput
# modes run the encoder channels-last there (cuDNN's NHWC kernels for tensor cores), as its search modes do anyway
# (optimize_for_inference), so that training and search time the same encoder
if [[ $device == cuda ]]; then accel=(--trainer.accelerator gpu --trainer.precision bf16-mixed --data.num_workers 4)
  bench=(--precision bf16 --channels-last)
else accel=(--trainer.accelerator cpu --trainer.precision 32-true) bench=(--precision fp32); fi
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  # pure-Python wheels: where pip is missing or fails, Python imports them from the wheel files themselves
  if "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
    .whl/*.whl >/tmp/gpu_check_wheels.txt 2>&1; then
    export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
  else
    cat /tmp/gpu_check_wheels.txt  # on stdout: a lent machine returns only 8 files from OUT_DIR, the steps' logs
    echo "pip failed (above): importing the wheels in place"
    wheels=$(printf '%s:' "$PWD"/.whl/*.whl)
    export PYTHONPATH=${wheels%:}${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
runs=$(mktemp -d)  # the training run's checkpoints stay out of OUT_DIR (only a few files come back)
logs=$(mktemp -d)  # each step's log as it is written, delivered to OUT_DIR when the step ends
current=
deliver() {  # deliver FILE...: files of $logs into OUT_DIR, or into its tar
  local f
  for f in "$@"; do
    [[ -f $logs/$f ]] || continue
    if ((pack)); then tar -rf "$out/gpu_check.tar" -C "$logs" "$f"; else cp "$logs/$f" "$out/"; fi
  done
}
# a run cut short still delivers the log of the step it was in
trap '[[ -n $current ]] && deliver "$current.txt"; rm -rf "$runs" "$logs"' EXIT
failed=0

# every step's limit is cut to what is left before DEADLINE seconds (default 570) from the script's start, so the
# whole script ends inside a 10-minute command limit however long the earlier steps took
deadline=${DEADLINE:-570}
step() {  # step NAME LIMIT_SECONDS COMMAND...: run COMMAND under a time limit, log to OUT_DIR/NAME.txt
  local name=$1 limit=$2
  shift 2
  [[ $steps == *" $name "* ]] || return 0
  local left=$((deadline - SECONDS))
  if ((left < 10)); then
    echo "== $name: skipped, ${left} s left before the ${deadline} s deadline" | tee "$logs/$name.txt"
    deliver "$name.txt"
    failed=1
    return 0
  fi
  ((limit > left)) && limit=$left
  current=$name
  echo "== $name: $*" | tee "$logs/$name.txt"
  local t0=$SECONDS
  # -k: Lightning traps SIGTERM and stops only at its next batch; a step still running 15 s later is killed
  timeout -k 15 "$limit" "$@" 2>&1 | tee -a "$logs/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$logs/$name.txt"
  current=
  deliver "$name.txt"
  [[ $rc -eq 0 ]] || failed=1
}

# the versions, and whether train.py's jsonargparse is there (else the train step fails at once: carry .whl)
step env 30 bash -c "{ nvidia-smi || true; }; $py -c 'import torch, pytorch_lightning as pl, jsonargparse; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(), \"lightning\", pl.__version__, \"jsonargparse\", jsonargparse.__version__)'"
# the fused attention kernels (Triton) compiled for this GPU, against their float64 definition
step gputest 60 "$py" -m pytest -q -m gpu -p no:cacheprovider tests
step throughput 270 "$py" benchmarks/throughput.py --device "$device" "${bench[@]}"
# the frozen ResNet-101 alone, as a frozen-encoder training step runs it and with its BatchNorm folded (as a search
# runs it): the ceiling it puts on those two rows
step encoder 60 "$py" benchmarks/throughput.py --device "$device" "${bench[@]}" --decoders lstm \
  --modes encode,encode_folded
step beam 60 "$py" benchmarks/beam_search.py --device "$device" --repeats 5
step train 180 "$py" train.py fit -c configs/shapes.yaml "${accel[@]}" \
  --trainer.logger.init_args.save_dir "$runs" --trainer.max_epochs 3 ${TRAIN_ARGS:-}
best=$(find "$runs" -name best.ckpt 2>/dev/null | head -n 1)
if [[ -n $best ]]; then
  cp "$(dirname "$(dirname "$best")")/test_metrics.json" "$logs/train_test_metrics.json" 2>/dev/null &&
    deliver train_test_metrics.json
  step infer 30 "$py" infer.py data/shapes/images/004600.png --ckpt "$best" --device "$device" --out "$logs"
  deliver 004600_attention.png
elif [[ $steps == *" infer "* ]]; then
  echo "== infer: skipped, the train step left no best.ckpt" | tee "$logs/infer.txt"
  deliver infer.txt
  failed=1
fi
# the frozen-encoder step with the next batch encoded on a second CUDA stream while the decoder trains (can the
# decoder's small kernels run beside the encoder's?), eager and as one CUDA graph, beside the plain step
step overlap 90 "$py" benchmarks/throughput.py --device "$device" "${bench[@]}" --decoders lstm \
  --modes frozen,frozen_overlap
[[ $device == cuda ]] && step overlap_graph 90 "$py" benchmarks/throughput.py --device "$device" "${bench[@]}" \
  --decoders lstm --modes frozen,frozen_overlap --cuda-graph
# then, in whatever time is left, the ways to a faster training step: the fused attention kernels' tiles and warps
# against eager; where a step's time goes (host against device); each whole step replayed from a CUDA graph; the LSTM's decoder under torch.compile, plain and
# with CUDA graphs (reduce-overhead; one-off compile time per mode, not counted in the rates); and the search on
# 1,024 images at once
[[ $device == cuda ]] && step kernels 90 "$py" benchmarks/fused_attention.py  # Triton kernels: a GPU only
step profile 75 "$py" benchmarks/train_step_profile.py --device "$device" "${bench[@]}" --decoders lstm \
  --modes cached,frozen,frozen_overlap,search
[[ $device == cuda ]] && step graph 90 "$py" benchmarks/throughput.py --device "$device" "${bench[@]}" \
  --modes frozen,finetune,cached --cuda-graph
# the frozen encoder compiled (model.compile_encoder): alone, in a frozen-encoder training step and in the search
step compile_enc 180 "$py" benchmarks/throughput.py --device "$device" "${bench[@]}" --decoders lstm \
  --modes encode,frozen,search --compile-encoder
# and the frozen-encoder step with it replayed as one CUDA graph (the row the 30,000 captions/s target is nearest to)
[[ $device == cuda ]] && step compile_enc_graph 150 "$py" benchmarks/throughput.py --device "$device" "${bench[@]}" \
  --decoders lstm --modes frozen --cuda-graph --compile-encoder
step compile 150 "$py" benchmarks/throughput.py --device "$device" "${bench[@]}" --decoders lstm \
  --modes cached,frozen --compile
step compile_ro 150 "$py" benchmarks/throughput.py --device "$device" "${bench[@]}" --decoders lstm \
  --modes cached,frozen --compile --compile-mode reduce-overhead
step search_big 60 "$py" benchmarks/throughput.py --device "$device" "${bench[@]}" --modes search \
  --search-images 1024

# the numbers together at the end of the output (a caller that keeps only the output's tail still has them)
echo "== summary"
grep -h -E '^\| (decoder|lstm|transformer|kernel|eager|fused) |^== [a-z_]+: (exit|skipped)|^(lstm|transformer)[ :]|^[0-9]+ (passed|failed)|^copy rate|^(fused kernel )?chosen' \
  "$logs"/*.txt 2>/dev/null
((pack)) && echo "== the logs are in $out/gpu_check.tar (tar -xf to read them)"
exit $failed
