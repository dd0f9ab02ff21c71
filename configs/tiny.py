"""The embedded offline default: a tiny random-weight SD-shaped model (dreambooth_jax/assets/tiny-sd), the bundled
dog photos, 64 px. The whole job (class images, training, checkpoint, export, validation samples) runs in a few
minutes on 2 CPU cores and shows the loss fall; the images are not meaningful.

  python -m dreambooth_jax.train --config=configs/tiny.py
  python -m dreambooth_jax.train --config=configs/tiny.py:lora    # LoRA on the UNet attention instead
"""

from dreambooth_jax.config_files import load_sibling


def get_config(arg: str | None = None):
  if arg not in (None, "", "lora"):
    raise ValueError(f"configs/tiny.py:{arg}: the only variant is 'lora'")
  c = load_sibling(__file__, "common.py")
  c.pretrained_model_name_or_path = "tiny"  # the bundled configs, see dreambooth_jax/assets/tiny-sd
  c.random_init = True
  c.mixed_precision = "no"  # CPUs compute bf16 slowly
  c.num_class_images = 8
  c.sample_batch_size = 8
  c.class_generation_steps = 10
  c.resolution = 64
  c.train_batch_size = 2
  c.learning_rate = 1e-3
  c.lr_warmup_steps = 10
  c.lr_scheduler = "constant_with_warmup"
  c.max_train_steps = 150
  c.checkpointing_steps = 50
  c.validation_steps = 75
  c.num_validation_images = 4
  c.validation_inference_steps = 10
  if arg == "lora":
    c.lora.enabled = True
    c.lora.rank = 4
    c.learning_rate = 1e-2  # LoRA factors take larger steps than full weights
  return c
