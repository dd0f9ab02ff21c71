"""Several subjects in one run (config.concepts): entries checked by name, the example sequence follows num_repeats
and pairs each instance example with its own concept's class example, per-concept losses in every step record,
per-concept class images and validation grids, and kill -9 then rerun repeats the losses exactly."""

import collections
import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dreambooth_jax import config_files
from dreambooth_jax.data import batches, concepts as concepts_lib
from test_train import FAST, fast_config, last_logged_step, read_losses, step_records, wait_for

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOG = ROOT / "dreambooth_jax" / "assets" / "dog"


def write_images(folder: pathlib.Path, count: int, seed: int, size: int = 40, captions: str = "") -> pathlib.Path:
  """`count` random PNGs (and, with captions, a NAME.txt caption beside each)."""
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i in range(count):
    Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(folder / f"{i:02d}.png")
    if captions:
      (folder / f"{i:02d}.txt").write_text(f"{captions} {i}\n")
  return folder


def two_subjects(tmp_path: pathlib.Path, **dog_extra) -> list[dict]:
  """The bundled dog (5 photos) and 3 written "toy" images captioned by .txt files, prompted as kohya users do
  (class_tokens "sks dog", reg "dog"), so that kohya_toml() below is the same run."""
  toy = write_images(tmp_path / "zwx toy", 3, seed=1, captions="a photo of zwx toy")
  return [{"name": "dog", "instance_data_dir": str(DOG), "instance_prompt": "sks dog", "class_prompt": "dog",
           "validation_prompt": "a photo of sks dog on grass", **dog_extra},
          {"name": "zwx toy", "instance_data_dir": str(toy), "instance_prompt": "zwx toy", "caption_extension": ".txt",
           "class_prompt": "toy", "num_repeats": 2}]


def kohya_toml(tmp_path: pathlib.Path, class_images: pathlib.Path) -> pathlib.Path:
  """two_subjects() as a kohya dataset TOML whose reg subsets are the class images in class_images/<name>."""
  path = tmp_path / "two.toml"
  path.write_text(f"""[[datasets]]
[[datasets.subsets]]
image_dir = "{DOG}"
class_tokens = "sks dog"
[[datasets.subsets]]
image_dir = "{tmp_path / 'zwx toy'}"
class_tokens = "zwx toy"
caption_extension = ".txt"
num_repeats = 2
[[datasets.subsets]]
image_dir = "{class_images / 'dog'}"
class_tokens = "dog"
is_reg = true
[[datasets.subsets]]
image_dir = "{class_images / 'zwx toy'}"
class_tokens = "toy"
is_reg = true
""")
  return path


def test_example_sequence_follows_num_repeats_and_pairs_class_examples(tmp_path):
  config = fast_config("train_batch_size=3")
  config.concepts = two_subjects(tmp_path, num_repeats=2)
  config.concepts[1]["num_repeats"] = 3
  for name, count, seed in (("dog", 4, 2), ("zwx toy", 2, 3)):
    write_images(tmp_path / "work" / "class_images" / name, count, seed=seed)
  # an epoch: 5 dog photos x 2 + 3 toy images x 3 = 19 examples; 19 steps of 3 = exactly 3 epochs
  steps = batches.example_sequence(config, 19, tmp_path / "work")
  instance = [e for step in steps for e in step if not e["prior"]]
  for epoch in range(3):
    counts = collections.Counter(e["path"] for e in instance[19 * epoch:19 * (epoch + 1)])
    assert sorted(counts.values()) == [2] * 5 + [3] * 3, counts
    assert all(counts[str(p)] == 2 for p in DOG.glob("*.jpg"))
  assert instance[:19] != instance[19:38]  # a new permutation each epoch
  for step in steps:  # each class example is of its paired instance example's concept, in the same order
    kinds = [e for e in step if not e["prior"]], [e for e in step if e["prior"]]
    assert [e["concept"] for e in kinds[0]] == [e["concept"] for e in kinds[1]]
    for e in kinds[1]:
      assert pathlib.Path(e["path"]).parent.name == e["concept"]
      assert e["caption"] == {"dog": "dog", "zwx toy": "toy"}[e["concept"]]
  captions = {e["path"]: e["caption"] for e in instance}
  assert captions[str(tmp_path / "zwx toy" / "01.png")] == "a photo of zwx toy 1"
  assert captions[str(DOG / "00.jpg")] == "sks dog"
  assert batches.example_sequence(config, 19, tmp_path / "work") == steps  # deterministic from the seed

  # resumable: iterators restored from a state continue exactly
  sets, iterators, names = batches.host_data(config, tmp_path / "work")
  for _ in range(7):
    batches.paired_examples(iterators)
  state = {name: json.loads(json.dumps(it.get_state())) for name, it in iterators.items()}
  _, fresh, _ = batches.host_data(config, tmp_path / "work", instance=sets["instance"])
  for name, it in fresh.items():
    it.set_state(state[name])
  for _ in range(5):
    a, b = batches.paired_examples(iterators), batches.paired_examples(fresh)
    for kind in a:
      assert a[kind]["index_B"].tolist() == b[kind]["index_B"].tolist()
      assert a[kind]["concept_B"].tolist() == b[kind]["concept_B"].tolist()


