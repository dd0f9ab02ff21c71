"""JAX's persistent compilation cache, on by default: a rerun or resume loads its compiled train steps (one per
bucket) and sampler from disk instead of compiling them again.

config.compilation_cache_dir: "auto" = $JAX_COMPILATION_CACHE_DIR when set, else
$XDG_CACHE_HOME/dreambooth_jax/xla (~/.cache/dreambooth_jax/xla); a path = that folder; "" = off. Every
executable is kept, however quick its compile (JAX's default keeps only those over 1 s; the many small eager
programs of a random-weight init then dominate a warm start): $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS, when
set, is left in force. A cached executable is the same code: results are bitwise those of a fresh compile.
"""

import os
import pathlib

import jax
from absl import logging


def default_dir() -> pathlib.Path:
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "dreambooth_jax" / "xla"


def cache_dir(config) -> pathlib.Path | None:
  """The folder the config asks for, None when off."""
  setting = config.get("compilation_cache_dir", "auto")
  if not setting:
    return None
  if setting == "auto":
    return pathlib.Path(os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_dir())
  return pathlib.Path(setting).expanduser()


def enable(config) -> pathlib.Path | None:
  """Points JAX at the config's cache folder (or turns the cache off) before anything compiles."""
  folder = cache_dir(config)
  if folder is None:
    jax.config.update("jax_enable_compilation_cache", False)
    logging.info("persistent compilation cache off (compilation_cache_dir='')")
    return None
  folder.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_enable_compilation_cache", True)
  if jax.config.jax_compilation_cache_dir != str(folder):
    jax.config.update("jax_compilation_cache_dir", str(folder))
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  logging.info("persistent compilation cache: %s", folder)
  return folder
