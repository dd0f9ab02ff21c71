"""The trainer end to end on the tiny model: loss falls, checkpoints, exact resume after kill -9, class images
resume identically, bad input, export to diffusers-torch. (Sharded steps vs 1 device: test_sharding.py.)"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.py"
# A short, fast variant of configs/tiny.py: 32 px, few class images and sampling steps.
FAST = ["resolution=32", "num_class_images=4", "sample_batch_size=4", "class_generation_steps=2",
        "max_train_steps=30", "checkpointing_steps=10", "validation_steps=30", "num_validation_images=2",
        "validation_inference_steps=2", "lr_warmup_steps=0", "lr_scheduler=constant"]


def fast_config(*overrides):
  from dreambooth_jax import config_files
  config = config_files.load(TINY)
  for item in (*FAST, *overrides):
    key, value = item.split("=", 1)
    current = config[key]
    config[key] = type(current)(value) if not isinstance(current, bool) else value == "True"
  return config


def train_command(workdir, *overrides):
  return [sys.executable, "-m", "dreambooth_jax.train", f"--config={TINY}", f"--workdir={workdir}",
          *(f"--config.{o}" for o in (*FAST, *overrides))]


def step_records(workdir) -> list[dict]:
  """metrics.jsonl's step records (not the compile events)."""
  metrics = pathlib.Path(workdir) / "metrics.jsonl"
  lines = metrics.read_text().splitlines() if metrics.is_file() else []
  return [r for r in map(json.loads, lines) if "step" in r]


def read_losses(workdir) -> dict[int, float]:
  # step records with a loss (validation-loss records have val/* keys instead); a resumed run re-logs steps after
  # the checkpoint: keep the last
  return {record["step"]: record["loss"] for record in step_records(workdir) if "loss" in record}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  """One uninterrupted tiny run (in process), shared by several tests."""
  from dreambooth_jax.training import run
  workdir = tmp_path_factory.mktemp("full") / "run"
  run.train(fast_config(), workdir)
  return workdir


def test_tiny_run_learns_checkpoints_and_exports(full_run):
  losses = read_losses(full_run)
  assert sorted(losses) == list(range(1, 31))
  first, last = np.mean([losses[s] for s in range(1, 11)]), np.mean([losses[s] for s in range(21, 31)])
  assert last < 0.8 * first, (first, last)
  record = step_records(full_run)[0]
  assert {"step", "loss", "instance_loss", "prior_loss", "grad_norm", "lr", "step_time", "images_per_s",
          "bucket"} <= set(record) and record["bucket"] == [32, 32]
  compiles = [json.loads(line) for line in (full_run / "metrics.jsonl").read_text().splitlines()
              if "event" in json.loads(line)]
  assert [(c["what"], c["bucket"]) for c in compiles] == [("train_step", [32, 32])]
  config = json.loads((full_run / "config.json").read_text())
  assert config["max_train_steps"] == 30 and config["resolution"] == 32
  assert sorted(p.name for p in (full_run / "checkpoints").iterdir() if p.name.isdigit()) == ["20", "30"]
  assert (full_run / "validation" / "step_000030.png").is_file()
  assert len(list((full_run / "class_images").glob("class_*.png"))) == 4


