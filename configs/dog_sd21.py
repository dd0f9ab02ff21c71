"""DreamBooth on the bundled dog photos with Stable Diffusion 2.1 (768 px, v-prediction: the target comes from
the model's scheduler config).

  python -m dreambooth_jax.train --config=configs/dog_sd21.py
"""

from dreambooth_jax.config_files import load_sibling


def get_config(arg: str | None = None):
  del arg
  c = load_sibling(__file__, "common.py")
  c.pretrained_model_name_or_path = "stabilityai/stable-diffusion-2-1"
  c.variant = "fp16"
  c.resolution = 768
  c.learning_rate = 2e-6
  c.max_train_steps = 800
  c.remat = "full"  # 768 px activations
  c.validation_prompt = "a photo of sks dog in a bucket"
  return c
