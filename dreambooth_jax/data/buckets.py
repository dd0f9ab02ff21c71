"""Aspect-ratio buckets (kohya-ss sd-scripts' settings and rules), as a small closed set of shapes.

config.enable_bucket: every image goes to the bucket (H, W) of nearest aspect ratio among kohya's
make_bucket_resolutions(resolution^2 area, min_bucket_reso, max_bucket_reso, bucket_reso_steps), is resized to cover
it and cropped (centred, or at random with center_crop=False: kohya's random_crop). Sizes are (height, width)
everywhere here except in make_bucket_resolutions, which returns kohya's (width, height) list unchanged.

Batches (BucketIterator) come from one bucket at a time and are always full: each epoch, a bucket's images are
permuted and its last batch is filled by repeating that permutation from its start; the batches of all buckets are
then shuffled. Both permutations are functions of (seed, epoch), and the iterator's state is (epoch, step), so a
resumed run repeats the bucket order exactly. Every micro-batch of one step (gradient accumulation) shares the
step's bucket: one compiled step per bucket. Class images (prior preservation) are assigned among the buckets in use
and each step's class examples are drawn from its bucket (ClassBucketIterator).
"""

import math

import numpy as np

from dreambooth_jax.data import images as data_lib


def make_bucket_resolutions(max_reso: tuple[int, int], min_size: int = 256, max_size: int = 1024,
                            divisible: int = 64) -> list[tuple[int, int]]:
  """kohya's bucket list: sorted (width, height) pairs of about max_reso's area, sides multiples of `divisible`."""
  max_area = max_reso[0] * max_reso[1]
  resos = {(int(math.sqrt(max_area) // divisible) * divisible,) * 2}
  width = min_size
  while width <= max_size:
    height = min(max_size, int((max_area // width) // divisible) * divisible)
    if height >= min_size:
      resos.update({(width, height), (height, width)})
    width += divisible
  return sorted(resos)


def check_settings(config, size_multiple: int | None = None):
  """Refuses, by key, bucket settings that cannot give valid buckets (before any work); with the model's
  size_multiple (Pipeline.size_multiple), also a bucket_reso_steps the model cannot take."""
  if not config.get("enable_bucket"):
    return
  if config.get("validation_loss"):
    raise ValueError("validation_loss=True with enable_bucket=True: the validation loss's fixed set is square only "
                     "for now; turn one of them off")
  res, lo, hi, step = config.resolution, config.min_bucket_reso, config.max_bucket_reso, config.bucket_reso_steps
  if step <= 0:
    raise ValueError(f"bucket_reso_steps={step}: must be positive (64 as kohya)")
  for key, value in (("min_bucket_reso", lo), ("max_bucket_reso", hi)):
    if value <= 0 or value % step:
      raise ValueError(f"{key}={value}: must be a positive multiple of bucket_reso_steps={step} (e.g. "
                       f"{max(step, round(value / step) * step)})")
  if lo > hi:
    raise ValueError(f"min_bucket_reso={lo} is larger than max_bucket_reso={hi}")
  if res > 0 and not lo <= res <= hi:
    raise ValueError(f"resolution={res} is outside [min_bucket_reso={lo}, max_bucket_reso={hi}]; the buckets hold "
                     "about resolution^2 pixels, so it must lie between them")
  if size_multiple is not None and step % size_multiple:
    raise ValueError(f"bucket_reso_steps={step}: this model takes image sizes in multiples of {size_multiple}; use "
                     f"a multiple of it (e.g. {max(size_multiple, round(step / size_multiple) * size_multiple)})")


def bucket_set(config) -> list[tuple[int, int]]:
  """All (H, W) buckets of the config, in kohya's order (by width, then height)."""
  resos = make_bucket_resolutions((config.resolution, config.resolution), config.min_bucket_reso,
                                  config.max_bucket_reso, config.bucket_reso_steps)
  return [(h, w) for w, h in resos]


def choices(config) -> list[tuple[int, int]] | None:
  """The config's (H, W) buckets, None when bucketing is off."""
  return bucket_set(config) if config.get("enable_bucket") else None


def select_bucket(height: int, width: int, buckets) -> tuple[int, int]:
  """kohya's choice: the image's own size if it is a bucket, else the first bucket of nearest aspect (w / h)."""
  buckets = [tuple(b) for b in buckets]
  if (height, width) in buckets:
    return (height, width)
  errors = np.abs(np.array([w / h for h, w in buckets]) - width / height)
  return buckets[int(errors.argmin())]


def largest(buckets) -> tuple[int, int]:
  """The bucket the memory plan checks: the most pixels (the taller on a tie)."""
  return max((tuple(b) for b in buckets), key=lambda b: (b[0] * b[1], b[0]))


def cover_size(height: int, width: int, bucket) -> tuple[int, int]:
  """(h, w) of the image resized to cover the bucket, as kohya rounds it (the side that fits is exact)."""
  bucket_h, bucket_w = bucket
  scale = bucket_h / height if width / height > bucket_w / bucket_h else bucket_w / width
  return max(bucket_h, int(height * scale + 0.5)), max(bucket_w, int(width * scale + 0.5))


def name(bucket) -> str:
  return f"{bucket[0]}x{bucket[1]}"


def class_image_quotas(instance_buckets, num_class_images: int) -> dict[tuple[int, int], int]:
  """Class images to generate per bucket in use, in proportion to its instance images (largest remainder), at
  least one per bucket."""
  used = sorted(set(map(tuple, instance_buckets)))
  counts = np.array([sum(1 for b in instance_buckets if tuple(b) == u) for u in used], np.float64)
  total = max(num_class_images, len(used))
  exact = counts / counts.sum() * total
  quotas = np.maximum(np.floor(exact).astype(int), 1)
  for i in np.argsort(-(exact - np.floor(exact)), kind="stable")[:max(0, total - quotas.sum())]:
    quotas[i] += 1
  return {u: int(q) for u, q in zip(used, quotas)}


def _members(images: data_lib.SubjectImages, bucket) -> np.ndarray:
  return np.array([i for i, b in enumerate(images.buckets) if b == tuple(bucket)], np.int64)


class _Slicer:
  """The common part: this process's rows of a step of `micro_batches` global micro-batches."""

  def __init__(self, images, batch_size_per_process, micro_batches, *, seed, center_crop, random_flip,
               process_index, process_count, with_pixels):
    self.images, self.local, self.micro = images, batch_size_per_process, micro_batches
    self.seed, self.center_crop, self.random_flip, self.with_pixels = seed, center_crop, random_flip, with_pixels
    self.process_index, self.process_count = process_index, process_count
    self.global_batch = batch_size_per_process * process_count
    self.per_step = micro_batches * self.global_batch

  def _batch(self, indices, rng_key) -> dict:
    """indices: the step's global example list; rows: micro-batch-major, this process's slice of each."""
    rows, slots = [], []
    for a in range(self.micro):
      for k in range(self.local):
        slot = self.process_index * self.local + k
        position = a * self.global_batch + slot
        rng = np.random.default_rng((*rng_key, position, 1))
        rows.append((int(indices[position]), *data_lib.make_example(
            self.images, int(indices[position]), rng, self.center_crop, self.random_flip)))
        slots.append(slot)
    return data_lib.rows_to_batch(self.images, rows, np.array(slots, np.int32), self.with_pixels)


class BucketIterator(_Slicer):
  """Infinite, deterministic steps of instance examples, one bucket per step: yields (bucket, rows)."""

  def __init__(self, images, batch_size_per_process, micro_batches, *, seed, center_crop=True, random_flip=False,
               process_index=0, process_count=1, with_pixels=True):
    super().__init__(images, batch_size_per_process, micro_batches, seed=seed, center_crop=center_crop,
                     random_flip=random_flip, process_index=process_index, process_count=process_count,
                     with_pixels=with_pixels)
    self.buckets = sorted(set(images.buckets))
    self.epoch, self.step = 0, 0
    self._plan_epoch = None

  def epoch_plan(self, epoch: int) -> list[tuple[tuple[int, int], np.ndarray]]:
    if self._plan_epoch != epoch:
      chunks = []
      for bucket in self.buckets:
        members = _members(self.images, bucket)
        if self.images.repeats:  # kohya's num_repeats (config.concepts): each image that many times an epoch
          members = np.repeat(members, [self.images.repeats[i] for i in members])
        members = members[np.random.default_rng((self.seed, epoch, *bucket)).permutation(len(members))]
        filled = np.resize(members, -(-len(members) // self.per_step) * self.per_step)  # repeats from the start
        chunks += [(bucket, filled[k:k + self.per_step]) for k in range(0, len(filled), self.per_step)]
      order = np.random.default_rng((self.seed, epoch)).permutation(len(chunks))
      self._plan, self._plan_epoch = [chunks[i] for i in order], epoch
    return self._plan

  def __iter__(self):
    return self

  def __next__(self):
    bucket, indices = self.epoch_plan(self.epoch)[self.step]
    batch = self._batch(indices, (self.seed, self.epoch, self.step))
    if self.images.concepts is not None:  # the whole step's, micro-batch-major: what class examples pair with
      self.global_concepts = [self.images.concepts[int(i)] for i in indices]
    self.step += 1
    if self.step == len(self.epoch_plan(self.epoch)):
      self.epoch, self.step = self.epoch + 1, 0
    return bucket, batch

  def get_state(self) -> dict:
    return {"epoch": self.epoch, "step": self.step, "seed": self.seed}

  def set_state(self, state: dict):
    if state.get("seed", self.seed) != self.seed or "step" not in state:
      raise ValueError(f"data iterator state {state} is not a bucketed state of seed {self.seed} (was the run "
                       "started with other enable_bucket or seed settings?)")
    self.epoch, self.step = int(state["epoch"]), int(state["step"])


class ClassBucketIterator(_Slicer):
  """Class examples of a given bucket: per bucket, the concatenation of permutations of its images drawn from
  (seed, bucket, epoch); the state is each bucket's position."""

  def __init__(self, images, batch_size_per_process, micro_batches, *, seed, center_crop=True, random_flip=False,
               process_index=0, process_count=1, with_pixels=True):
    super().__init__(images, batch_size_per_process, micro_batches, seed=seed, center_crop=center_crop,
                     random_flip=random_flip, process_index=process_index, process_count=process_count,
                     with_pixels=with_pixels)
    self.positions = {name(b): 0 for b in sorted(set(images.buckets))}

  def next_for(self, bucket) -> dict:
    members = _members(self.images, bucket)
    if not len(members):
      raise ValueError(f"no class image in bucket {name(bucket)}")
    start, n = self.positions[name(bucket)], len(members)
    indices = [members[np.random.default_rng((self.seed, *bucket, j // n)).permutation(n)[j % n]]
               for j in range(start, start + self.per_step)]
    self.positions[name(bucket)] = start + self.per_step
    return self._batch(indices, (self.seed, *bucket, start))

  def get_state(self) -> dict:
    return {"positions": dict(self.positions), "seed": self.seed}

  def set_state(self, state: dict):
    if state.get("seed", self.seed) != self.seed or "positions" not in state:
      raise ValueError(f"class data iterator state {state} is not a bucketed state of seed {self.seed}")
    self.positions.update({k: int(v) for k, v in state["positions"].items()})
