"""Several subjects in one run (config.concepts): the entries, their checks, their images and class images.

An entry names one subject: its images (`instance_data_dir`), captions, class images and how often its images come
per epoch (`num_repeats`, as kohya). Missing keys take the top-level key of the same name (INHERITED), or the
entry's own default (ENTRY_DEFAULTS). An empty list is the single-subject shorthand: the top-level keys, today's
behaviour and metrics bit for bit; everything here then stays out of the way.

The instance images of all concepts are one SubjectImages whose `concepts` say whose each image is; the class
examples are drawn per concept (PairedClassIterator): the class example paired with an instance example of concept c
is the next of c's own class sequence, so each concept's prior term uses its own class images.
"""

import dataclasses
import difflib
import pathlib

import numpy as np

from dreambooth_jax.data import buckets as buckets_lib, images as data_lib

# key -> its default when neither the entry nor the top level sets it; None = required
ENTRY_DEFAULTS = {
    "name": None,
    "instance_data_dir": "",  # a folder; exactly one of instance_data_dir / dataset_name, never inherited
    "dataset_name": "",  # a Hugging Face dataset (hub id, save_to_disk folder, imagefolder)
    "image_column": "image",
    "caption_column": "",  # "" = no caption column: instance_prompt
    "dataset_split": "train",
    "instance_prompt": "",
    "caption_extension": "",  # e.g. ".txt": NAME.txt beside NAME.jpg is its caption (kohya)
    "class_prompt": "",
    "class_data_dir": "",  # "" = WORKDIR/class_images/<name> (not the top-level class_data_dir: one per concept)
    "num_class_images": 0,
    "num_repeats": 1,
    "prior_loss_weight": 1.0,
    "validation_prompt": "",  # "" = none for this concept (the top-level validation_prompt is its own grid)
}
# entry keys whose default is the top-level key of the same name (when the top level has it)
INHERITED = ("image_column", "caption_column", "dataset_split", "instance_prompt", "caption_extension", "class_prompt",
             "num_class_images", "prior_loss_weight")


@dataclasses.dataclass(frozen=True)
class Concept:
  name: str
  instance_data_dir: str
  dataset_name: str
  image_column: str
  caption_column: str
  dataset_split: str
  instance_prompt: str
  caption_extension: str
  class_prompt: str
  class_data_dir: str
  num_class_images: int
  num_repeats: int
  prior_loss_weight: float
  validation_prompt: str

  def class_dir(self, workdir) -> pathlib.Path:
    return pathlib.Path(self.class_data_dir or pathlib.Path(workdir) / "class_images" / self.name)


def unknown_entry_keys(concepts) -> list[str]:
  """'concepts[1].nmae' for each key of an entry that is not an entry key (config_files names them)."""
  return [f"concepts[{i}].{key}" for i, entry in enumerate(concepts or ()) if isinstance(entry, dict)
          for key in entry if key not in ENTRY_DEFAULTS]


def nearest_entry_key(key: str) -> str | None:
  near = difflib.get_close_matches(key, list(ENTRY_DEFAULTS), n=1, cutoff=0.6)
  return near[0] if near else None


def _where(i: int, entry) -> str:
  name = entry.get("name") if isinstance(entry, dict) else None
  return f"concepts[{i}]" + (f" ({name})" if name else "")


def _check_type(where: str, key: str, value, kind):
  ok = isinstance(value, (int, float) if kind is float else kind) and not (kind in (int, float) and
                                                                      isinstance(value, bool))
  if not ok:
    raise ValueError(f"{where}: {key}={value!r}: expected {'a number' if kind is float else kind.__name__}")


