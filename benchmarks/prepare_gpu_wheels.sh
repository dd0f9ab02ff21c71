#!/usr/bin/env bash
# Downloads (here, with network) the wheels the GPU machine lacks into wheels/ (git-ignored; carry it to the device):
# diffusers and ml_collections (and their small pure-Python dependencies the GPU image does not have). The GPU
# machine has jax (CUDA), flax, optax, orbax, torch, transformers and peft already, and no network.
#   bash benchmarks/prepare_gpu_wheels.sh        # then: run(..., carry=["wheels"]) with benchmarks/gpu_suite.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p wheels
python -m pip download -q --no-deps -d wheels diffusers ml_collections absl-py tensorboardX importlib_metadata zipp
ls -la wheels
