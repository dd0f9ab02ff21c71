"""kohya-ss/sd-scripts' dataset config (`--dataset_config FILE.toml`) -> our settings and concept entries.

The format is kohya's (library/config_util.py): `[general]`, `[[datasets]]`, `[[datasets.subsets]]`. A key set in
a subset wins over its dataset's, which wins over `[general]`; a key set nowhere keeps the config's own value, as
kohya falls back to its command line. Each subset with is_reg=false becomes a concept (its name is its image_dir's
folder name); is_reg=true subsets are the user's class images. Relative image_dir paths are relative to the working
directory, as in kohya (os.path.isdir on the path as written), and are stored absolute. Every key kohya's DreamBooth
schema knows is mapped, accepted at a value that behaves as kohya's, or refused by name; any other key is refused
with the nearest known one.
"""

import dataclasses
import difflib
import json
import logging
import os
import pathlib
import tomllib

from dreambooth_jax.data.images import IMAGE_EXTENSIONS, read_caption_files

# kohya's schema (ConfigSanitizer, DreamBooth datasets): keys only a subset may set; subset keys a dataset or
# [general] may set for all its subsets; dataset keys [general] may set for all datasets.
SUBSET_ONLY = {"image_dir": str, "is_reg": bool, "alpha_mask": bool}
SUBSET_SHARED = {
    "num_repeats": int, "class_tokens": str, "caption_extension": str, "flip_aug": bool, "random_crop": bool,
    "cache_info": bool, "shuffle_caption": bool, "keep_tokens": int, "keep_tokens_separator": str,
    "secondary_separator": str, "caption_separator": str, "enable_wildcard": bool, "color_aug": bool,
    "face_crop_aug_range": list, "token_warmup_min": int, "token_warmup_step": float, "caption_prefix": str,
    "caption_suffix": str, "custom_attributes": dict, "resize_interpolation": str, "caption_dropout_rate": float,
    "caption_dropout_every_n_epochs": int, "caption_tag_dropout_rate": float,
}
DATASET_KEYS = {
    "resolution": list, "batch_size": int, "enable_bucket": bool, "min_bucket_reso": int, "max_bucket_reso": int,
    "bucket_reso_steps": int, "bucket_no_upscale": bool, "network_multiplier": float, "validation_seed": int,
    "validation_split": float, "resize_interpolation": str,
}
# kohya's other dataset kinds: their keys are refused with this reason
OTHER_KINDS = {
    "metadata_file": "fine-tuning datasets (metadata_file / in_json) are not supported: use image_dir with caption "
                     "files (caption_extension)",
    "in_json": "fine-tuning datasets (metadata_file / in_json) are not supported: use image_dir with caption files "
               "(caption_extension)",
    "conditioning_data_dir": "ControlNet datasets are not supported",
}

