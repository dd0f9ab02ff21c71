"""Config files are plain Python files with get_config(arg), loaded by path (as ml_collections.config_flags does),
so configs/ needs no package or sys.path entry; this is how one config builds on another (configs/common.py)."""

import importlib.util
import pathlib

import ml_collections


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
