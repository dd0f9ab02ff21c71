#!/usr/bin/env bash
# Every GPU figure in one call (about 8 minutes on one H100/H200, plus up to 5 for Flux): writes one JSON line per benchmark to
# ${OUT:-gpu_results}/gpu_suite.jsonl and a log beside it. Run on the device machine from the repository root,
# after `bash benchmarks/prepare_gpu_wheels.sh` here (carry wheels/):
#   bash benchmarks/gpu_suite.sh
# Record the figures in docs/benchmarks.md with the date, device, commit and this command.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_results}"
mkdir -p "$out"
results="$out/gpu_suite.jsonl"
log="$out/gpu_suite.log"
: > "$results"
if [ -d wheels ]; then python -m pip install -q --no-deps wheels/*.whl >> "$log" 2>&1; fi
python -m pip install -q --no-deps -e . >> "$log" 2>&1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
echo "{\"commit\": \"$(git rev-parse --short HEAD 2>/dev/null || echo unknown)\", \"date\": \"$(date -u +%FT%TZ)\", \"device\": \"$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)\"}" >> "$results"

bench() {  # name, seconds, command...: one JSON line (the script's last stdout line) or an error record
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" >> "$log"
  local line
  line=$(timeout "$limit" "$@" 2>> "$log" | tail -n 1)
  if [ -n "$line" ] && [ "${line:0:1}" = "{" ]; then
    echo "{\"bench\": \"$name\", \"result\": $line}" >> "$results"
  else
    echo "{\"bench\": \"$name\", \"error\": \"no result (timeout ${limit}s or failure; see gpu_suite.log)\"}" >> "$results"
  fi
}

common=(--resolution=512 --mixed_precision=bf16 --peak_tflops=989)
bench sd15_step_1p1_cudnn 120 python benchmarks/train_step.py --model=sd15 "${common[@]}" --batch=1 --prior --steps=20
bench sd15_step_1p1_xla 90 python benchmarks/train_step.py --model=sd15 "${common[@]}" --batch=1 --prior --steps=20 \
    --attention=xla --no_torch
bench sd15_step_large_batch 120 python benchmarks/train_step.py --model=sd15 "${common[@]}" --batch=16 --prior \
    --steps=10 --no_torch
bench sd15_sampler 90 python benchmarks/sample.py --model=sd15 --batch=8 --steps=25 --size=512 --dtype=bfloat16
bench sd15_memory_plan 60 python benchmarks/memory_plan.py --model=sd15 --resolution=512 --variants=baseline,lora16
bench sdxl_lora_1024 120 python benchmarks/train_step.py --model=sdxl --resolution=1024 --batch=1 \
    --mixed_precision=bf16 --lora=4 --steps=10 --no_torch --peak_tflops=989
# issue #14: FLUX.1-dev LoRA (configs/dog_flux.py:1024: rank 4 with feed-forward, bf16 base, remat full), random
# weights, batch 1; targets <= 1.5 s per step and <= 40 GiB peak (the result's "targets")
bench flux_dev_lora_1024 300 python benchmarks/train_step.py --model=flux-dev --resolution=1024 --batch=1 --lora=4 \
    --steps=5 --warmup=2 --peak_tflops=989
echo "wrote $results" >&2
cat "$results"
