#!/usr/bin/env bash
# Several GPU hosts, one process per host driving all its GPUs, on jax.distributed.
#
# SLURM (inside an allocation, e.g. salloc -N 4 --gpus-per-node=8): one srun task per node; jax reads SLURM_*.
#   launch/gpu_multinode.sh [--dry-run] --slurm [--nodes=4] -- --config=configs/dog.py --workdir=/shared/runs/dog
# Plain environment: run the same line on every host, each with its own --process_id.
#   launch/gpu_multinode.sh [--dry-run] --coordinator=host0:12345 --num_processes=4 --process_id=0 -- --config=...
#
# The workdir must be on a filesystem every host sees (Orbax writes checkpoints from all processes).
set -euo pipefail
source "$(dirname "$0")/common.sh"

mode="" nodes="" coordinator="" num_processes="" process_id=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --slurm) mode=slurm ;;
    --nodes=*) nodes=${1#*=} ;;
    --coordinator=*) coordinator=${1#*=}; mode=${mode:-env} ;;
    --num_processes=*) num_processes=${1#*=} ;;
    --process_id=*) process_id=${1#*=} ;;
    --) shift; break ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) die "unknown option $1 (train arguments go after --)" ;;
  esac
  shift
done
[[ $# -gt 0 ]] || die "no train arguments after -- (e.g. -- --config=configs/dog.py --workdir=/shared/runs/dog)"
if [[ -z $mode && -n ${SLURM_JOB_ID:-} ]]; then mode=slurm; fi

envs=(XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_latency_hiding_scheduler=true")
case $mode in
  slurm)
    srun_args=(--ntasks-per-node=1 --kill-on-bad-exit=1)
    [[ -n $nodes ]] && srun_args+=(--nodes="$nodes")
    run "${envs[@]}" -- srun "${srun_args[@]}" "$PYTHON" -m dreambooth_jax.train "$@" ;;
  env)
    [[ -n $num_processes && -n $process_id ]] || die "--coordinator needs --num_processes and --process_id"
    [[ $process_id =~ ^[0-9]+$ && $process_id -lt $num_processes ]] \
      || die "--process_id=$process_id must be in [0, $num_processes)"
    run "${envs[@]}" JAX_COORDINATOR_ADDRESS="$coordinator" JAX_NUM_PROCESSES="$num_processes" \
      JAX_PROCESS_ID="$process_id" -- "$PYTHON" -m dreambooth_jax.train "$@" ;;
  *) die "say --slurm (or run inside a SLURM allocation) or give --coordinator/--num_processes/--process_id" ;;
esac