def resolve(config, check: bool = True) -> list[Concept]:
  """config.concepts as Concepts (defaults filled, every entry checked), [] for the single-subject shorthand. Each
  refusal names concepts[i], the concept and the key. check: also refuse settings that do not go with concepts."""
  entries = list(config.get("concepts") or ())
  concepts = []
  for i, entry in enumerate(entries):
    where = _where(i, entry)
    if not isinstance(entry, dict):
      raise ValueError(f"{where}: expected a dict of concept settings (name, instance_data_dir, ...), got {entry!r}")
    unknown = [k for k in entry if k not in ENTRY_DEFAULTS]
    if unknown:
      near = nearest_entry_key(unknown[0])
      raise ValueError(f"{where}: unknown key {unknown[0]!r}" + (f" (did you mean {near}?)" if near else "")
                       + f"; the keys are {', '.join(ENTRY_DEFAULTS)}")
    values = {}
    for key, default in ENTRY_DEFAULTS.items():
      if key in entry:
        values[key] = entry[key]
      elif key in INHERITED and key in config:
        values[key] = config[key]
      elif default is None:
        raise ValueError(f"{where}: {key} is required")
      else:
        values[key] = default
    for key, default in ENTRY_DEFAULTS.items():
      _check_type(where, key, values[key], str if default is None else type(default))
    name = values["name"]
    if not name.strip() or "/" in name:
      raise ValueError(f"{where}: name={name!r}: must be non-empty, without '/' (it names metrics and a folder)")
    if bool(values["instance_data_dir"]) == bool(values["dataset_name"]):
      raise ValueError(f"{where}: give exactly one of instance_data_dir and dataset_name (got "
                       f"instance_data_dir={values['instance_data_dir']!r}, dataset_name={values['dataset_name']!r})")
    if values["dataset_name"] and values["caption_extension"]:
      raise ValueError(f"{where}: caption_extension={values['caption_extension']!r} with dataset_name: a dataset's "
                       "captions come from its caption_column; set caption_extension to ''")
    if values["num_repeats"] < 1:
      raise ValueError(f"{where}: num_repeats={values['num_repeats']}: must be >= 1 (each image's appearances per "
                       "epoch)")
    if values["num_class_images"] < 0 or values["prior_loss_weight"] < 0:
      key = "num_class_images" if values["num_class_images"] < 0 else "prior_loss_weight"
      raise ValueError(f"{where}: {key}={values[key]}: must be >= 0")
    if values["caption_extension"] and not values["caption_extension"].startswith("."):
      raise ValueError(f"{where}: caption_extension={values['caption_extension']!r}: must start with '.' (e.g. "
                       "'.txt')")
    values["prior_loss_weight"] = float(values["prior_loss_weight"])
    concepts.append(Concept(**values))
  names = [c.name for c in concepts]
  for i, name in enumerate(names):
    if name in names[:i]:
      raise ValueError(f"concepts[{i}] ({name}): name={name!r} is also concepts[{names.index(name)}]'s; names must "
                       "be unique (they key the metrics and class folders)")
  if concepts and check:
    _check_combinations(config, concepts)
  return concepts


def _check_combinations(config, concepts: list[Concept]):
  for key in ("instance_data_dir", "dataset_name", "class_data_dir"):  # per concept: never silently ignored
    if config.get(key):
      raise ValueError(f"{key}={config[key]!r} with concepts: each concept names its own ({key} in its entry); "
                       f"set the top-level {key} to ''")
  if config.get("eval_steps"):
    raise ValueError("concepts with eval_steps: the paper's metrics compare samples to one subject's photos; turn "
                     "eval_steps off (validation images and the validation loss work per run)")
  by_dir = {}
  for i, concept in enumerate(concepts):
    if concept.class_data_dir:
      first = by_dir.setdefault(concept.class_data_dir, (i, concept))
      if first[1].class_prompt != concept.class_prompt and config.with_prior_preservation:
        raise ValueError(f"concepts[{i}] ({concept.name}): class_data_dir={concept.class_data_dir!r} is also "
                         f"concepts[{first[0]}] ({first[1].name})'s, with another class_prompt ("
                         f"{concept.class_prompt!r} vs {first[1].class_prompt!r}); give each its own class_data_dir")


def check_folders(concepts: list[Concept]):
  """Refuses a missing instance_data_dir by its entry before any work (the model is not loaded yet)."""
  for i, concept in enumerate(concepts):
    if concept.instance_data_dir and not pathlib.Path(concept.instance_data_dir).is_dir():
      raise FileNotFoundError(f"concepts[{i}] ({concept.name}): instance_data_dir={concept.instance_data_dir}: "
                              "image folder missing")


def resolve_into(config) -> list[Concept]:
  """Checks config.concepts and writes the resolved entries back (the saved config.json then carries them)."""
  concepts = resolve(config)
  if concepts:
    config.concepts = [dataclasses.asdict(c) for c in concepts]
  return concepts


def _wrap(error: Exception, where: str) -> Exception:
  kind = type(error) if isinstance(error, (FileNotFoundError, data_lib.BadImagesError)) else ValueError
  return kind(f"{where}: {error}")


