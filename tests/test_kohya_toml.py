"""kohya's dataset TOML -> our settings and concept entries: the mapping, kohya's precedence (subset over dataset over
[general], unset = the config's own value), reg-subset pairing, every refusal by name, the shipped example, and
kohya's caption files (data/images.py read_caption_files). Pure Python: no model, no compile."""

import logging
import pathlib
import re

import pytest
from PIL import Image

from dreambooth_jax import config_files
from dreambooth_jax.data import images as data
from dreambooth_jax.data import kohya_toml

ROOT = pathlib.Path(__file__).resolve().parents[1]


def images(folder: pathlib.Path, count: int, captions: dict[str, str] | None = None) -> pathlib.Path:
  folder.mkdir(parents=True)
  for i in range(count):
    Image.new("RGB", (4, 4), (40 * i, 0, 0)).save(folder / f"{i:02d}.png")
  for name, text in (captions or {}).items():
    (folder / name).write_text(text)
  return folder


@pytest.fixture
def kohya_dir(tmp_path, monkeypatch):
  """A kohya-style layout, the working directory: two subjects (one with a caption file), two reg folders."""
  images(tmp_path / "train" / "10_sks dog", 3, {"01.txt": "sks dog on a beach\nalternative line\n"})
  images(tmp_path / "train" / "5_ohwx cat", 2)
  images(tmp_path / "reg" / "1_dog", 4)
  images(tmp_path / "reg" / "1_cat", 2)
  monkeypatch.chdir(tmp_path)
  return tmp_path


def write(text: str, name: str = "dataset.toml") -> pathlib.Path:
  path = pathlib.Path(name)
  path.write_text(text)
  return path


TWO_SUBJECTS = """
[general]
shuffle_caption = false
caption_extension = ".txt"
keep_tokens = 1

[[datasets]]
resolution = [512, 512]
batch_size = 2
enable_bucket = true
min_bucket_reso = 256
max_bucket_reso = 1024
bucket_reso_steps = 64
bucket_no_upscale = false

  [[datasets.subsets]]
  image_dir = "train/10_sks dog"
  class_tokens = "sks dog"
  num_repeats = 10

  [[datasets.subsets]]
  image_dir = "train/5_ohwx cat"
  class_tokens = "ohwx cat"
  num_repeats = 5

  [[datasets.subsets]]
  is_reg = true
  image_dir = "reg/1_dog"
  class_tokens = "dog"
  num_repeats = 1

  [[datasets.subsets]]
  is_reg = true
  image_dir = "reg/1_cat"
  class_tokens = "cat"
"""


def test_two_subjects_with_reg_subsets(kohya_dir, caplog):
  caplog.set_level(logging.INFO)
  settings, concepts = kohya_toml.read_dataset_config(write(TWO_SUBJECTS))
  assert settings == {"resolution": 512, "train_batch_size": 2, "enable_bucket": True, "min_bucket_reso": 256,
                      "max_bucket_reso": 1024, "bucket_reso_steps": 64, "with_prior_preservation": True,
                      "prior_preservation": "class_images"}
  assert concepts == [
      {"name": "10_sks dog", "instance_data_dir": str(kohya_dir / "train" / "10_sks dog"),
       "instance_prompt": "sks dog", "caption_extension": ".txt", "num_repeats": 10, "class_prompt": "dog",
       "class_data_dir": str(kohya_dir / "reg" / "1_dog"), "num_class_images": 4},
      {"name": "5_ohwx cat", "instance_data_dir": str(kohya_dir / "train" / "5_ohwx cat"),
       "instance_prompt": "ohwx cat", "caption_extension": ".txt", "num_repeats": 5, "class_prompt": "cat",
       "class_data_dir": str(kohya_dir / "reg" / "1_cat"), "num_class_images": 2}]
  assert "general.keep_tokens=1: no effect here" in caplog.text  # accepted, never silently


def test_one_reg_subset_serves_every_concept_and_none_turns_prior_preservation_off(kohya_dir):
  one_reg = TWO_SUBJECTS.split("  [[datasets.subsets]]\n  is_reg = true\n  image_dir = \"reg/1_cat\"")[0]
  settings, concepts = kohya_toml.read_dataset_config(write(one_reg))
  assert settings["with_prior_preservation"] and [c["class_prompt"] for c in concepts] == ["dog", "dog"]
  no_reg = TWO_SUBJECTS.split("  [[datasets.subsets]]\n  is_reg = true")[0]
  settings, concepts = kohya_toml.read_dataset_config(write(no_reg))
  assert settings["with_prior_preservation"] is False and "prior_preservation" not in settings
  assert all("class_prompt" not in c for c in concepts)


