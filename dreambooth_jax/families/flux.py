"""Flux.1 (dev, schnell): a flow-matching transformer over 2 x 2-packed 16-channel VAE latents, conditioned on T5
hidden states (context) and the CLIP pooled output, as diffusers' FluxPipeline.

- context = T5 v1.1's last hidden state over `max_sequence_length` tokens (the T5 tokenizer's model_max_length:
  512 for FLUX.1; `set_max_sequence_length` changes it), no attention mask; pooled = CLIP-L's pooler_output over
  77 tokens;
- the transformer sees the sigma in [0, 1] (timestep / 1000), the packed latents with their (0, row, col) ids and
  the text with zero ids; guidance-distilled models (`guidance_embeds`, dev) take the guidance scale as an input
  (image conditioning "guidance"), schnell none; no classifier-free guidance unless `true_cfg` > 1 with a negative
  prompt (FluxPipeline's true CFG);
- the noise "schedule" is the FlowMatchEulerDiscreteScheduler config (sampling/flow_matching.py), the VAE latent
  is shifted and scaled ((z - shift_factor) * scaling_factor; models/vae.py).
"""

import jax
import jax.numpy as jnp
import numpy as np

from dreambooth_jax.families import sd
from dreambooth_jax.families.spec import Component, TrainingInputs
from dreambooth_jax.io import flux_lora_keys
from dreambooth_jax.io.tokenizers import tokenize as pad_tokenize
from dreambooth_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, hub_keys
from dreambooth_jax.models.flux import (FluxConfig, FluxTransformer2DModel, image_ids, pack_latents, text_ids,
                                        unpack_latents)
from dreambooth_jax.models.t5 import T5Config, T5EncoderModel, t5_encoder_keys
from dreambooth_jax.models.vae import AutoencoderKL, VAEConfig
from dreambooth_jax.sampling import flow_matching

NAME = "flux"
PIPELINE_CLASSES = ("FluxPipeline",)
COMPONENTS = {
    "transformer": Component(FluxConfig, FluxTransformer2DModel, "diffusion_pytorch_model", "denoiser"),
    "vae": Component(VAEConfig, AutoencoderKL, "diffusion_pytorch_model", "vae"),
    "text_encoder": Component(CLIPTextConfig, CLIPTextModel, "model", "text", save_keys=hub_keys),
    # T5's keys are transformers' own (no `text_model.` prefix); the tied embedding is stored once as `shared`
    "text_encoder_2": Component(T5Config, T5EncoderModel, "model", "text", normalize=t5_encoder_keys),
}
TOKENIZERS = ("tokenizer", "tokenizer_2")
DENOISER = "transformer"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
TEXT_KEYS = ("context", "pooled")
ID_KEYS = ("ids", "ids_2")
# Bundled config folders (offline memory plans at the real sizes; no weights, no T5 vocabulary), by name.
BUNDLED_CONFIGS = {"flux-dev": sd.ASSETS / "flux-configs" / "dev", "flux-schnell": sd.ASSETS / "flux-configs" / "schnell"}
KNOWN_HUB_CONFIGS = {"black-forest-labs/FLUX.1-dev": "flux-dev", "black-forest-labs/FLUX.1-schnell": "flux-schnell"}
SINGLE_FILE_DESCRIPTION = "none for Flux (diffusers folders only)"
MODEL_INDEX_DEFAULTS = {}
# LoRA's denoiser targets, train_dreambooth_lora_flux's defaults: the attention projections of both streams (image
# to_q/k/v/out.0, text add_*_proj/to_add_out; the single blocks' to_q/k/v) and, with lora.feed_forward (the
# script's default list has them too), both streams' feed-forward layers
LORA_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                  "attn.add_v_proj", "attn.to_add_out")
LORA_FEED_FORWARD = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
MAX_SEQUENCE_LENGTH = 512  # FluxPipeline refuses longer T5 prompts
latent_factor = sd.latent_factor
SAMPLER = flow_matching
DEFAULT_GUIDANCE = 3.5  # FluxPipeline's guidance_scale (the distilled guidance input)


def size_multiple(configs: dict, denoiser_config) -> int:
  """The VAE's factor times the 2 x 2 packing (x patch_size: FLUX.1 has 1)."""
  return latent_factor(configs) * 2 * denoiser_config.patch_size


def default_resolution(configs: dict) -> int:
  del configs
  return 1024


def schedule_from_config(scheduler_config: dict) -> flow_matching.FlowMatchConfig:
  return flow_matching.FlowMatchConfig.from_dict(scheduler_config)


def component_dtype(component: str, config, dtype):
  del component, config
  return dtype


def set_max_sequence_length(tokenizers: dict, length: int | None):
  """FluxPipeline's max_sequence_length: the T5 prompt length (None keeps the tokenizer's model_max_length)."""
  if length is None:
    return
  if not 1 <= length <= MAX_SEQUENCE_LENGTH:
    raise ValueError(f"max_sequence_length={length}: must be in [1, {MAX_SEQUENCE_LENGTH}] (as FluxPipeline)")
  tokenizers["tokenizer_2"].model_max_length = int(length)


def tokenize(tokenizers: dict, prompts) -> dict:
  """CLIP ids (77) for the pooled vector, T5 ids (max_sequence_length) for the context, both padded to length."""
  prompts = list(prompts)
  return {"ids": pad_tokenize(tokenizers["tokenizer"], prompts), "ids_2": pad_tokenize(tokenizers["tokenizer_2"],
                                                                                         prompts)}


def encode_text(modules: dict, ids: dict) -> dict:
  """FluxPipeline.encode_prompt: T5's last hidden state, CLIP's pooler_output."""
  _, pooled_BD = modules["text_encoder"](ids["ids"])
  return {"context": modules["text_encoder_2"](ids["ids_2"]), "pooled": pooled_BD}


