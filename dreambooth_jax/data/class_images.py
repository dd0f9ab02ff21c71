"""Prior-preservation class images: generated once by the frozen model, resumable, reproducible.

Image i is `class_{i:05d}.png`, drawn from the key fold_in(seed, i): an interrupted generation loses only the
batch in flight, and a re-run generates exactly the missing indices, bit-identical to an uninterrupted run.
Images already in the folder from elsewhere count towards `num_class_images` and are used as they are.

With aspect-ratio buckets (ensure_bucketed_class_images) each bucket in use gets its share of num_class_images, in
proportion to its instance images, generated at its size as `class_{H}x{W}_{i:05d}.png` (same resumable rule per
bucket); images from elsewhere count towards the bucket of their aspect ratio.
"""

import dataclasses
import json
import logging
import os
import pathlib

import jax
import numpy as np
from PIL import Image

from dreambooth_jax.sampling import sampler as sampling
from dreambooth_jax.data import buckets as buckets_lib
from dreambooth_jax.data.images import IMAGE_EXTENSIONS, open_image

GENERATED_PREFIX = "class_"
RECORD = "class_images.json"


def generated_name(index: int, prefix: str = GENERATED_PREFIX) -> str:
  return f"{prefix}{index:05d}.png"


def _image_files(class_dir: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.stat().st_size > 0)


def missing_indices(class_dir: pathlib.Path, num_class_images: int, prefix: str = GENERATED_PREFIX,
                    foreign: int | None = None) -> list[int]:
  """Indices still to generate: our own files (`prefix`) count by index, anything else in the folder counts once
  (or `foreign` images count, when given)."""
  files = _image_files(class_dir)
  if foreign is None:
    foreign = sum(1 for p in files if not p.name.startswith(GENERATED_PREFIX))
  ours = {p.name for p in files if p.name.startswith(prefix)}
  return [i for i in range(max(0, num_class_images - foreign)) if generated_name(i, prefix) not in ours]


def write_png(image, path: pathlib.Path):
  """Atomic write: a kill mid-write leaves no truncated image that a re-run would count as done."""
  tmp = path.with_name(f".{path.name}.tmp")
  Image.fromarray(image).save(tmp, format="PNG")
  os.replace(tmp, path)


def ensure_class_images(pipe, class_dir, class_prompt: str, num_class_images: int, *, seed: int,
                        settings: sampling.SamplerSettings, batch_size: int, mesh=None,
                        negative_prompt: str = "", prefix: str = GENERATED_PREFIX, foreign: int | None = None) -> int:
  """Generates the missing class images into class_dir; returns how many were generated. prefix/foreign: see
  missing_indices (one bucket's files)."""
  class_dir = pathlib.Path(class_dir)
  class_dir.mkdir(parents=True, exist_ok=True)
  record_path = class_dir / (RECORD if prefix == GENERATED_PREFIX else f"{prefix}images.json")
  record = {"class_prompt": class_prompt, "seed": seed, "steps": settings.steps, "guidance": settings.guidance,
            "height": settings.height, "width": settings.width, "negative_prompt": negative_prompt}
  if record_path.is_file():
    previous = json.loads(record_path.read_text())
    if previous != record:
      logging.warning("%s: class images were generated with %s; generating the missing ones with %s",
                      class_dir, previous, record)
  _barrier("class images: listed")  # no process lists the folder while process 0 already writes into it
  todo = missing_indices(class_dir, num_class_images, prefix, foreign)
  _barrier("class images: listed")
  if not todo:
    logging.info("%s: all %d class images present", class_dir, num_class_images)
    return 0
  primary = jax.process_index() == 0
  if primary:
    record_path.write_text(json.dumps(record, indent=2))
  logging.info("generating %d class images for %r into %s", len(todo), class_prompt, class_dir)
  done = 0
  for indices, images in sampling.generate_all(pipe, [class_prompt] * len(todo), indices=todo, seed=seed,
                                               batch_size=batch_size, settings=settings,
                                               negative_prompt=negative_prompt, mesh=mesh):
    if primary:  # one writer; every process computed its shard of the batch
      for i, image in zip(indices, images):
        write_png(image, class_dir / generated_name(i, prefix))
    done += len(indices)
    logging.info("class images: %d/%d", done, len(todo))
  _barrier("class images: written")  # the other processes read them next
  return done


def ensure_bucketed_class_images(pipe, class_dir, class_prompt: str, num_class_images: int, *, instance_buckets,
                                 seed: int, settings: sampling.SamplerSettings, batch_size: int, mesh=None) -> int:
  """Per bucket in use (instance_buckets: each instance image's (H, W)), its share of num_class_images at its size;
  returns how many were generated."""
  class_dir = pathlib.Path(class_dir)
  class_dir.mkdir(parents=True, exist_ok=True)
  quotas = buckets_lib.class_image_quotas(instance_buckets, num_class_images)
  foreign = dict.fromkeys(quotas, 0)
  for path in _image_files(class_dir):
    if not path.name.startswith(GENERATED_PREFIX):
      image = open_image(path)
      foreign[buckets_lib.select_bucket(image.height, image.width, list(quotas))] += 1
  done = 0
  for bucket, quota in quotas.items():
    # a seed of its own per bucket: the same key at another shape would start from correlated noise
    bucket_seed = int(np.random.default_rng((seed, *bucket)).integers(2**31))
    done += ensure_class_images(
        pipe, class_dir, class_prompt, quota, seed=bucket_seed,
        settings=dataclasses.replace(settings, height=bucket[0], width=bucket[1]), batch_size=batch_size,
        mesh=mesh, prefix=f"{GENERATED_PREFIX}{buckets_lib.name(bucket)}_", foreign=foreign[bucket])
  return done


def _barrier(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    multihost_utils.sync_global_devices(name)
