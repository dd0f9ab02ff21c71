"""Metric maths on hand-made embeddings, and the evaluate CLI end to end against transformers-torch."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_jax import evaluate
from dreambooth_jax.eval import metrics, preprocess
from dreambooth_jax.evaluate import InputError

# ----------------------------------------------------------------------------------------------- metric maths


def test_pairwise_cosine_known_answer():
  generated = np.array([[1.0, 0.0], [0.0, 1.0]])
  real = np.array([[1.0, 0.0], [1.0, 1.0]])
  expected = (1 + 1 / math.sqrt(2) + 0 + 1 / math.sqrt(2)) / 4
  assert metrics.dino(generated, real) == pytest.approx(expected, abs=1e-12)
  # Cosine: the scale of each embedding does not matter.
  assert metrics.clip_i(generated * [[3.0], [0.5]], real * [[7.0], [2.0]]) == pytest.approx(expected, abs=1e-12)
  # Opposite vectors -> -1; identical -> 1.
  assert metrics.dino([[1.0, 2.0]], [[-2.0, -4.0]]) == pytest.approx(-1.0)
  assert metrics.dino(real, real[:1]) == pytest.approx((1 + 1 / math.sqrt(2)) / 2)


def test_pres_is_dino_of_class_images_against_real():
  real = np.array([[1.0, 0.0, 0.0]])
  class_generated = np.array([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
  assert metrics.pres(real, class_generated) == pytest.approx((0 + 1 / math.sqrt(2)) / 2)


def test_clip_t_known_answer():
  text = np.array([[1.0, 0.0], [0.0, 2.0]])
  images = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
  mean, per_prompt = metrics.clip_t(text, images, [0, 0, 1])
  assert mean == pytest.approx((1 + 1 / math.sqrt(2) - 1) / 3)  # every image weighs the same
  np.testing.assert_allclose(per_prompt, [(1 + 1 / math.sqrt(2)) / 2, -1.0])
  _, per_prompt = metrics.clip_t(np.vstack([text, [[1.0, 1.0]]]), images, [0, 0, 1])
  assert np.isnan(per_prompt[2])  # a prompt without images has no value


def test_metric_input_errors():
  with pytest.raises(ValueError, match="zero"):
    metrics.dino([[0.0, 0.0]], [[1.0, 0.0]])
  with pytest.raises(ValueError, match="sizes differ"):
    metrics.clip_i([[1.0, 0.0]], [[1.0, 0.0, 0.0]])
  with pytest.raises(ValueError, match="non-empty"):
    metrics.dino(np.zeros((0, 4)), [[1.0, 0, 0, 0]])
  with pytest.raises(ValueError, match="prompt indices"):
    metrics.clip_t([[1.0, 0.0]], [[1.0, 0.0]], [1])
  with pytest.raises(ValueError, match="at least one pair"):
    metrics.div([0.3, 0.5], [1, 0])
  with pytest.raises(ValueError, match="matching non-empty"):
    metrics.div([0.3], [1, 2])


def test_div_weighs_every_pair_the_same():
  # prompt A: 3 pairs of mean 0.2; prompt B: 1 pair of 0.6 -> (3 * 0.2 + 0.6) / 4
  assert metrics.div([0.2, 0.6], [3, 1]) == pytest.approx(0.3)


# ----------------------------------------------------------------------------------------------- inputs

def write_images(folder, names, seed):
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  for name in names:
    h, w = rng.integers(40, 80, 2)
    small = Image.fromarray(rng.integers(0, 256, (h // 4, w // 4, 3), np.uint8))
    small.resize((int(w), int(h)), Image.BILINEAR).save(folder / name)
  return folder


def test_read_prompts(tmp_path):
  path = tmp_path / "prompts.txt"
  path.write_text("a sks dog\n\n  a sks dog in the snow  \n")
  assert evaluate.read_prompts(path) == ["a sks dog", "a sks dog in the snow"]
  path.write_text("a sks dog\n\na {0} {1} on the beach\n")
  with pytest.raises(InputError, match=r"prompts.txt:3:.*placeholder"):
    evaluate.read_prompts(path)
  path.write_text("\n \n")
  with pytest.raises(InputError, match="no prompts"):
    evaluate.read_prompts(path)
  with pytest.raises(InputError, match="no such file"):
    evaluate.read_prompts(tmp_path / "missing.txt")


def test_grouping_layouts(tmp_path):
  # index.csv
  csv_dir = write_images(tmp_path / "csv", ["a.png", "b.png"], 0)
  (csv_dir / "index.csv").write_text("file,prompt\na.png,a dog\nb.png,a cat\n")
  assert [(p.name, q) for p, q in evaluate.group_generated(csv_dir)] == [("a.png", "a dog"), ("b.png", "a cat")]
  # Subfolders: prompt.txt wins over the folder name.
  sub = tmp_path / "sub"
  write_images(sub / "a dog", ["0.png"], 1)
  write_images(sub / "p1", ["0.png", "1.jpg"], 2)
  (sub / "p1" / "prompt.txt").write_text("a sks dog on the moon\n")
  pairs = evaluate.group_generated(sub)
  assert [q for _, q in pairs] == ["a dog", "a sks dog on the moon", "a sks dog on the moon"]
  prompts, of_image = evaluate.assign_prompts(pairs, None)
  assert prompts == ["a dog", "a sks dog on the moon"] and of_image.tolist() == [0, 1, 1]
  # A bare list index.json.
  js = write_images(tmp_path / "js", ["x.png"], 3)
  (js / "index.json").write_text(json.dumps([{"file": "x.png", "prompt": "a dog"}]))
  assert [q for _, q in evaluate.group_generated(js)] == ["a dog"]


def test_grouping_errors(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(InputError, match="no index.json, index.csv or per-prompt subfolders"):
    evaluate.group_generated(empty)
  with pytest.raises(InputError, match="no images"):
    evaluate.list_images(empty, "--real")
  with pytest.raises(InputError, match="no such folder"):
    evaluate.group_generated(tmp_path / "nope")
  gen = write_images(tmp_path / "gen", ["a.png"], 0)
  (gen / "index.json").write_text(json.dumps({"images": [{"file": "a.png", "prompt": "a dog"},
                                                         {"file": "gone.png", "prompt": "a dog"}]}))
  with pytest.raises(InputError, match="gone.png does not exist"):
    evaluate.group_generated(gen)
  (gen / "index.json").write_text(json.dumps({"images": [{"file": "a.png"}]}))
  with pytest.raises(InputError, match="entry 0 needs"):
    evaluate.group_generated(gen)
  (gen / "index.json").write_text("{not json")
  with pytest.raises(InputError, match="invalid JSON"):
    evaluate.group_generated(gen)
  (gen / "index.json").unlink()
  (gen / "index.csv").write_text("name,text\na.png,a dog\n")
  with pytest.raises(InputError, match="file,prompt"):
    evaluate.group_generated(gen)
  pairs = [(gen / "a.png", "a dog")]
  with pytest.raises(InputError, match="a.png: its prompt 'a dog' is not in --prompts"):
    evaluate.assign_prompts(pairs, ["a cat"], "p.txt")
  with pytest.raises(InputError, match=r"no generated images for prompt\(s\) \['a cat'\]"):
    evaluate.assign_prompts(pairs, ["a dog", "a cat"], "p.txt")


# ----------------------------------------------------------------------------------------------- end to end

def perturb_(model, seed):
  """Noisy norms and a strong patch embedding: random-init encoders map every image to nearly one direction
  otherwise (CLS and position embeddings dominate), and metric values near 1 would hide preprocessing mistakes."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.5 * torch.randn(p.shape, generator=g))
      if "patch_embedding" in name and name.endswith("weight"):
        p.mul_(30.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """Tiny random DINO and CLIP transformers folders (32x32 images, the real CLIP vocabulary) + torch models."""
  from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel
  root = tmp_path_factory.mktemp("models")
  torch.manual_seed(0)
  dino = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                            image_size=32, patch_size=8, layer_norm_eps=1e-6)).eval()
  perturb_(dino, 0)
  dino.save_pretrained(root / "dino")
  (root / "dino" / "preprocessor_config.json").write_text(json.dumps({
      "feature_extractor_type": "ViTFeatureExtractor", "size": 32, "resample": 2, "do_resize": True,
      "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
  text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=49408,
              max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
  vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                patch_size=8)
  clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
  perturb_(clip, 1)
  clip.save_pretrained(root / "clip")
  (root / "clip" / "preprocessor_config.json").write_text(json.dumps({
      "image_processor_type": "CLIPImageProcessor", "size": 32, "crop_size": 32, "do_center_crop": True,
      "resample": 3, "image_mean": list(preprocess.OPENAI_CLIP_MEAN), "image_std": list(preprocess.OPENAI_CLIP_STD)}))
  return root, dino, clip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  gen = write_images(root / "generated", ["00000.png", "00001.png", "00002.png", "00003.png"], 0)
  prompts = ["a sks dog", "a sks dog in the snow"]
  index = [{"file": f"0000{i}.png", "prompt": prompts[i // 2], "index": i} for i in range(4)]
  (gen / "index.json").write_text(json.dumps({"settings": {"seed": 0}, "images": index}))  # as sample.py writes
  write_images(root / "real", ["r0.jpg", "r1.png", "r2.png"], 1)
  write_images(root / "class", ["c0.png", "c1.png"], 2)
  (root / "prompts.txt").write_text("\n".join(prompts) + "\n")
  return root, prompts


@torch.no_grad()
def torch_reference(models, data):
  """The metrics computed with transformers only (torch models, AutoImageProcessor, CLIPTokenizer)."""
  from transformers import AutoImageProcessor
  root, dino, clip = models
  data_root, prompts = data
  dino_proc = AutoImageProcessor.from_pretrained(root / "dino", backend="pil")
  clip_proc = AutoImageProcessor.from_pretrained(root / "clip", backend="pil")
  load = lambda folder, names: [Image.open(data_root / folder / n).convert("RGB") for n in names]
  gen, real = load("generated", [f"0000{i}.png" for i in range(4)]), load("real", ["r0.jpg", "r1.png", "r2.png"])
  klass = load("class", ["c0.png", "c1.png"])
  pixels = lambda proc, images: torch.from_numpy(proc(images=images, return_tensors="np")["pixel_values"])
  feats = lambda out: out if isinstance(out, torch.Tensor) else out.pooler_output
  d = lambda images: dino(pixel_values=pixels(dino_proc, images)).last_hidden_state[:, 0].numpy()
  c = lambda images: feats(clip.get_image_features(pixel_values=pixels(clip_proc, images))).numpy()
  tok = evaluate.clip_tokenizer(root / "clip")
  ids = torch.from_numpy(tok(prompts, padding="max_length", max_length=77, return_tensors="np").input_ids)
  t = feats(clip.get_text_features(input_ids=ids.long())).numpy()
  cos = lambda a, b: (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1,
                                                                                           keepdims=True)).T
  clip_gen = c(gen)
  return {"dino": cos(d(gen), d(real)).mean(), "clip_i": cos(clip_gen, c(real)).mean(),
          "clip_t": np.mean([cos(t[i // 2:i // 2 + 1], clip_gen[i:i + 1])[0, 0] for i in range(4)]),
          "pres": cos(d(klass), d(real)).mean()}


def test_evaluate_matches_transformers(models, data):
  root, _, _ = models
  data_root, prompts = data
  results = evaluate.evaluate(data_root / "generated", data_root / "real", dino_model=root / "dino",
                              clip_model=root / "clip", prompts_file=data_root / "prompts.txt",
                              class_generated=data_root / "class", batch_size=3)  # 3: a partial last batch
  expected = torch_reference(models, data)
  for key, value in expected.items():
    assert results[key] == pytest.approx(float(value), abs=2e-6), key  # cosines; fp32 errors seen: ~5e-8
  assert results["counts"] == {"generated_images": 4, "real_images": 3, "prompts": 2, "class_generated_images": 2}
  assert list(results["per_prompt"]) == prompts
  assert np.mean([v["clip_t"] for v in results["per_prompt"].values()]) == pytest.approx(results["clip_t"])


def test_cli_writes_json_and_reports_bad_input(models, data, tmp_path):
  root, _, _ = models
  data_root, _ = data
  cmd = [sys.executable, "-m", "dreambooth_jax.evaluate", f"--generated={data_root / 'generated'}",
         f"--real={data_root / 'real'}", f"--prompts={data_root / 'prompts.txt'}", f"--dino_model={root / 'dino'}",
         f"--clip_model={root / 'clip'}", f"--out={tmp_path / 'out' / 'metrics.json'}"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "DINO" in out.stdout and "CLIP-I" in out.stdout and "(4 images, 2 prompts)" in out.stdout
  written = json.loads((tmp_path / "out" / "metrics.json").read_text())
  assert set(written) >= {"dino", "clip_i", "clip_t", "counts", "per_prompt"} and "pres" not in written
  # An unreadable real image: named, in a clean one-line error.
  bad_real = write_images(tmp_path / "real", ["ok.png"], 5)
  (bad_real / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
  cmd = [c if not c.startswith("--real=") else f"--real={bad_real}" for c in cmd]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "broken.jpg: cannot read image" in out.stderr and "Traceback" not in out.stderr


def test_cli_div_with_lpips_weights(models, data, tmp_path):
  """--lpips_model adds DIV (mean LPIPS over same-prompt pairs) to the report and the JSON; value as lpips'."""
  import safetensors.torch

  from lpips_reference import random_backbone_model
  root, _, _ = models
  data_root, prompts = data
  reference = random_backbone_model("alex")
  safetensors.torch.save_model(reference, str(tmp_path / "lpips_alex.safetensors"))
  gen = tmp_path / "generated"
  gen.mkdir()
  rng = np.random.default_rng(3)
  pixels = [rng.integers(0, 256, (64, 64, 3), np.uint8) for _ in range(4)]
  for i, im in enumerate(pixels):
    Image.fromarray(im).save(gen / f"{i}.png")
  (gen / "index.json").write_text(json.dumps([{"file": f"{i}.png", "prompt": prompts[i // 2]} for i in range(4)]))
  cmd = [sys.executable, "-m", "dreambooth_jax.evaluate", f"--generated={gen}", f"--real={data_root / 'real'}",
         f"--dino_model={root / 'dino'}", f"--clip_model={root / 'clip'}", f"--out={tmp_path / 'metrics.json'}",
         f"--lpips_model={tmp_path / 'lpips_alex.safetensors'}", "--lpips_net=alex"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "DIV" in out.stdout and "(2 pairs of images of one prompt" in out.stdout
  written = json.loads((tmp_path / "metrics.json").read_text())
  as_torch = lambda im: torch.from_numpy(im.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
  with torch.no_grad():
    expected = [float(reference(as_torch(pixels[i]), as_torch(pixels[i + 1]))) for i in (0, 2)]
  assert written["counts"]["div_pairs"] == 2 and written["models"]["lpips_net"] == "alex"
  assert [written["per_prompt"][p]["div"] for p in prompts] == pytest.approx(expected, rel=1e-4)
  assert written["div"] == pytest.approx(np.mean(expected), rel=1e-4)


def test_exif_rotated_photo_scores_as_upright(models, data, tmp_path):
  """Evaluation decodes with training's decoder: a photo stored sideways with an EXIF orientation tag (6: rotate 90
  degrees clockwise to display) scores as the upright file (DINO, CLIP-I within 1e-6)."""
  from dreambooth_jax.data import images as images_lib
  root, _, _ = models
  data_root, _ = data
  rng = np.random.default_rng(7)
  small = Image.fromarray(rng.integers(0, 256, (12, 18, 3), np.uint8)).resize((72, 48), Image.BILINEAR)
  (tmp_path / "upright").mkdir()
  (tmp_path / "sideways").mkdir()
  small.save(tmp_path / "upright" / "photo.png")
  exif = Image.Exif()
  exif[0x0112] = 6
  small.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "sideways" / "photo.png", exif=exif)
  decoded = np.asarray(images_lib.open_image(tmp_path / "sideways" / "photo.png"))
  np.testing.assert_array_equal(decoded, np.asarray(small))
  encoders = evaluate.load_encoders(root / "dino", root / "clip")
  score = lambda real: evaluate.evaluate(data_root / "generated", real, encoders=encoders)
  upright, sideways = score(tmp_path / "upright"), score(tmp_path / "sideways")
  for key in ("dino", "clip_i"):
    assert sideways[key] == pytest.approx(upright[key], abs=1e-6), key
  # Without the orientation the scores do differ (the test can tell).
  Image.open(tmp_path / "sideways" / "photo.png").save(tmp_path / "sideways" / "photo.png", exif=Image.Exif())
  assert score(tmp_path / "sideways")["dino"] != pytest.approx(upright["dino"], abs=1e-6)
