"""Global training batches: instance + class examples, cached VAE posteriors and text embeddings, sharded.

Each process draws only its slice of the global batch (data.SubjectIterator) and the global arrays are formed with
jax.make_array_from_process_local_data. With center crops an example is fully determined by (image, flip), so the
frozen VAE's posterior (mean, std) is computed once per variant and the per-step latent sample is drawn inside the
train step; with a frozen text encoder the embeddings of each distinct caption are computed once too.

With config.enable_bucket (data/buckets.py) each step's examples share one bucket (H, W): `bucket` after next_batch
says which, so the run calls that bucket's compiled step; the posteriors are cached per image at its bucket's size.
"""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from dreambooth_jax import sharding as sharding_lib
from dreambooth_jax.data import buckets as buckets_lib, concepts as concepts_lib, hf_datasets, images as data_lib
from dreambooth_jax.sampling import sampler

BUNDLED_DOG = pathlib.Path(__file__).resolve().parents[1] / "assets" / "dog"


def trains_text_encoder(config) -> bool:
  """Whether the text encoders get gradients: fully (train_text_encoder) or through LoRA factors."""
  lora = config.get("lora")
  return bool(config.train_text_encoder or (lora and lora.get("enabled") and lora.get("text_encoder")))


def caches_latents(config) -> bool:
  """VAE posteriors are computed once per (image, flip) when crops are centred: a sample is then fully
  determined by (image, flip)."""
  return bool(config.cache_latents and config.center_crop)


def caches_text(config) -> bool:
  """Text embeddings are computed once when the text encoders are frozen (and caching is on)."""
  return bool(config.cache_latents) and not trains_text_encoder(config)


def uses_base_output(config) -> bool:
  """Prior preservation whose class examples are the instance images with the class prompt, their target the base
  model's prediction (training/step.py): no class images."""
  return bool(config.with_prior_preservation and config.prior_preservation == "base_output")


def uses_class_images(config) -> bool:
  return bool(config.with_prior_preservation and not uses_base_output(config))


def global_batch_size(config) -> int:
  """Examples per micro-batch over all processes: the instance examples, and as many class examples."""
  return config.train_batch_size * (2 if config.with_prior_preservation else 1)


def describe_batch(config) -> str:
  return (f"the global batch of {global_batch_size(config)} examples (train_batch_size={config.train_batch_size}"
          f"{' x 2 with prior preservation' if config.with_prior_preservation else ''})")


