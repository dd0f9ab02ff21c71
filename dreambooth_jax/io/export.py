"""Export a pipeline (a run's trained view) in the formats other tools load: diffusers folders, single files,
kohya and diffusers/PEFT LoRA files. The CLI is dreambooth_jax/export.py."""

import pathlib

from absl import logging

from dreambooth_jax.families import Pipeline
from dreambooth_jax.io import diffusers_folder, lora_files, single_file
from dreambooth_jax.models import lora as lora_lib

FORMATS = ("diffusers", "single_file", "lora_kohya", "lora_diffusers")
DTYPES = {"": None, "float32": None, "fp32": None, "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16",
          "bf16": "bfloat16"}


def _merged(pipe: Pipeline) -> dict:
  """The components carrying LoRA layers, with the factors folded into their base weights."""
  return {name: lora_lib.merge_lora(module) for name, module in pipe.modules.items()
          if module is not None and lora_lib.lora_modules(module)}


def export_diffusers(pipe: Pipeline, out, dtype: str | None = None) -> pathlib.Path:
  """Writes pipe (the trained view; LoRA layers are merged into their base) as a diffusers folder."""
  out = diffusers_folder.save_pipeline(pipe, out, replace=_merged(pipe) or None, dtype=dtype)
  logging.info("exported diffusers folder to %s", out)
  return out


def lora_metadata(pipe: Pipeline, config) -> dict:
  """What a LoRA file says about itself: base model, rank, alpha, trigger prompt (kohya ss_* and modelspec keys,
  which AUTOMATIC1111/ComfyUI show)."""
  rank = {node.rank for module in pipe.modules.values() if module is not None
          for node in lora_lib.lora_modules(module).values()}.pop()
  alpha = lora_lib.lora_scale(pipe.denoiser) * rank
  return {"ss_base_model_version": str(config.pretrained_model_name_or_path), "ss_network_dim": rank,
          "ss_network_alpha": alpha, "ss_network_module": "networks.lora", "modelspec.trigger_phrase":
          config.instance_prompt, "dreambooth_jax.base_model": config.pretrained_model_name_or_path,
          "dreambooth_jax.rank": rank, "dreambooth_jax.alpha": alpha,
          "dreambooth_jax.instance_prompt": config.instance_prompt}


def export_lora(pipe: Pipeline, config, out, fmt: str) -> pathlib.Path:
  """Writes the LoRA factors of the denoiser (and of each text encoder that has LoRA) as one .safetensors."""
  if not lora_lib.lora_modules(pipe.denoiser):
    raise ValueError(f"--format={fmt}: this run trained the full model, not LoRA; export it with "
                     "--format=diffusers or --format=single_file")
  out = pathlib.Path(out)
  if out.suffix != ".safetensors":
    out = out / "pytorch_lora_weights.safetensors"
  out.parent.mkdir(parents=True, exist_ok=True)
  factors = {pipe.family.DENOISER: lora_lib.lora_factors(pipe.denoiser)}
  for name in pipe.family.TEXT_ENCODERS:
    if pipe.modules[name] is not None and lora_lib.lora_modules(pipe.modules[name]):
      factors[name] = lora_lib.lora_factors(pipe.modules[name])
  meta = lora_metadata(pipe, config)
  alpha = meta["dreambooth_jax.alpha"]
  if fmt == "lora_kohya":
    # the family's kohya layout: prefixes, and the denoiser's module names (SD diffusers', SDXL SGM, Flux fused BFL)
    tensors = pipe.family.to_kohya_lora(factors, alpha, pipe.configs)
    extra = {}
  else:
    tensors, extra = lora_files.to_diffusers_peft(factors, alpha)
  lora_files.save_lora(out, tensors, {**meta, **extra})
  logging.info("exported %s LoRA to %s", fmt, out)
  return out


def export(pipe, config, out, fmt: str = "diffusers", *, merge_lora: bool = False, dtype: str = "") -> pathlib.Path:
  if fmt not in FORMATS:
    raise ValueError(f"--format={fmt!r}: expected one of {list(FORMATS)}")
  if dtype not in DTYPES:
    raise ValueError(f"--dtype={dtype!r}: expected one of {sorted(DTYPES)}")
  if fmt.startswith("lora_"):
    return export_lora(pipe, config, out, fmt)
  if lora_lib.lora_modules(pipe.denoiser) and not merge_lora:
    raise ValueError(f"--format={fmt}: this is a LoRA run; pass --merge_lora to write the base model with the LoRA "
                     "folded in, or use --format=lora_kohya / lora_diffusers")
  if fmt == "diffusers":
    return export_diffusers(pipe, out, dtype=DTYPES[dtype])
  out = pathlib.Path(out)
  if out.suffix != ".safetensors":
    out = out / "model.safetensors"
  out.parent.mkdir(parents=True, exist_ok=True)
  file_dtype = {None: "fp32", "float16": "fp16", "bfloat16": "bf16"}[DTYPES[dtype or "fp16"]]
  path = single_file.export_single_file(pipe, out, replace=_merged(pipe) or None, dtype=file_dtype,
                                        metadata={"dreambooth_jax.base_model": config.pretrained_model_name_or_path,
                                                  "modelspec.trigger_phrase": config.instance_prompt})
  logging.info("exported single file to %s", path)
  return path