def load_instance_images(config, concepts: list[Concept]) -> data_lib.SubjectImages:
  """All concepts' images, in entry order, as one set whose `concepts` (and `repeats`) say each image's."""
  from dreambooth_jax.data import hf_datasets  # noqa: PLC0415 (imports the datasets library)
  parts = []
  for i, concept in enumerate(concepts):
    try:
      if concept.dataset_name:
        where = f"dataset_name={concept.dataset_name}"
        parts.append(hf_datasets.load_dataset_images(
            concept.dataset_name, split=concept.dataset_split, image_column=concept.image_column,
            caption_column=concept.caption_column, resolution=config.resolution,
            default_caption=concept.instance_prompt, on_bad_image=config.on_bad_image, masks=config.masked_loss,
            buckets=buckets_lib.choices(config)))
      else:
        where = f"instance_data_dir={concept.instance_data_dir}"
        parts.append(data_lib.load_subject_images(concept.instance_data_dir, config.resolution,
                                                  concept.instance_prompt, on_bad_image=config.on_bad_image,
                                                  masks=config.masked_loss, buckets=buckets_lib.choices(config),
                                                  caption_extension=concept.caption_extension))
    except (ValueError, FileNotFoundError) as e:
      raise _wrap(e, f"concepts[{i}] ({concept.name}): {where}") from None
  joined = join(parts)
  joined.repeats = [concepts[c].num_repeats for c in joined.concepts]
  return joined


def join(parts: list[data_lib.SubjectImages]) -> data_lib.SubjectImages:
  """One set of the parts' images; concepts[i] = the part image i came from."""
  return data_lib.SubjectImages(
      paths=[p for s in parts for p in s.paths], captions=[c for s in parts for c in s.captions],
      images=[x for s in parts for x in s.images], resolution=parts[0].resolution,
      original_sizes=[x for s in parts for x in s.original_sizes],
      concepts=[k for k, s in enumerate(parts) for _ in s.paths], files=all(s.files for s in parts),
      buckets=None if any(s.buckets is None for s in parts) else [b for s in parts for b in s.buckets],
      masks=None if all(s.masks is None for s in parts) else
      [m for s in parts for m in (s.masks or [None] * len(s.paths))])


def class_sets(config, concepts: list[Concept], workdir) -> list[tuple[pathlib.Path, str, int, list[int]]]:
  """The distinct class folders: (folder, class_prompt, num_class_images, the concepts that use it); concepts that
  share a folder share its images (and the most class images any of them asks for)."""
  sets = {}
  for i, concept in enumerate(concepts):
    folder = concept.class_dir(workdir)
    if folder in sets:
      _, prompt, count, users = sets[folder]
      sets[folder] = (folder, prompt, max(count, concept.num_class_images), users + [i])
    else:
      sets[folder] = (folder, concept.class_prompt, concept.num_class_images, [i])
  return list(sets.values())


def load_class_images(config, concepts: list[Concept], workdir, instance: data_lib.SubjectImages,
                      buckets=None) -> tuple[data_lib.SubjectImages, list[np.ndarray]]:
  """(the class set, per concept the indices of its class images in it). With prior_preservation="base_output" a
  concept's class examples are its own photos with its class_prompt (the instance set's order: the same cached
  posteriors); else its class folder's images (each folder loaded once; `concepts` there = its first user)."""
  if config.prior_preservation == "base_output":
    captions = [concepts[c].class_prompt for c in instance.concepts]
    groups = [np.flatnonzero(np.array(instance.concepts) == k) for k in range(len(concepts))]
    return dataclasses.replace(instance, captions=captions, repeats=None), groups
  parts, groups, folders = [], [None] * len(concepts), class_sets(config, concepts, workdir)
  for folder, prompt, _, users in folders:
    i = users[0]
    try:
      part = data_lib.load_subject_images(folder, config.resolution, prompt, on_bad_image=config.on_bad_image,
                                          buckets=buckets)
    except (ValueError, FileNotFoundError) as e:
      raise _wrap(e, f"concepts[{i}] ({concepts[i].name}): class_data_dir={folder}") from None
    start = sum(len(p.paths) for p in parts)
    for user in users:
      groups[user] = np.arange(start, start + len(part.paths))
    parts.append(part)
  joined = join(parts)
  firsts = [users[0] for *_, users in folders]
  joined.concepts = [firsts[k] for k in joined.concepts]
  return joined, groups


