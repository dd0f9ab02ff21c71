"""Image preprocessing of the metric encoders with numpy + PIL, equal to transformers' image processors (PIL
backend: CLIPImageProcessorPil, ViTImageProcessorPil): convert to RGB (alpha over white), PIL resize of the uint8
image, center crop (zero padding when too small), rescale by 1/255, normalise. Output: float32 NHWC.

Files are decoded by training's decoder (data.images.open_image: EXIF orientation, 16-bit, palette, alpha over
white, as transformers' convert_to_rgb composites it), so a photo scores as the model was trained on it.

The sizes, filter and statistics come from the model folder's preprocessor_config.json when there is one, read with
transformers' semantics; otherwise from the defaults below.
"""

import dataclasses
import json
import math
import pathlib

import numpy as np
from PIL import Image, UnidentifiedImageError

from dreambooth_jax.data import images as images_lib

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
NEAREST, BILINEAR, BICUBIC = 0, 2, 3  # PIL.Image.Resampling values, as preprocessor_config.json stores them


@dataclasses.dataclass(frozen=True)
class ImageSpec:
  size: dict  # {"shortest_edge": n} or {"height": h, "width": w}
  resample: int = BILINEAR
  do_resize: bool = True
  do_center_crop: bool = False
  crop_size: dict | None = None  # {"height": h, "width": w}
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  image_mean: tuple = IMAGENET_DEFAULT_MEAN
  image_std: tuple = IMAGENET_DEFAULT_STD
  default_to_square: bool = True  # how an int `size` in a config reads (CLIP: shortest edge; ViT: square)


# CLIPImageProcessor's defaults (= openai/clip-vit-*'s preprocessor_config.json).
CLIP_SPEC = ImageSpec(size={"shortest_edge": 224}, resample=BICUBIC, do_center_crop=True,
                      crop_size={"height": 224, "width": 224}, image_mean=OPENAI_CLIP_MEAN,
                      image_std=OPENAI_CLIP_STD, default_to_square=False)
# facebook/dino-vits16's preprocessor_config.json (a ViTFeatureExtractor): 224x224 bilinear squash, no crop,
# ImageNet statistics. ViTImageProcessor's own defaults (mean/std 0.5) would not suit DINO's weights.
DINO_SPEC = ImageSpec(size={"height": 224, "width": 224}, resample=BILINEAR)
# The DINO repository's evaluation transform (Resize(256, bicubic), CenterCrop(224), ImageNet statistics), which
# reimplementations of DreamBooth's DINO metric often use; torchvision resizes PIL images with PIL, as here.
DINO_EVAL_SPEC = ImageSpec(size={"shortest_edge": 256}, resample=BICUBIC, do_center_crop=True,
                           crop_size={"height": 224, "width": 224})


def size_dict(value, default_to_square: bool, where: str) -> dict:
  """transformers' get_size_dict: int -> square or shortest edge; (h, w) -> height/width; dicts as they are."""
  if isinstance(value, int):
    return {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
  if isinstance(value, (list, tuple)) and len(value) == 2:
    return {"height": int(value[0]), "width": int(value[1])}
  if isinstance(value, dict):
    if set(value) == {"shortest_edge"} or set(value) == {"height", "width"}:
      return {k: int(v) for k, v in value.items()}
  raise ValueError(f"{where}: size {value!r} is not supported (an int, [h, w], {{'shortest_edge': n}} or "
                   "{'height': h, 'width': w})")


def spec_from_config(config: dict, defaults: ImageSpec, where: str = "preprocessor_config.json") -> ImageSpec:
  square = defaults.default_to_square
  fields = {}
  if config.get("size") is not None:
    fields["size"] = size_dict(config["size"], square, where)
  if config.get("crop_size") is not None:
    fields["crop_size"] = size_dict(config["crop_size"], True, where)
  for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
    if config.get(key) is not None:
      fields[key] = bool(config[key])
  if config.get("resample") is not None:
    fields["resample"] = int(config["resample"])
  if config.get("rescale_factor") is not None:
    fields["rescale_factor"] = float(config["rescale_factor"])
  for key in ("image_mean", "image_std"):
    if config.get(key) is not None:
      value = config[key]
      fields[key] = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value] * 3))
      if len(fields[key]) != 3:
        raise ValueError(f"{where}: {key} must have 3 values (RGB), got {value!r}")
  spec = dataclasses.replace(defaults, **fields)
  if spec.do_center_crop and spec.crop_size is None:
    raise ValueError(f"{where}: do_center_crop is set but crop_size is missing")
  return spec


