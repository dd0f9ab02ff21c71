"""LPIPS (for DIV) against lpips 0.1.4's PyTorch code (tests/lpips_reference.py) on the same weights: random
backbone weights, the real bundled lin weights; both weight-file spellings; loading errors; DIV in evaluate."""

import json

import numpy as np
import pytest
import safetensors.torch
import torch

from dreambooth_jax.eval import lpips
from dreambooth_jax.io.safetensors import CheckpointError

import lpips_reference  # tests/ is on sys.path (rootdir conftest)

# fp32 on CPU: observed errors ~1e-7 of the distance; the bound is relative to the largest distance compared.
REL_TOL = 1e-4


reference_model = lpips_reference.random_backbone_model


def images(seed: int, n: int, size: int) -> np.ndarray:
  """n smooth random images in [-1, 1], NHWC (smooth so deep layers see structure, not only noise)."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(-1, 1, (n, size // 8, size // 8, 3))
  return np.clip(np.repeat(np.repeat(coarse, 8, 1), 8, 2) + 0.2 * rng.normal(size=(n, size, size, 3)),
                 -1, 1).astype(np.float32)


def torch_distance(model, a_NHWC, b_NHWC) -> np.ndarray:
  to_torch = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    return model(to_torch(a_NHWC), to_torch(b_NHWC)).numpy().reshape(-1)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_matches_reference_from_an_lpips_state_dict(net, tmp_path):
  reference = reference_model(net)
  path = tmp_path / f"lpips_{net}.safetensors"
  safetensors.torch.save_model(reference, str(path))  # as a user converts lpips.LPIPS(net=...) (see lpips.py)
  model = lpips.load_lpips(path, net)
  a, b = images(0, 3, 64), images(1, 3, 64)
  expected = torch_distance(reference, a, b)
  got = np.asarray(model(a, b))
  assert got.shape == expected.shape == (3,)
  assert np.abs(got - expected).max() <= REL_TOL * np.abs(expected).max(), (got, expected)
  assert np.all(expected > 1e-3)  # a real signal, not zeros compared with zeros
  # Pairwise over one batch, features computed once per image.
  pairs = np.array([(0, 1), (0, 2), (1, 2)], np.int32)
  got_pairs = np.asarray(lpips.pairwise_distances(model, a, pairs))
  expected_pairs = np.concatenate([torch_distance(reference, a[i:i + 1], a[j:j + 1]) for i, j in pairs])
  assert np.abs(got_pairs - expected_pairs).max() <= REL_TOL * np.abs(expected_pairs).max()
  assert float(np.asarray(model(a, a)).max()) == pytest.approx(0.0, abs=1e-9)


def test_torchvision_backbone_file_takes_the_bundled_lin_weights(tmp_path):
  """A torchvision/timm classifier checkpoint (features.N.*, classifier ignored) + the bundled v0.1 lins."""
  reference = reference_model("alex", seed=3)
  features = {f"features.{name.split('.', 1)[1]}": p.detach().clone()
              for name, p in reference.net.named_parameters()}  # net.sliceK.N.weight -> features.N.weight
  features["classifier.1.weight"] = torch.randn(10, 9216)  # torchvision's head
  features["pre_logits.fc1.weight"] = torch.randn(4, 256, 1, 1)  # timm's (e.g. timm/vgg16.tv_in1k)
  features["head.fc.bias"] = torch.randn(10)
  safetensors.torch.save_file(features, str(tmp_path / "model.safetensors"))
  model = lpips.load_lpips(tmp_path, "alex")  # a folder with model.safetensors, as a hub snapshot
  a, b = images(2, 2, 96), images(3, 2, 96)
  expected = torch_distance(reference, a, b)
  assert np.abs(np.asarray(model(a, b)) - expected).max() <= REL_TOL * np.abs(expected).max()


def test_loading_errors(tmp_path):
  vgg = reference_model("vgg")
  safetensors.torch.save_model(vgg, str(tmp_path / "vgg.safetensors"))
  with pytest.raises(CheckpointError, match=r"vgg\.safetensors.*(missing|unexpected) keys"):
    lpips.load_lpips(tmp_path / "vgg.safetensors", "alex")  # another architecture's weights
  with pytest.raises(ValueError, match="net='squeeze' is not supported"):
    lpips.load_lpips(tmp_path / "vgg.safetensors", "squeeze")
  (tmp_path / "alexnet.pth").write_bytes(b"pickle")
  with pytest.raises(CheckpointError, match="alexnet.pth"):
    lpips.load_lpips(tmp_path / "alexnet.pth", "alex")
  state = {k: v.clone() for k, v in reference_model("alex").state_dict().items()}
  state["scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)
  safetensors.torch.save_file(state, str(tmp_path / "v00.safetensors"))
  with pytest.raises(CheckpointError, match="scaling_layer.shift"):
    lpips.load_lpips(tmp_path / "v00.safetensors", "alex")
  safetensors.torch.save_file({"features.0.weight": torch.zeros(64, 3, 11, 11), "encoder.x": torch.zeros(1)},
                              str(tmp_path / "other.safetensors"))
  with pytest.raises(CheckpointError, match=r"other\.safetensors.*encoder\.x"):
    lpips.load_lpips(tmp_path / "other.safetensors", "alex")


def test_div_in_evaluate(tmp_path):
  """DIV = mean LPIPS over all same-prompt pairs (every pair weighs the same), per prompt and overall."""
  from PIL import Image

  from dreambooth_jax import evaluate
  reference = reference_model("alex")
  safetensors.torch.save_model(reference, str(tmp_path / "lpips_alex.safetensors"))
  model = lpips.load_lpips(tmp_path / "lpips_alex.safetensors", "alex")
  gen = tmp_path / "generated"
  gen.mkdir()
  pixels = ((images(7, 5, 64) + 1) * 127.5).round().astype(np.uint8)
  prompts = ["a sks dog"] * 3 + ["a sks dog on the beach"] * 2
  for i, im in enumerate(pixels):
    Image.fromarray(im).save(gen / f"{i:05d}.png")
  (gen / "index.json").write_text(json.dumps([{"file": f"{i:05d}.png", "prompt": p} for i, p in enumerate(prompts)]))
  pairs, of_image = evaluate.assign_prompts(evaluate.group_generated(gen), None)
  per_prompt = {p: {} for p in pairs}
  div, count = evaluate.diversity(model, sorted(gen.glob("*.png")), pairs, of_image, per_prompt)
  as_input = pixels.astype(np.float32) / 127.5 - 1
  d = lambda i, j: torch_distance(reference, as_input[i:i + 1], as_input[j:j + 1])[0]
  first, second = [d(0, 1), d(0, 2), d(1, 2)], [d(3, 4)]
  assert count == 4
  assert per_prompt["a sks dog"]["div"] == pytest.approx(np.mean(first), rel=REL_TOL)
  assert per_prompt["a sks dog on the beach"]["div"] == pytest.approx(second[0], rel=REL_TOL)
  assert div == pytest.approx(np.mean(first + second), rel=REL_TOL)
  # One image per prompt: no pair, a clear error. Mixed sizes within a prompt: named.
  with pytest.raises(evaluate.InputError, match="2 or more per prompt"):
    evaluate.diversity(model, [gen / "00000.png"], ["a sks dog"], np.array([0]), {"a sks dog": {}})
  Image.fromarray(pixels[0][:32]).save(gen / "small.png")
  with pytest.raises(evaluate.InputError, match=r"one size.*small\.png"):
    evaluate.diversity(model, [gen / "00000.png", gen / "small.png"], ["a sks dog"], np.array([0, 0]),
                       {"a sks dog": {}})