def batch_schema(config, pipe, bucket: tuple[int, int] | None = None) -> dict:
  """The one definition of a micro-batch: {key: (per-example shape, dtype)}. TrainData yields these keys (with
  leading (accumulation, example) axes), the memory plan and the AOT compile build abstract batches from it, and
  the train step reads them.

    prior (), slot ()                      class-example flag; position in the step's batch (the noise key)
    latent_mean, latent_std (h, w, C)      the frozen VAE's cached posterior  | pixels (H, W, 3) in [-1, 1]
    the family's TEXT_KEYS (cached)        | its ID_KEYS (token ids, when a text encoder runs in the step)
    the family's image conditioning        (SDXL's time ids)
    mask (h, w, 1)                         with masked_loss: the loss mask on the latent grid (class examples: ones)
    concept () int32                       with config.concepts: the example's concept (a class example: its
                                           paired instance example's), which weights its prior term

  (H, W) is the bucket's, or the square resolution; (h, w) = (H/f, W/f), f the VAE's factor.
  """
  family = pipe.family
  height, width = bucket or (config.resolution, config.resolution)
  factor = family.latent_factor(pipe.configs)
  schema = {"prior": ((), jnp.float32), "slot": ((), jnp.int32)}
  if caches_latents(config):
    latent = (height // factor, width // factor, pipe.configs["vae"]["latent_channels"])
    schema.update(latent_mean=(latent, jnp.float32), latent_std=(latent, jnp.float32))
  else:
    schema["pixels"] = ((height, width, 3), jnp.float32)
  schema.update(family.text_spec(pipe) if caches_text(config) else family.ids_spec(pipe))
  schema.update(family.image_conditioning_spec(pipe))
  if config.masked_loss:
    schema["mask"] = ((height // factor, width // factor, 1), jnp.float32)
  if config.get("concepts"):
    schema["concept"] = ((), jnp.int32)
  return schema


def batch_spec(config, pipe, mesh, bucket: tuple[int, int] | None = None) -> dict:
  """ShapeDtypeStructs (with shardings) of the batches TrainData.next_batch yields for this config (and bucket)."""
  accum, batch = config.gradient_accumulation_steps, global_batch_size(config)
  sharding = sharding_lib.accumulation_batch_sharding(mesh, batch)
  return {k: jax.ShapeDtypeStruct((accum, batch, *shape), dtype, sharding=sharding)
          for k, (shape, dtype) in batch_schema(config, pipe, bucket).items()}


DATASET_DEFAULTS = {"image_column": "image", "caption_column": "", "dataset_split": "train"}


def check_instance_source(config):
  """Refuses, by key, instance settings that contradict each other: the images come from instance_data_dir or
  dataset_name, and the dataset's keys mean nothing without a dataset."""
  if config.dataset_name and config.instance_data_dir:
    raise ValueError(f"dataset_name={config.dataset_name!r} and instance_data_dir={config.instance_data_dir!r} are "
                     "both set: the instance images come from one of them; set the other to ''")
  if not config.dataset_name:
    for key, default in DATASET_DEFAULTS.items():
      if config[key] != default:
        raise ValueError(f"{key}={config[key]!r} is set but dataset_name is '': it applies to Hugging Face datasets "
                         f"only; set dataset_name or leave {key} at {default!r}")


def load_instance_images(config, concepts: list[concepts_lib.Concept] | None = None) -> data_lib.SubjectImages:
  """The instance photos (each in its bucket when bucketing): the run reads them before compiling, to know the
  buckets in use. With config.concepts, all concepts' photos (data/concepts.py). concepts: config.concepts as the
  caller resolved them (concepts.resolve), else resolved here."""
  concepts = concepts_lib.resolve(config) if concepts is None else concepts
  if concepts:
    return concepts_lib.load_instance_images(config, concepts)
  check_instance_source(config)
  if config.dataset_name:
    return hf_datasets.load_dataset_images(
        config.dataset_name, split=config.dataset_split, image_column=config.image_column,
        caption_column=config.caption_column, resolution=config.resolution, default_caption=config.instance_prompt,
        on_bad_image=config.on_bad_image, buckets=buckets_lib.choices(config), masks=config.masked_loss)
  return _load_images("instance_data_dir", pathlib.Path(config.instance_data_dir or BUNDLED_DOG), config.resolution,
                      config.instance_prompt, config.on_bad_image, buckets_lib.choices(config), config.masked_loss)


def used_buckets(config, instance: data_lib.SubjectImages) -> list[tuple[int, int]]:
  """The shapes the run trains at: the instance images' buckets, or the one square."""
  return sorted(set(instance.buckets)) if instance.buckets else [(config.resolution, config.resolution)]


@nnx.jit
def _encode(vae, pixels_BHWC):
  return vae.encode(pixels_BHWC)


def _load_images(key: str, folder, resolution: int, caption: str, on_bad_image: str, buckets=None,
                 masks: bool = False):
  try:
    return data_lib.load_subject_images(folder, resolution, caption, on_bad_image=on_bad_image, buckets=buckets,
                                        masks=masks)
  except FileNotFoundError as e:  # the key to change, for the CLI's one-line error
    raise FileNotFoundError(f"{key}: {e}") from None


def host_data(config, workdir, instance=None, process_index: int = 0, process_count: int = 1,
              with_pixels: bool = False, concepts: list[concepts_lib.Concept] | None = None
              ) -> tuple[dict, dict, list[str]]:
  """({set name: SubjectImages}, {set name: iterator}, concept names) of this process: the instance photos (given,
  or loaded) and the class set, no model needed. Concept names are [] for the single-subject shorthand. concepts:
  as load_instance_images'."""
  concepts = concepts_lib.resolve(config) if concepts is None else concepts
  local = config.train_batch_size // process_count
  sets = {"instance": instance or load_instance_images(config, concepts)}
  settings = dict(center_crop=config.center_crop, random_flip=config.random_flip, process_index=process_index,
                  process_count=process_count, with_pixels=with_pixels)
  bucketed = sets["instance"].buckets is not None
  if concepts:  # class examples paired per concept (data/concepts.py), and per bucket when bucketed
    if bucketed:
      iterators = {"instance": buckets_lib.BucketIterator(sets["instance"], local, config.gradient_accumulation_steps,
                                                          seed=config.seed, **settings)}
    else:
      iterators = {"instance": data_lib.SubjectIterator(sets["instance"], local, seed=config.seed, **settings)}
    if config.with_prior_preservation:
      sets["class"], groups = concepts_lib.load_class_images(
          config, concepts, workdir, sets["instance"], used_buckets(config, sets["instance"]) if bucketed else None)
      iterators["class"] = concepts_lib.PairedClassIterator(sets["class"], groups, [c.name for c in concepts], local,
                                                            seed=config.seed + 1, **settings)
    return sets, iterators, [c.name for c in concepts]
  if uses_base_output(config):  # drawn on their own: another order than the instance examples'
    photos = sets["instance"]
    sets["class"] = dataclasses.replace(photos, captions=[config.class_prompt] * len(photos.paths))
  elif config.with_prior_preservation:
    class_dir = pathlib.Path(config.class_data_dir or workdir / "class_images")
    sets["class"] = _load_images("class_data_dir", class_dir, config.resolution, config.class_prompt,
                                 config.on_bad_image, used_buckets(config, sets["instance"]) if bucketed else None)
  if bucketed:
    accum = config.gradient_accumulation_steps
    iterators = {"instance": buckets_lib.BucketIterator(sets["instance"], local, accum, seed=config.seed, **settings)}
    if config.with_prior_preservation:
      missing = sorted(set(used_buckets(config, sets["instance"])) - set(sets["class"].buckets))
      if missing:
        raise ValueError(f"class_data_dir={class_dir}: no class image in bucket(s) "
                         f"{[buckets_lib.name(b) for b in missing]}; add some or let the run generate them")
      iterators["class"] = buckets_lib.ClassBucketIterator(sets["class"], local, accum, seed=config.seed + 1,
                                                           **settings)
  else:
    iterators = {name: data_lib.SubjectIterator(images, local, seed=config.seed + k, **settings)
                 for k, (name, images) in enumerate(sets.items())}
  return sets, iterators, []


def bucketed_step(iterators: dict, concepts: bool):
  """(bucket, {"instance": rows, ["class": rows]}) of one bucketed step, all its micro-batches (micro-batch-major):
  class examples of the step's bucket, and with concepts of each paired instance example's concept."""
  bucket, instance = next(iterators["instance"])
  step = {"instance": instance}
  if "class" in iterators:
    step["class"] = (iterators["class"].next_for(iterators["instance"].global_concepts, bucket)
                     if concepts else iterators["class"].next_for(bucket))
  return bucket, step


def paired_examples(iterators: dict) -> dict:
  """One micro-batch of a concepts run: the instance examples, then each one's class example from its concept."""
  examples = {"instance": next(iterators["instance"])}
  if "class" in iterators:
    examples["class"] = iterators["class"].next_for(iterators["instance"].global_concepts)
  return examples


def example_sequence(config, steps: int, workdir) -> list[list[dict]]:
  """Per step, its global batch's examples in order (instance, then class), each {"concept", "path", "caption",
  "flip", "prior"}, as the trainer draws them, without a model or pixels: to compare two configs' batches (a kohya
  TOML and its config.concepts) or count what an epoch holds. One process; concept is "" for the single-subject
  shorthand. Reads the class folders as they are (a run generates the missing class images first)."""
  from dreambooth_jax.training import run_state  # noqa: PLC0415 (run_state builds on this module)
  run_state.resolve_defaults(config)
  sets, iterators, names = host_data(config, pathlib.Path(workdir))
  out = []
  for _ in range(steps):
    if sets["instance"].buckets is not None:  # one draw holds the step's micro-batches
      micro = [bucketed_step(iterators, bool(names))[1]]
    else:
      micro = [paired_examples(iterators) if names else {name: next(it) for name, it in iterators.items()}
               for _ in range(config.gradient_accumulation_steps)]
    out.append([{"concept": names[int(e["concept_B"][k])] if names else "", "path": str(sets[name].paths[i]),
                 "caption": e["caption_B"][k], "flip": bool(e["flip_B"][k]), "prior": name == "class"}
                for step in micro for name, e in step.items() for k, i in enumerate(e["index_B"])])
  return out


class TrainData:
  def __init__(self, config, pipe, mesh, workdir: pathlib.Path, instance: data_lib.SubjectImages | None = None,
               concepts: list[concepts_lib.Concept] | None = None):
    """instance: the already loaded instance images (load_instance_images), else loaded here; concepts: as
    load_instance_images'."""
    self.config, self.mesh = config, mesh
    processes, index = jax.process_count(), jax.process_index()
    if config.train_batch_size % processes:
      raise ValueError(f"train_batch_size={config.train_batch_size} must be a multiple of the process count "
                       f"({processes})")
    self.with_prior = bool(config.with_prior_preservation)
    self.global_batch_size = global_batch_size(config)
    if self.global_batch_size % mesh.shape["data"]:  # run.make_mesh refuses this first, with the levers
      raise ValueError(f"{describe_batch(config)} does not divide over mesh_data={mesh.shape['data']}")
    self.sets, self.iterators, self.concept_names = host_data(config, workdir, instance, index, processes,
                                                              with_pixels=not caches_latents(config),
                                                              concepts=concepts)
    self.buckets = used_buckets(config, self.sets["instance"])
    self.bucketed = self.sets["instance"].buckets is not None
    self.bucket = self.buckets[0]  # the bucket of the last batch (next_batch sets it)
    logging.info("training on %s", {k: len(v.paths) for k, v in self.sets.items()})
    if self.bucketed:
      counts = {buckets_lib.name(b): sum(1 for x in self.sets["instance"].buckets if x == b) for b in self.buckets}
      logging.info("instance images per bucket (HxW): %s", counts)

    self.schema = batch_schema(config, pipe)
    self.latent_factor = pipe.family.latent_factor(pipe.configs)
    self.latents = None
    if caches_latents(config):
      self.latents = {"instance": self._cache_latents(pipe.vae, self.sets["instance"])}
      if "class" in self.sets:  # base_output's class set is the instance photos: the same posteriors
        self.latents["class"] = (self.latents["instance"] if uses_base_output(config)
                                 else self._cache_latents(pipe.vae, self.sets["class"]))
    self.caches_text = caches_text(config)
    self.family, self.tokenizers = pipe.family, pipe.tokenizers
    if self.caches_text:  # the encoded text of each distinct caption, one table row per caption
      captions = sorted({c for images in self.sets.values() for c in images.captions})
      self.caption_rows = {c: i for i, c in enumerate(captions)}
      encoders = {name: pipe.modules[name] for name in pipe.family.TEXT_ENCODERS}
      chunks = [sampler.encode_text(pipe.family, encoders, self.family.tokenize(self.tokenizers, captions[i:i + 16]),
                                    jnp.float32) for i in range(0, len(captions), 16)]
      self.text_table = {k: np.concatenate([np.asarray(c[k]) for c in chunks]) for k in self.family.TEXT_KEYS}

  def _cache_latents(self, vae, images) -> dict:
    """Posterior mean/std per image: arrays (2, h, w, C) (unflipped, flipped) at the image's own size; with masks,
    the loss mask on the latent grid the same way, (2, h, w, 1)."""
    means, stds, masks = [], [], []
    for i in range(len(images.paths)):
      pixels = np.stack([data_lib.center_crop_pixels(images, i, flip) for flip in (False, True)])
      mean, std = _encode(vae, pixels)
      means.append(np.asarray(mean))
      stds.append(np.asarray(std))
      if images.masks is not None:
        masks.append(np.stack([data_lib.latent_mask(data_lib.center_crop_mask(images, i, flip), self.latent_factor)
                               for flip in (False, True)]))
    return {"mean": means, "std": stds, **({"mask": masks} if images.masks is not None else {})}

  def _part(self, name: str, example: dict, offset: int, size: tuple[int, int]) -> dict:
    """An iterator's examples of set `name` as batch_schema arrays; slots start at `offset`; size: the (H, W)
    trained at (SDXL's target-size conditioning)."""
    part = {"prior": np.full(len(example["index_B"]), name == "class", np.float32),
            "slot": example["slot_B"] + offset}
    if self.concept_names:
      part["concept"] = example["concept_B"]
    if self.latents is not None:
      table = self.latents[name]
      rows = list(zip(example["index_B"], example["flip_B"].astype(np.int32)))
      part["latent_mean"] = np.stack([table["mean"][i][f] for i, f in rows])
      part["latent_std"] = np.stack([table["std"][i][f] for i, f in rows])
    else:
      part["pixels"] = example["pixels_BHWC"]
    if "mask" in self.schema:
      part["mask"] = self._masks(name, example, size)
    part.update(self.family.training_image_conditioning(example["original_size_B2"], example["crop_top_left_B2"],
                                                        size))
    if self.caches_text:
      rows = [self.caption_rows[c] for c in example["caption_B"]]
      part.update({k: table[rows] for k, table in self.text_table.items()})
    else:
      part.update(self.family.tokenize(self.tokenizers, list(example["caption_B"])))
    return part

  def _masks(self, name: str, example: dict, size: tuple[int, int]) -> np.ndarray:
    """The examples' loss masks on the latent grid, (B, h, w, 1). Class examples get all ones: generated class
    images have no masks, and base_output preserves the base model over the whole image."""
    factor = self.latent_factor
    if name == "class":
      return np.ones((len(example["index_B"]), size[0] // factor, size[1] // factor, 1), np.float32)
    if self.latents is not None:  # cached with the posteriors, per (image, flip)
      table = self.latents[name]["mask"]
      return np.stack([table[i][f] for i, f in zip(example["index_B"], example["flip_B"].astype(np.int32))])
    return np.stack([data_lib.latent_mask(m, factor) for m in example["mask_BHW"]])

  def fixed_examples(self, name: str, count: int, first_slot: int = 0) -> dict:
    """`count` examples of set `name` (all of it, or a seeded choice), centre-cropped, not flipped, whatever the
    training's crop and flip settings, with slots first_slot, first_slot + 1, ...: the validation loss's. Square
    runs only (buckets.check_settings refuses validation_loss with buckets)."""
    once = dataclasses.replace(self.sets[name], repeats=None)  # each image once, whatever its num_repeats
    it = data_lib.SubjectIterator(once, count, seed=self.config.seed, center_crop=True,
                                  random_flip=False, process_index=0, process_count=1,
                                  with_pixels=self.latents is None)
    return self._part(name, next(it), first_slot, (self.config.resolution, self.config.resolution))

  def _step_examples(self) -> list[dict]:
    """Per micro-batch, {set name: this process's examples}: each step's examples share one bucket."""
    accum = self.config.gradient_accumulation_steps
    if not self.bucketed:
      if self.concept_names:
        return [paired_examples(self.iterators) for _ in range(accum)]
      return [{name: next(it) for name, it in self.iterators.items()} for _ in range(accum)]
    self.bucket, step = bucketed_step(self.iterators, bool(self.concept_names))
    local = len(step["instance"]["index_B"]) // accum
    return [{name: {k: v[a * local:(a + 1) * local] for k, v in examples.items()} for name, examples in step.items()}
            for a in range(self.config.gradient_accumulation_steps)]

  def _local_micro_batch(self, micro: int, examples: dict) -> dict:
    parts = []
    for name, example in examples.items():
      # slot: the example's position in the step's whole batch (its noise key), across micro-batches
      offset = micro * self.global_batch_size + (self.config.train_batch_size if name == "class" else 0)
      parts.append(self._part(name, example, offset, self.bucket))
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if set(batch) != set(self.schema):  # one schema: what the step was compiled for
      raise AssertionError(f"batch keys {sorted(batch)} differ from the schema {sorted(self.schema)}")
    return batch

  def next_batch(self) -> dict:
    """The next step's global batch; self.bucket is then its (H, W)."""
    micro = [self._local_micro_batch(a, examples) for a, examples in enumerate(self._step_examples())]
    local = {k: np.stack([m[k] for m in micro]) for k in micro[0]}
    sharding = sharding_lib.accumulation_batch_sharding(self.mesh, self.global_batch_size)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}

  def get_state(self) -> dict:
    return {name: it.get_state() for name, it in self.iterators.items()}

  def set_state(self, state: dict):
    for name, it in self.iterators.items():
      it.set_state(state[name])