# Run-wide settings: kohya key -> (our config key, kohya value -> ours). Ours are one per run, so every subset (or
# dataset) must resolve to the same value.
SUBSET_SETTINGS = {
    "flip_aug": ("random_flip", bool),
    "random_crop": ("center_crop", lambda random_crop: not random_crop),
    "alpha_mask": ("masked_loss", bool),
}
DATASET_SETTINGS = {
    "resolution": ("resolution", int), "batch_size": ("train_batch_size", int),
    "enable_bucket": ("enable_bucket", bool), "min_bucket_reso": ("min_bucket_reso", int),
    "max_bucket_reso": ("max_bucket_reso", int), "bucket_reso_steps": ("bucket_reso_steps", int),
}
# Accepted only at values that behave as kohya's default (unset is always accepted): key -> (values, why not more).
DEFAULT_ONLY = {
    "shuffle_caption": ((False,), "captions are used as written"),
    "enable_wildcard": ((False,), "captions are used as written (the first line of a caption file)"),
    "color_aug": ((False,), "there is no colour augmentation"),
    "face_crop_aug_range": ((), "there is no face-crop augmentation"),
    "caption_prefix": (("",), "captions are used as written; put the words in class_tokens or the caption files"),
    "caption_suffix": (("",), "captions are used as written; put the words in class_tokens or the caption files"),
    "secondary_separator": (("",), "captions are used as written"),
    "caption_dropout_rate": ((0, 0.0), "there is no caption dropout"),
    "caption_dropout_every_n_epochs": ((0,), "there is no caption dropout"),
    "caption_tag_dropout_rate": ((0, 0.0), "there is no caption dropout"),
    "token_warmup_step": ((0, 0.0), "there is no token warm-up"),
    "custom_attributes": (({},), "no network module reads them"),
    "resize_interpolation": ((), "images are resized bilinear (PIL)"),
    "bucket_no_upscale": ((False,), "small images are upscaled to their bucket"),
    "network_multiplier": ((1, 1.0), "the LoRA scale is lora.alpha / lora.rank"),
    "validation_split": ((0, 0.0), "the validation loss (validation_loss=True) uses every instance image"),
}
# Accepted at any value: without the keys above at their defaults they change nothing in kohya either.
INERT = {
    "keep_tokens": "acts only with shuffle_caption, caption_tag_dropout_rate or token_warmup_step",
    "caption_separator": "acts only with shuffle_caption, caption_tag_dropout_rate or token_warmup_step",
    "keep_tokens_separator": "acts only with shuffle_caption, caption_tag_dropout_rate or token_warmup_step",
    "token_warmup_min": "acts only with token_warmup_step",
    "validation_seed": "acts only with validation_split",
    "cache_info": "a cache of image sizes: the same images are read without it",
}
KOHYA_CAPTION_EXTENSION = ".caption"  # kohya's default, for the command line and the subset alike


def _toml(value) -> str:
  return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def _check_type(where: str, key: str, value, kind):
  if key == "resolution":
    ok = (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                            for v in value))
    expected = "an integer or [width, height]"
  elif key == "face_crop_aug_range":
    ok = isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
    expected = "[low, high]"
  elif kind is float:
    ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
  elif kind is int:
    ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
  else:
    ok, expected = isinstance(value, kind), {bool: "true or false", str: "a string", dict: "a table"}[kind]
  if not ok:
    raise ValueError(f"{where}.{key}={_toml(value)}: must be {expected}")


def _check_keys(table: dict, where: str, allowed: dict, *, table_keys=()):
  """Each key known at this level, of its type, and at a value we implement."""
  everything = {**SUBSET_ONLY, **SUBSET_SHARED, **DATASET_KEYS}
  for key, value in table.items():
    if key in table_keys:
      continue
    if key in OTHER_KINDS:
      raise ValueError(f"{where}.{key}: {OTHER_KINDS[key]}")
    if key not in allowed:
      if key in everything:
        level = ("a [[datasets.subsets]] entry" if key in SUBSET_ONLY else "a [[datasets]] entry or [general]")
        raise ValueError(f"{where}.{key}: only {level} may set it (kohya's schema)")
      near = difflib.get_close_matches(key, sorted(everything) + ["subsets"], n=1, cutoff=0.6)
      hint = f"did you mean {near[0]}?" if near else "no similar key"
      raise ValueError(f"{where}.{key}: unknown key ({hint}); kohya's dataset keys are in sd-scripts' "
                       "library/config_util.py")
    _check_type(where, key, value, allowed[key])
    if key in DEFAULT_ONLY and value not in DEFAULT_ONLY[key][0]:
      raise ValueError(f"{where}.{key}={_toml(value)} is not supported: {DEFAULT_ONLY[key][1]}; remove it")
    if key in INERT:
      logging.info("%s.%s=%s: no effect here (%s)", where, key, _toml(value), INERT[key])


def _tables(value, where: str, header: str) -> list[dict]:
  if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
    raise ValueError(f"{where}: must be an array of tables ([[{header}]])")
  return value


