"""Multi-host start-up: jax.distributed.initialize from the environment, or nothing for one process.

- TPU VM pods (several workers): jax detects the cluster itself (launch/tpu_pod.sh sets
  DREAMBOOTH_JAX_DISTRIBUTED=auto to ask for that detection).
- SLURM with several tasks: jax's SLURM cluster detection reads SLURM_* variables.
- Plain GPU clusters: JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES, JAX_PROCESS_ID (as set by
  launch/gpu_multinode.sh).
"""

import os

import jax
from absl import logging

_initialized = False


def wants_distributed(env=os.environ) -> str | None:
  """Which multi-process environment this is, or None for a single process."""
  if env.get("DREAMBOOTH_JAX_DISTRIBUTED") == "auto":  # set by launch/tpu_pod.sh: let jax detect the cluster
    return "auto"
  if int(env.get("JAX_NUM_PROCESSES", "1")) > 1:
    return "env"
  if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env:
    return "slurm"
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h]) > 1:
    return "tpu"
  return None


def initialize() -> None:
  """Idempotent. Must run before anything touches jax devices."""
  global _initialized
  if _initialized:
    return
  kind = wants_distributed()
  if kind == "env":
    jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif kind in ("slurm", "tpu", "auto"):
    jax.distributed.initialize()  # cluster auto-detection
  _initialized = True
  if kind:
    logging.info("jax.distributed (%s): process %d of %d, %d local / %d global devices", kind,
                 jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def is_primary() -> bool:
  return jax.process_index() == 0
