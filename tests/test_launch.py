"""The launch scripts' --dry-run lines: the exact command and environment each would run."""

import os
import pathlib
import shlex
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"


def dry_run(script, *args, env=None):
  result = subprocess.run(["bash", str(LAUNCH / script), "--dry-run", *args], capture_output=True, text=True,
                          env={k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}, timeout=30)
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines()]


def split_env(words):
  env = {}
  while "=" in words[0] and not words[0].startswith("-"):
    k, v = words.pop(0).split("=", 1)
    env[k] = v
  return env, words


def test_gpu_single_host():
  [line] = dry_run("gpu.sh", "--gpus=0,1", "--", "--config=configs/dog.py", "--config.learning_rate=2e-6",
                   env={"XLA_FLAGS": None})
  env, cmd = split_env(line)
  assert cmd == ["python", "-m", "dreambooth_jax.train", "--config=configs/dog.py", "--config.learning_rate=2e-6"]
  assert env["CUDA_VISIBLE_DEVICES"] == "0,1" and env["XLA_FLAGS"] == "--xla_gpu_enable_latency_hiding_scheduler=true"
  assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.95"


def test_gpu_multinode_plain_env():
  [line] = dry_run("gpu_multinode.sh", "--coordinator=host0:1234", "--num_processes=4", "--process_id=3", "--",
                   "--config=configs/dog.py", "--workdir=/shared/run", env={"SLURM_JOB_ID": None})
  env, cmd = split_env(line)
  assert {k: env[k] for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")} == {
      "JAX_COORDINATOR_ADDRESS": "host0:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  assert cmd == ["python", "-m", "dreambooth_jax.train", "--config=configs/dog.py", "--workdir=/shared/run"]


def test_gpu_multinode_slurm():
  [line] = dry_run("gpu_multinode.sh", "--nodes=2", "--", "--config=configs/dog.py", env={"SLURM_JOB_ID": "77"})
  _, cmd = split_env(line)
  assert cmd == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--nodes=2", "python", "-m",
                 "dreambooth_jax.train", "--config=configs/dog.py"]


def test_tpu_pod_runs_on_every_worker():
  setup, train = dry_run("tpu_pod.sh", "--tpu=pod1", "--zone=us-central2-b", "--project=p", "--setup", "--",
                         "--config=configs/dog.py", "--workdir=/mnt/shared/run 1")
  assert setup[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1", "--zone=us-central2-b", "--worker=all"]
  assert "pip install -e '.[tpu]'" in setup[-1]
  remote = train[-1].removeprefix("--command=")
  assert shlex.split(remote) == ["cd", "~/dreambooth_jax", "&&", "DREAMBOOTH_JAX_DISTRIBUTED=auto", "python", "-m",
                                 "dreambooth_jax.train", "--config=configs/dog.py", "--workdir=/mnt/shared/run 1"]
  assert "--project=p" in train


@pytest.mark.parametrize("script,args,message", [
    ("gpu.sh", ["--config=x"], "unknown option"),
    ("gpu.sh", [], "no train arguments"),
    ("gpu_multinode.sh", ["--coordinator=h:1", "--num_processes=2", "--process_id=2", "--", "--config=x"],
     "must be in"),
    ("tpu_pod.sh", ["--", "--config=x"], "--tpu=NAME and --zone=ZONE are required"),
])
def test_bad_arguments_are_refused(script, args, message):
  result = subprocess.run(["bash", str(LAUNCH / script), "--dry-run", *args], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}, timeout=30)
  assert result.returncode == 2 and message in result.stderr, result.stderr


def test_distributed_reads_the_launch_environment():
  from dreambooth_jax import distributed
  assert distributed.wants_distributed({}) is None
  assert distributed.wants_distributed({"JAX_NUM_PROCESSES": "4"}) == "env"
  assert distributed.wants_distributed({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"}) == "slurm"
  assert distributed.wants_distributed({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}) is None
  assert distributed.wants_distributed({"DREAMBOOTH_JAX_DISTRIBUTED": "auto"}) == "auto"
