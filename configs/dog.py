"""DreamBooth on the bundled dog photos with Stable Diffusion 1.5, as the paper and diffusers' example do it:
"a photo of sks dog" / "a photo of dog", 200 class images, 512 px, lr 5e-6, 800 steps, prior weight 1.0.

  python -m dreambooth_jax.train --config=configs/dog.py [--config.pretrained_model_name_or_path=/local/sd15]
  python -m dreambooth_jax.train --config=configs/dog.py:lora   # LoRA rank 16 (as diffusers' LoRA example, lr 1e-4)
"""

from dreambooth_jax.config_files import load_sibling


def get_config(arg: str | None = None):
  if arg not in (None, "", "lora"):
    raise ValueError(f"configs/dog.py:{arg}: the only variant is 'lora'")
  c = load_sibling(__file__, "common.py")
  c.pretrained_model_name_or_path = "stable-diffusion-v1-5/stable-diffusion-v1-5"
  c.instance_prompt = "a photo of sks dog"
  c.class_prompt = "a photo of dog"
  c.num_class_images = 200
  c.resolution = 512
  c.learning_rate = 5e-6
  c.max_train_steps = 800
  c.prior_loss_weight = 1.0
  c.validation_prompt = "a photo of sks dog in a bucket"
  if arg == "lora":
    c.lora.enabled = True
    c.lora.rank = 16
    c.learning_rate = 1e-4
  return c
