"""What every family module is made of: its components, and the pipeline they make once loaded."""

import dataclasses
import pathlib
import types
import typing
from typing import Any


@dataclasses.dataclass(frozen=True)
class Component:
  config_class: type
  model_class: type
  weight_stem: str  # <stem>.safetensors (or .<variant>.safetensors, or a sharded index) in the component folder
  role: str  # "denoiser" | "vae" | "text": LoRA targets and dtype rules go by role
  # the state dict after the generic key clean-up (io.diffusers_folder.normalize_keys) -> this model's names
  normalize: Any = None
  # our torch-named state dict -> the names written to the folder (None: as they are); the inverse of the key
  # clean-up, e.g. CLIP keeps its transformer under `text_model.` in hub checkpoints
  save_keys: Any = None


class TrainingInputs(typing.NamedTuple):
  """What a family's training_inputs draws for one micro-batch: the noised latents and the denoiser's timestep,
  the regression target, a per-example loss weight (None: 1) and image conditioning added for the step."""
  x_t: Any
  t_B: Any
  target: Any
  weight_B: Any
  image: dict


@dataclasses.dataclass
class Pipeline:
  """A loaded (or abstract) pipeline: the family's NNX modules, tokenizers, noise schedule and raw configs."""

  family: types.ModuleType
  modules: dict[str, Any]  # component name -> nnx.Module (None once freed)
  tokenizers: dict[str, Any]
  schedule: Any
  configs: dict  # raw config.json dicts per component, plus "scheduler" and "model_index"
  model_dir: pathlib.Path | None = None
  # prompt -> the family's encode_text outputs for it (each without a batch axis): what sampling reads once the
  # text encoders have been freed (sampling/sampler.py free_text_encoders)
  text_cache: dict | None = None

  @property
  def denoiser(self):
    return self.modules[self.family.DENOISER]

  @property
  def vae(self):
    return self.modules["vae"]

  def __getattr__(self, name: str):
    """pipe.unet, pipe.text_encoder_2, pipe.tokenizer ...: components and tokenizers by name, as on diffusers'
    pipelines."""
    if name not in ("modules", "tokenizers"):
      for table in (self.modules, self.tokenizers):
        if name in table:
          return table[name]
    raise AttributeError(f"{type(self).__name__} of family {self.family.NAME!r} has no {name!r}")

  def size_multiple(self, denoiser=None) -> int:
    """Image sizes must divide by this (the family's rule: SD's VAE factor x the UNet's halvings, Flux's VAE
    factor x its 2 x 2 packing). `denoiser` overrides the pipeline's (its config is what counts)."""
    denoiser = self.denoiser if denoiser is None else denoiser
    return self.family.size_multiple(self.configs, denoiser.config)

  def replace(self, **modules) -> "Pipeline":
    """A copy with some modules replaced (e.g. the trained UNet)."""
    return dataclasses.replace(self, modules={**self.modules, **modules})
