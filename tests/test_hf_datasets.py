"""Hugging Face datasets as instance images (data/hf_datasets.py): a save_to_disk dataset and image folders with
metadata.csv / metadata.jsonl load as the same files from a folder do, with their captions; every bad input is
named; a short training run takes the per-image captions into its batches."""

import json
import math

import datasets
import huggingface_hub
import numpy as np
import pytest
from PIL import Image

from dreambooth_jax.data import batches, hf_datasets, images as data
from dreambooth_jax.eval import preprocess
from test_train import fast_config, read_losses

SIZES = {"a.png": (40, 48), "b.jpg": (36, 36), "c.png": (64, 40)}  # (height, width)
CAPTIONS = {"a.png": "a photo of sks dog on grass", "b.jpg": "sks dog, close up", "c.png": "a sks dog sleeping"}


@pytest.fixture(autouse=True)
def no_user_cache_or_network(tmp_path, monkeypatch):
  """load_dataset writes its Arrow cache under tmp_path, not ~/.cache; the hub is offline (no retries)."""
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def photos(folder):
  """Three photos of different sizes and modes (one RGBA: composited on white by our rules)."""
  folder.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for name, (h, w) in SIZES.items():
    mode, channels = ("RGBA", 4) if name == "c.png" else ("RGB", 3)
    Image.fromarray(rng.integers(0, 256, (h, w, channels), dtype=np.uint8), mode).save(folder / name)
  return folder


def saved_dataset(root, rows=None, features=None):
  """A save_to_disk dataset of the photos (an Image feature) with a "text" caption column."""
  folder = photos(root / "photos")
  if rows is None:
    rows = {"image": [str(folder / n) for n in SIZES], "text": [CAPTIONS[n] for n in SIZES]}
  dataset = datasets.Dataset.from_dict(rows, features=features)
  if features is None:
    dataset = dataset.cast_column("image", datasets.Image())
  dataset.save_to_disk(str(root / "saved"))
  return root / "saved", folder


def load(name, **kwargs):
  return hf_datasets.load_dataset_images(str(name), **{"resolution": 32, "default_caption": "a photo of sks dog",
                                                       **kwargs})


def test_saved_dataset_equals_the_folder_with_its_captions(tmp_path):
  saved, folder = saved_dataset(tmp_path)
  choices = [(32, 32), (32, 48), (48, 32)]
  for buckets in (None, choices):
    ours = load(saved, caption_column="text", buckets=buckets)
    files = data.load_subject_images(folder, 32, "unused", buckets=buckets)
    assert ours.captions == [CAPTIONS[n] for n in SIZES]
    assert ours.original_sizes == files.original_sizes == list(SIZES.values())
    assert ours.buckets == files.buckets and (buckets is None) == (ours.buckets is None)
    for got, want in zip(ours.images, files.images, strict=True):
      np.testing.assert_array_equal(got, want)
  assert [str(p) for p in ours.paths] == [f"{saved}[train][{i}]" for i in range(3)]  # names; no files
  # evaluation's reference photos: the stored images (no files), which its preprocessing takes as it takes files
  assert not ours.files and all(r is i for r, i in zip(ours.references(), ours.images))
  assert files.references() == files.paths
  assert preprocess.load_batch(ours.references(), preprocess.CLIP_SPEC).shape == (3, 224, 224, 3)
  assert load(saved).captions == ["a photo of sks dog"] * 3  # caption_column "": the instance prompt
  # masked loss: a dataset image's mask is its alpha channel, resized with it, as for the same file in a folder
  ours, files = load(saved, buckets=choices, masks=True), data.load_subject_images(folder, 32, "", buckets=choices,
                                                                                   masks=True)
  assert [m is None for m in ours.masks] == [m is None for m in files.masks] == [n != "c.png" for n in SIZES]
  np.testing.assert_array_equal(ours.masks[2], files.masks[2])


