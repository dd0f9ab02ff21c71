"""Subject images -> deterministic, resumable, per-process batches (numpy + PIL; no TensorFlow, no torch).

Every file is decoded and checked once, up front: a broken image stops the run before training with every bad
file named (or is skipped and logged with on_bad_image="skip"). Each image is stored resized so its short side is
`resolution` (with
aspect-ratio buckets, data/buckets.py: resized to cover its bucket); per step only crop, flip and normalisation
remain. Crops and flips are pure functions of
(seed, epoch, position), so an iterator restored from its state yields exactly what the original would have.

Masked loss (kohya's): an image's loss mask in [0, 1] comes from `NAME_mask.png` beside `NAME.ext` (grayscale / 255;
white = trained, black = ignored), else its alpha channel, else it is all ones. It is resized, cropped and flipped
exactly as its image, then averaged over each f x f block down to the latent grid (latent_mask). A `*_mask.png`
whose stem minus `_mask` names an image of the folder is a mask, never an instance photo, with masked loss off too.
"""

import dataclasses
import json
import pathlib

import jax
import numpy as np
from absl import logging
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA = "metadata.jsonl"
MASK_SUFFIX = "_mask.png"


class BadImagesError(ValueError):
  """One or more image files cannot be used; the message names each with the reason."""


def to_rgb(image: Image.Image) -> Image.Image:
  """Any PIL mode to 8-bit RGB; transparency is composited on white, 16-bit data scaled (not clipped)."""
  if image.mode in ("I;16", "I;16B", "I;16L", "I"):
    array = np.asarray(image, dtype=np.float64)
    peak = 65535.0 if image.mode != "I" or array.max() > 255 else 255.0
    image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
  elif image.mode == "F":
    array = np.asarray(image, dtype=np.float64)
    image = Image.fromarray(np.clip(array * (255.0 if array.max() <= 1.0 else 1.0) + 0.5, 0, 255).astype(np.uint8))
  if image.mode == "P":
    image = image.convert("RGBA" if "transparency" in image.info else "RGB")
  if image.mode in ("RGBA", "LA", "PA") or (image.mode in ("RGB", "L") and "transparency" in image.info):
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return image.convert("RGB")


def alpha_channel(image: Image.Image) -> Image.Image | None:
  """The transparency (mode "L") of an image that has one (the modes to_rgb composites), else None."""
  if image.mode in ("RGBA", "LA", "PA") or ("transparency" in image.info and image.mode in ("RGB", "L", "P")):
    return image.convert("RGBA").getchannel("A")
  return None


def decode(source) -> Image.Image:
  """The image as stored (any mode), fully decoded (catches truncation), EXIF-rotated. source: a file's path, or a
  binary file object (a dataset's encoded image bytes, data/hf_datasets.py)."""
  if isinstance(source, (str, pathlib.Path)) and pathlib.Path(source).stat().st_size == 0:
    raise ValueError("empty file")
  with Image.open(source) as image:
    image.load()
    return ImageOps.exif_transpose(image)


def open_image(source) -> Image.Image:
  """Decodes fully (catches truncation), applies EXIF orientation, returns RGB. Raises with the reason.
  source: a file's path, or a binary file object (a dataset's encoded image bytes, data/hf_datasets.py)."""
  return to_rgb(decode(source))


def open_image_and_mask(path: pathlib.Path) -> tuple[Image.Image, Image.Image | None]:
  """(RGB image, its loss mask as mode "L" or None = all ones): NAME_mask.png in any mode as grayscale, else the
  image's alpha channel. A mask of another size than its image raises, naming both."""
  image = decode(path)
  mask_path = path.with_name(path.stem + MASK_SUFFIX)
  if mask_path.is_file():
    try:
      mask = to_rgb(decode(mask_path)).convert("L")
    except Exception as e:  # PIL raises many types for broken files
      raise ValueError(f"its mask {mask_path.name} cannot be read ({type(e).__name__}: {e})") from None
    if mask.size != image.size:
      raise ValueError(f"its mask {mask_path.name} is {mask.width}x{mask.height}, the image {image.width}x"
                       f"{image.height} (WxH); a mask must have its image's size")
  else:
    mask = alpha_channel(image)
  return to_rgb(image), mask


