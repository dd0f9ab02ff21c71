"""The numpy data pipeline: every image mode to RGB, EXIF orientation, bad files named (or skipped), small images
upscaled, captions from metadata.jsonl, and a deterministic, resumable iterator whose per-process slices form the
single-process batch."""

import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from dreambooth_jax.data import images as data


def save(image: Image.Image, path, **kwargs):
  image.save(path, **kwargs)
  return path


def test_modes_become_rgb_with_alpha_on_white(tmp_path):
  red = (200, 10, 10)
  rgba = Image.new("RGBA", (8, 8), red + (255,))
  rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent -> white
  got = np.asarray(data.open_image(save(rgba, tmp_path / "a.png")))
  assert got.shape == (8, 8, 3) and tuple(got[0, 0]) == (255, 255, 255) and tuple(got[1, 1]) == red
  la = Image.new("LA", (4, 4), (0, 0))  # transparent black -> white
  assert np.asarray(data.open_image(save(la, tmp_path / "la.png"))).min() == 255
  cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
  r, g, b = np.asarray(data.open_image(save(cmyk, tmp_path / "c.jpg", quality=100)))[2, 2]
  assert r > 200 and g < 60 and b < 60
  palette = Image.new("RGB", (4, 4), red).convert("P", palette=Image.Palette.ADAPTIVE)
  assert tuple(np.asarray(data.open_image(save(palette, tmp_path / "p.png")))[0, 0]) == red
  sixteen = Image.fromarray(np.full((4, 4), 65535, np.uint16))
  assert np.asarray(data.open_image(save(sixteen, tmp_path / "s.png"))).min() == 255  # scaled, not clipped to 1
  grey = Image.new("L", (4, 4), 77)
  assert tuple(np.asarray(data.open_image(save(grey, tmp_path / "g.png")))[0, 0]) == (77, 77, 77)


def test_exif_orientation_is_applied(tmp_path):
  image = Image.new("RGB", (40, 20), (0, 0, 255))
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise on display
  path = save(image, tmp_path / "rotated.jpg", exif=exif.tobytes())
  assert data.open_image(path).size == (20, 40)


def test_bad_files_are_all_named_or_skipped(tmp_path, caplog):
  folder = tmp_path / "images"
  folder.mkdir()
  save(Image.new("RGB", (64, 64), (1, 2, 3)), folder / "good.png")
  (folder / "empty.png").write_bytes(b"")
  (folder / "text.jpg").write_text("not an image")
  buf = io.BytesIO()
  Image.new("RGB", (64, 64), (9, 9, 9)).save(buf, "JPEG")
  (folder / "truncated.jpg").write_bytes(buf.getvalue()[:200])
  with pytest.raises(data.BadImagesError) as info:
    data.load_subject_images(folder, 32, "a sks dog")
  message = str(info.value)
  assert "3 unusable" in message and all(n in message for n in ("empty.png", "text.jpg", "truncated.jpg"))
  with caplog.at_level(logging.WARNING):
    images = data.load_subject_images(folder, 32, "a sks dog", on_bad_image="skip")
  assert [p.name for p in images.paths] == ["good.png"]
  with pytest.raises(ValueError, match="on_bad_image='ignore'"):
    data.load_subject_images(folder, 32, "x", on_bad_image="ignore")


def test_no_usable_image_is_an_error(tmp_path):
  (tmp_path / "x.jpg").write_bytes(b"")
  with pytest.raises(data.BadImagesError, match="no usable images"):
    data.load_subject_images(tmp_path, 32, "x", on_bad_image="skip")
  with pytest.raises(FileNotFoundError, match="missing"):
    data.load_subject_images(tmp_path / "nope", 32, "x")


def test_small_images_are_upscaled_with_a_warning(tmp_path, caplog):
  save(Image.new("RGB", (20, 10), (5, 5, 5)), tmp_path / "small.png")
  with caplog.at_level(logging.WARNING):
    images = data.load_subject_images(tmp_path, 32, "x")
  assert images.images[0].shape == (32, 64, 3)
  assert "upscaling" in caplog.text


def test_captions_from_metadata_jsonl(tmp_path):
  for name in ("a.png", "b.png"):
    save(Image.new("RGB", (32, 32)), tmp_path / name)
  (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a sks dog on grass"}) + "\n")
  images = data.load_subject_images(tmp_path, 32, "a sks dog")
  assert images.captions == ["a sks dog on grass", "a sks dog"]
  (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "zzz.png", "text": "x"}) + "\n")
  with pytest.raises(ValueError, match="zzz.png"):
    data.load_subject_images(tmp_path, 32, "a sks dog")


def subject(tmp_path, n=5):
  rng = np.random.default_rng(0)
  for i in range(n):
    save(Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)), tmp_path / f"{i}.png")
  return data.load_subject_images(tmp_path, 32, "a sks dog")


def test_iterator_is_deterministic_and_resumes_exactly(tmp_path):
  images = subject(tmp_path)
  make = lambda: data.SubjectIterator(images, 2, seed=3, center_crop=False, random_flip=True, process_index=0,
                                      process_count=1)
  first = make()
  batches = [next(first) for _ in range(7)]  # crosses epochs (5 images, 2 per step)
  again = make()
  for _ in range(3):
    next(again)
  state = again.get_state()
  resumed = make()
  resumed.set_state(json.loads(json.dumps(state)))  # as stored in the checkpoint's JSON
  for want in batches[3:]:
    got = next(resumed)
    np.testing.assert_array_equal(got["pixels_BHWC"], want["pixels_BHWC"])
    np.testing.assert_array_equal(got["index_B"], want["index_B"])
  assert all(b["pixels_BHWC"].shape == (2, 32, 32, 3) for b in batches)
  assert -1.0 <= batches[0]["pixels_BHWC"].min() and batches[0]["pixels_BHWC"].max() <= 1.0
  with pytest.raises(ValueError, match="seed"):
    make().set_state({**state, "seed": 99})


def test_process_slices_form_the_single_process_batch(tmp_path):
  images = subject(tmp_path)
  single = data.SubjectIterator(images, 4, seed=1, process_index=0, process_count=1)
  parts = [data.SubjectIterator(images, 2, seed=1, process_index=i, process_count=2) for i in range(2)]
  for _ in range(3):
    whole = next(single)
    pieces = [next(p) for p in parts]
    np.testing.assert_array_equal(np.concatenate([p["index_B"] for p in pieces]), whole["index_B"])
    np.testing.assert_array_equal(np.concatenate([p["slot_B"] for p in pieces]), whole["slot_B"])