@pytest.mark.parametrize("metadata", ["metadata.csv", "metadata.jsonl"])
def test_image_folder_with_metadata(tmp_path, metadata):
  folder = photos(tmp_path / "photos")
  files = data.load_subject_images(folder, 32, "unused")  # (its own metadata.jsonl rule wants a "text" column)
  if metadata.endswith(".csv"):
    lines = ["file_name,caption"] + [f'{n},"{c}"' for n, c in CAPTIONS.items()]
  else:
    lines = [json.dumps({"file_name": n, "caption": c}) for n, c in CAPTIONS.items()]
  (folder / metadata).write_text("\n".join(lines) + "\n")
  ours = load(folder, caption_column="caption")
  by_caption = {CAPTIONS[p.name]: image for p, image in zip(files.paths, files.images)}
  assert sorted(ours.captions) == sorted(CAPTIONS.values())
  for caption, image in zip(ours.captions, ours.images, strict=True):
    np.testing.assert_array_equal(image, by_caption[caption])
  assert (tmp_path / "hf_cache").is_dir()  # load_dataset's cache went where the fixture put it


def test_splits_columns_and_sources_are_named(tmp_path):
  saved, folder = saved_dataset(tmp_path)
  with pytest.raises(ValueError, match=r"dataset_split='test': .* holds one dataset .* set dataset_split='train'"):
    load(saved, split="test")
  ds = datasets.load_from_disk(str(saved))
  datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(tmp_path / "dict"))
  assert len(load(tmp_path / "dict", split="validation").paths) == 3
  with pytest.raises(ValueError, match=r"dataset_split='test': .* has the splits \['train', 'validation'\]"):
    load(tmp_path / "dict", split="test")
  with pytest.raises(ValueError, match=r"image_column='img': .* no such column; its columns are \['image', 'text'\]"):
    load(saved, image_column="img")
  with pytest.raises(ValueError, match=r"caption_column='prompt': .* its columns are \['image', 'text'\]"):
    load(saved, caption_column="prompt")
  with pytest.raises(FileNotFoundError, match=r"dataset_name='/nonexistent/ds': no such folder"):
    load("/nonexistent/ds")
  with pytest.raises(ValueError, match=r"dataset_name='someone/no-such-dataset': cannot be loaded through the "
                                       r"Hugging Face hub .*ConnectionError") as error:
    load("someone/no-such-dataset")
  assert "\n" not in str(error.value)


def test_bad_rows_are_named_or_skipped(tmp_path, caplog):
  folder = photos(tmp_path / "photos")
  (folder / "cut.png").write_bytes((folder / "a.png").read_bytes()[:60])  # truncated
  junk = {"bytes": b"not an image", "path": "junk.png"}
  rows = {"image": [str(folder / "a.png"), str(folder / "cut.png"), None, junk, str(folder / "b.jpg"),
                    str(folder / "c.png")],
          "text": ["ok", "ok", "ok", "ok", None, "  "]}
  features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
  datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "saved"))  # embeds the bytes
  with pytest.raises(data.BadImagesError) as error:
    load(tmp_path / "saved", caption_column="text")
  lines = str(error.value).splitlines()
  assert lines[0].startswith(f"5 unusable row(s) in dataset_name='{tmp_path / 'saved'}' split 'train'"), lines
  assert lines[1].startswith("  row 1: cut.png: OSError"), lines  # the file name the bytes came from
  assert lines[2] == "  row 2: no image in it (NoneType 'None')", lines
  assert lines[3].startswith("  row 3: junk.png: UnidentifiedImageError"), lines
  assert lines[4:] == ["  row 4: caption is None, not a string", "  row 5: caption is empty ('  ')"]
  with caplog.at_level("WARNING"):
    kept = load(tmp_path / "saved", caption_column="text", on_bad_image="skip")
  assert [str(p) for p in kept.paths] == [f"{tmp_path / 'saved'}[train][0]"] and kept.captions == ["ok"]
  assert sum("skipping unusable row" in r.getMessage() for r in caplog.records) == 5
  # a column of path strings (not an Image feature), relative to the saved dataset's folder
  strings = tmp_path / "strings"
  datasets.Dataset.from_dict({"image": ["b.jpg", "missing.png"]}).save_to_disk(str(strings))
  (strings / "b.jpg").write_bytes((folder / "b.jpg").read_bytes())
  with pytest.raises(data.BadImagesError, match=f"row 1: {strings / 'missing.png'}: FileNotFoundError"):
    load(strings)
  kept = load(strings, on_bad_image="skip")
  assert len(kept.images) == 1
  np.testing.assert_array_equal(kept.images[0], data.load_image(folder / "b.jpg", 32))