def mask_files(paths) -> set[pathlib.Path]:
  """The `NAME_mask.png` files among paths whose NAME is the stem of another of them: masks, not photos (spelt
  exactly so, as open_image_and_mask looks for them)."""
  stems = {p.stem for p in paths}
  return {p for p in paths if p.name.endswith(MASK_SUFFIX) and p.name[:-len(MASK_SUFFIX)] in stems}


def resize_short_side(image: Image.Image, resolution: int, name: str = "") -> np.ndarray:
  """Short side -> resolution (bilinear, as diffusers' train_dreambooth), uint8 HWC."""
  w, h = image.size
  if min(w, h) < resolution:
    logging.warning("%s: %dx%d is smaller than resolution %d; upscaling", name, w, h, resolution)
  scale = resolution / min(w, h)
  size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
  return np.asarray(image.resize(size, Image.BILINEAR), dtype=np.uint8)


def resize_to_cover(image: Image.Image, bucket, name: str = "") -> np.ndarray:
  """Resized (bilinear) to cover the bucket (H, W), as kohya scales it; uint8 HWC."""
  from dreambooth_jax.data import buckets as buckets_lib  # noqa: PLC0415 (buckets builds on this module)
  h, w = buckets_lib.cover_size(image.height, image.width, bucket)
  if h > image.height or w > image.width:
    logging.warning("%s: %dx%d is smaller than its bucket %s; upscaling", name, image.width, image.height,
                    buckets_lib.name(bucket))
  return np.asarray(image.resize((w, h), Image.BILINEAR), dtype=np.uint8)


def fit(image: Image.Image, resolution: int, buckets, name: str) -> tuple[np.ndarray, tuple[int, int] | None]:
  """(stored uint8 HWC image, its bucket): resized to cover the bucket chosen among `buckets`, or (buckets None)
  to short side `resolution`, bucket None."""
  if not buckets:
    return resize_short_side(image, resolution, name), None
  from dreambooth_jax.data import buckets as buckets_lib  # noqa: PLC0415 (buckets builds on this module)
  bucket = buckets_lib.select_bucket(image.height, image.width, buckets)
  return resize_to_cover(image, bucket, name), bucket


def check_on_bad_image(value: str):
  if value not in ("error", "skip"):
    raise ValueError(f"on_bad_image={value!r}: use 'error' or 'skip'")


def resize_like(mask: Image.Image, image_uint8: np.ndarray) -> np.ndarray:
  """A mask resized exactly as its image was (resize_short_side / resize_to_cover: the same size and filter),
  uint8 HW."""
  return np.asarray(mask.resize((image_uint8.shape[1], image_uint8.shape[0]), Image.BILINEAR), dtype=np.uint8)


def load_image(path, resolution: int) -> np.ndarray:
  path = pathlib.Path(path)
  return resize_short_side(open_image(path), resolution, str(path))


def to_pixels(image_uint8: np.ndarray) -> np.ndarray:
  return image_uint8.astype(np.float32) / 127.5 - 1.0


def read_captions(folder: pathlib.Path, names: set[str]) -> dict[str, str]:
  path = folder / METADATA
  if not path.is_file():
    return {}
  import datasets  # noqa: PLC0415 (slow import, only when captions exist)
  try:
    rows = datasets.load_dataset("json", data_files=str(path), split="train")
  except Exception as e:
    raise ValueError(f"{path}: cannot be read as JSON lines ({type(e).__name__}: {e})") from None
  if "file_name" not in rows.column_names or "text" not in rows.column_names:
    raise ValueError(f"{path}: each line needs 'file_name' and 'text' (found columns {rows.column_names})")
  captions = {}
  for row in rows:
    name = pathlib.PurePosixPath(row["file_name"]).name
    if name not in names:
      raise ValueError(f"{path}: caption for {row['file_name']!r}, which is not a usable image in {folder}")
    captions[name] = row["text"]
  return captions


