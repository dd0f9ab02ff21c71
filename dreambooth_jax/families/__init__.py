"""Model families. Each module here describes one kind of pipeline (plain constants and functions, no class tree):

  NAME, PIPELINE_CLASSES                              its name; model_index.json `_class_name`s it loads
  COMPONENTS {name: Component}, TOKENIZERS            model and config classes, weight-file stems, roles, the
                                                      key spellings read (normalize) and written (save_keys)
  DENOISER, TEXT_ENCODERS                             which components play which part
  component_dtype(component, config, dtype)           dtype rules (SDXL: the VAE never computes in fp16)
  tokenize(tokenizers, prompts) -> {ID_KEYS: ids}     the text inputs; ids_spec(pipeline) their shapes
  set_max_sequence_length(tokenizers, length)         the T5 prompt length (Flux; None elsewhere)
  encode_text(modules, ids) -> {TEXT_KEYS: array}     the text conditioning (what the text-embedding cache stores);
                                                      text_spec(pipeline) its per-example shapes
  zero_unconditional(configs, negative_prompts)       whether guidance's unconditional text is zeros
  image_conditioning_keys(), image_conditioning_spec(pipeline)
                                                      per-example inputs besides latents and text (SDXL time ids),
  training_image_conditioning(original_size, crop_top_left, (H, W)), sampling_image_conditioning(configs,
  settings, batch)                                    and their values in training and sampling (SDXL's time
                                                      ids at the trained (H, W); Flux: the distilled guidance)
  denoise(modules, x_BHWC, t_B, text, image)          the denoiser's prediction
  schedule_from_config(scheduler_config)              the noise schedule (Pipeline.schedule): SD's betas, Flux's
                                                      flow-matching config
  SAMPLER, DEFAULT_GUIDANCE                           the sampler protocol module (plan_for, initial_noise_scale,
                                                      initial_carry, scale_model_input, denoiser_timestep,
                                                      needs_noise, step: sampling/schedulers.py,
                                                      sampling/flow_matching.py) and the default `guidance`
  guidance_scales(configs, settings, negative_prompts)
                                                      the classifier-free guidance scale of a sampling run
  size_multiple(configs, denoiser_config)             what image sizes must divide by
  is_single_file, single_file_config, from_single_file, to_single_file, single_file_names
                                                      the original single-file layout
  kohya_unet_names(configs)                           how kohya's LoRA files name the denoiser's modules
  to_kohya_lora(factors, alpha, configs), from_kohya_lora(tensors, configs, known_modules)
                                                      the family's kohya LoRA layout (Flux: fused BFL modules)
  LORA_ATTENTION, LORA_FEED_FORWARD                   LoRA's default denoiser targets; lora.feed_forward's
  training_inputs(modules, schedule, x0, noise, keys_B, settings)
                                                      the training objective: timesteps, noised input, target,
                                                      loss weight (DDPM / flow matching)
  BUNDLED_CONFIGS, KNOWN_HUB_CONFIGS                  configs shipped for single files and offline plans
  default_resolution(configs), latent_factor(configs), MODEL_INDEX_DEFAULTS

The trainer, sampler, memory plan, export and LoRA code ask the family instead of assuming one pipeline shape.
A family is chosen from model_index.json's `_class_name` (or, for a single file, from its keys).
"""

import types

from dreambooth_jax.families import flux, sd, sdxl
from dreambooth_jax.families.spec import Component, Pipeline

__all__ = ["Component", "FAMILIES", "Pipeline", "for_model_index", "for_single_file", "get"]

FAMILIES: dict[str, types.ModuleType] = {"sd": sd, "sdxl": sdxl, "flux": flux}


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