class PairedClassIterator:
  """Class examples paired with the instance examples of a step: the one paired with an instance example of concept c
  is the next of c's class sequence, the concatenation of per-epoch permutations of c's class images drawn from
  (seed, c, epoch); in a bucketed step (aspect-ratio buckets) of c's class images in the step's bucket (H, W), drawn
  from (seed, c, H, W, epoch). Every process walks the whole global batch (the instance iterator's global_concepts)
  and keeps its own slice, as SubjectIterator does; the state is each sequence's (epoch, position)."""

  def __init__(self, images: data_lib.SubjectImages, groups: list[np.ndarray], names: list[str],
               batch_size_per_process: int, *, seed: int, center_crop: bool = True, random_flip: bool = False,
               process_index: int = 0, process_count: int = 1, with_pixels: bool = True):
    self.images, self.names = images, names
    self.local, self.seed, self.with_pixels = batch_size_per_process, seed, with_pixels
    self.center_crop, self.random_flip = center_crop, random_flip
    self.process_index, self.process_count = process_index, process_count
    # per (concept, bucket or None): the class images its sequence permutes (the images and groups never change)
    self.members = {(c, None): group for c, group in enumerate(groups)}
    if images.buckets is not None:
      for c, group in enumerate(groups):
        of_group = [tuple(images.buckets[i]) for i in group]
        for bucket in sorted(set(of_group)):
          self.members[c, bucket] = group[[b == bucket for b in of_group]]
    self.positions = {}  # per (concept name, bucket name or None): (epoch, position); (0, 0) until drawn from

  def next_for(self, global_concepts, bucket: tuple[int, int] | None = None) -> dict:
    """This process's class examples for a step whose global instance examples are of `global_concepts` (all the
    step's micro-batches, micro-batch-major, as buckets.BucketIterator's); bucket: the bucketed step's (H, W)."""
    rows, mine, slots = [], [], []
    global_batch = self.local * self.process_count
    bucket = None if bucket is None else tuple(bucket)
    for j, concept in enumerate(global_concepts):
      slot = j % global_batch  # within the micro-batch
      members = self._class_images(concept, bucket)
      key = (self.names[concept], None if bucket is None else buckets_lib.name(bucket))
      epoch, position = self.positions.get(key, (0, 0))
      if self.process_index * self.local <= slot < (self.process_index + 1) * self.local:
        draw = (self.seed, concept, *(bucket or ()), epoch)
        index = int(members[np.random.default_rng(draw).permutation(len(members))[position]])
        rng = np.random.default_rng((*draw, position, 1))
        rows.append((index, *data_lib.make_example(self.images, index, rng, self.center_crop, self.random_flip)))
        mine.append(concept)
        slots.append(slot)
      position += 1
      self.positions[key] = (epoch + 1, 0) if position == len(members) else (epoch, position)
    batch = data_lib.rows_to_batch(self.images, rows, np.array(slots, np.int32), self.with_pixels)
    batch["concept_B"] = np.array(mine, np.int32)  # the paired instance example's (a shared folder has several)
    return batch

  def _class_images(self, concept: int, bucket) -> np.ndarray:
    members = self.members.get((concept, bucket))
    if members is None:
      raise ValueError(f"concept {self.names[concept]!r}: no class image in bucket {buckets_lib.name(bucket)} (HxW), "
                       "where it has instance images; add some to its class_data_dir or let the run generate them")
    return members

  def get_state(self) -> dict:
    concepts = {n: self.positions.get((n, None), (0, 0)) for n in self.names}
    state = {"seed": self.seed, "concepts": {n: {"epoch": e, "position": p} for n, (e, p) in concepts.items()}}
    in_buckets = {f"{n}@{b}": {"epoch": e, "position": p} for (n, b), (e, p) in self.positions.items()
                  if b is not None}
    if in_buckets:
      state["buckets"] = dict(sorted(in_buckets.items()))
    return state

  def set_state(self, state: dict):
    if state.get("seed", self.seed) != self.seed:
      raise ValueError(f"class iterator state has seed {state['seed']}, this run uses {self.seed}")
    saved = state.get("concepts", {})
    if sorted(saved) != sorted(self.names):
      raise ValueError(f"class iterator state is of concepts {sorted(saved)}, this run has {sorted(self.names)}")
    self.positions = {(n, None): (int(saved[n]["epoch"]), int(saved[n]["position"])) for n in self.names}
    for key, v in state.get("buckets", {}).items():  # "name@HxW": a bucket name has no "@"
      self.positions[tuple(key.rsplit("@", 1))] = (int(v["epoch"]), int(v["position"]))
