"""Hugging Face datasets as subject images (config.dataset_name, as diffusers' train_text_to_image --dataset_name).

dataset_name is a local `save_to_disk` folder (datasets.load_from_disk), another local folder that
datasets.load_dataset reads (an image folder with metadata.jsonl or metadata.csv: a file_name column and caption
columns), or a hub id. The split's image column holds Image features, {bytes, path} dicts or path strings (relative
to a local dataset's folder); each image is decoded and resized by data/images.py's rules, as a folder's files are,
and the caption column (if any) gives each image its caption. A row is named `DATASET[SPLIT][ROW]` (its
SubjectImages path: logs, errors); evaluation compares with the stored images since a row has no file of its own.
"""

import io
import pathlib

from absl import logging

from dreambooth_jax.data import images as data_lib

SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what Dataset(Dict).save_to_disk writes at the top


def _first_line(e: Exception) -> str:
  return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def open_split(dataset_name: str, split: str):
  """(datasets.Dataset of the split, the local folder or None); refusals name dataset_name."""
  import datasets  # noqa: PLC0415 (slow import, only for dataset inputs)
  folder = pathlib.Path(dataset_name).expanduser()
  if folder.is_dir() and any((folder / m).is_file() for m in SAVED_MARKERS):
    how, load, source = "datasets.load_from_disk", datasets.load_from_disk, str(folder)
  elif folder.is_dir():  # an image folder with metadata (or any folder load_dataset reads)
    how, load, source = "datasets.load_dataset", datasets.load_dataset, str(folder)
  elif dataset_name.startswith(("/", ".", "~")):  # a path (hub ids never start so)
    raise FileNotFoundError(f"dataset_name={dataset_name!r}: no such folder")
  else:
    how, load, source = "the Hugging Face hub (datasets.load_dataset)", datasets.load_dataset, dataset_name
    folder = None
  try:
    loaded = load(source)
  except Exception as e:  # offline, missing, unreadable: the library raises many types
    raise ValueError(f"dataset_name={dataset_name!r}: cannot be loaded through {how} ({_first_line(e)})") from None
  if isinstance(loaded, datasets.DatasetDict):
    if split not in loaded:
      raise ValueError(f"dataset_split={split!r}: dataset_name={dataset_name!r} has the splits {sorted(loaded)}")
    return loaded[split], folder
  if not isinstance(loaded, datasets.Dataset):
    raise ValueError(f"dataset_name={dataset_name!r}: expected a Dataset or DatasetDict, got {type(loaded).__name__}")
  own = str(loaded.split) if loaded.split is not None else "train"  # a saved Dataset without splits counts as train
  if split != own:
    what = f"split {own!r}" if loaded.split is not None else "no splits, read as 'train'"
    raise ValueError(f"dataset_split={split!r}: dataset_name={dataset_name!r} holds one dataset ({what}), not a "
                     f"DatasetDict; set dataset_split={own!r}")
  return loaded, folder


def _check_column(rows, dataset_name: str, split: str, key: str, column: str):
  if column not in rows.column_names:
    raise ValueError(f"{key}={column!r}: dataset_name={dataset_name!r} split {split!r} has no such column; its "
                     f"columns are {rows.column_names}")


def _decode(value, folder: pathlib.Path | None):
  """(PIL image as stored, any mode; its file path or None) of an image column's value (undecoded Image feature,
  path string)."""
  from PIL import Image, ImageOps  # noqa: PLC0415
  if isinstance(value, Image.Image):  # already decoded (not an Image feature's column)
    return ImageOps.exif_transpose(value), None
  if isinstance(value, str):
    value = {"path": value, "bytes": None}
  elif isinstance(value, bytes):
    value = {"path": None, "bytes": value}
  if not isinstance(value, dict) or not (value.get("bytes") or value.get("path")):
    raise ValueError(f"no image in it ({type(value).__name__} {str(value)[:60]!r})")
  path = value.get("path")
  if path and folder is not None and not pathlib.Path(path).is_absolute() and not value.get("bytes"):
    path = str(folder / path)
  try:
    source = io.BytesIO(value["bytes"]) if value.get("bytes") else pathlib.Path(path)
    return data_lib.decode(source), path
  except Exception as e:
    raise ValueError(f"{f'{path}: ' if path else ''}{_first_line(e)}") from None


def _caption(value) -> str:
  if not isinstance(value, str):
    raise ValueError(f"caption is {value!r}, not a string")
  if not value.strip():
    raise ValueError(f"caption is empty ({value!r})")
  return value


def load_dataset_images(dataset_name: str, *, split: str = "train", image_column: str = "image",
                        caption_column: str = "", resolution: int, default_caption: str,
                        on_bad_image: str = "error", buckets=None, masks: bool = False) -> data_lib.SubjectImages:
  """The split's images (each in its bucket when `buckets`), as data/images.py's load_subject_images returns a
  folder's: captions from caption_column ("" = default_caption for every image). A bad row (undecodable image,
  missing, None or empty caption) stops the load with every bad row named, or with on_bad_image="skip" is skipped
  with a warning. masks: each image's loss mask is its alpha channel (all ones without one), resized with it."""
  import datasets  # noqa: PLC0415
  data_lib.check_on_bad_image(on_bad_image)
  rows, folder = open_split(dataset_name, split)
  _check_column(rows, dataset_name, split, "image_column", image_column)
  if caption_column:
    _check_column(rows, dataset_name, split, "caption_column", caption_column)
  if isinstance(rows.features[image_column], datasets.Image):  # our decoding rules (EXIF, modes), not the library's
    rows = rows.cast_column(image_column, datasets.Image(decode=False))
  rows = rows.select_columns([image_column, *([caption_column] if caption_column else [])])
  paths, captions, images, sizes, chosen, loaded_masks, bad = [], [], [], [], [], [], []
  for index, row in enumerate(rows):
    name = f"{dataset_name}[{split}][{index}]"
    try:
      caption = _caption(row[caption_column]) if caption_column else default_caption
      raw, file = _decode(row[image_column], folder)
      image, mask = data_lib.to_rgb(raw), (data_lib.alpha_channel(raw) if masks else None)
      stored, bucket = data_lib.fit(image, resolution, buckets, file or name)
    except Exception as e:  # PIL raises many types for broken images
      bad.append(f"row {index}: {e}")
      continue
    paths.append(pathlib.Path(name))
    captions.append(caption)
    images.append(stored)
    loaded_masks.append(None if mask is None else data_lib.resize_like(mask, stored))
    sizes.append((image.height, image.width))
    if bucket:
      chosen.append(bucket)
  where = f"dataset_name={dataset_name!r} split {split!r}"
  if bad:
    if on_bad_image == "error":
      raise data_lib.BadImagesError(f"{len(bad)} unusable row(s) in {where} (fix or remove them, or set "
                                    "on_bad_image='skip'):\n  " + "\n  ".join(bad))
    for line in bad:
      logging.warning("skipping unusable row of %s: %s", where, line)
  if not paths:
    raise data_lib.BadImagesError(f"{where}: no usable rows ({len(rows)} in the split)")
  return data_lib.SubjectImages(paths=paths, captions=captions, images=images, resolution=resolution,
                                original_sizes=sizes, buckets=chosen or None, files=False,
                                masks=loaded_masks if masks else None)
