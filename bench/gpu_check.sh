#!/usr/bin/env bash
# The GPU session's checks, most valuable figures first, each printing as it goes, under one time budget:
#
#   bash bench/gpu_check.sh [OUT_DIR]          # from anywhere; OUT_DIR defaults to ./gpu-out
#
# 1. bench/sampler.py, Qwen2.5-0.5B's shapes, batch 1: eager and graph paths vs transformers, capture time per shape
# 2. the same at batch 64 x 256 new tokens (graph vs transformers)
# 3. bench/sampler.py, Qwen2.5-7B's shapes, batch 1, graph path only: the decode step against the HBM bound
# 4. bench/grpo_step.py at the 0.5B shape, bf16: a GRPO step split into rollout, log-probs and update
# 5. bench/sft_mfu.py: SFT MFU at Qwen2.5-1.5B's shapes
# 6. bench/logprobs.py at 7B's shape: the fused kernel vs compiled naive, time and peak memory
# 7. the GPU tests without compiling (tests/test_gpu.py -m "gpu and not compile"), then the kernel tests
# 8. if time is left: the compile-heavy GPU tests and the compiled sampler path
#
# Each step runs under `timeout` (its process group is killed when its budget is spent), its output goes to
# OUT_DIR/<step>.log, and the next step runs whatever happened. OUT_DIR/summary.tsv has one line per step:
# name, exit status (124 = ran out of time), seconds, budget, command. The budgets sum to GPU_CHECK_TOTAL
# (default 360 s, counted after the environment report, OUT_DIR/environment.log); a step never gets more than
# what is left of it. The GPU tests append the errors and peaks they measured to OUT_DIR/gpu_measurements.jsonl
# (passing tests too) and write OUT_DIR/gpu-tests.xml.
# Nothing here installs packages or uses the network; the package is imported from this checkout (PYTHONPATH).

set -u

OUT=${1:-./gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1  # the repository root

export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PIP_NO_INDEX=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/psyche-triton-cache}
export PSYCHE_GPU_REPORT=$OUT/gpu_measurements.jsonl
unset PSYCHE_KERNELS PSYCHE_TEST_DEVICE TRITON_INTERPRET
PY=${PYTHON:-python}
TOTAL=${GPU_CHECK_TOTAL:-360}
SUMMARY=$OUT/summary.tsv
rm -f "$PSYCHE_GPU_REPORT" "$OUT/gpu-tests.xml"
printf 'step\texit\tseconds\tbudget\tcommand\n' > "$SUMMARY"

# step NAME BUDGET_S COMMAND...: run COMMAND under timeout, tee its output to OUT/NAME.log, record its status.
step() {
    local name=$1 budget=$2
    shift 2
    local left=$((TOTAL - ($(date +%s) - START)))
    if ((left < 15)); then
        printf '%s\tnot run\t0\t%s\t%s (total budget spent)\n' "$name" "$budget" "$*" >> "$SUMMARY"
        echo "=== $name: not run, ${left}s of the total budget left"
        return
    fi
    ((budget > left)) && budget=$left
    local t0
    t0=$(date +%s)
    echo "=== $name (budget ${budget}s, $(date -u +%H:%M:%S) UTC): $*" | tee "$OUT/$name.log"
    timeout --kill-after=10 "$budget" "$@" < /dev/null 2>&1 | tee -a "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    local dt=$(($(date +%s) - t0))
    echo "=== $name: exit $rc after ${dt}s" | tee -a "$OUT/$name.log"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$dt" "$budget" "$*" >> "$SUMMARY"
}

# ---- the machine and the software (not budgeted: a few seconds) ----
{
    echo "=== environment $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    git rev-parse HEAD 2> /dev/null && git status --short 2> /dev/null | head -20
    timeout 30 nvidia-smi || echo "nvidia-smi failed or is missing"
    timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    timeout 120 "$PY" - << 'EOF'
import importlib, platform, sys
print("python", sys.version.split()[0], platform.platform())
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("cuda available:", torch.cuda.is_available(), "devices:", torch.cuda.device_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
for name in ("triton", "transformers", "tokenizers", "safetensors", "click", "tqdm", "matplotlib", "numpy",
             "pytest", "pytest_timeout", "flash_attn"):
    try:
        m = importlib.import_module(name)
        print(f"{name}: {getattr(m, '__version__', 'imported')}")
    except Exception as e:
        print(f"{name}: not importable ({type(e).__name__}: {str(e)[:120]})")
from psyche import kernels
print("psyche kernels: HAS_TRITON", kernels.HAS_TRITON, "HAS_FLASH_ATTN", kernels.HAS_FLASH_ATTN,
      "mode", kernels.mode())
EOF
} 2>&1 | tee "$OUT/environment.log"

START=$(date +%s)  # the budgets count from here (the environment report above takes a few seconds)
TIMEOUT_OPT=()
if "$PY" -c "import pytest_timeout" 2> /dev/null; then
    TIMEOUT_OPT=(--timeout=90)  # per test: a hung test fails alone instead of eating the step's budget
fi

# ---- the checks, most valuable first (budgets: 45 + 50 + 45 + 40 + 40 + 30 + 90 + 60 + 60 = 460 s, cut to what is
# left of the total: the last steps run only when the first ones finish early) ----
step sampler-0.5b-b1 45 "$PY" bench/sampler.py --config 0.5b --batch 1 --new-tokens 256 --repeats 2 --paths eager,graph
step sampler-0.5b-b64 50 "$PY" bench/sampler.py --config 0.5b --batch 64 --new-tokens 256 --repeats 1 --paths graph
step sampler-7b-b1 45 "$PY" bench/sampler.py --config 7b --batch 1 --new-tokens 128 --repeats 2 --paths graph --no-hf
step grpo-step 40 "$PY" bench/grpo_step.py --set model.dtype=bfloat16 --set 'model.init="preset:qwen2.5-0.5b"'
step sft-mfu 40 "$PY" bench/sft_mfu.py
step logprobs-7b 30 "$PY" bench/logprobs.py --repeat 1 --tokens 8192 --hidden 3584 --vocab 152064
step gpu-tests 90 "$PY" -m pytest -m "gpu and not compile" -q -rfEs --durations=15 \
    ${TIMEOUT_OPT[@]+"${TIMEOUT_OPT[@]}"} --junitxml="$OUT/gpu-tests.xml" tests/test_gpu.py
step test-kernels 60 "$PY" -m pytest -q -rfEs ${TIMEOUT_OPT[@]+"${TIMEOUT_OPT[@]}"} tests/test_kernels.py \
    -k "not compile_for_a_gpu"
step gpu-compile-tests 60 "$PY" -m pytest -m "gpu and compile" -q -rfEs ${TIMEOUT_OPT[@]+"${TIMEOUT_OPT[@]}"} \
    tests/test_gpu.py

echo "=== summary ($(($(date +%s) - START))s of ${TOTAL}s)"
column -t -s $'\t' "$SUMMARY" 2> /dev/null || cat "$SUMMARY"
