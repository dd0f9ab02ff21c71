"""Aspect-ratio buckets: kohya's bucket sets, nearest-aspect choice and cover resize, full one-bucket batches with a
resumable bucket order, SDXL's real size/crop time ids, bad settings refused by name, and a mixed-aspect folder
trained in several buckets with one compile each before step 1 and an exact kill -9 resume."""

import json
import math
import os
import signal
import subprocess

import numpy as np
import pytest
from PIL import Image

from test_train import fast_config, train_command, wait_for
from dreambooth_jax.data import buckets, images as data

# The bucket list kohya's train_network.py logs for resolution 512 with its defaults (256..1024, step 64), as
# (width, height): a fixed expectation, not computed by our code.
KOHYA_512 = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
             (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
             (1024, 256)]
# The tiny runs' settings: 32 px area, sides 16..64 in steps of 16 (the tiny model's size multiple).
BUCKETED = ["enable_bucket=True", "min_bucket_reso=16", "max_bucket_reso=64", "bucket_reso_steps=16"]


def brute_force_buckets(resolution, lo, hi, step):
  """kohya's rule restated: for every allowed width, the tallest allowed height whose area stays within
  resolution^2 (and the transposed pair), plus the largest square of whole steps."""
  sizes = range(lo, hi + 1, step)
  area = resolution * resolution
  out = {(math.isqrt(area) // step * step,) * 2}
  for w in sizes:
    fitting = [h for h in range(step, hi + 1, step) if w * h <= area]
    if fitting and max(fitting) >= lo:
      out |= {(w, max(fitting)), (max(fitting), w)}
  return sorted(out)


def test_bucket_sets_equal_kohyas():
  assert buckets.make_bucket_resolutions((512, 512), 256, 1024, 64) == KOHYA_512
  for setting in [(512, 256, 1024, 64), (1024, 256, 2048, 64), (768, 320, 1536, 32), (32, 16, 64, 16),
                  (64, 32, 128, 16)]:
    res, lo, hi, step = setting
    assert buckets.make_bucket_resolutions((res, res), lo, hi, step) == brute_force_buckets(*setting), setting


def test_nearest_aspect_cover_and_crop(tmp_path):
  choices = [(h, w) for w, h in KOHYA_512]
  assert buckets.select_bucket(1200, 800, choices) == (640, 384)  # w/h 0.667: 384/640 = 0.6 beats 448/576 = 0.78
  assert buckets.select_bucket(640, 384, choices) == (640, 384)  # an exact size wins
  assert buckets.select_bucket(300, 300, choices) == (512, 512)
  assert buckets.cover_size(1200, 800, (640, 384)) == (640, 427)  # height fits exactly, width covers
  assert buckets.cover_size(800, 1200, (384, 640)) == (427, 640)
  assert buckets.cover_size(600, 300, (640, 384)) == (768, 384)  # upscaled: width fits
  assert buckets.largest([(16, 48), (32, 32), (48, 16)]) == (32, 32)  # what the memory plan checks
  assert buckets.largest([(16, 48), (48, 16)]) == (48, 16)
  # SDXL time ids: the photo's real size and the crop's top-left in the resized image, target = the bucket.
  Image.fromarray(np.zeros((90, 30, 3), np.uint8)).save(tmp_path / "tall.png")
  images = data.load_subject_images(tmp_path, 32, "x", buckets=buckets.bucket_set(fast_config(*BUCKETED)))
  assert images.buckets == [(48, 16)] and images.images[0].shape == (48, 16, 3)
  Image.fromarray(np.zeros((100, 30, 3), np.uint8)).save(tmp_path / "taller.png")
  images = data.load_subject_images(tmp_path, 32, "x", buckets=buckets.bucket_set(fast_config(*BUCKETED)))
  assert images.images[1].shape == (53, 16, 3)  # "taller.png" after "tall.png": covers 48x16, 5 rows to crop
  it = buckets.BucketIterator(images, 2, 1, seed=0, center_crop=False, random_flip=True)
  bucket, batch = next(it)
  assert bucket == (48, 16) and batch["pixels_BHWC"].shape == (2, 48, 16, 3)
  assert [tuple(s) for s in batch["original_size_B2"]] == [images.original_sizes[i] for i in batch["index_B"]]
  tops = [int(c[0]) for c, i in zip(batch["crop_top_left_B2"], batch["index_B"]) if i == 1]
  assert all(0 <= t <= 5 for t in tops)
  from dreambooth_jax.families import sdxl
  ids = sdxl.training_image_conditioning(batch["original_size_B2"], batch["crop_top_left_B2"], bucket)["time_ids"]
  np.testing.assert_array_equal(ids[:, :2], batch["original_size_B2"])
  np.testing.assert_array_equal(ids[:, 2:4], batch["crop_top_left_B2"])
  np.testing.assert_array_equal(ids[:, 4:], [[48, 16]] * 2)


def mixed_folder(folder):
  """Two portraits, two landscapes, one square photo (random pixels)."""
  folder.mkdir(exist_ok=True)
  rng = np.random.default_rng(0)
  for name, (h, w) in {"p0": (90, 30), "p1": (80, 28), "l0": (30, 90), "l1": (26, 84), "s0": (40, 40)}.items():
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{name}.png")
  return folder


def test_batches_are_full_one_bucket_each_and_resume(tmp_path):
  choices = buckets.bucket_set(fast_config(*BUCKETED))
  images = data.load_subject_images(mixed_folder(tmp_path / "mixed"), 32, "x", buckets=choices)
  assert images.buckets == [(16, 48), (16, 48), (48, 16), (48, 16), (32, 32)]  # l0 l1 p0 p1 s0 (sorted names)
  make = lambda: buckets.BucketIterator(images, 2, 2, seed=5, center_crop=False, random_flip=True)
  first = make()
  steps = [next(first) for _ in range(7)]  # crosses epochs: 3 buckets -> 3 steps each
  for bucket, batch in steps:
    assert batch["pixels_BHWC"].shape == (4, *bucket, 3)  # 2 micro-batches x 2, always full
    assert all(images.buckets[i] == bucket for i in batch["index_B"])
  assert {b for b, _ in steps[:3]} == {(16, 48), (48, 16), (32, 32)}
  other = [b for b, _ in (next(buckets.BucketIterator(images, 2, 2, seed=s)) for s in range(6))]
  assert len(set(other)) > 1  # the first bucket depends on the seed
  resumed = make()
  for _ in range(3):
    next(resumed)
  restored = make()
  restored.set_state(json.loads(json.dumps(resumed.get_state())))
  for want_bucket, want in steps[3:]:
    got_bucket, got = next(restored)
    assert got_bucket == want_bucket
    np.testing.assert_array_equal(got["pixels_BHWC"], want["pixels_BHWC"])
  # class examples follow the step's bucket
  classes = buckets.ClassBucketIterator(images, 2, 1, seed=1)
  assert all(images.buckets[i] == (32, 32) for i in classes.next_for((32, 32))["index_B"])
  assert buckets.class_image_quotas(images.buckets, 8) == {(16, 48): 3, (32, 32): 2, (48, 16): 3}
  assert buckets.class_image_quotas(images.buckets, 2) == {(16, 48): 1, (32, 32): 1, (48, 16): 1}


@pytest.mark.parametrize("overrides, message", [
    (["min_bucket_reso=64", "max_bucket_reso=32"], "min_bucket_reso=64 is larger than max_bucket_reso=32"),
    (["min_bucket_reso=24"], r"min_bucket_reso=24: must be a positive multiple of bucket_reso_steps=16"),
    (["resolution=80"], r"resolution=80 is outside \[min_bucket_reso=16, max_bucket_reso=64\]"),
    (["validation_loss=True"], r"validation_loss=True with enable_bucket=True"),
])
def test_bad_bucket_settings_are_refused_by_name_before_any_work(tmp_path, overrides, message):
  from dreambooth_jax.training import run
  with pytest.raises(ValueError, match=message):
    run.train(fast_config(*BUCKETED, *overrides), tmp_path / "run")
  assert not (tmp_path / "run" / "config.json").exists()  # before anything is written


def test_a_bucket_step_the_model_cannot_take_is_refused_before_compiling():
  # the tiny model takes multiples of 16 (VAE 8 x one UNet halving); checked as soon as the model's shapes are
  # known: here the dry run's abstract model (a run checks the same right after loading it, before compiling)
  from dreambooth_jax.training import run
  with pytest.raises(ValueError, match=r"bucket_reso_steps=8: this model takes image sizes in multiples of 16"):
    run.dry_run(fast_config(*BUCKETED, "bucket_reso_steps=8", "min_bucket_reso=16", "max_bucket_reso=64"))


def read_records(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def step_records(workdir) -> dict:
  return {r["step"]: r for r in read_records(workdir) if "step" in r}  # a resumed run re-logs: keep the last


def bucketed_overrides(folder):
  return [*BUCKETED, f"instance_data_dir={folder}", "max_train_steps=9", "num_class_images=3", "validation_steps=0",
          "export_at_end=False", "random_flip=True"]


def own_class_images(workdir):
  """A square and a landscape class photo of the user's: of the 3 class images (one per bucket), only the
  portrait bucket's is generated (one sampler compile, at 48 x 16)."""
  folder = workdir / "class_images"
  folder.mkdir(parents=True)
  Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(folder / "mine_square.png")
  Image.fromarray(np.full((20, 64, 3), 160, np.uint8)).save(folder / "mine_wide.png")


@pytest.fixture(scope="module")
def bucketed_run(tmp_path_factory):
  from dreambooth_jax.training import run
  root = tmp_path_factory.mktemp("bucketed")
  folder = mixed_folder(root / "photos")
  own_class_images(root / "run")
  run.train(fast_config(*bucketed_overrides(folder)), root / "run")
  return root / "run", folder


def test_mixed_aspect_folder_trains_in_buckets_compiled_once_each_before_step_1(bucketed_run):
  workdir, _ = bucketed_run
  records = read_records(workdir)
  compiles = [r for r in records if r.get("event") == "compile"]
  first_step = next(i for i, r in enumerate(records) if "step" in r)
  assert all(records.index(c) < first_step for c in compiles)
  assert sorted(tuple(c["bucket"]) for c in compiles) == [(16, 48), (32, 32), (48, 16)]
  assert all(c["what"] == "train_step" and c["seconds"] > 0 for c in compiles)
  steps = step_records(workdir)
  assert sorted(steps) == list(range(1, 10))
  assert {tuple(r["bucket"]) for r in steps.values()} == {(16, 48), (32, 32), (48, 16)}
  assert all(np.isfinite(r["loss"]) and r["prior_loss"] > 0 for r in steps.values())
  generated = [p.name for p in (workdir / "class_images").glob("class_*.png")]
  assert generated == ["class_48x16_00000.png"] and Image.open(workdir / "class_images" / generated[0]).size == (16, 48)


def test_bucketed_kill_9_and_rerun_repeat_losses_and_bucket_order(bucketed_run, tmp_path):
  reference_dir, folder = bucketed_run
  workdir = tmp_path / "run"
  own_class_images(workdir)
  command = train_command(workdir, *bucketed_overrides(folder), "checkpointing_steps=1")
  proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  wait_for(proc, lambda: (workdir / "metrics.jsonl").is_file() and len(step_records(workdir)) >= 4, "kill -9")
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  result = subprocess.run(command, capture_output=True, text=True, timeout=400)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resumed from step" in result.stderr
  got, want = step_records(workdir), step_records(reference_dir)
  assert sorted(got) == sorted(want)
  for step in want:  # bitwise on CPU, and the same bucket at every step
    assert (got[step]["bucket"], got[step]["loss"]) == (want[step]["bucket"], want[step]["loss"]), step


def test_dry_run_plans_the_largest_bucket_of_the_set(capsys):
  from dreambooth_jax.training import run
  # sides 16..48: 16x48, 32x32, 48x16; the square holds the most pixels (the bucketed run's 32x32 step, so the
  # session's compilation cache has it)
  step = run.dry_run(fast_config(*BUCKETED, "max_bucket_reso=48"))
  assert list(step.fns) == [(32, 32)] and "largest bucket 32x32 (HxW) of 3" in capsys.readouterr().out
