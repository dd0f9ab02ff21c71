"""Stable Diffusion 1.x / 2.x: a UNet conditioned on one CLIP text encoder's last hidden state, and a VAE.

1.x uses OpenAI CLIP ViT-L (quick_gelu), 2.x OpenCLIP ViT-H (gelu) and, at 768 px, v-prediction; both are read from
the folder's configs, so one family covers both.
"""

import pathlib

import jax
import jax.numpy as jnp

from dreambooth_jax.families.spec import Component, TrainingInputs
from dreambooth_jax.io import lora_files, single_file_keys as keys
from dreambooth_jax.io.tokenizers import tokenize as clip_tokenize
from dreambooth_jax.sampling import schedulers, schedules
from dreambooth_jax.models import lora
from dreambooth_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, hub_keys
from dreambooth_jax.models.unet import UNet2DConditionModel, UNetConfig
from dreambooth_jax.models.vae import AutoencoderKL, VAEConfig

NAME = "sd"
PIPELINE_CLASSES = ("StableDiffusionPipeline",)
COMPONENTS = {
    "unet": Component(UNetConfig, UNet2DConditionModel, "diffusion_pytorch_model", "denoiser"),
    "vae": Component(VAEConfig, AutoencoderKL, "diffusion_pytorch_model", "vae"),
    "text_encoder": Component(CLIPTextConfig, CLIPTextModel, "model", "text", save_keys=hub_keys),
}
TOKENIZERS = ("tokenizer",)
DENOISER = "unet"
TEXT_ENCODERS = ("text_encoder",)
TEXT_KEYS = ("context",)  # encode_text's outputs: what the text-embedding cache stores per caption
ID_KEYS = ("ids",)  # tokenize's outputs
# LoRA's denoiser targets (module-name suffixes): the attention projections; lora.feed_forward adds the others
LORA_ATTENTION, LORA_FEED_FORWARD = lora.UNET_ATTENTION, lora.UNET_FEED_FORWARD
ASSETS = pathlib.Path(__file__).resolve().parents[1] / "assets"
# Bundled config folders (single files and offline memory plans), by name.
BUNDLED_CONFIGS = {"sd15": ASSETS / "sd-configs" / "sd15", "sd21": ASSETS / "sd-configs" / "sd21"}
# Hub ids whose shapes the bundled configs describe (the memory plan works offline with them).
KNOWN_HUB_CONFIGS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15", "runwayml/stable-diffusion-v1-5": "sd15",
    "CompVis/stable-diffusion-v1-4": "sd15", "stabilityai/stable-diffusion-2-1": "sd21",
    "stabilityai/stable-diffusion-2-1-base": "sd21"}
SINGLE_FILE_DESCRIPTION = f"SD 1.x ({keys.CLIP_PREFIX}*) or 2.x ({keys.OPEN_CLIP_PREFIX}*)"
# model_index.json entries an export adds when absent (no safety checker is exported: say it is not required)
MODEL_INDEX_DEFAULTS = {"requires_safety_checker": False}


def latent_factor(configs: dict) -> int:
  """Pixels per latent cell: the VAE halves the resolution at each block but the last."""
  return 2 ** (len(configs["vae"]["block_out_channels"]) - 1)


def size_multiple(configs: dict, denoiser_config) -> int:
  """Image sizes divide by this: the VAE's factor times the UNet's halvings (one per down block but the last)."""
  return latent_factor(configs) * 2 ** (len(denoiser_config.block_out_channels) - 1)


def schedule_from_config(scheduler_config: dict):
  """The noise schedule of scheduler_config.json (what training draws from and the samplers start from)."""
  return schedules.schedule_from_config(scheduler_config)


# The sampler protocol (sampling/sampler.py drives it): plan_for, initial_noise_scale, initial_carry,
# scale_model_input, denoiser_timestep, needs_noise, step. SD's is DDIM / DPM++ 2M / Euler / Euler a.
SAMPLER = schedulers
DEFAULT_GUIDANCE = 7.5  # classifier-free guidance


def guidance_scales(configs: dict, settings, negative_prompts) -> float:
  """The classifier-free guidance scale of a sampling run (1 = one unguided pass): SD's `guidance`."""
  del configs, negative_prompts
  if settings.true_cfg != 1.0:
    raise ValueError(f"true_cfg={settings.true_cfg} applies to guidance-distilled models (Flux) only; SD's "
                     "classifier-free guidance scale is `guidance`")
  return settings.guidance


def training_inputs(modules: dict, schedule, x0_BHWC, noise_BHWC, keys_B, settings) -> TrainingInputs:
  """DDPM training: t uniform over the train timesteps (one key per example), x_t = add_noise, the target of the
  schedule's prediction type, min-SNR weighting with settings.snr_gamma."""
  del modules
  if settings.weighting_scheme != "none":
    raise ValueError(f"weighting_scheme={settings.weighting_scheme!r} applies to flow-matching models (Flux); "
                     "noise-schedule models weight with snr_gamma")
  t_B = jax.vmap(lambda k: jax.random.randint(k, (), 0, schedule.num_train_timesteps))(keys_B)
  x_t = schedules.add_noise(schedule, x0_BHWC, noise_BHWC, t_B)
  target = schedules.training_target(schedule, x0_BHWC, noise_BHWC, t_B)
  weight_B = (schedules.min_snr_loss_weight(schedule, t_B, settings.snr_gamma, settings.snr_weighting)
              if settings.snr_gamma else None)
  return TrainingInputs(x_t, t_B, target, weight_B, {})


