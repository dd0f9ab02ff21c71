"""Stable Diffusion XL: a UNet conditioned on two CLIP text encoders and on image sizes, and a VAE.

- context = both encoders' *penultimate* hidden states (no final layer norm), concatenated (768 + 1280 = 2048);
- pooled = the second encoder's final-norm EOS token through `text_projection` (text_embeds, 1280); the second
  tokenizer pads with "!" (id 0), so the EOS is found by its id;
- six time ids per image (original size, crop top-left, target size) -> `add_time_proj` -> `add_embedding`,
  added to the timestep embedding; training uses each image's real original size and crop, sampling (H, W, 0, 0,
  H, W) as StableDiffusionXLPipeline;
- guidance's unconditional text is zeros for an empty negative prompt when model_index.json says
  `force_zeros_for_empty_prompt` (the base model does);
- the VAE (scaling 0.13025) overflows in fp16: with `force_upcast` it computes in fp32 when fp16 is asked.
"""

import jax.numpy as jnp
import numpy as np

from dreambooth_jax.families import sd
from dreambooth_jax.families.spec import Component
from dreambooth_jax.io import lora_files, sgm_keys
from dreambooth_jax.io.tokenizers import tokenize as clip_tokenize
from dreambooth_jax.models.clip_text import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                                             hub_keys, projection_model_keys)
from dreambooth_jax.models.unet import UNet2DConditionModel, UNetConfig
from dreambooth_jax.models.vae import AutoencoderKL, VAEConfig

NAME = "sdxl"
PIPELINE_CLASSES = ("StableDiffusionXLPipeline",)
COMPONENTS = {
    "unet": Component(UNetConfig, UNet2DConditionModel, "diffusion_pytorch_model", "denoiser"),
    "vae": Component(VAEConfig, AutoencoderKL, "diffusion_pytorch_model", "vae"),
    "text_encoder": Component(CLIPTextConfig, CLIPTextModel, "model", "text", save_keys=hub_keys),
    "text_encoder_2": Component(CLIPTextConfig, CLIPTextModelWithProjection, "model", "text",
                                normalize=projection_model_keys, save_keys=hub_keys),
}
TOKENIZERS = ("tokenizer", "tokenizer_2")
DENOISER = "unet"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
TEXT_KEYS = ("context", "text_embeds")
ID_KEYS = ("ids", "ids_2")
TIME_IDS = ("time_ids",)
BUNDLED_CONFIGS = {"sdxl": sd.ASSETS / "sdxl-configs"}
KNOWN_HUB_CONFIGS = {"stabilityai/stable-diffusion-xl-base-1.0": "sdxl"}
SINGLE_FILE_DESCRIPTION = "SDXL (conditioner.embedders.*)"
MODEL_INDEX_DEFAULTS = {}
latent_factor = sd.latent_factor
LORA_ATTENTION, LORA_FEED_FORWARD = sd.LORA_ATTENTION, sd.LORA_FEED_FORWARD
size_multiple = sd.size_multiple
schedule_from_config = sd.schedule_from_config
SAMPLER = sd.SAMPLER
DEFAULT_GUIDANCE = sd.DEFAULT_GUIDANCE
guidance_scales = sd.guidance_scales
set_max_sequence_length = sd.set_max_sequence_length
training_inputs = sd.training_inputs


def default_resolution(configs: dict) -> int:
  """1024 for the SDXL base (sample_size 128 x the VAE's 8)."""
  return sd.default_resolution(configs)


def component_dtype(component: str, config, dtype):
  if component == "vae" and config.force_upcast and jnp.dtype(dtype) == jnp.float16:
    return jnp.float32
  return dtype


def tokenize(tokenizers: dict, prompts) -> dict:
  prompts = list(prompts)
  return {"ids": clip_tokenize(tokenizers["tokenizer"], prompts),
          "ids_2": clip_tokenize(tokenizers["tokenizer_2"], prompts)}


def encode_text(modules: dict, ids: dict) -> dict:
  """StableDiffusionXLPipeline.encode_prompt (clip_skip None): penultimate states of both encoders, concatenated,
  and the second encoder's projected pooled output."""
  first = modules["text_encoder"].encode(ids["ids"])
  second = modules["text_encoder_2"].encode(ids["ids_2"])
  context_BSD = jnp.concatenate([first.penultimate, second.penultimate.astype(first.penultimate.dtype)], axis=-1)
  return {"context": context_BSD, "text_embeds": second.text_embeds}


