"""Two subjects in one run (config.concepts) on the offline tiny model: the bundled dog and a cat from the DreamBooth
dataset (github.com/google/dreambooth: its `dataset/` folder, one folder per subject), 64 px. Each concept has its
own class images (WORKDIR/class_images/<name>), prior weight and validation grid; metrics.jsonl's step records carry
instance_loss/<name> and prior_loss/<name>.

  python -m dreambooth_jax.train --config=configs/two_subjects.py:/path/to/dreambooth/dataset
  python -m dreambooth_jax.train --config=configs/two_subjects.py:/path/to/dreambooth/dataset \
      --config.pretrained_model_name_or_path=/local/sd15 --config.random_init=False --config.resolution=512
"""

import pathlib

from dreambooth_jax.config_files import load_sibling

BUNDLED_DOG = pathlib.Path(__file__).resolve().parents[1] / "dreambooth_jax" / "assets" / "dog"


def get_config(arg: str | None = None):
  if not arg:
    raise ValueError("configs/two_subjects.py needs the DreamBooth dataset folder (holding cat/): "
                     "--config=configs/two_subjects.py:/path/to/dreambooth/dataset")
  c = load_sibling(__file__, "tiny.py")
  c.num_class_images = 8  # per concept
  c.max_train_steps = 200
  c.validation_prompt = ""  # each concept draws its own grid
  c.concepts = [
      {"name": "dog", "instance_data_dir": str(BUNDLED_DOG), "instance_prompt": "a photo of sks dog",
       "class_prompt": "a photo of dog", "validation_prompt": "a photo of sks dog in a bucket"},
      # twice per epoch: a subject with fewer photos, or one that learns more slowly, is seen more often (kohya)
      {"name": "cat", "instance_data_dir": str(pathlib.Path(arg) / "cat"), "instance_prompt": "a photo of zwx cat",
       "class_prompt": "a photo of cat", "num_repeats": 2, "prior_loss_weight": 0.5,
       "validation_prompt": "a photo of zwx cat on a sofa"},
  ]
  return c