def test_the_data_side_takes_the_resolved_concepts(tmp_path, monkeypatch):
  """A run resolves config.concepts once and passes them along: given them, the data side does not resolve again."""
  config = fast_config("with_prior_preservation=False")
  config.concepts = two_subjects(tmp_path)
  resolved = concepts_lib.resolve(config)
  monkeypatch.setattr(concepts_lib, "resolve", lambda *args, **kwargs: pytest.fail("config.concepts resolved again"))
  sets, _, names = batches.host_data(config, tmp_path / "work", concepts=resolved)
  assert names == ["dog", "zwx toy"] and sorted(set(sets["instance"].concepts)) == [0, 1]

def test_one_concept_draws_the_shorthands_instance_examples(tmp_path):
  shorthand = fast_config("with_prior_preservation=False", "random_flip=True")
  single = fast_config("with_prior_preservation=False", "random_flip=True")
  single.concepts = [{"name": "dog", "instance_data_dir": str(DOG), "instance_prompt": shorthand.instance_prompt}]
  strip = lambda steps: [[{k: v for k, v in e.items() if k != "concept"} for e in step] for step in steps]
  assert strip(batches.example_sequence(single, 6, tmp_path)) == strip(batches.example_sequence(shorthand, 6, tmp_path))


@pytest.mark.parametrize("entry, message", [
    ({"name": "cat", "instance_data_dir": "DIR", "num_repeat": 2},
     "concepts[1].num_repeat (did you mean num_repeats?)"),
    ({"name": "dog", "instance_data_dir": "DIR"}, "concepts[1] (dog): name='dog' is also concepts[0]'s"),
    ({"name": "cat", "instance_data_dir": "DIR", "dataset_name": "me/cats"},
     "concepts[1] (cat): give exactly one of instance_data_dir and dataset_name"),
    ({"name": "cat"}, "concepts[1] (cat): give exactly one of instance_data_dir and dataset_name"),
    ({"instance_data_dir": "DIR"}, "concepts[1]: name is required"),
    ({"name": "a/b", "instance_data_dir": "DIR"}, "concepts[1] (a/b): name='a/b': must be non-empty, without '/'"),
    ({"name": "cat", "instance_data_dir": "DIR", "num_repeats": 0}, "concepts[1] (cat): num_repeats=0: must be >= 1"),
    ({"name": "cat", "instance_data_dir": "/no/such/cats"},
     "concepts[1] (cat): instance_data_dir=/no/such/cats: image folder missing"),
    ({"name": "cat", "instance_data_dir": "DIR", "class_data_dir": "/shared/classes", "class_prompt": "a cat"},
     "concepts[1] (cat): class_data_dir='/shared/classes' is also concepts[0] (dog)'s, with another class_prompt"),
])
def test_bad_entries_are_refused_naming_the_entry_and_key(tmp_path, entry, message):
  from dreambooth_jax.training import run
  config = fast_config()
  good = write_images(tmp_path / "cats", 2, seed=0)
  config.concepts = [{"name": "dog", "instance_data_dir": str(DOG), "class_data_dir": "/shared/classes"},
                     {k: str(good) if v == "DIR" else v for k, v in entry.items()}]
  with pytest.raises((ValueError, FileNotFoundError)) as error:
    run.train(config, tmp_path / "run")
  assert message in str(error.value) and "\n" not in str(error.value), str(error.value)
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_per_concept_prior_weights_and_sums():
  import jax.numpy as jnp
  from dreambooth_jax.training import step as step_lib
  mse = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
  prior = jnp.array([0, 0, 0, 1, 1, 1], jnp.float32)
  concept = jnp.array([0, 1, 1, 0, 1, 1], jnp.int32)
  same = step_lib.combine_losses(mse, prior, 0.5, concept, (0.5, 0.5))
  np.testing.assert_allclose(same[0], step_lib.combine_losses(mse, prior, 0.5)[0], rtol=1e-7)
  loss, (instance, prior_loss) = step_lib.combine_losses(mse, prior, 1.0, concept, (1.0, 0.25))
  np.testing.assert_allclose([loss, instance, prior_loss], [2.0 + (4.0 + 0.25 * 11.0) / 3, 2.0, 5.0], rtol=1e-6)
  sums = step_lib.concept_sums(mse, prior, concept, 2)
  np.testing.assert_array_equal(sums["concept_instance_sum"], [1.0, 5.0])
  np.testing.assert_array_equal(sums["concept_prior_count"], [1.0, 2.0])
  from dreambooth_jax.training import metrics
  values = metrics.concept_losses({"loss": 1.0, **sums, "concept_instance_count": np.array([0.0, 2.0])}, ["a", "b"])
  assert values["instance_loss/a"] is None and values["instance_loss/b"] == 2.5 and values["prior_loss/b"] == 5.5