def _parse(path: pathlib.Path) -> tuple[dict, list[dict]]:
  """(general, datasets) with every key checked; datasets' subsets checked too."""
  try:
    document = tomllib.loads(path.read_text(encoding="utf-8"))
  except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"not valid TOML: {e}") from None
  for key in document:
    if key not in ("general", "datasets"):
      near = difflib.get_close_matches(key, ["general", "datasets"], n=1, cutoff=0.6)
      raise ValueError(f"{key}: unknown top-level key ({f'did you mean {near[0]}?' if near else 'no similar key'}); "
                       "a kohya dataset config has [general] and [[datasets]]")
  general = document.get("general", {})
  if not isinstance(general, dict):
    raise ValueError("general: must be a table ([general])")
  _check_keys(general, "general", {**SUBSET_SHARED, **DATASET_KEYS})
  datasets = _tables(document.get("datasets", []), "datasets", "datasets")
  if not datasets:
    raise ValueError("no [[datasets]]: add one with its [[datasets.subsets]] (image_dir, class_tokens, ...)")
  for d, dataset in enumerate(datasets):
    _check_keys(dataset, f"datasets[{d}]", {**SUBSET_SHARED, **DATASET_KEYS}, table_keys=("subsets",))
    subsets = _tables(dataset.get("subsets", []), f"datasets[{d}].subsets", "datasets.subsets")
    if not subsets:
      raise ValueError(f"datasets[{d}]: no [[datasets.subsets]]; add one with its image_dir")
    for s, subset in enumerate(subsets):
      where = f"datasets[{d}].subsets[{s}]"
      _check_keys(subset, where, {**SUBSET_SHARED, **SUBSET_ONLY})
      if "image_dir" not in subset:
        raise ValueError(f"{where}: image_dir is required (the folder of its images)")
  return general, datasets


def _resolve(key: str, levels: list[tuple[str, dict]]):
  """(value, where it is set) by kohya's precedence (most specific first); (None, None) if set nowhere."""
  for where, table in levels:
    if key in table:
      return table[key], where
  return None, None


def _one_per_run(key: str, ours: str, resolved: list[tuple[str, object, str | None]]):
  """resolved: (what, value, where set) per subset or dataset; the single value, or None if set nowhere."""
  where_to = "on every subset" if key in SUBSET_ONLY else "once in [general]"
  first_what, first_value, first_where = resolved[0]
  for what, value, where in resolved[1:]:
    if value != first_value:
      a = f"{first_where}.{key}={_toml(first_value)}" if first_where else f"{first_what} leaves {key} unset"
      b = f"{where}.{key}={_toml(value)}" if where else f"{what} leaves {key} unset"
      raise ValueError(f"{a} but {b}: this trainer takes one {key} ({ours}) per run; set it {where_to}")
  return first_value


def _count_images(folder: pathlib.Path) -> list[str]:
  return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _subsets(general: dict, datasets: list[dict]) -> list[dict]:
  """Every subset resolved: where, dataset index, folder, image names, captions, and its kohya keys."""
  out = []
  for d, dataset in enumerate(datasets):
    for s, subset in enumerate(dataset["subsets"]):
      where = f"datasets[{d}].subsets[{s}]"
      levels = [(where, subset), (f"datasets[{d}]", dataset), ("general", general)]
      keys = {key: _resolve(key, levels) for key in ("num_repeats", "class_tokens", "caption_extension")}
      num_repeats = keys["num_repeats"][0] if keys["num_repeats"][1] else 1
      if num_repeats < 1:
        raise ValueError(f"{keys['num_repeats'][1]}.num_repeats={num_repeats}: must be >= 1 (kohya skips such a "
                         "subset; delete it instead)")
      folder = pathlib.Path(os.path.abspath(subset["image_dir"]))
      if not folder.is_dir():
        raise FileNotFoundError(f"{where}.image_dir={_toml(subset['image_dir'])}: no such folder ({folder}; a "
                                "relative path is relative to the working directory, as in kohya)")
      names = _count_images(folder)
      if not names:
        raise ValueError(f"{where}.image_dir={_toml(subset['image_dir'])}: no images in {folder} (looked for "
                         f"{', '.join(IMAGE_EXTENSIONS)})")
      extension = keys["caption_extension"][0] if keys["caption_extension"][1] else KOHYA_CAPTION_EXTENSION
      out.append({"where": where, "dataset": d, "folder": folder, "names": names, "levels": levels,
                  "is_reg": subset.get("is_reg", False), "num_repeats": num_repeats,
                  "class_tokens": keys["class_tokens"][0], "caption_extension": extension,
                  "captions": read_caption_files(folder, names, extension)})
  return out


