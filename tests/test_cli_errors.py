"""Expected user mistakes end the CLIs in one line on stderr naming what to change, a non-zero status and no
traceback (dreambooth_jax/cli.py); the helper keeps tracebacks for errors raised outside the package."""

import os
import pathlib
import subprocess
import sys

import pytest

from dreambooth_jax import cli
from xla_flags import fake_devices

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.py"


def run_cli(module, *args, tmp_path, **env_vars):
  env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"),
             HF_DATASETS_CACHE=str(tmp_path / "datasets"), JAX_PLATFORMS="cpu", **env_vars)
  return subprocess.run([sys.executable, "-m", f"dreambooth_jax.{module}", *args], capture_output=True, text=True,
                        timeout=300, env=env, cwd=tmp_path)


@pytest.mark.parametrize("module, args, expected", [
    ("train", ["--config.random_init=False", "--config.pretrained_model_name_or_path=nobody/nothing"],
     "pretrained_model_name_or_path='nobody/nothing'"),
    ("train", ["--config.mixed_precision=fp8"], "mixed_precision='fp8'"),
    ("train", ["--config.lora.enabled=True", "--config.lora.rank=0"], "lora.rank = 0"),
    ("train", ["--config.resolution=36"], "resolution=36"),
    ("train", ["--config.prior_preservation=bogus"], "prior_preservation='bogus' is not one of"),
    ("train", ["--config.instance_data_dir=/no/such/folder"], "instance_data_dir: /no/such/folder"),
    ("train", ["--config.dataset_name=nobody/no-dataset"], "dataset_name='nobody/no-dataset': cannot be loaded"),
    ("sample", ["--model=/no/such/folder", "--prompt=x", "--out=samples"], "--model=/no/such/folder"),
    ("export", ["--workdir=/no/such/run"], "/no/such/run"),
], ids=["hub-offline", "mixed-precision", "lora-rank", "resolution", "prior-preservation", "instance-dir",
        "dataset-offline", "sample-model", "export-workdir"])
def test_user_mistakes_end_in_one_line(module, args, expected, tmp_path):
  if module == "train":
    args = [f"--config={TINY}", f"--workdir={tmp_path / 'run'}", *args]
  result = run_cli(module, *args, tmp_path=tmp_path)
  assert result.returncode != 0
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f"{module}: error: ") and expected in last, last


def test_mesh_that_cannot_hold_the_batch_is_refused(tmp_path):
  """8 devices, global batch 2 (train_batch_size=1 with prior preservation), explicit mesh_data=8."""
  result = run_cli("train", f"--config={TINY}", f"--workdir={tmp_path / 'run'}", "--config.train_batch_size=1",
                   "--config.mesh_data=8", tmp_path=tmp_path, XLA_FLAGS=fake_devices(8))
  assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("train: error: mesh_data=8 x mesh_fsdp=1 cannot split the global batch of 2 examples "
                         "(train_batch_size=1 x 2 with prior preservation)"), last


def test_library_errors_keep_their_traceback():
  @cli.main("x")
  def main(argv):
    del argv
    int("not a number")  # a ValueError raised inside Python itself: a bug here, not a user mistake

  with pytest.raises(ValueError):
    main([])

  @cli.main("x")
  def ours(argv):
    del argv
    from dreambooth_jax.training import run_state
    run_state.compute_dtype(type("Config", (), {"mixed_precision": "fp8"})())  # our own check

  with pytest.raises(SystemExit, match="x: error: mixed_precision='fp8'"):
    ours([])
  assert cli.one_line(ValueError("2 bad files:\n  a.jpg\n  b.png")) == "2 bad files:; a.jpg; b.png"

  @cli.main("train")
  def diverged(argv):
    del argv
    from dreambooth_jax.training import metrics
    raise metrics.NonFiniteLoss("non-finite loss (nan) at step 7; stopping")  # what run.train raises

  with pytest.raises(SystemExit, match=r"^train: error: non-finite loss \(nan\) at step 7; stopping$"):
    diverged([])