def test_subset_over_dataset_over_general_and_unset_keeps_the_config(kohya_dir):
  settings, concepts = kohya_toml.read_dataset_config(write("""
[general]
num_repeats = 3
class_tokens = "general tokens"
caption_extension = ".general"
batch_size = 4
flip_aug = true
[[datasets]]
num_repeats = 2
caption_extension = ".dataset"
  [[datasets.subsets]]
  image_dir = "train/10_sks dog"
  num_repeats = 7
  class_tokens = "sks dog"
  [[datasets.subsets]]
  image_dir = "train/5_ohwx cat"
[[datasets]]
  [[datasets.subsets]]
  image_dir = "reg/1_cat"
  caption_extension = ".subset"
"""))
  assert [(c["num_repeats"], c["instance_prompt"], c["caption_extension"]) for c in concepts] == [
      (7, "sks dog", ".dataset"), (2, "general tokens", ".dataset"), (3, "general tokens", ".subset")]
  # resolution, buckets and crops are set nowhere: the config's own values stay (kohya: its command line's)
  assert settings == {"train_batch_size": 4, "random_flip": True, "with_prior_preservation": False}
  _, concepts = kohya_toml.read_dataset_config(write('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "reg/1_dog"\n'
                                                      'class_tokens = "x"\n'))
  assert concepts[0]["caption_extension"] == ".caption" and concepts[0]["num_repeats"] == 1  # kohya's defaults


def test_captions_alone_need_no_class_tokens(kohya_dir):
  images(kohya_dir / "captioned", 2, {"00.caption": "a red square", "01.caption": "a black square"})
  _, concepts = kohya_toml.read_dataset_config(write('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "captioned"\n'))
  assert concepts[0]["instance_prompt"] == "" and concepts[0]["caption_extension"] == ".caption"


def test_read_caption_files(tmp_path):
  folder = images(tmp_path / "f", 3, {"00.txt": "\ufefffirst line  \nsecond line", "01.caption": "other extension"})
  names = sorted(p.name for p in folder.glob("*.png"))
  assert data.read_caption_files(folder, names, ".txt") == {"00.png": "first line"}
  assert data.read_caption_files(folder, names, ".caption") == {"01.png": "other extension"}
  assert data.read_caption_files(folder, names, "") == {}
  (folder / "02.txt").write_text("\n\nthe first line is empty")
  with pytest.raises(ValueError, match=re.escape(f"{folder / '02.txt'}: empty caption (the first line is the "
                                                 "caption); write one or delete the file")):
    data.read_caption_files(folder, names, ".txt")
  (folder / "02.txt").write_bytes(b"caf\xe9")
  with pytest.raises(ValueError, match=re.escape(f"{folder / '02.txt'}: caption file is not UTF-8")):
    data.read_caption_files(folder, names, ".txt")


SUBSET = '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "train/10_sks dog"\nclass_tokens = "sks dog"\n'
REG = '[[datasets.subsets]]\nis_reg = true\nimage_dir = "reg/1_dog"\nclass_tokens = "dog"\n'
REG_CAT = REG.replace("1_dog", "1_cat").replace('"dog"', '"cat"')