def _settings(general: dict, datasets: list[dict], subsets: list[dict]) -> dict:
  settings = {}
  for key, (ours, convert) in DATASET_SETTINGS.items():
    resolved = [(f"datasets[{d}]", *_resolve(key, [(f"datasets[{d}]", ds), ("general", general)]))
                for d, ds in enumerate(datasets)]
    value = _one_per_run(key, ours, resolved)
    if value is None:
      continue
    if key == "resolution" and isinstance(value, list):
      if value[0] != value[1]:
        raise ValueError(f"{resolved[0][2]}.resolution={_toml(value)} is not supported: one square training "
                         "resolution (other aspect ratios: enable_bucket=true); use one number")
      value = value[0]
    if convert is int and value < 1:
      raise ValueError(f"{resolved[0][2]}.{key}={value}: must be >= 1")
    settings[ours] = convert(value)
  for key, (ours, convert) in SUBSET_SETTINGS.items():
    value = _one_per_run(key, ours, [(s["where"], *_resolve(key, s["levels"])) for s in subsets])
    if value is not None and (key != "alpha_mask" or value):  # masked_loss only when asked for
      settings[ours] = convert(value)
  return settings


def _concepts(subsets: list[dict]) -> list[dict]:
  """The is_reg=false subsets as concept entries (no class set yet); is_reg subsets checked."""
  concepts, names = [], {}
  for subset in subsets:
    where, tokens = subset["where"], subset["class_tokens"]
    if subset["is_reg"]:
      if not tokens:
        raise ValueError(f"{where}: an is_reg subset needs class_tokens (its class prompt, e.g. \"dog\")")
      if subset["captions"]:
        raise ValueError(f"{where}: {len(subset['captions'])} class image(s) in {subset['folder']} have "
                         f"{subset['caption_extension']} caption files, but class images take class_tokens as their "
                         "caption; remove the caption files or set caption_extension=\"\" on this subset")
      if subset["num_repeats"] != 1:
        logging.info("%s.num_repeats=%d: no effect here (each instance image is paired with one class image)",
                     where, subset["num_repeats"])
      continue
    uncaptioned = [n for n in subset["names"] if n not in subset["captions"]]
    if tokens is None and uncaptioned:
      raise ValueError(f"{where}: {len(uncaptioned)} image(s) in {subset['folder']} have no "
                       f"{subset['caption_extension']} caption file (e.g. {uncaptioned[0]}) and the subset has no "
                       "class_tokens to caption them; set class_tokens (e.g. \"sks dog\") or add caption files")
    name = subset["folder"].name
    if name in names:
      raise ValueError(f"{where}.image_dir and {names[name]}.image_dir are both folders named {name!r}: a concept's "
                       "name is its folder's name and must be unique; rename one folder")
    names[name] = where
    # kohya captions an image without a caption file with class_tokens ("" without them: every image has one here)
    concepts.append({"name": name, "instance_data_dir": str(subset["folder"]), "instance_prompt": tokens or "",
                     "caption_extension": subset["caption_extension"], "num_repeats": subset["num_repeats"]})
  if not concepts:
    raise ValueError("every subset has is_reg=true: add one with the subject's images (is_reg=false)")
  return concepts


def _ends_with(words: list[str], tail: list[str]) -> bool:
  return len(words) >= len(tail) and words[len(words) - len(tail):] == tail


def _class_set(subset: dict, regs: list[dict]) -> dict:
  """The is_reg subset of its dataset for a concept subset: the only one, or the one whose class_tokens are the last
  words of the concept's ("sks dog" -> "dog"). kohya pools a dataset's reg images; DreamBooth pairs them."""
  if len(regs) == 1:
    return regs[0]
  words = (subset["class_tokens"] or "").split()
  matches = [r for r in regs if _ends_with(words, r["class_tokens"].split())]
  if len(matches) != 1:
    options = ", ".join(f"{r['where']} ({_toml(r['class_tokens'])})" for r in regs)
    found = "several match" if matches else "none matches"
    raise ValueError(f"{subset['where']}: class_tokens={_toml(subset['class_tokens'])} and its dataset's "
                     f"is_reg subsets {options}: {found} its last words, so which class images it pairs with is "
                     "unclear; make exactly one reg subset's class_tokens the last words of the concept's, or put "
                     "the concept with its reg subset in a [[datasets]] of their own")
  return matches[0]