def text_spec(pipeline) -> dict:
  tokens = pipeline.tokenizers["tokenizer_2"].model_max_length
  return {"context": ((tokens, pipeline.configs["text_encoder_2"]["d_model"]), jnp.float32),
          "pooled": ((pipeline.configs["text_encoder"]["hidden_size"],), jnp.float32)}


def ids_spec(pipeline) -> dict:
  return {"ids": ((pipeline.tokenizers["tokenizer"].model_max_length,), jnp.int32),
          "ids_2": ((pipeline.tokenizers["tokenizer_2"].model_max_length,), jnp.int32)}


def guidance_embeds(configs: dict) -> bool:
  return bool(configs["transformer"].get("guidance_embeds", False))


def image_conditioning_keys() -> tuple:
  """Nothing per example from the data: the distilled guidance is a constant of the run (training_inputs)."""
  return ()


def image_conditioning_spec(pipeline) -> dict:
  del pipeline
  return {}


def training_image_conditioning(original_size_B2, crop_top_left_B2, target_size: tuple[int, int]) -> dict:
  del original_size_B2, crop_top_left_B2, target_size
  return {}


def sampling_image_conditioning(configs: dict, settings, batch: int) -> dict:
  """The distilled guidance (B,) for guidance_embeds models; schnell takes none (a guidance other than the
  default is refused rather than ignored)."""
  if guidance_embeds(configs):
    return {"guidance": np.full((batch,), settings.guidance, np.float32)}
  if settings.guidance != DEFAULT_GUIDANCE:
    raise ValueError(f"guidance={settings.guidance}: this Flux model has no guidance input (guidance_embeds false, "
                     "e.g. schnell); leave guidance unset, or use true_cfg with a negative prompt")
  return {}


def guidance_scales(configs: dict, settings, negative_prompts) -> float:
  """Classifier-free guidance only as FluxPipeline's true CFG: true_cfg > 1 and a negative prompt."""
  del configs
  if settings.true_cfg > 1 and any(negative_prompts):
    return settings.true_cfg
  return 1.0


def training_inputs(modules: dict, schedule: flow_matching.FlowMatchConfig, x0_BHWC, noise_BHWC, keys_B,
                    settings) -> TrainingInputs:
  """train_dreambooth_lora_flux: u from the weighting scheme's density (one key per example) -> the training
  schedule's sigma and timestep; x_t = (1 - sigma) x0 + sigma noise, target noise - x0, the scheme's loss weight;
  guidance_scale as the guidance input of guidance_embeds models."""
  if settings.snr_gamma:
    raise ValueError(f"snr_gamma={settings.snr_gamma}: min-SNR weighting is for noise-schedule models; flow "
                     "matching weights with weighting_scheme (none, sigma_sqrt, logit_normal, mode, cosmap)")
  scheme = flow_matching.check_weighting_scheme(settings.weighting_scheme)
  u_B = jax.vmap(lambda k: flow_matching.sample_density(
      k, scheme, 1, logit_mean=settings.logit_mean, logit_std=settings.logit_std,
      mode_scale=settings.mode_scale)[0])(keys_B)
  sigmas_N, timesteps_N = flow_matching.training_schedule(schedule)
  sigma_B, t_B = flow_matching.training_timesteps(u_B, jnp.asarray(sigmas_N), jnp.asarray(timesteps_N))
  sigma = sigma_B[:, None, None, None]
  x_t = (1.0 - sigma) * x0_BHWC + sigma * noise_BHWC
  image = {}
  if modules["transformer"].config.guidance_embeds:
    image["guidance"] = jnp.full(sigma_B.shape, settings.guidance_scale, jnp.float32)
  return TrainingInputs(x_t, t_B, noise_BHWC - x0_BHWC, flow_matching.loss_weighting(scheme, sigma_B), image)


def zero_unconditional(configs: dict, negative_prompts) -> bool:
  del configs, negative_prompts
  return False


def denoise(modules: dict, x_BHWC, t_B, text: dict, image: dict):
  """The velocity (B, H, W, C) for latents x_BHWC at sigma t_B: packed, run through the transformer, unpacked."""
  _, h, w, _ = x_BHWC.shape
  out_BSC = modules["transformer"](pack_latents(x_BHWC), text["context"], text["pooled"], t_B, image_ids(h, w),
                                   text_ids(text["context"].shape[1]), image.get("guidance"))
  return unpack_latents(out_BSC, h, w)


# ---------------------------------------------------------------------------------------- single files

def is_single_file(names) -> bool:
  del names
  return False


def kohya_unet_names(configs: dict) -> None:
  """kohya's Flux names are not renames of single modules (q/k/v are fused): to/from_kohya_lora convert them."""
  del configs


def to_kohya_lora(factors: dict, alpha: float, configs: dict) -> dict:
  """kohya's Flux LoRA keys (lora_unet_double_blocks_N_img_attn_qkv ..., io/flux_lora_keys.py); transformer only."""
  others = sorted(set(factors) - {DENOISER})
  if others:
    raise ValueError(f"kohya's Flux LoRA layout is written for the transformer only, not {others}; export "
                     "text-encoder LoRA with --format=lora_diffusers")
  return flux_lora_keys.to_kohya_flux(factors[DENOISER], alpha, configs["transformer"])


def from_kohya_lora(tensors: dict, configs: dict, known_modules: dict | None) -> tuple[dict, float]:
  del known_modules  # the module set is checked by read_lora afterwards
  return flux_lora_keys.from_kohya_flux(tensors, configs["transformer"])