@pytest.mark.parametrize("toml, message", [
    ("[genral]\n" + SUBSET, "genral: unknown top-level key (did you mean general?); a kohya dataset config has "
                            "[general] and [[datasets]]"),
    ("[general]\nflip_agu = true\n" + SUBSET, "general.flip_agu: unknown key (did you mean flip_aug?); kohya's "
                                               "dataset keys are in sd-scripts' library/config_util.py"),
    (SUBSET + "shuffle_caption = true\n", "datasets[0].subsets[0].shuffle_caption=true is not supported: captions "
                                          "are used as written; remove it"),
    (SUBSET + "caption_dropout_rate = 0.1\n", "datasets[0].subsets[0].caption_dropout_rate=0.1 is not supported: "
                                              "there is no caption dropout; remove it"),
    (SUBSET + "color_aug = true\n", "datasets[0].subsets[0].color_aug=true is not supported"),
    ("[general]\nbucket_no_upscale = true\n" + SUBSET, "general.bucket_no_upscale=true is not supported"),
    ("[general]\nresize_interpolation = \"lanczos\"\n" + SUBSET,
     "general.resize_interpolation=\"lanczos\" is not supported: images are resized bilinear (PIL); remove it"),
    ("[general]\nbatch_size = 0\n" + SUBSET, "general.batch_size=0: must be >= 1"),
    ("[general]\nresolution = [768, 512]\n" + SUBSET,
     "general.resolution=[768, 512] is not supported: one square training resolution (other aspect ratios: "
     "enable_bucket=true); use one number"),
    (SUBSET + "num_repeats = \"10\"\n", "datasets[0].subsets[0].num_repeats=\"10\": must be an integer"),
    (SUBSET + "flip_aug = 1\n", "datasets[0].subsets[0].flip_aug=1: must be true or false"),
    ("[general]\nis_reg = true\n" + SUBSET, "general.is_reg: only a [[datasets.subsets]] entry may set it"),
    (SUBSET + "batch_size = 2\n", "datasets[0].subsets[0].batch_size: only a [[datasets]] entry or [general] may "
                                  "set it"),
    (SUBSET + "metadata_file = \"meta.json\"\n", "datasets[0].subsets[0].metadata_file: fine-tuning datasets "
                                                 "(metadata_file / in_json) are not supported"),
    ("[general]\nin_json = \"meta.json\"\n" + SUBSET, "general.in_json: fine-tuning datasets"),
    (SUBSET + "conditioning_data_dir = \"c\"\n", "datasets[0].subsets[0].conditioning_data_dir: ControlNet datasets "
                                                 "are not supported"),
    ("[general]\nresolution = 512\n", "no [[datasets]]: add one with its [[datasets.subsets]]"),
    ("[[datasets]]\nresolution = 512\n", "datasets[0]: no [[datasets.subsets]]; add one with its image_dir"),
    ("[[datasets]]\n[[datasets.subsets]]\nclass_tokens = \"x\"\n", "datasets[0].subsets[0]: image_dir is required"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = \"train/missing\"\n",
     "datasets[0].subsets[0].image_dir=\"train/missing\": no such folder ({cwd}/train/missing; a relative path is "
     "relative to the working directory, as in kohya)"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = \"train\"\n",
     "datasets[0].subsets[0].image_dir=\"train\": no images in {cwd}/train"),
    (SUBSET + "num_repeats = 0\n", "datasets[0].subsets[0].num_repeats=0: must be >= 1 (kohya skips such a subset; "
                                   "delete it instead)"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = \"reg/1_dog\"\n",
     "datasets[0].subsets[0]: 4 image(s) in {cwd}/reg/1_dog have no .caption caption file (e.g. 00.png) and the "
     "subset has no class_tokens to caption them; set class_tokens (e.g. \"sks dog\") or add caption files"),
    (SUBSET + "[[datasets.subsets]]\nis_reg = true\nimage_dir = \"reg/1_dog\"\n",
     "datasets[0].subsets[1]: an is_reg subset needs class_tokens (its class prompt, e.g. \"dog\")"),
    ("[general]\ncaption_extension = \".txt\"\n" + SUBSET + REG.replace("reg/1_dog", "train/10_sks dog"),
     "datasets[0].subsets[1]: 1 class image(s) in {cwd}/train/10_sks dog have .txt caption files, but class images "
     "take class_tokens as their caption; remove the caption files or set caption_extension=\"\" on this subset"),
    (SUBSET + REG.replace('"dog"', '"cow"') + REG_CAT.replace('"cat"', '"horse"'),
     "datasets[0].subsets[0]: class_tokens=\"sks dog\" and its dataset's is_reg subsets datasets[0].subsets[1] "
     "(\"cow\"), datasets[0].subsets[2] (\"horse\"): none matches its last words"),
    (SUBSET.replace('"sks dog"', '"sks black dog"') + REG + REG_CAT.replace('"cat"', '"black dog"'),
     "datasets[0].subsets[0]: class_tokens=\"sks black dog\" and its dataset's is_reg subsets "
     "datasets[0].subsets[1] (\"dog\"), datasets[0].subsets[2] (\"black dog\"): several match its last words, so "
     "which class images it pairs with is unclear; make exactly one reg subset's class_tokens the last words of the "
     "concept's, or put the concept with its reg subset in a [[datasets]] of their own"),
    (SUBSET + REG + REG_CAT,
     "datasets[0].subsets[2]: no concept pairs with this is_reg subset (class_tokens=\"cat\"); make its "
     "class_tokens the last words of a concept's, or remove it"),
    (SUBSET + REG + SUBSET.replace("train/10_sks dog", "train/5_ohwx cat"),
     "datasets[1] has no is_reg subset while datasets[0].subsets[1] is one: with class images, every dataset needs "
     "its own reg subset"),
    ('[[datasets]]\n' + REG, "every subset has is_reg=true: add one with the subject's images (is_reg=false)"),
    (SUBSET + SUBSET.replace("[[datasets]]\n", ""),
     "datasets[0].subsets[1].image_dir and datasets[0].subsets[0].image_dir are both folders named '10_sks dog': a "
     "concept's name is its folder's name and must be unique; rename one folder"),
    (SUBSET + "flip_aug = true\n" + SUBSET.replace("[[datasets]]\n", "").replace("10_sks dog", "5_ohwx cat"),
     "datasets[0].subsets[0].flip_aug=true but datasets[0].subsets[1] leaves flip_aug unset: this trainer takes one "
     "flip_aug (random_flip) per run; set it once in [general]"),
    (SUBSET + "alpha_mask = true\n" + REG,
     "datasets[0].subsets[0].alpha_mask=true but datasets[0].subsets[1] leaves alpha_mask unset: this trainer takes "
     "one alpha_mask (masked_loss) per run; set it on every subset"),
    ("[general]\nbatch_size = 2\n" + SUBSET + "[[datasets]]\nbatch_size = 4\n[[datasets.subsets]]\n"
     "image_dir = \"train/5_ohwx cat\"\nclass_tokens = \"ohwx cat\"\n",
     "general.batch_size=2 but datasets[1].batch_size=4: this trainer takes one batch_size (train_batch_size) per "
     "run; set it once in [general]"),
    ("[general\n", "not valid TOML: "),
])
def test_refusals_name_the_file_and_the_key(kohya_dir, toml, message):
  path = write(toml)
  with pytest.raises((ValueError, FileNotFoundError)) as error:
    kohya_toml.read_dataset_config(path)
  assert str(error.value).startswith(f"dataset_config={path}: {message.format(cwd=kohya_dir)}"), str(error.value)