def _pair_class_sets(subsets: list[dict], concepts: list[dict]):
  """Each concept's class_prompt, class_data_dir and num_class_images (all the reg folder's images: never generated,
  they are the user's) from the is_reg subset it pairs with; every reg subset must pair with a concept."""
  regs, used = [s for s in subsets if s["is_reg"]], set()
  for subset, concept in zip([s for s in subsets if not s["is_reg"]], concepts, strict=True):
    own = [r for r in regs if r["dataset"] == subset["dataset"]]
    if not own:
      raise ValueError(f"datasets[{subset['dataset']}] has no is_reg subset while {regs[0]['where']} is one: with "
                       "class images, every dataset needs its own reg subset")
    reg = _class_set(subset, own)
    used.add(reg["where"])
    concept.update(class_prompt=reg["class_tokens"], class_data_dir=str(reg["folder"]),
                   num_class_images=len(reg["names"]))
  for reg in regs:
    if reg["where"] not in used:
      raise ValueError(f"{reg['where']}: no concept pairs with this is_reg subset (class_tokens="
                       f"{_toml(reg['class_tokens'])}); make its class_tokens the last words of a concept's, or "
                       "remove it")


def read_dataset_config(path) -> tuple[dict, list[dict]]:
  """(settings: {our config key: value}, concepts: config.concepts entries) of a kohya dataset TOML.

  settings holds only what the file sets, plus with_prior_preservation (whether it has is_reg subsets) and, with
  them, prior_preservation="class_images". Raises ValueError / FileNotFoundError naming the file, the key and what
  to do.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"dataset_config={path}: no such file")
  try:
    general, datasets = _parse(path)
    subsets = _subsets(general, datasets)
    settings = _settings(general, datasets, subsets)
    concepts = _concepts(subsets)
    settings["with_prior_preservation"] = any(s["is_reg"] for s in subsets)
    if settings["with_prior_preservation"]:
      settings["prior_preservation"] = "class_images"
      _pair_class_sets(subsets, concepts)
  except (ValueError, FileNotFoundError) as e:
    raise type(e)(f"dataset_config={path}: {e}") from None
  return settings, concepts


def apply_dataset_config(config) -> None:
  """config.dataset_config set: its concepts and settings written into config (each logged). A config that already
  holds the TOML's concepts (a run's saved config.json read back) is left as it is."""
  if not config.dataset_config:
    return
  settings, concepts = read_dataset_config(config.dataset_config)
  if config.concepts and _completed(config, config.concepts) != _completed(config, concepts):
    raise ValueError(f"dataset_config={config.dataset_config} and concepts are both set: the TOML's subsets are the "
                     "concepts; set one of them")
  for key, value in settings.items():
    if key not in config:
      raise ValueError(f"dataset_config={config.dataset_config}: sets {key}, which this trainer does not have "
                       "(alpha_mask=true needs masked_loss)")
    if config[key] != value:
      logging.info("dataset_config: %s=%r (was %r)", key, value, config[key])
    config[key] = value
  config.concepts = concepts
  logging.info("dataset_config: %d concept(s): %s", len(concepts), ", ".join(c["name"] for c in concepts))


def _completed(config, entries) -> list:
  """The entries with their defaults filled in (data/concepts.py), to compare a run's saved entries with a TOML's."""
  from dreambooth_jax.data import concepts as concepts_lib  # noqa: PLC0415 (concepts reads images; this module not)
  probe = config.copy_and_resolve_references()
  probe.concepts = list(entries)
  return [dataclasses.asdict(c) for c in concepts_lib.resolve(probe, check=False)]