def default_resolution(configs: dict) -> int:
  """The resolution the UNet was trained at (512 for 1.x and 2.x-base, 768 for 2.x)."""
  return int(configs["unet"].get("sample_size") or 64) * latent_factor(configs)


def component_dtype(component: str, config, dtype):
  """The compute dtype a component is built with: as asked (SD's VAE runs in fp16 in practice)."""
  del component, config
  return dtype


def set_max_sequence_length(tokenizers: dict, length: int | None):
  """A T5 prompt length (Flux's max_sequence_length): CLIP's 77 tokens are fixed, so only None is accepted."""
  del tokenizers
  if length is not None:
    raise ValueError(f"max_sequence_length={length} applies to T5-conditioned models (Flux) only")


def tokenize(tokenizers: dict, prompts) -> dict:
  return {"ids": clip_tokenize(tokenizers["tokenizer"], list(prompts))}


def encode_text(modules: dict, ids: dict) -> dict:
  """The UNet's cross-attention context: the text encoder's last hidden state (after its final layer norm)."""
  context_BSD, _ = modules["text_encoder"](ids["ids"])
  return {"context": context_BSD}


def text_spec(pipeline) -> dict:
  """Per-example shapes of encode_text's outputs (the text-embedding cache and the memory plan)."""
  tokens = pipeline.tokenizers["tokenizer"].model_max_length
  return {"context": ((tokens, pipeline.configs["text_encoder"]["hidden_size"]), jnp.float32)}


def ids_spec(pipeline) -> dict:
  return {"ids": ((pipeline.tokenizers["tokenizer"].model_max_length,), jnp.int32)}


def image_conditioning_keys() -> tuple:
  """Per-example inputs besides latents and text that the denoiser takes: none for SD."""
  return ()


def image_conditioning_spec(pipeline) -> dict:
  del pipeline
  return {}


def sampling_image_conditioning(configs: dict, settings, batch: int) -> dict:
  del configs, settings, batch
  return {}


def training_image_conditioning(original_size_B2, crop_top_left_B2, target_size: tuple[int, int]) -> dict:
  del original_size_B2, crop_top_left_B2, target_size
  return {}


def zero_unconditional(configs: dict, negative_prompts) -> bool:
  """Whether guidance's unconditional text is zeros instead of the encoded negative prompt: never for SD."""
  del configs, negative_prompts
  return False


def denoise(modules: dict, x_BHWC, t_B, text: dict, image: dict):
  del image  # SD has no per-image conditioning
  return modules["unet"](x_BHWC, t_B, text["context"])


# ---------------------------------------------------------------------------------------- single files

def is_single_file(names) -> bool:
  return any(k.startswith((keys.CLIP_PREFIX, keys.OPEN_CLIP_PREFIX)) for k in names)


def single_file_config(names) -> str:
  """The bundled configs of a single file: OpenCLIP text keys -> SD 2.1, OpenAI CLIP -> SD 1.5."""
  return "sd21" if any(k.startswith(keys.OPEN_CLIP_PREFIX) for k in names) else "sd15"


def from_single_file(tensors: dict, configs: dict) -> dict:
  """{component: diffusers-named state dict} of an original-layout single file."""
  unet, vae, text = keys.single_file_to_diffusers(tensors, unet_config=configs["unet"], vae_config=configs["vae"],
                                                  text_config=configs["text_encoder"])
  return {"unet": unet, "vae": vae, "text_encoder": text}


def to_single_file(state_dicts: dict, configs: dict) -> dict:
  return keys.diffusers_to_single_file(state_dicts["unet"], state_dicts["vae"], state_dicts["text_encoder"],
                                       unet_config=configs["unet"], vae_config=configs["vae"],
                                       text_config=configs["text_encoder"])


def kohya_unet_names(configs: dict) -> None:
  """kohya's SD 1.x/2.x LoRA files name UNet modules by their diffusers paths: no renaming."""
  del configs


def single_file_names(configs: dict) -> dict[str, dict[str, str]]:
  """{component: {diffusers key: single-file key}}, to name the file's tensor in errors."""
  names = {"unet": {d: s for d, (s, _) in keys.unet_key_map(configs["unet"]).items()},
           "vae": {d: s for d, (s, _) in keys.vae_key_map(configs["vae"]).items()},
           "text_encoder": dict(keys.text_key_map(configs["text_encoder"]))}
  if keys.is_open_clip(configs["text_encoder"]):
    for i in range(configs["text_encoder"]["num_hidden_layers"]):
      for p in keys.WB:
        for q in "qkv":
          names["text_encoder"][f"encoder.layers.{i}.self_attn.{q}_proj.{p}"] = (
              f"{keys.OPEN_CLIP_PREFIX}transformer.resblocks.{i}.attn.in_proj_{p} ({q} part)")
  return names


def to_kohya_lora(factors: dict, alpha: float, configs: dict) -> dict:
  """kohya sd-scripts' LoRA keys (lora_unet_<diffusers path>, lora_te_) of {component: lora}."""
  return lora_files.to_kohya(factors, alpha, lora_files.KOHYA_PREFIXES_SD, unet_names=kohya_unet_names(configs))


def from_kohya_lora(tensors: dict, configs: dict, known_modules: dict | None) -> tuple[dict, float]:
  return lora_files.from_kohya(tensors, known_modules=known_modules, unet_names=kohya_unet_names(configs))
