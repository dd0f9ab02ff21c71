#!/usr/bin/env bash
# A TPU VM pod slice: the same train command on every worker (jax.distributed finds the pod by itself).
#
#   launch/tpu_pod.sh [--dry-run] --tpu=NAME --zone=ZONE [--project=P] [--repo=~/dreambooth_jax] [--setup] \
#       -- --config=configs/dog.py --workdir=/mnt/shared/runs/dog
#
# --setup first installs the project with the TPU extra on every worker (the repo must be cloned at --repo).
# The workdir must be one folder all workers see (NFS/Filestore, or a bucket mounted with gcsfuse).
set -euo pipefail
source "$(dirname "$0")/common.sh"

tpu="" zone="" project="" repo="~/dreambooth_jax" setup=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --tpu=*) tpu=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --repo=*) repo=${1#*=} ;;
    --setup) setup=1 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) die "unknown option $1 (train arguments go after --)" ;;
  esac
  shift
done
[[ -n $tpu && -n $zone ]] || die "--tpu=NAME and --zone=ZONE are required"
[[ $# -gt 0 ]] || die "no train arguments after -- (e.g. -- --config=configs/dog.py --workdir=/mnt/shared/run)"

ssh=(gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all)
[[ -n $project ]] && ssh+=(--project="$project")
train="cd $repo && DREAMBOOTH_JAX_DISTRIBUTED=auto $PYTHON -m dreambooth_jax.train$(printf ' %q' "$@")"
if [[ $setup == 1 ]]; then
  run -- "${ssh[@]}" --command="cd $repo && $PYTHON -m pip install -e '.[tpu]'"
fi
run -- "${ssh[@]}" --command="$train"