def concepts_config_file(tmp_path: pathlib.Path, toml: pathlib.Path | None = None) -> pathlib.Path:
  """A config file (config.concepts cannot be given on the command line) over configs/tiny.py with FAST's settings:
  two_subjects(), or with `toml` the same subjects from that kohya dataset TOML."""
  entries = two_subjects(tmp_path)
  lines = [f"  c.{k} = type(c.{k})({v!r}) if not isinstance(c.{k}, bool) else {v!r} == 'True'"
           for k, v in (item.split("=", 1) for item in (*FAST, "max_train_steps=8", "validation_steps=8",
                                                        "num_class_images=2", "validation_loss=True",
                                                        "export_at_end=False"))]
  path = tmp_path / ("two_toml.py" if toml else "two.py")
  subjects = f"c.dataset_config = {str(toml)!r}" if toml else f"c.concepts = {entries!r}"
  path.write_text("from dreambooth_jax.config_files import load\n"
                  f"def get_config(arg=None):\n  c = load({str(ROOT / 'configs' / 'tiny.py')!r})\n"
                  + "\n".join(lines) + f"\n  {subjects}\n  return c\n")
  return path


@pytest.fixture(scope="module")
def concepts_run(tmp_path_factory):
  from dreambooth_jax.training import run
  tmp = tmp_path_factory.mktemp("concepts")
  config_file = concepts_config_file(tmp)
  workdir = tmp / "run"
  run.train(config_files.load(config_file), workdir)
  return config_file, workdir


def test_two_subjects_log_per_concept_losses(concepts_run):
  config_file, workdir = concepts_run
  records = [r for r in step_records(workdir) if "loss" in r]
  assert [r["step"] for r in records] == list(range(1, 9))
  for r in records:
    for kind in ("instance", "prior"):
      values = [r[f"{kind}_loss/{name}"] for name in ("dog", "zwx toy")]  # every concept, every step
      assert any(v is not None for v in values), r
      present = [v for v in values if v is not None]
      # the step's mean over its examples is a mix of the concepts' means
      assert min(present) - 1e-6 <= r[f"{kind}_loss"] <= max(present) + 1e-6, r
  assert any(r["instance_loss/dog"] is None or r["instance_loss/zwx toy"] is None for r in records)  # 2 per step
  val = [r for r in step_records(workdir) if "val/instance_loss" in r]
  assert len(val) == 1 and val[0]["step"] == 8 and np.isfinite(val[0]["val/prior_loss"])
  for name in ("dog", "zwx toy"):
    assert len(list((workdir / "class_images" / name).glob("class_*.png"))) == 2
  assert (workdir / "validation" / "step_000008.png").is_file()
  assert (workdir / "validation" / "step_000008_dog.png").is_file()
  assert not (workdir / "validation" / "step_000008_zwx toy.png").exists()  # no validation_prompt of its own
  saved = json.loads((workdir / "config.json").read_text())  # the resolved entries, defaults filled
  assert saved["concepts"][0]["num_repeats"] == 1 and saved["concepts"][1]["num_repeats"] == 2
  assert saved["concepts"][0]["num_class_images"] == 2 and set(saved["concepts"][1]) == set(concepts_lib.ENTRY_DEFAULTS)
  from dreambooth_jax.training import run_state
  resolved = concepts_lib.resolve(config_files.load(config_file))
  assert concepts_lib.resolve(run_state.read_run_config(workdir)) == resolved