def test_config_keys_are_checked_by_name(tmp_path):
  with pytest.raises(ValueError, match=r"dataset_name='x' and instance_data_dir='photos' are both set"):
    batches.load_instance_images(fast_config("dataset_name=x", "instance_data_dir=photos"))
  with pytest.raises(ValueError, match=r"caption_column='text' is set but dataset_name is ''"):
    batches.load_instance_images(fast_config("caption_column=text"))
  with pytest.raises(ValueError, match=r"dataset_split='test' is set but dataset_name is ''"):
    batches.load_instance_images(fast_config("dataset_split=test"))


def test_training_on_a_saved_dataset_uses_its_captions(tmp_path):
  from dreambooth_jax.training import run
  saved, _ = saved_dataset(tmp_path)
  # test_train's settings (with its class images): the compiled step and sampler come from the session's cache
  config = fast_config(f"dataset_name={saved}", "caption_column=text", "max_train_steps=3", "checkpointing_steps=3",
                       "validation_steps=0", "export_at_end=False")
  job = run.train(config, tmp_path / "run")
  losses = read_losses(tmp_path / "run")
  assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values()), losses
  # the instance prompt is no image's caption; the class prompt is the class images'
  assert sorted(job.data.caption_rows) == sorted([*CAPTIONS.values(), config.class_prompt])
  table = job.data.text_table["context"]
  assert len({row.tobytes() for row in table}) == 4  # four distinct encoded captions
  seen = set()
  for _ in range(2):  # 2 batches of 2 instance examples: each one's text is one of the dataset's captions
    batch = job.data.next_batch()
    instance = np.asarray(batch["prior"]).reshape(-1) == 0
    for context in np.asarray(batch["context"]).reshape(-1, *table.shape[1:])[instance]:
      seen.update(c for c in CAPTIONS.values() if np.array_equal(context, table[job.data.caption_rows[c]]))
  assert len(seen) >= 2, seen


def test_a_concept_can_be_a_saved_dataset(tmp_path):
  """config.concepts with one concept from a folder (the bundled dog) and one from a save_to_disk dataset with
  per-image captions: the dataset's rows and captions are that concept's examples."""
  from test_concepts import DOG
  saved, _ = saved_dataset(tmp_path)
  config = fast_config("with_prior_preservation=False", "train_batch_size=2")
  config.concepts = [{"name": "dog", "instance_data_dir": str(DOG), "instance_prompt": "sks dog"},
                     {"name": "photos", "dataset_name": str(saved), "caption_column": "text"}]
  steps = batches.example_sequence(config, 8, tmp_path / "work")  # 8 x 2 = 2 epochs of 5 + 3 examples
  examples = [e for step in steps for e in step]
  rows = {e["path"]: e["caption"] for e in examples if e["concept"] == "photos"}
  assert rows == {f"{saved}[train][{i}]": CAPTIONS[n] for i, n in enumerate(SIZES)}
  assert sum(e["concept"] == "dog" for e in examples) == 10
  config.concepts[1]["caption_extension"] = ".txt"
  with pytest.raises(ValueError, match=r"concepts\[1\] \(photos\): caption_extension='.txt' with dataset_name"):
    batches.example_sequence(config, 1, tmp_path / "work")
