"""Memory plan: per-device bytes of the trainable params, optimizer state, EMA weights (use_ema), frozen weights,
batch and the compiled train step's temporaries (XLA's memory analysis of the exact step the run will execute), and
a refusal, with the levers to pull, when that cannot fit the device.

  python -m dreambooth_jax.train --config=configs/dog.py --dry_run

The dry run builds the model abstractly (jax.eval_shape: no weights read or allocated, no class images generated),
so it plans SD 1.5 at 512 px on a laptop in the time of one compile.
"""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding

from dreambooth_jax import families
from dreambooth_jax.families import Pipeline
from dreambooth_jax.io import diffusers_folder

GIB = 2**30
LEVERS = ("remat='full' (or 'attention'/'dots')", "attention='chunked' (where no flash kernel applies, e.g. TPU)",
          "param_dtype='bfloat16'", "optimizer_moments_bf16=True",
          "mesh_fsdp=<devices> (shard params and optimizer state)", "a smaller train_batch_size with "
          "gradient_accumulation_steps", "cache_latents=True (no VAE encoder in the step)", "lora.enabled=True")


# ------------------------------------------------------------------------------------ shapes without weights

def known_hub_configs(hub_id: str) -> pathlib.Path | None:
  """The bundled configs with the same shapes as a known hub model (the plan then works offline)."""
  for family in families.FAMILIES.values():
    if hub_id in family.KNOWN_HUB_CONFIGS:
      return family.BUNDLED_CONFIGS[family.KNOWN_HUB_CONFIGS[hub_id]]
  return None


def model_config_dir(config) -> pathlib.Path:
  """The folder whose config.json files describe the model (configs only are fetched for a hub id)."""
  path = str(config.pretrained_model_name_or_path)
  if config.random_init:
    return diffusers_folder.TINY_MODEL if path == "tiny" else pathlib.Path(path)
  if pathlib.Path(path).suffix == ".safetensors":
    from dreambooth_jax.io import safetensors as safetensors_io, single_file  # noqa: PLC0415
    header, _ = safetensors_io.read_header(pathlib.Path(path))
    return single_file.config_dir(config.get("single_file_config", "auto") or "auto", dict.fromkeys(header), path)
  local = pathlib.Path(path).expanduser()
  if local.exists():
    return diffusers_folder.resolve_model_dir(local)
  from huggingface_hub import snapshot_download  # noqa: PLC0415
  try:
    return pathlib.Path(snapshot_download(path, allow_patterns=["*.json", "tokenizer*/*"]))
  except Exception as e:  # offline, unknown or gated repo
    bundled = known_hub_configs(path)
    if bundled is not None:  # shapes are all a plan needs: the bundled configs of the same architecture
      logging.warning("%s: hub unreachable (%s); planning with the bundled %s configs", path, type(e).__name__,
                      bundled.name)
      return bundled
    raise FileNotFoundError(f"{path}: cannot fetch its configs from the Hugging Face hub ({type(e).__name__}); pass "
                            "a local diffusers folder as pretrained_model_name_or_path") from None


def abstract_model(config, *, dtype, param_dtype, unet_kwargs) -> Pipeline:
  """The pipeline with every parameter a ShapeDtypeStruct."""
  with jax.default_device(jax.devices("cpu")[0]):
    pipe = diffusers_folder.random_pipeline(model_config_dir(config), seed=config.seed, dtype=dtype,
                                            param_dtype=param_dtype, unet_kwargs=unet_kwargs, abstract=True)
  pipe.family.set_max_sequence_length(pipe.tokenizers, config.get("max_sequence_length") or None)
  return pipe


# ------------------------------------------------------------------------------------------------- the plan

def per_device_bytes(tree, shardings) -> int:
  """Bytes one device holds of a tree placed with these shardings (the largest shard of each leaf)."""
  total = 0
  for leaf, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))):
    shape = s.shard_shape(leaf.shape) if hasattr(s, "shard_shape") else leaf.shape
    total += int(np.prod(shape, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
  return total


@dataclasses.dataclass
class MemoryPlan:
  params: int  # trainable params (master copies), per device
  optimizer: int  # optimizer state, per device
  frozen: int  # frozen weights in the step (VAE, text encoder, LoRA base), per device
  batch: int
  temporaries: int  # XLA's temp buffers of the compiled step (activations, gradients, ...)
  code: int
  peak: int  # estimate: arguments + outputs - donated aliases + temporaries + code
  limit: int | None  # device memory, when known
  devices: int
  ema: int = 0  # moving average of the trainable params (use_ema), float32, per device

  def fits(self) -> bool:
    return self.limit is None or self.peak <= self.limit

  def table(self) -> str:
    rows = [("trainable params", self.params), ("optimizer state", self.optimizer),
            *([("EMA weights", self.ema)] if self.ema else []), ("frozen weights", self.frozen), ("batch", self.batch),
            ("step temporaries (XLA)", self.temporaries), ("compiled code", self.code), ("peak estimate", self.peak)]
    lines = [f"  {name:<24}{value / GIB:9.3f} GiB" for name, value in rows]
    limit = "unknown (CPU; set device_memory_gib)" if self.limit is None else f"{self.limit / GIB:.3f} GiB"
    return "\n".join([f"memory per device ({self.devices} devices):", *lines, f"  {'device memory':<24}{limit}"])


def device_limit(config) -> int | None:
  if config.get("device_memory_gib"):
    return int(config.device_memory_gib * GIB)
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def memory_plan(config, compiled, mesh, state, state_shardings, frozen, frozen_shardings, batch) -> MemoryPlan:
  analysis = compiled.memory_analysis()
  temp = getattr(analysis, "temp_size_in_bytes", 0) or 0
  code = getattr(analysis, "generated_code_size_in_bytes", 0) or 0
  args = getattr(analysis, "argument_size_in_bytes", 0) or 0
  out = getattr(analysis, "output_size_in_bytes", 0) or 0
  alias = getattr(analysis, "alias_size_in_bytes", 0) or 0
  batch_shardings = jax.tree.map(lambda x: x.sharding, batch)
  return MemoryPlan(
      params=per_device_bytes(state["params"], state_shardings["params"]),
      optimizer=per_device_bytes(state["opt_state"], state_shardings["opt_state"]),
      frozen=per_device_bytes(frozen, frozen_shardings), batch=per_device_bytes(batch, batch_shardings),
      temporaries=temp, code=code, peak=args + out - alias + temp + code, limit=device_limit(config),
      devices=mesh.devices.size,
      ema=per_device_bytes(state["ema"], state_shardings["ema"]) if "ema" in state else 0)


def check_fits(plan: MemoryPlan, config):
  logging.info("%s", plan.table())
  if not plan.fits():
    raise MemoryError(
        f"this config needs about {plan.peak / GIB:.2f} GiB per device, the device has {plan.limit / GIB:.2f} GiB "
        f"(resolution={config.resolution}, train_batch_size={config.train_batch_size}, remat={config.remat!r}, "
        f"mesh_fsdp={config.mesh_fsdp}). Levers: " + "; ".join(LEVERS) + ".\n" + plan.table())