def test_kohya_toml_gives_the_same_batches_as_its_concepts(tmp_path):
  """The golden check of issue #13: a kohya dataset TOML and the equivalent config.concepts draw the same examples
  (concept, image, caption, flip; class examples from the same class images), step by step."""
  entries = two_subjects(tmp_path)
  for name, seed in (("dog", 2), ("zwx toy", 3)):
    write_images(tmp_path / "classes" / name, 2, seed=seed)
  concepts = fast_config("train_batch_size=2", "random_flip=True")
  concepts.concepts = [{**e, "class_data_dir": str(tmp_path / "classes" / e["name"]), "num_class_images": 2}
                       for e in entries]
  toml = fast_config("train_batch_size=2", "random_flip=True")
  toml.dataset_config = str(kohya_toml(tmp_path, tmp_path / "classes"))
  steps = batches.example_sequence(concepts, 12, tmp_path / "a")
  assert batches.example_sequence(toml, 12, tmp_path / "b") == steps
  assert {e["concept"] for step in steps for e in step} == {"dog", "zwx toy"}
  assert [c["name"] for c in toml.concepts] == ["dog", "zwx toy"]  # applied in place: the saved config has them


def test_kill_9_then_rerun_from_the_kohya_toml_gives_identical_per_concept_losses(concepts_run, tmp_path):
  """kill -9 mid-run, rerun: the losses (and each concept's) equal the uninterrupted run's, exactly. The killed run
  reads its subjects from the kohya TOML equivalent to the reference's config.concepts (its reg subsets are the
  class images the reference generated): a TOML run is the same run."""
  config_file, reference = concepts_run
  config_file = concepts_config_file(reference.parent, toml=kohya_toml(reference.parent, reference / "class_images"))
  workdir = tmp_path / "run"
  command = [sys.executable, "-m", "dreambooth_jax.train", f"--config={config_file}", f"--workdir={workdir}",
             "--config.checkpointing_steps=1", "--config.validation_steps=0"]
  proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  wait_for(proc, lambda: last_logged_step(workdir) >= 2, "kill -9")
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  killed_at = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert killed_at < 8
  result = subprocess.run(command, capture_output=True, text=True, timeout=400)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resumed from step {killed_at}" in result.stderr
  assert read_losses(workdir) == read_losses(reference)
  last = lambda run: {r["step"]: r for r in step_records(run) if "loss" in r}
  for step, record in last(reference).items():
    got = last(workdir)[step]
    for key in record:
      if "/" in key:
        assert got[key] == record[key], (step, key)


def test_unusable_folder_is_named_by_its_entry(tmp_path):
  config = fast_config()
  config.concepts = two_subjects(tmp_path)
  (tmp_path / "empty").mkdir()
  config.concepts[1]["instance_data_dir"] = str(tmp_path / "empty")
  with pytest.raises(ValueError, match=rf"^concepts\[1\] \(zwx toy\): instance_data_dir={tmp_path / 'empty'}: .*no "
                                       "usable images"):
    batches.load_instance_images(config)


def test_base_output_pairs_each_concept_with_its_own_photos(tmp_path):
  config = fast_config("prior_preservation=base_output", "train_batch_size=4")
  config.concepts = two_subjects(tmp_path)
  folders = {"dog": str(DOG), "zwx toy": str(tmp_path / "zwx toy")}
  for step in batches.example_sequence(config, 5, tmp_path / "work"):
    for e in (e for e in step if e["prior"]):
      assert str(pathlib.Path(e["path"]).parent) == folders[e["concept"]]
      assert e["caption"] == {"dog": "dog", "zwx toy": "toy"}[e["concept"]]
  assert not (tmp_path / "work" / "class_images").exists()


def test_cli_refuses_a_bad_entry_in_one_line(tmp_path):
  from test_cli_errors import run_cli
  config_file = tmp_path / "bad.py"
  config_file.write_text("from dreambooth_jax.config_files import load\n"
                         f"def get_config(arg=None):\n  c = load({str(ROOT / 'configs' / 'tiny.py')!r})\n"
                         f"  c.concepts = [{{'name': 'dog', 'instance_data_dir': {str(DOG)!r}}}, "
                         "{'name': 'cat', 'instance_data_dir': '/no/such/cats'}]\n  return c\n")
  result = run_cli("train", f"--config={config_file}", f"--workdir={tmp_path / 'run'}", tmp_path=tmp_path)
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last == "train: error: concepts[1] (cat): instance_data_dir=/no/such/cats: image folder missing", last


