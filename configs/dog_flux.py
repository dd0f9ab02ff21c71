"""DreamBooth-LoRA on the bundled dog photos with FLUX.1-dev, as diffusers' train_dreambooth_lora_flux.py.

  python -m dreambooth_jax.train --config=configs/dog_flux.py           # 512 px (the script's README example)
  python -m dreambooth_jax.train --config=configs/dog_flux.py:1024      # 1024 px, FLUX.1's own resolution
  [--config.pretrained_model_name_or_path=/local/FLUX.1-dev] [--dry_run]

The script's defaults: rank 4, lr 1e-4, guidance_scale 3.5 as the transformer's guidance input, weighting_scheme
none, LoRA on the attention projections of both streams and the single blocks plus the feed-forward layers (its
default target list), T5 prompts of 512 tokens; its README example trains 500 steps at 512 px, batch 1, prior
preservation off. Text embeddings are cached (T5-XXL and CLIP encode each caption once); bf16 base weights.
"""

from dreambooth_jax.config_files import load_sibling


def get_config(arg: str | None = None):
  if arg not in (None, "", "512", "1024"):
    raise ValueError(f"configs/dog_flux.py:{arg}: the variants are '512' (default) and '1024'")
  c = load_sibling(__file__, "common.py")
  c.pretrained_model_name_or_path = "black-forest-labs/FLUX.1-dev"
  c.instance_prompt = "a photo of sks dog"
  c.class_prompt = "a photo of dog"
  c.with_prior_preservation = False
  c.resolution = 1024 if arg == "1024" else 512
  c.lora.enabled = True
  c.lora.rank = 4
  c.lora.feed_forward = True
  c.learning_rate = 1e-4
  c.max_train_steps = 500
  c.guidance_scale = 3.5
  c.weighting_scheme = "none"
  c.max_sequence_length = 512
  c.mixed_precision = "bf16"
  c.param_dtype = "bfloat16"  # the frozen 12B base in bf16; the LoRA factors (always float32) are the only trained params
  c.remat = "full"
  # class images and validation: FluxPipeline's sampler and guidance
  c.sample_scheduler = "flow_euler"
  c.class_guidance = 3.5
  c.class_generation_steps = 28
  c.validation_guidance = 3.5
  c.validation_inference_steps = 28
  c.validation_prompt = "a photo of sks dog in a bucket"
  return c
