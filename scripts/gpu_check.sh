#!/usr/bin/env bash
# Verifies the CUDA backend on a machine with an NVIDIA GPU in one run (under 8 minutes on one
# H200): builds with CUDA (or unpacks the bundle of scripts/gpu_bundle.sh), runs every GPU test,
# the attention kernels' benchmark, and training and inference benchmarks against PyTorch on the
# same GPU, then writes one report: REPORT_DIR/gpu_report.md and gpu_report.json (with the raw
# measurements and a log beside them). Every step has a time limit; a failing step is recorded
# and the run goes on.
#
# Usage: scripts/gpu_check.sh [REPORT_DIR]          (default: $OUT when set, else gpu_report/)
#   SUBLLM_GPU_BUNDLE=.gpu/subllm-gpu.tar.xz  use prebuilt binaries instead of building here
#   PYTHON=python3                            the Python with CUDA PyTorch (the peer)
set -uo pipefail
cd "$(dirname "$0")/.."
REPORT=${1:-${OUT:-gpu_report}}
mkdir -p "$REPORT"
REPORT=$(cd "$REPORT" && pwd)
LOG="$REPORT/gpu_check.log"
STATUS="$REPORT/steps.tsv"
PY=${PYTHON:-python3}
: >"$LOG"
printf 'step\trc\tseconds\n' >"$STATUS"
t0=$(date +%s)
say() { echo "[gpu_check $(($(date +%s) - t0))s] $*" | tee -a "$LOG" >&2; }
# The whole check ends within BUDGET_S seconds (default 450): each step's limit is cut to what
# is left, and a step with under 10 s left is skipped (recorded as exit 124).
DEADLINE=$((t0 + ${BUDGET_S:-450}))
# run NAME LIMIT_S OUTFILE CMD...: stdout to OUTFILE, stderr to the log, status to steps.tsv.
run() {
  local name=$1 limit=$2 out=$3 s rc left
  shift 3
  s=$(date +%s)
  left=$((DEADLINE - s))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    say "$name: skipped, out of time"
    printf '%s\t124\t0\n' "$name" >>"$STATUS"
    return 0
  fi
  say "$name: $*"
  timeout "$limit" "$@" >"$out" 2>>"$LOG"
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - s))" >>"$STATUS"
  [ "$rc" = 0 ] || say "$name: exit $rc"
  return 0
}

nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader >"$REPORT/gpu.txt" 2>>"$LOG" ||
  echo "unknown (nvidia-smi failed)" >"$REPORT/gpu.txt"
say "GPU: $(head -1 "$REPORT/gpu.txt")"

# ---- binaries --------------------------------------------------------------------------------
if [ -n "${SUBLLM_GPU_BUNDLE:-}" ]; then
  dir=$(mktemp -d)
  trap 'rm -rf "$dir"' EXIT
  tar -C "$dir" -xJf "$SUBLLM_GPU_BUNDLE" || { say "cannot unpack $SUBLLM_GPU_BUNDLE"; exit 1; }
  BIN=$dir/bin
  export LD_LIBRARY_PATH="$dir/lib:/usr/local/cuda/lib64:/usr/local/cuda/lib:${LD_LIBRARY_PATH:-}"
  printf 'build\t0\t0\n' >>"$STATUS"
else
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')
  run build 300 "$REPORT/build.txt" bash -c "cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DSUBLLM_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=${cap:-90} && cmake --build build-gpu -j$(nproc) --target subllm subllm_tests bench_cuda_attention"
  BIN=build-gpu
fi
[ -x "$BIN/subllm" ] || { say "no binaries in $BIN"; }

# ---- tests -----------------------------------------------------------------------------------
SUBLLM_CLI="$BIN/subllm" run tests 200 "$REPORT/tests.txt" "$BIN/subllm_tests" --gtest_filter='Cuda*' --gtest_brief=1 \
  --gtest_output="json:$REPORT/tests.json"

# ---- kernels ---------------------------------------------------------------------------------
run attention 60 "$REPORT/attention.jsonl" "$BIN/bench_cuda_attention"

# ---- training: ours (SUBLLM with its LLaMA in the same process) and PyTorch -----------------------
run train_d1024_t2048 90 "$REPORT/train_d1024_t2048.json" "$BIN/subllm" bench train --device cuda \
  --config configs/subllm-d1024-l16.json --baseline configs/llama-d1024-l16.json --seq 2048 --batch 8 --steps 6 \
  --warmup 2 --json
run torch_llama_d1024_t2048 90 "$REPORT/torch_llama_d1024_t2048.json" "$PY" bench/pytorch_gpu_bench.py --device cuda \
  --config configs/llama-d1024-l16.json --seq 2048 --batch 8 --steps 6 --warmup 2
run torch_subllm_d1024_t2048 90 "$REPORT/torch_subllm_d1024_t2048.json" "$PY" bench/pytorch_gpu_bench.py --device cuda \
  --config configs/subllm-d1024-l16.json --seq 2048 --batch 8 --steps 6 --warmup 2
run train_1p3b_t4096 150 "$REPORT/train_1p3b_t4096.json" "$BIN/subllm" bench train --device cuda \
  --config configs/subllm-1.3B-keep0p4-4k.json --baseline configs/llama-1.3B-4k.json --seq 4096 --batch 4 --steps 5 \
  --warmup 2 --json
run torch_llama_1p3b_t4096 120 "$REPORT/torch_llama_1p3b_t4096.json" "$PY" bench/pytorch_gpu_bench.py --device cuda \
  --config configs/llama-1.3B-4k.json --seq 4096 --batch 4 --steps 5 --warmup 2
run torch_subllm_1p3b_t4096 120 "$REPORT/torch_subllm_1p3b_t4096.json" "$PY" bench/pytorch_gpu_bench.py --device cuda \
  --config configs/subllm-1.3B-keep0p4-4k.json --seq 4096 --batch 4 --steps 5 --warmup 2

# ---- inference: first token and decoding at 2k, SUBLLM against LLaMA ----------------------------
run infer_1p3b_2k 120 "$REPORT/infer_1p3b_2k.json" "$BIN/subllm" bench infer --device cuda \
  --config configs/subllm-1.3B-keep0p4-4k.json --baseline configs/llama-1.3B-4k.json --prompt-len 2048 --gen 64 --json

# ---- report ------------------------------------------------------------------------------------
"$PY" scripts/gpu_report.py "$REPORT" 2>>"$LOG" || say "the report could not be written"
say "done: $REPORT/gpu_report.md"