def spec_for_folder(folder, defaults: ImageSpec) -> ImageSpec:
  """The spec of a transformers model folder: its preprocessor_config.json over `defaults`."""
  path = pathlib.Path(folder) / "preprocessor_config.json"
  if not path.is_file():
    return defaults
  try:
    config = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON ({e})") from None
  return spec_from_config(config, defaults, where=str(path))


def output_size(height: int, width: int, size: dict) -> tuple[int, int]:
  if "shortest_edge" in size:  # torchvision/transformers: the long side is truncated, not rounded
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)
  return size["height"], size["width"]


# One decoder for training and evaluation. Both composite alpha over white (transformers' convert_to_rgb does too).
to_rgb = images_lib.to_rgb


def center_crop(image_HWC: np.ndarray, height: int, width: int) -> np.ndarray:
  """transformers' center_crop: floor offsets, zero padding (centred, ceil) where the image is too small."""
  h, w = image_HWC.shape[:2]
  new_h, new_w = max(h, height), max(w, width)
  if (new_h, new_w) != (h, w):
    top_pad, left_pad = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    padded = np.zeros((new_h, new_w, image_HWC.shape[2]), image_HWC.dtype)
    padded[top_pad:top_pad + h, left_pad:left_pad + w] = image_HWC
    top, left = (h - height) // 2 + top_pad, (w - width) // 2 + left_pad
    image_HWC = padded
  else:
    top, left = (h - height) // 2, (w - width) // 2
  return image_HWC[max(0, top):top + height, max(0, left):left + width]


def preprocess(image: Image.Image, spec: ImageSpec) -> np.ndarray:
  """One PIL image -> float32 (H, W, 3)."""
  image = to_rgb(image)
  if spec.do_resize:
    height, width = output_size(image.height, image.width, spec.size)
    image = image.resize((width, height), resample=spec.resample)
  pixels_HWC = np.asarray(image)
  if spec.do_center_crop:
    pixels_HWC = center_crop(pixels_HWC, spec.crop_size["height"], spec.crop_size["width"])
  # float64 product then float32, then float32 normalisation: the same arithmetic as transformers' numpy path.
  pixels_HWC = (pixels_HWC.astype(np.float64) * spec.rescale_factor if spec.do_rescale else pixels_HWC)
  pixels_HWC = pixels_HWC.astype(np.float32)
  if spec.do_normalize:
    mean, std = np.asarray(spec.image_mean, np.float32), np.asarray(spec.image_std, np.float32)
    pixels_HWC = (pixels_HWC - mean) / std
  return pixels_HWC


def open_image(path) -> Image.Image:
  """Training's decoder (RGB, EXIF-oriented), its errors as one ValueError naming the file."""
  try:
    return images_lib.open_image(pathlib.Path(path))
  except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def load_batch(paths, spec: ImageSpec) -> np.ndarray:
  """float32 (N, H, W, 3) of the image files (or uint8 HWC arrays), preprocessed."""
  arrays = [preprocess(Image.fromarray(p) if isinstance(p, np.ndarray) else open_image(p), spec) for p in paths]
  shapes = {a.shape for a in arrays}
  if len(shapes) > 1:  # only without crop and with shortest-edge resizing
    raise ValueError(f"images preprocess to different shapes {sorted(shapes)}: configure a center crop or a fixed "
                     "height/width resize")
  return np.stack(arrays)
