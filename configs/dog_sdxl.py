"""DreamBooth on the bundled dog photos with Stable Diffusion XL base 1.0 at 1024 px.

  python -m dreambooth_jax.train --config=configs/dog_sdxl.py:lora   # LoRA: the one-GPU default
  python -m dreambooth_jax.train --config=configs/dog_sdxl.py        # full UNet fine-tune (pods: shard with mesh_fsdp)
  [--config.pretrained_model_name_or_path=/local/stable-diffusion-xl-base-1.0] [--dry_run]

LoRA follows diffusers' train_dreambooth_lora_sdxl.py (rank 4, lr 1e-4, 500 steps, prior preservation); the full
fine-tune pulls the memory levers a 2.6B-parameter UNet needs (bf16 master weights and Adam moments, remat).
"""

from dreambooth_jax.config_files import load_sibling


def get_config(arg: str | None = None):
  if arg not in (None, "", "lora"):
    raise ValueError(f"configs/dog_sdxl.py:{arg}: the only variant is 'lora'")
  c = load_sibling(__file__, "common.py")
  c.pretrained_model_name_or_path = "stabilityai/stable-diffusion-xl-base-1.0"
  c.instance_prompt = "a photo of sks dog"
  c.class_prompt = "a photo of dog"
  c.num_class_images = 100
  c.class_generation_steps = 25
  c.sample_scheduler = "euler"  # the hub model's own scheduler; 25 steps
  c.resolution = 0  # the model's own: 1024 for SDXL base
  c.validation_prompt = "a photo of sks dog in a bucket"
  c.validation_inference_steps = 25
  c.validation_guidance = 5.0
  c.class_guidance = 5.0
  if arg == "lora":
    c.lora.enabled = True
    c.lora.rank = 4
    c.learning_rate = 1e-4
    c.max_train_steps = 500
  else:
    c.learning_rate = 5e-6
    c.max_train_steps = 800
    c.param_dtype = "bfloat16"  # updated with stochastic rounding
    c.optimizer_moments_bf16 = True
    c.remat = "full"
  return c