def test_several_datasets_that_agree_are_one_run(kohya_dir):
  toml = ("[general]\nbatch_size = 2\n" + SUBSET + REG + "[[datasets]]\n[[datasets.subsets]]\n"
          "image_dir = \"train/5_ohwx cat\"\nclass_tokens = \"ohwx cat\"\n" + REG_CAT.replace('"cat"', '"dog"'))
  settings, concepts = kohya_toml.read_dataset_config(write(toml))
  assert settings["train_batch_size"] == 2
  assert [(c["name"], c["class_data_dir"]) for c in concepts] == [
      ("10_sks dog", str(kohya_dir / "reg" / "1_dog")), ("5_ohwx cat", str(kohya_dir / "reg" / "1_cat"))]


def test_missing_toml_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=re.escape(f"dataset_config={tmp_path / 'x.toml'}: no such file")):
    kohya_toml.read_dataset_config(tmp_path / "x.toml")


def test_apply_dataset_config_sets_the_config(kohya_dir):
  config = config_files.defaults()
  kohya_toml.apply_dataset_config(config)  # unset: nothing changes
  assert config == config_files.defaults()
  config.dataset_config = str(write(TWO_SUBJECTS))
  kohya_toml.apply_dataset_config(config)
  settings, concepts = kohya_toml.read_dataset_config(config.dataset_config)
  assert config.concepts == concepts and all(config[k] == v for k, v in settings.items())
  config_files.check_known(config)
  saved = config.to_json_best_effort()
  kohya_toml.apply_dataset_config(config)  # a run's config read back: already applied, unchanged
  assert config.to_json_best_effort() == saved
  config.concepts = [{"name": "dog", "instance_data_dir": "elsewhere"}]
  with pytest.raises(ValueError, match=re.escape(f"dataset_config={config.dataset_config} and concepts are both "
                                                 "set: the TOML's subsets are the concepts; set one of them")):
    kohya_toml.apply_dataset_config(config)


def test_alpha_mask_is_masked_loss(kohya_dir):
  toml = SUBSET + "alpha_mask = true\n"
  settings, _ = kohya_toml.read_dataset_config(write(toml))
  assert settings["masked_loss"] is True
  config = config_files.defaults()
  config.dataset_config = str(write(toml))
  if "masked_loss" in config:  # the masked-loss setting (another branch) present
    kohya_toml.apply_dataset_config(config)
    assert config.masked_loss is True
  else:
    with pytest.raises(ValueError, match="sets masked_loss, which this trainer does not have"):
      kohya_toml.apply_dataset_config(config)


def test_shipped_example(tmp_path, monkeypatch):
  # its paths are relative to the working directory (the repository root, beside ../shared/dreambooth-dataset):
  # the same layout in tmp_path, so the test needs no ../shared
  shared = tmp_path / "shared" / "dreambooth-dataset"
  images(shared / "dog", 2), images(shared / "cat", 1), (tmp_path / "repo").mkdir()
  monkeypatch.chdir(tmp_path / "repo")
  settings, concepts = kohya_toml.read_dataset_config(ROOT / "configs" / "kohya_two_subjects.toml")
  assert settings == {"resolution": 512, "train_batch_size": 1, "enable_bucket": False, "random_flip": False,
                      "center_crop": True, "with_prior_preservation": False}
  assert concepts == [
      {"name": "dog", "instance_data_dir": str(shared / "dog"),
       "instance_prompt": "sks dog", "caption_extension": ".txt", "num_repeats": 2},
      {"name": "cat", "instance_data_dir": str(shared / "cat"),
       "instance_prompt": "zwx cat", "caption_extension": ".txt", "num_repeats": 1}]
