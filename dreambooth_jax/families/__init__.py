"""Model families. Each module here describes one kind of pipeline (plain constants and functions, no class tree):

  NAME, PIPELINE_CLASSES                              its name; model_index.json `_class_name`s it loads
  COMPONENTS {name: Component}, TOKENIZERS            model and config classes, weight-file stems, roles
  DENOISER, TEXT_ENCODERS                             which components play which part
  component_dtype(component, config, dtype)           dtype rules (SDXL: the VAE never computes in fp16)
  tokenize(tokenizers, prompts) -> {ID_KEYS: ids}     the text inputs; ids_spec(pipeline) their shapes
  encode_text(modules, ids) -> {TEXT_KEYS: array}     the text conditioning (what the text-embedding cache stores);
                                                      text_spec(pipeline) its per-example shapes
  zero_unconditional(configs, negative_prompts)       whether guidance's unconditional text is zeros
  image_conditioning_keys(), image_conditioning_spec(pipeline)
                                                      per-example inputs besides latents and text (SDXL time ids),
  training_image_conditioning(original_size, crop_top_left, (H, W)), sampling_image_conditioning(h, w, batch)
                                                      and their values in training and sampling
  denoise(modules, x_BHWC, t_B, text, image)          the denoiser's prediction
  is_single_file, single_file_config, from_single_file, to_single_file, single_file_names
                                                      the original single-file layout
  kohya_unet_names(configs)                           how kohya's LoRA files name the denoiser's modules
  BUNDLED_CONFIGS, KNOWN_HUB_CONFIGS                  configs shipped for single files and offline plans
  default_resolution(configs), latent_factor(configs), MODEL_INDEX_DEFAULTS

The trainer, sampler, memory plan, export and LoRA code ask the family instead of assuming one pipeline shape.
A family is chosen from model_index.json's `_class_name` (or, for a single file, from its keys).
"""

import types

from dreambooth_jax.families import sd, sdxl
from dreambooth_jax.families.spec import Component, Pipeline

__all__ = ["Component", "FAMILIES", "Pipeline", "for_model_index", "for_single_file", "get"]

FAMILIES: dict[str, types.ModuleType] = {"sd": sd, "sdxl": sdxl}


def get(name: str) -> types.ModuleType:
  if name not in FAMILIES:
    raise ValueError(f"model family {name!r}: expected one of {sorted(FAMILIES)}")
  return FAMILIES[name]


def for_model_index(index: dict, where: str) -> types.ModuleType:
  """The family of a diffusers folder, from model_index.json's `_class_name`."""
  class_name = index.get("_class_name")
  for family in FAMILIES.values():
    if class_name in family.PIPELINE_CLASSES:
      return family
  known = sorted(c for f in FAMILIES.values() for c in f.PIPELINE_CLASSES)
  raise ValueError(f"{where}: model_index.json's _class_name {class_name!r} is not a supported pipeline "
                   f"(supported: {known})")


def for_single_file(keys, where: str) -> types.ModuleType:
  """The family whose single-file layout these tensor names are."""
  for family in FAMILIES.values():
    if family.is_single_file(keys):
      return family
  raise ValueError(f"{where}: the tensor names match no supported single-file layout "
                   f"({', '.join(f.SINGLE_FILE_DESCRIPTION for f in FAMILIES.values())})")