def test_export_loads_in_diffusers_torch_and_generates(full_run, tmp_path):
  import torch
  from diffusers import DDIMScheduler, StableDiffusionPipeline
  from dreambooth_jax.sampling import sampler as sampling
  from dreambooth_jax.io import diffusers_folder as weights
  pipe = StableDiffusionPipeline.from_pretrained(full_run / "export")
  pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
  pipe.set_progress_bar_config(disable=True)
  latents = np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype(np.float32)
  expected = pipe(["a photo of sks dog"], height=32, width=32, num_inference_steps=3, guidance_scale=5.0,
                  latents=torch.from_numpy(latents), output_type="np").images
  ours = weights.load_pipeline(full_run / "export")
  got = sampling.generate(ours, ["a photo of sks dog"], [0], settings=sampling.SamplerSettings(
      steps=3, guidance=5.0, height=32, width=32), init_latents_BHWC=latents.transpose(0, 2, 3, 1))
  assert np.abs(np.asarray(got) - expected).max() <= 1e-4
  # The trained UNet differs from the base model; the frozen parts are the base model's.
  base = weights.random_pipeline(seed=0)
  trained = weights.module_state_dict(ours.unet)
  assert any(not np.array_equal(v, weights.module_state_dict(base.unet)[k]) for k, v in trained.items())
  for k, v in weights.module_state_dict(base.vae).items():
    np.testing.assert_array_equal(weights.module_state_dict(ours.vae)[k], v)
  # The export CLI writes any checkpoint.
  out = tmp_path / "step20"
  result = subprocess.run([sys.executable, "-m", "dreambooth_jax.export", f"--workdir={full_run}", "--step=20",
                           f"--out={out}"], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def last_logged_step(workdir) -> int:
  records = step_records(workdir)
  return records[-1]["step"] if records else 0


def wait_for(proc, condition, what: str, timeout: float = 400):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None and not condition():
    time.sleep(0.05)
  assert proc.poll() is None, f"the run ended before {what}"


# The interrupted runs' command: checkpoints every step (changes nothing in the losses, leaves a wide window to
# interrupt in); no validation images or export, which come after the last step and are tested on full_run.
INTERRUPTED = ("checkpointing_steps=1", "validation_steps=0", "export_at_end=False")


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
  """The run of test_sigterm_and_kill_9_then_resume_give_identical_losses: preempted (SIGTERM) after step 5,
  resumed, killed hard (kill -9), resumed again to the end. Its finished workdir (checkpoints 29 and 30) is also
  the start of test_damaged_latest_checkpoint_is_set_aside_and_run_resumes_from_previous."""
  tmp_path = tmp_path_factory.mktemp("interrupted")
  workdir = tmp_path / "run"
  command = train_command(workdir, *INTERRUPTED)
  log = tmp_path / "first.log"
  with open(log, "w") as stderr_file:  # a file, not a pipe: a full pipe would block the run
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr_file)
    wait_for(proc, lambda: last_logged_step(workdir) >= 5, "SIGTERM")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
  sigterm = {"returncode": proc.returncode, "stderr": log.read_text(),
             "preempted": max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())}

  proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  wait_for(proc, lambda: last_logged_step(workdir) >= max(sigterm["preempted"] + 3, 15), "kill -9")
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  killed_at = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())

  resumed = subprocess.run(command, capture_output=True, text=True, timeout=400)
  return {"workdir": workdir, "sigterm": sigterm, "killed_at": killed_at, "resumed": resumed}


def test_sigterm_and_kill_9_then_resume_give_identical_losses(full_run, interrupted_run):
  """Preempted (SIGTERM: checkpoint, exit 143), resumed, killed hard (kill -9), resumed again: step for step the
  losses of the uninterrupted run, bitwise on CPU."""
  sigterm = interrupted_run["sigterm"]
  assert sigterm["returncode"] == 143, sigterm["stderr"][-3000:]
  assert 5 <= sigterm["preempted"] < 30 and "SIGTERM received" in sigterm["stderr"]
  killed_at = interrupted_run["killed_at"]
  assert killed_at > sigterm["preempted"]
  result = interrupted_run["resumed"]
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resumed from step {killed_at}" in result.stderr
  resumed, reference = read_losses(interrupted_run["workdir"]), read_losses(full_run)
  assert sorted(resumed) == sorted(reference)
  for step in reference:  # bitwise on CPU
    assert resumed[step] == reference[step], f"step {step}: {resumed[step]} != {reference[step]}"


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  from dreambooth_jax.training import run
  config = fast_config("learning_rate=1e30", "checkpointing_steps=1", "max_grad_norm=0.0",
                       "with_prior_preservation=False", "validation_steps=0", "cache_latents=False")
  with pytest.raises(FloatingPointError, match=r"non-finite loss .* at step (\d+)") as info:
    run.train(config, tmp_path / "run")
  bad_step = int(str(info.value).split("at step ")[1].split(";")[0])
  saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and max(saved) == bad_step - 1


