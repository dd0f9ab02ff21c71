"""Config files are plain Python files with get_config(arg), loaded by path (as ml_collections.config_flags does),
so configs/ needs no package or sys.path entry; this is how one config builds on another (configs/common.py).

The known settings are the keys of configs/common.py's get_config(): a config that sets any other key (a typo, or a
setting of another version) is refused by name, with the nearest known key, before any work (check_known).
"""

import copy
import difflib
import functools
import importlib.util
import pathlib

import ml_collections

COMMON = pathlib.Path(__file__).resolve().parents[1] / "configs" / "common.py"


def load(path, arg: str | None = None) -> ml_collections.ConfigDict:
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"config file {path}: no such file")
  spec = importlib.util.spec_from_file_location(f"dreambooth_jax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def load_sibling(config_file, name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The config in the file `name` beside `config_file` (pass __file__)."""
  return load(pathlib.Path(config_file).with_name(name), arg)


@functools.cache
def _defaults() -> ml_collections.ConfigDict:
  return load(COMMON)


def defaults() -> ml_collections.ConfigDict:
  """A fresh copy of every known setting with its default (configs/common.py)."""
  return copy.deepcopy(_defaults())


def _flat_keys(config, prefix: str = "") -> dict[str, object]:
  """{"a", "lora.rank", ...}: dotted key -> value, descending into nested ConfigDicts and dicts."""
  keys = {}
  for key, value in config.items():
    keys[prefix + key] = value
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      keys.update(_flat_keys(value, f"{prefix}{key}."))
  return keys


def unknown_keys(config, known=None) -> list[str]:
  """Dotted keys of `config` that are not in `known` (default: configs/common.py), nested ones too, and the keys of
  config.concepts entries that are not entry keys ("concepts[1].nmae")."""
  known_keys = _flat_keys(defaults() if known is None else known)
  found = []
  for key, value in _flat_keys(config).items():
    parent = key.rpartition(".")[0]
    if parent and parent not in known_keys:
      continue  # below an unknown key: the key itself is named
    if parent and not isinstance(known_keys[parent], (ml_collections.ConfigDict, dict)):
      continue  # a known setting whose value is a dict (none today): its contents are its value
    if key not in known_keys:
      found.append(key)
  if "concepts" in known_keys and isinstance(config.get("concepts"), (list, tuple)):
    from dreambooth_jax.data import concepts  # noqa: PLC0415 (the entry keys' one home)
    found += concepts.unknown_entry_keys(config["concepts"])
  return sorted(found)


def describe_unknown(keys, known=None) -> str:
  """'learning_rat (did you mean learning_rate?), subjects (no similar setting)'."""
  names = list(_flat_keys(defaults() if known is None else known))
  parts = []
  for key in keys:
    if key.startswith("concepts["):  # an entry's key: the nearest entry key
      from dreambooth_jax.data import concepts  # noqa: PLC0415
      near = concepts.nearest_entry_key(key.partition(".")[2])
      parts.append(f"{key} (did you mean {near}?)" if near else f"{key} (no similar concept key)")
      continue
    near = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    parts.append(f"{key} (did you mean {near[0]}?)" if near else f"{key} (no similar setting)")
  return ", ".join(parts)


def check_known(config, where: str = "config"):
  """Refuses a config with keys configs/common.py does not define, naming each with the nearest known key."""
  keys = unknown_keys(config)
  if keys:
    raise ValueError(f"{where}: unknown setting(s) {describe_unknown(keys)}; the settings and their defaults are "
                     f"in {COMMON}")