def test_concepts_in_aspect_ratio_buckets(tmp_path):
  """Concepts with enable_bucket (a kohya TOML's usual setting): every step's examples share one bucket; each class
  example is of its instance example's concept and bucket; num_repeats counts per epoch; a concept without class
  images in one of its buckets is named; the iterators resume exactly."""
  from test_buckets import BUCKETED
  wide, tall = tmp_path / "wide", tmp_path / "tall"
  for folder, (h, w), seed in ((wide, (32, 64), 1), (tall, (64, 32), 2)):
    write_images(folder, 2, seed=seed)  # 40 x 40: the square bucket
    rng = np.random.default_rng(seed)
    for i in range(2):
      Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(folder / f"r{i}.png")
  config = fast_config(*BUCKETED, "train_batch_size=2", "gradient_accumulation_steps=2")
  config.concepts = [{"name": "wide", "instance_data_dir": str(wide), "class_prompt": "a wide thing",
                      "num_repeats": 2},
                     {"name": "tall", "instance_data_dir": str(tall), "class_prompt": "a tall thing"}]
  work = tmp_path / "work"
  for name, shapes in (("wide", [(32, 32), (32, 64)]), ("tall", [(32, 32), (64, 32)])):
    for k, (h, w) in enumerate(shapes):  # one class image per bucket the concept has photos in
      folder = work / "class_images" / name
      folder.mkdir(parents=True, exist_ok=True)
      Image.fromarray(np.full((h, w, 3), 40 * k, np.uint8)).save(folder / f"c{k}.png")
  sets, _, _ = batches.host_data(config, work)
  bucket_of = {str(p): b for p, b in zip(sets["instance"].paths, sets["instance"].buckets)}
  bucket_of.update({str(p): b for p, b in zip(sets["class"].paths, sets["class"].buckets)})
  steps = batches.example_sequence(config, 12, work)
  for step in steps:
    assert len({bucket_of[e["path"]] for e in step}) == 1, step  # one bucket per step, class examples included
    instance, paired = [e for e in step if not e["prior"]], [e for e in step if e["prior"]]
    assert [e["concept"] for e in instance] == [e["concept"] for e in paired]
    assert all(pathlib.Path(e["path"]).parent.name == e["concept"] for e in paired)
  counts = collections.Counter(e["path"] for step in steps for e in step if not e["prior"])
  assert counts[str(wide / "00.png")] > counts[str(tall / "00.png")]  # num_repeats 2 against 1
  assert batches.example_sequence(config, 12, work) == steps  # deterministic
  sets, iterators, names = batches.host_data(config, work)
  for _ in range(3):
    batches.bucketed_step(iterators, True)
  state = {name: json.loads(json.dumps(it.get_state())) for name, it in iterators.items()}
  _, fresh, _ = batches.host_data(config, work, instance=sets["instance"])
  for name, it in fresh.items():
    it.set_state(state[name])
  for _ in range(4):
    (bucket_a, a), (bucket_b, b) = batches.bucketed_step(iterators, True), batches.bucketed_step(fresh, True)
    assert bucket_a == bucket_b
    for kind in a:
      assert a[kind]["index_B"].tolist() == b[kind]["index_B"].tolist()
  (work / "class_images" / "tall" / "c1.png").unlink()  # no class image in the bucket of tall's tall photos now
  with pytest.raises(ValueError, match=r"concept 'tall': no class image in bucket \d+x\d+ \(HxW\)"):
    batches.example_sequence(config, 12, work)


@pytest.mark.slow  # about 3 minutes on 2 cores: class images sampled per concept and bucket, a compile per bucket
def test_concepts_with_buckets_generate_class_images_per_concept_and_bucket(tmp_path):
  """Two concepts in aspect-ratio buckets with generated class images: each concept's class images are generated at
  every bucket its photos are in, the run trains, and every step record carries its bucket and both concepts'
  losses."""
  from test_buckets import BUCKETED
  from dreambooth_jax.training import run
  shapes = {"wide": ((16, 64), 1), "square": ((40, 40), 2)}  # buckets 16 x 64 and 32 x 32 (HxW)
  for name, ((h, w), seed) in shapes.items():
    folder = tmp_path / name
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(2):
      Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(folder / f"{i}.png")
  config = fast_config(*BUCKETED, "max_train_steps=4", "checkpointing_steps=4", "validation_steps=0",
                       "export_at_end=False")
  config.concepts = [{"name": name, "instance_data_dir": str(tmp_path / name), "instance_prompt": f"sks {name}",
                      "class_prompt": name, "num_class_images": 2} for name in shapes]
  workdir = tmp_path / "run"
  run.train(config, workdir)
  sizes = {name: {Image.open(p).size for p in (workdir / "class_images" / name).glob("class_*.png")}
           for name in shapes}
  assert len(sizes["wide"]) == 1 and len(sizes["square"]) == 1 and sizes["wide"] != sizes["square"], sizes
  records = [r for r in step_records(workdir) if "loss" in r]
  assert [r["step"] for r in records] == [1, 2, 3, 4] and all("bucket" in r for r in records)
  assert all(f"instance_loss/{n}" in r and f"prior_loss/{n}" in r for r in records for n in shapes)