def test_bad_instance_images_stop_before_training(tmp_path):
  from dreambooth_jax.training import run
  images = tmp_path / "images"
  images.mkdir()
  from PIL import Image
  Image.new("RGB", (40, 40), (200, 10, 10)).save(images / "good.png")
  (images / "broken.jpg").write_bytes(b"not an image")
  (images / "empty.png").write_bytes(b"")
  config = fast_config(f"instance_data_dir={images}", "with_prior_preservation=False")
  with pytest.raises(ValueError, match=r"(?s)broken\.jpg.*empty\.png|empty\.png.*broken\.jpg"):
    run.train(config, tmp_path / "run")
  assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_interrupted_class_generation_resumes_identically(tmp_path):
  from dreambooth_jax.data import class_images as prior
  from dreambooth_jax.sampling import sampler as sampling
  from dreambooth_jax.io import diffusers_folder as weights
  sd = weights.random_pipeline()
  settings = sampling.SamplerSettings(steps=2, guidance=3.0, height=32, width=32)
  first = tmp_path / "first"
  assert prior.ensure_class_images(sd, first, "a dog", 5, seed=1, settings=settings, batch_size=2) == 5
  # An "interrupted" folder: two images never written, one half-written temporary file, one foreign image.
  second = tmp_path / "second"
  second.mkdir()
  for name in ("class_00000.png", "class_00002.png"):
    (second / name).write_bytes((first / name).read_bytes())
  (second / ".class_00003.png.tmp").write_bytes(b"\x89PNG partial")
  assert prior.ensure_class_images(sd, second, "a dog", 5, seed=1, settings=settings, batch_size=2) == 3
  for i in range(5):
    assert (second / f"class_{i:05d}.png").read_bytes() == (first / f"class_{i:05d}.png").read_bytes()
  assert prior.ensure_class_images(sd, second, "a dog", 5, seed=1, settings=settings, batch_size=2) == 0
  from PIL import Image
  Image.new("RGB", (32, 32)).save(second / "my_own_dog.jpg")  # user images count towards the total
  (second / "class_00004.png").unlink()
  assert prior.ensure_class_images(sd, second, "a dog", 5, seed=1, settings=settings, batch_size=2) == 0


def test_damaged_latest_checkpoint_is_set_aside_and_run_resumes_from_previous(full_run, interrupted_run, tmp_path):
  """A copy of the finished interrupted run (checkpoints 29 and 30) with checkpoint 30's data files truncated (a
  partial copy, a full disk): the rerun warns naming 30, renames it (kept, no longer listed), resumes from 29, and
  its loss for step 30 and the weights it saves after it equal the uninterrupted run's (bitwise on CPU)."""
  assert interrupted_run["resumed"].returncode == 0, interrupted_run["resumed"].stderr[-3000:]
  workdir = tmp_path / "run"
  shutil.copytree(interrupted_run["workdir"], workdir)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["29", "30"]
  data_files = [p for p in (workdir / "checkpoints" / "30").rglob("*")
                if p.is_file() and p.parent.name == "d" and p.stat().st_size > 0]
  assert data_files, sorted(str(p) for p in (workdir / "checkpoints" / "30").rglob("*"))
  for path in data_files:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  logged_30 = [r for r in step_records(workdir) if r.get("step") == 30 and "loss" in r]
  result = subprocess.run(train_command(workdir, *INTERRUPTED), capture_output=True, text=True, timeout=400)
  assert result.returncode == 0, result.stderr[-3000:]
  warnings = [line for line in result.stderr.splitlines() if "cannot be restored" in line]
  assert len(warnings) == 1 and "[30]" in warnings[0], warnings
  assert "resumed from step 29" in result.stderr
  names = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  assert "30.damaged-1" in names and "30" in names, names
  rerun_30 = [r for r in step_records(workdir) if r.get("step") == 30 and "loss" in r][len(logged_30):]
  assert len(rerun_30) == 1, rerun_30  # step 30 trained again, from checkpoint 29
  assert rerun_30[0]["loss"] == read_losses(full_run)[30], (rerun_30[0]["loss"], read_losses(full_run)[30])
  # Step 30's update read the optimizer state restored from 29: its result, the new checkpoint 30's weights, equals
  # the uninterrupted run's checkpoint 30, bitwise.
  from dreambooth_jax.io import diffusers_folder
  from dreambooth_jax.training import run_state
  again, reference = (diffusers_folder.module_state_dict(run_state.load_run(run, 30)[1].unet)
                      for run in (workdir, full_run))
  assert again.keys() == reference.keys()
  for name, value in reference.items():
    np.testing.assert_array_equal(again[name], value, err_msg=name)
