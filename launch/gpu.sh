#!/usr/bin/env bash
# One host, all its local GPUs: one process drives every GPU (jit + NamedSharding over a data x fsdp mesh).
#
#   launch/gpu.sh [--dry-run] [--gpus=0,1,2,3] [--mem_fraction=0.95] -- --config=configs/dog.py [--config.x=y ...]
#
# Everything after "--" goes to `python -m dreambooth_jax.train`.
set -euo pipefail
source "$(dirname "$0")/common.sh"

gpus="" mem_fraction="0.95"
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --gpus=*) gpus=${1#*=} ;;
    --mem_fraction=*) mem_fraction=${1#*=} ;;
    --) shift; break ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) die "unknown option $1 (train arguments go after --)" ;;
  esac
  shift
done
[[ $# -gt 0 ]] || die "no train arguments after -- (e.g. -- --config=configs/dog.py)"

envs=(XLA_PYTHON_CLIENT_MEM_FRACTION="$mem_fraction"
      XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_latency_hiding_scheduler=true")
[[ -n $gpus ]] && envs+=(CUDA_VISIBLE_DEVICES="$gpus")
run "${envs[@]}" -- "$PYTHON" -m dreambooth_jax.train "$@"