def read_caption_files(folder, names, extension: str) -> dict[str, str]:
  """{image name: caption} from kohya's caption files: NAME.jpg's caption is the first line of NAME + extension
  (".caption", ".txt") beside it, stripped (kohya's later lines are wildcard alternatives). "" = no caption files.
  Images without one are left out; an empty or non-UTF-8 caption file is refused by name."""
  if not extension:
    return {}
  folder = pathlib.Path(folder)
  captions = {}
  for name in names:
    path = folder / (pathlib.PurePath(name).stem + extension)  # kohya: os.path.splitext(image)[0] + extension
    if not path.is_file():
      continue
    try:
      lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
      raise ValueError(f"{path}: caption file is not UTF-8 ({e}); save it as UTF-8") from None
    if not lines or not lines[0].strip():
      raise ValueError(f"{path}: empty caption (the first line is the caption); write one or delete the file")
    captions[name] = lines[0].strip()
  return captions


@dataclasses.dataclass
class SubjectImages:
  paths: list[pathlib.Path]
  captions: list[str]
  images: list[np.ndarray]  # uint8 HWC, short side == resolution (or covering its bucket)
  resolution: int
  original_sizes: list[tuple[int, int]]  # (height, width) as decoded (EXIF-rotated), before resizing
  buckets: list[tuple[int, int]] | None = None  # each image's bucket (H, W) when bucketed
  files: bool = True  # paths are the image files; False: names of dataset rows (data/hf_datasets.py), no files
  # with masked loss: each image's loss mask, uint8 HW resized as its image (None: all ones); None when off
  masks: list[np.ndarray | None] | None = None
  concepts: list[int] | None = None  # each image's concept (config.concepts index); None = one subject
  repeats: list[int] | None = None  # each image's appearances per epoch (its concept's num_repeats); None = once

  def references(self) -> list:
    """The photos evaluation compares generated images with (evaluate.embed_images): the files, or for dataset
    rows the images as stored here (decoded, resized to the training size)."""
    return list(self.paths) if self.files else list(self.images)

  def target_size(self, index: int) -> tuple[int, int]:
    """(H, W) the image is cropped to: its bucket, or the square resolution."""
    return self.buckets[index] if self.buckets else (self.resolution, self.resolution)


def load_subject_images(folder, resolution: int, default_caption: str, on_bad_image: str = "error",
                        buckets=None, masks: bool = False, caption_extension: str = "") -> SubjectImages:
  """buckets: (H, W) sizes to choose from (buckets.select_bucket) instead of the square resolution; masks: read
  each image's loss mask (open_image_and_mask). caption_extension: e.g. ".txt": NAME.txt beside NAME.jpg is that
  image's caption (kohya's caption files, read_caption_files); "" = none."""
  folder = pathlib.Path(folder)
  check_on_bad_image(on_bad_image)
  if not folder.is_dir():
    raise FileNotFoundError(f"{folder}: image folder missing")
  candidates = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
  skipped = mask_files(candidates)
  if skipped:
    logging.info("%s: %d mask file(s) (NAME_mask.png) are not training images%s: %s", folder, len(skipped),
                 "" if masks else " (masked_loss is off: not used)", ", ".join(sorted(p.name for p in skipped)))
  paths, images, sizes, chosen, loaded_masks, bad = [], [], [], [], [], []
  for path in (p for p in candidates if p not in skipped):
    try:
      image, mask = open_image_and_mask(path) if masks else (open_image(path), None)
      stored, bucket = fit(image, resolution, buckets, str(path))
      images.append(stored)
      if bucket:
        chosen.append(bucket)
      loaded_masks.append(None if mask is None else resize_like(mask, stored))
      sizes.append((image.height, image.width))
      paths.append(path)
    except Exception as e:  # PIL raises many types for broken files
      bad.append(f"{path}: {type(e).__name__}: {e}")
  if bad:
    if on_bad_image == "error":
      raise BadImagesError(f"{len(bad)} unusable image file(s) in {folder} (fix or remove them, or set "
                           "on_bad_image='skip'):\n  " + "\n  ".join(bad))
    for line in bad:
      logging.warning("skipping unusable image %s", line)
  if not paths:
    raise BadImagesError(f"{folder}: no usable images (looked for {', '.join(IMAGE_EXTENSIONS)})")
  captions = read_captions(folder, {p.name for p in paths})
  if caption_extension:
    files = read_caption_files(folder, [p.name for p in paths], caption_extension)
    both = sorted(set(files) & set(captions))
    if both:  # one home per caption
      raise ValueError(f"{folder / both[0]}: captioned both in {METADATA} and in its {caption_extension} file; "
                       "keep one")
    captions.update(files)
  return SubjectImages(paths=paths, captions=[captions.get(p.name, default_caption) for p in paths],
                       images=images, resolution=resolution, original_sizes=sizes, buckets=chosen or None,
                       masks=loaded_masks if masks else None)


