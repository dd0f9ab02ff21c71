"""The benchmark-protocol runner: the dataset's prompt file, errors, and the whole loop on the tiny model
(2 subjects x 2 prompts x 2 images) producing the Table-1 layout, resumable."""

import json
import pathlib
import shutil

import numpy as np
import pytest
import safetensors.torch
from PIL import Image

from lpips_reference import random_backbone_model
from test_eval_metrics import models  # noqa: F401 (tiny random DINO / CLIP folders)
from test_train import fast_config
from dreambooth_jax.eval import protocol

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "dreambooth-dataset"
BUNDLED_DOG = pathlib.Path(__file__).resolve().parents[1] / "dreambooth_jax" / "assets" / "dog"


@pytest.mark.skipif(not (SHARED / "prompts_and_classes.txt").is_file(), reason="../shared dataset not present")
def test_reads_the_papers_prompt_file():
  classes, templates = protocol.read_prompts_and_classes(SHARED / "prompts_and_classes.txt")
  assert len(classes) == 30 and classes["dog"] == "dog" and classes["bear_plushie"] == "stuffed animal"
  assert len(templates["object"]) == 25 and len(templates["live"]) == 25
  assert protocol.subject_prompts("dog", templates, "sks")[0] == "a sks dog in the jungle"
  assert protocol.subject_prompts("backpack", templates, "sks")[-1] == templates["object"][-1].format("sks", "backpack")
  assert protocol.subject_prompts("teapot", templates, "sks", limit=2) == [
      "a sks teapot in the jungle", "a sks teapot in the snow"]


PROMPT_FILE = """Classes

subject_name,class
dog,dog
blocks,toy

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} in the snow'.format(unique_token, class_token),
'a {0} {1} on the beach'.format(unique_token, class_token),
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
]
"""


def test_malformed_prompt_file_names_the_line(tmp_path):
  bad = tmp_path / "prompts_and_classes.txt"
  bad.write_text(PROMPT_FILE.replace("'a {0} {1} in the snow'.format(unique_token, class_token),",
                                     "a {0} {1} in the snow"))
  with pytest.raises(protocol.ProtocolError, match=r"prompts_and_classes.txt:13: expected a line like"):
    protocol.read_prompts_and_classes(bad)
  with pytest.raises(protocol.ProtocolError, match="missing"):
    protocol.read_prompts_and_classes(tmp_path / "nope.txt")


def make_dataset(root: pathlib.Path) -> pathlib.Path:
  (root / "dog").mkdir(parents=True)
  for p in sorted(BUNDLED_DOG.glob("*.jpg"))[:3]:
    shutil.copy(p, root / "dog" / p.name)
  (root / "blocks").mkdir()
  rng = np.random.default_rng(0)
  for i in range(3):
    image = np.zeros((64, 64, 3), np.uint8)
    image[16 + 4 * i:48, 8:40 + 4 * i] = rng.integers(0, 255, 3)
    Image.fromarray(image).save(root / "blocks" / f"{i:02d}.png")
  (root / "prompts_and_classes.txt").write_text(PROMPT_FILE)
  return root


def test_runner_end_to_end_and_resumable(tmp_path, models):  # noqa: F811
  model_root = models[0]
  dataset = make_dataset(tmp_path / "dataset")
  config = fast_config("max_train_steps=2", "checkpointing_steps=2", "validation_steps=0", "export_at_end=False",
                       "num_class_images=2")
  safetensors.torch.save_model(random_backbone_model("alex"), str(tmp_path / "lpips_alex.safetensors"))
  kwargs = dict(dino_model=model_root / "dino", clip_model=model_root / "clip", images_per_prompt=2,
                prompts_limit=2, sample_steps=2, batch_size=4, lpips_model=tmp_path / "lpips_alex.safetensors",
                pres_images=2, method="w/ PPL")
  out = tmp_path / "out"
  table = protocol.run(config, dataset, out, **kwargs)
  ours, real = table["rows"]
  assert ours["method"] == "w/ PPL" and real["method"] == "Real Images" and real["clip_t"] is None
  assert ours["subjects"] == 2 and ours["images"] == 2 * 2 * 2 and real["images"] == 6
  for row in table["rows"]:
    for key in ("dino", "clip_i"):
      assert -1.0 <= row[key] <= 1.0
  dog = json.loads((out / "dog" / "metrics.json").read_text())
  assert sorted(dog["per_prompt"]) == ["a sks dog in the jungle", "a sks dog wearing a red hat"]  # live prompts
  blocks = json.loads((out / "blocks" / "metrics.json").read_text())
  assert sorted(blocks["per_prompt"]) == ["a sks toy in the jungle", "a sks toy in the snow"]  # object prompts
  np.testing.assert_allclose(ours["dino"], np.mean([dog["dino"], blocks["dino"]]), rtol=1e-9)
  np.testing.assert_allclose(ours["div"], np.mean([dog["div"], blocks["div"]]), rtol=1e-9)
  np.testing.assert_allclose(ours["pres"], np.mean([dog["pres"], blocks["pres"]]), rtol=1e-9)
  assert dog["counts"]["class_generated_images"] == 2 and "pres" not in real
  assert json.loads((out / "dog" / "class_generated" / "index.json").read_text())["images"][0]["prompt"] == "a dog"
  assert dog["counts"]["div_pairs"] == 2 and "div" not in real  # 2 prompts x 1 pair; no DIV for real photos
  md = (out / "table.md").read_text()
  assert "| w/ PPL |" in md and "| Real Images |" in md and "N/A" in md and "| PRES | DIV |" in md
  assert len(list((out / "class_images" / "dog").glob("class_*.png"))) == 2  # prior preservation ran per class

  # Resume: a finished subject is kept; a half-done one regenerates only what is missing, identically.
  image = out / "blocks" / "generated" / "00003.png"
  before = image.read_bytes()
  image.unlink()
  (out / "blocks" / "metrics.json").unlink()
  dog_mtime = (out / "dog" / "metrics.json").stat().st_mtime_ns
  again = protocol.run(config, dataset, out, **kwargs)
  assert image.read_bytes() == before
  assert (out / "dog" / "metrics.json").stat().st_mtime_ns == dog_mtime
  np.testing.assert_allclose(again["rows"][0]["dino"], ours["dino"], rtol=1e-6)


def test_unknown_subject_is_named(tmp_path, models):  # noqa: F811
  dataset = make_dataset(tmp_path / "dataset")
  with pytest.raises(protocol.ProtocolError, match=r"\['cat'\] are not listed"):
    protocol.run(fast_config(), dataset, tmp_path / "out", dino_model=models[0] / "dino",
                 clip_model=models[0] / "clip", subjects=["cat"])
