"""The one entry for "the model this name means": a diffusers folder or hub id, a single file, or (random_init) a
folder of configs with random weights."""

import pathlib

from dreambooth_jax.families import Pipeline
from dreambooth_jax.io import diffusers_folder, single_file


def load_or_init_pipeline(name_or_path, *, random_init: bool = False, seed: int = 0, **kwargs) -> Pipeline:
  """A diffusers folder or hub id, or a single-file .safetensors checkpoint (original layout; its family and
  configs detected from its keys, or given by single_file_config: a bundled name or a diffusers folder of
  config.json files). `random_init` builds the model from the folder's configs with random weights (the tiny
  offline default)."""
  if random_init:
    kwargs.pop("variant", None)  # no weight files are read
    kwargs.pop("single_file_config", None)
    return diffusers_folder.random_pipeline(name_or_path, seed=seed, **kwargs)
  single_file_config = kwargs.pop("single_file_config", "auto") or "auto"
  if pathlib.Path(str(name_or_path)).suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
    kwargs.pop("variant", None)
    return single_file.load_single_file_pipeline(name_or_path, config=single_file_config, **kwargs)
  return diffusers_folder.load_pipeline(name_or_path, **kwargs)