def text_spec(pipeline) -> dict:
  tokens = pipeline.tokenizers["tokenizer"].model_max_length
  width = pipeline.configs["text_encoder"]["hidden_size"] + pipeline.configs["text_encoder_2"]["hidden_size"]
  return {"context": ((tokens, width), jnp.float32),
          "text_embeds": ((pipeline.configs["text_encoder_2"]["projection_dim"],), jnp.float32)}


def ids_spec(pipeline) -> dict:
  return {"ids": ((pipeline.tokenizers["tokenizer"].model_max_length,), jnp.int32),
          "ids_2": ((pipeline.tokenizers["tokenizer_2"].model_max_length,), jnp.int32)}


def image_conditioning_keys() -> tuple:
  return TIME_IDS


def image_conditioning_spec(pipeline) -> dict:
  del pipeline
  return {"time_ids": ((6,), jnp.float32)}


def time_ids(original_size_B2, crop_top_left_B2, target_size_B2) -> np.ndarray:
  """(B, 6) float32: original (h, w), crop top-left (y, x), target (h, w), as diffusers' _get_add_time_ids."""
  return np.concatenate([original_size_B2, crop_top_left_B2, target_size_B2], axis=-1).astype(np.float32)


def sampling_image_conditioning(configs: dict, settings, batch: int) -> dict:
  del configs
  size = np.tile([[settings.height, settings.width]], (batch, 1))
  return {"time_ids": time_ids(size, np.zeros_like(size), size)}


def training_image_conditioning(original_size_B2, crop_top_left_B2, target_size: tuple[int, int]) -> dict:
  """Each image's real original size and crop (recorded by the data pipeline), target = the training (H, W): the
  square resolution, or the batch's bucket."""
  target = np.tile(np.asarray(target_size, np.asarray(original_size_B2).dtype), (len(original_size_B2), 1))
  return {"time_ids": time_ids(original_size_B2, crop_top_left_B2, target)}


def zero_unconditional(configs: dict, negative_prompts) -> bool:
  """StableDiffusionXLPipeline: no negative prompt and force_zeros_for_empty_prompt -> zero embeddings."""
  return bool(configs["model_index"].get("force_zeros_for_empty_prompt", True)) and not any(negative_prompts)


def denoise(modules: dict, x_BHWC, t_B, text: dict, image: dict):
  return modules["unet"](x_BHWC, t_B, text["context"],
                         added_cond={"text_embeds": text["text_embeds"], "time_ids": image["time_ids"]})


# ---------------------------------------------------------------------------------------- single files

def is_single_file(names) -> bool:
  return sgm_keys.is_sdxl_single_file(names)


def single_file_config(names) -> str:
  del names
  return "sdxl"


def from_single_file(tensors: dict, configs: dict) -> dict:
  """{component: diffusers-named state dict} of an original SGM-layout single file."""
  return sgm_keys.sdxl_single_file_to_diffusers(tensors, configs)


def to_single_file(state_dicts: dict, configs: dict) -> dict:
  return sgm_keys.sdxl_diffusers_to_single_file(state_dicts, configs)


def single_file_names(configs: dict) -> dict:
  return sgm_keys.sdxl_single_file_names(configs)


def kohya_unet_names(configs: dict) -> dict:
  """kohya's SDXL LoRA files name UNet modules by their original SGM paths (lora_unet_input_blocks_4_1_...)."""
  return sgm_keys.unet_module_names(configs["unet"])


def to_kohya_lora(factors: dict, alpha: float, configs: dict) -> dict:
  """kohya's SDXL LoRA keys: lora_unet_<SGM path>, lora_te1_ / lora_te2_."""
  return lora_files.to_kohya(factors, alpha, lora_files.KOHYA_PREFIXES_SDXL, unet_names=kohya_unet_names(configs))


def from_kohya_lora(tensors: dict, configs: dict, known_modules: dict | None) -> tuple[dict, float]:
  return lora_files.from_kohya(tensors, known_modules=known_modules, unet_names=kohya_unet_names(configs))