def crop(image: np.ndarray, size: tuple[int, int], top: int, left: int, flip: bool) -> np.ndarray:
  out = image[top:top + size[0], left:left + size[1]]
  return out[:, ::-1] if flip else out


def center_crop_pixels(images: SubjectImages, index: int, flip: bool) -> np.ndarray:
  image, (th, tw) = images.images[index], images.target_size(index)
  h, w = image.shape[:2]
  return to_pixels(crop(image, (th, tw), (h - th) // 2, (w - tw) // 2, flip))


def center_crop_mask(images: SubjectImages, index: int, flip: bool) -> np.ndarray:
  """The loss mask of center_crop_pixels' example, float32 (H, W) in [0, 1]."""
  (th, tw), h, w = images.target_size(index), *images.images[index].shape[:2]
  return mask_crop(images, index, (th, tw), (h - th) // 2, (w - tw) // 2, flip)


def mask_crop(images: SubjectImages, index: int, size: tuple[int, int], top: int, left: int,
              flip: bool) -> np.ndarray:
  """Image `index`'s loss mask cropped and flipped as its pixels, float32 (H, W) in [0, 1] (all ones without one)."""
  mask = images.masks[index] if images.masks else None
  if mask is None:
    return np.ones(size, np.float32)
  return crop(mask, size, top, left, flip).astype(np.float32) / 255.0


def latent_mask(mask_HW: np.ndarray, factor: int) -> np.ndarray:
  """A pixel mask down to the latent grid: float32 (H/f, W/f, 1). kohya interpolates with mode="area"; our crops
  are multiples of f, so area interpolation is exactly the mean of each f x f block, which this computes."""
  height, width = mask_HW.shape
  if height % factor or width % factor:
    raise ValueError(f"mask of {height}x{width} pixels does not divide into {factor}x{factor} latent cells")
  blocks = np.asarray(mask_HW, np.float64).reshape(height // factor, factor, width // factor, factor)
  return blocks.mean(axis=(1, 3)).astype(np.float32)[..., None]


def make_example(images: SubjectImages, index: int, rng: np.random.Generator, center_crop: bool,
                 random_flip: bool) -> tuple[bool, np.ndarray, tuple[int, int], np.ndarray | None]:
  """(flip, uint8 crop, crop top-left, loss mask crop) of image `index` at its target size; rng decides the flip and
  a random crop. The mask (float32 HW, mask_crop) goes through the same crop and flip; None without masked loss."""
  flip = bool(random_flip and rng.random() < 0.5)
  image, (th, tw) = images.images[index], images.target_size(index)
  h, w = image.shape[:2]
  if center_crop:
    top, left = (h - th) // 2, (w - tw) // 2
  else:
    top, left = int(rng.integers(0, h - th + 1)), int(rng.integers(0, w - tw + 1))
  mask = None if images.masks is None else mask_crop(images, index, (th, tw), top, left, flip)
  # SDXL's crop conditioning: the crop's top-left in the (flipped) resized image, as diffusers' SDXL scripts
  # flip before cropping
  return flip, crop(image, (th, tw), top, left, flip), (top, w - left - tw if flip else left), mask


def rows_to_batch(images: SubjectImages, rows, slots_B: np.ndarray, with_pixels: bool) -> dict:
  """rows: (index, flip, uint8 crop, crop top-left, mask crop) per example -> the iterators' batch dict."""
  batch = {
      "index_B": np.array([r[0] for r in rows], np.int32),
      "flip_B": np.array([r[1] for r in rows], bool),
      "caption_B": [images.captions[r[0]] for r in rows],
      "original_size_B2": np.array([images.original_sizes[r[0]] for r in rows], np.int32).reshape(-1, 2),
      "crop_top_left_B2": np.array([r[3] for r in rows], np.int32).reshape(-1, 2),
      # position in the global batch: what the trainer's per-example noise is keyed on, so the draws do not
      # depend on how the batch is laid out over processes and devices
      "slot_B": slots_B,
  }
  if images.concepts is not None:
    batch["concept_B"] = np.array([images.concepts[r[0]] for r in rows], np.int32)
  if with_pixels:  # off when the trainer reads cached latents (and masks) by (index, flip) instead
    batch["pixels_BHWC"] = np.stack([to_pixels(r[2]) for r in rows])
    if images.masks is not None:
      batch["mask_BHW"] = np.stack([r[4] for r in rows])
  return batch


class SubjectIterator:
  """Infinite, deterministic batches of one process's slice of the global batch.

  The example sequence is the concatenation of per-epoch permutations drawn from (seed, epoch) of the images, each
  images.repeats[i] times (kohya's num_repeats; once when None); the global batch of a step is the next
  `batch_size_per_process * process_count` examples, of which this process takes its own contiguous slice.
  global_concepts: the concepts of the last global batch's examples (with images.concepts).
  """

  def __init__(self, images: SubjectImages, batch_size_per_process: int, *, seed: int, center_crop: bool = True,
               random_flip: bool = False, process_index: int | None = None, process_count: int | None = None,
               with_pixels: bool = True):
    self.images, self.local, self.with_pixels = images, batch_size_per_process, with_pixels
    self.seed, self.center_crop, self.random_flip = seed, center_crop, random_flip
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    self.epoch, self.position = 0, 0
    # each image once per epoch, or repeats[i] times: the permutation of arange(n) is today's single-subject order
    self.sequence = np.repeat(np.arange(len(images.paths)), images.repeats or 1)
    self.global_concepts = []

  def _index(self, epoch: int, position: int) -> int:
    return int(self.sequence[np.random.default_rng((self.seed, epoch)).permutation(len(self.sequence))[position]])

  def _example(self, epoch: int, position: int):
    index = self._index(epoch, position)
    rng = np.random.default_rng((self.seed, epoch, position, 1))
    return index, *make_example(self.images, index, rng, self.center_crop, self.random_flip)

  def _advance(self):
    self.position += 1
    if self.position == len(self.sequence):
      self.epoch, self.position = self.epoch + 1, 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    rows, self.global_concepts = [], []
    for k in range(self.local * self.process_count):
      if self.process_index * self.local <= k < (self.process_index + 1) * self.local:
        rows.append(self._example(self.epoch, self.position))
      if self.images.concepts is not None:  # the class side pairs by them (data/concepts.py)
        self.global_concepts.append(self.images.concepts[self._index(self.epoch, self.position)])
      self._advance()
    slots = np.arange(self.process_index * self.local, (self.process_index + 1) * self.local, dtype=np.int32)
    return rows_to_batch(self.images, rows, slots, self.with_pixels)

  def get_state(self) -> dict:
    return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

  def set_state(self, state: dict):
    if state.get("seed", self.seed) != self.seed:
      raise ValueError(f"data iterator state has seed {state['seed']}, this run uses {self.seed}")
    if "position" not in state:
      raise ValueError(f"data iterator state {state} is a bucketed run's; this run has enable_bucket=False")
    self.epoch, self.position = int(state["epoch"]), int(state["position"])


def global_batch(local_batch: dict, sharding) -> dict:
  """Process-local numeric arrays -> global jax arrays split over the batch axes (strings left out)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()
          if not (isinstance(v, list) or np.asarray(v).dtype.kind in "OUS")}


def dump_state(state: dict) -> str:
  return json.dumps(state, sort_keys=True)
