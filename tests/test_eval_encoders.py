"""The metric encoders (DINO ViT, CLIP) against transformers-torch on the same random weights, their loading
errors, and image preprocessing against transformers' PIL-backend image processors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_jax.io import safetensors as safetensors_io
from dreambooth_jax.eval import encoders, preprocess
from dreambooth_jax.io.safetensors import CheckpointError

# fp32 on CPU: observed errors are ~1e-6; the bound is relative to the output's scale.
REL_TOL = 1e-4


def perturb_(model, seed=0):
  """Noise on every norm weight/bias and embedding so default inits (ones/zeros) cannot hide mistakes."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or "embed" in name or "cls_token" in name or "logit_scale" in name:
        p.add_(0.3 * torch.randn(p.shape, generator=g))


def assert_close(got, expected, what):
  got, expected = np.asarray(got), expected.detach().numpy()
  assert got.shape == expected.shape, what
  scale = np.abs(expected).max()
  err = np.abs(got - expected).max()
  assert err <= REL_TOL * scale, f"{what}: max abs error {err} vs output scale {scale}"


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
  from transformers import ViTConfig, ViTModel
  torch.manual_seed(0)
  config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                     image_size=32, patch_size=8, layer_norm_eps=1e-6, hidden_act="gelu")
  model = ViTModel(config).eval()  # with its pooler: checkpoints carry it, we drop it
  perturb_(model)
  folder = tmp_path_factory.mktemp("dino") / "model"
  model.save_pretrained(folder)
  return folder, model


def tiny_clip_config(eos_token_id):
  from transformers import CLIPConfig
  text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=99,
              max_position_embeddings=16, bos_token_id=97, eos_token_id=eos_token_id, pad_token_id=1)
  vision = dict(hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                patch_size=8)
  return CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  from transformers import CLIPModel
  torch.manual_seed(1)
  model = CLIPModel(tiny_clip_config(eos_token_id=98)).eval()
  perturb_(model, seed=1)
  folder = tmp_path_factory.mktemp("clip") / "model"
  model.save_pretrained(folder)
  return folder, model


def features(out):
  return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_dino_matches_transformers(dino_dir):
  folder, reference = dino_dir
  ours, _ = encoders.load_dino(folder)
  pixels = np.random.default_rng(0).standard_normal((3, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    expected = reference(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).last_hidden_state
  assert_close(ours(pixels), expected, "last_hidden_state")
  assert_close(ours.image_embeds(pixels), expected[:, 0], "CLS embedding")


def test_clip_matches_transformers(clip_dir):
  folder, reference = clip_dir
  ours, _ = encoders.load_clip(folder)
  pixels = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
  ids = np.array([[97, 5, 17, 40, 98, 1, 1, 1], [97, 60, 98, 1, 1, 1, 1, 1]], np.int32)
  with torch.no_grad():
    image = features(reference.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))))
    text = features(reference.get_text_features(input_ids=torch.from_numpy(ids).long()))
  assert_close(ours.image_embeds(pixels), image, "image embeds")
  assert_close(ours.text_embeds(ids), text, "text embeds")
  np.testing.assert_allclose(float(ours.logit_scale[...]), reference.logit_scale.item(), rtol=1e-6)


def test_clip_legacy_eos_id_pools_at_highest_id(tmp_path):
  """Old CLIP configs (openai/clip-vit-*) say eos_token_id=2: transformers then pools at the argmax id."""
  from transformers import CLIPModel
  torch.manual_seed(2)
  reference = CLIPModel(tiny_clip_config(eos_token_id=2)).eval()
  perturb_(reference, seed=2)
  reference.save_pretrained(tmp_path / "m")
  ours, _ = encoders.load_clip(tmp_path / "m")
  ids = np.array([[97, 5, 17, 98, 0, 0]], np.int32)
  with torch.no_grad():
    text = features(reference.get_text_features(input_ids=torch.from_numpy(ids).long()))
  assert_close(ours.text_embeds(ids), text, "text embeds (eos_token_id=2)")


def test_clip_config_shapes_of_real_models():
  config = encoders.CLIPConfig.from_dict({
      "model_type": "clip", "projection_dim": 768,
      "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12},
      "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                        "num_hidden_layers": 24, "patch_size": 14}})
  assert config.vision.patch_size == 14 and config.vision.num_hidden_layers == 24
  assert config.text.hidden_size == 768 and config.projection_dim == 768
  default = encoders.CLIPConfig.from_dict({"model_type": "clip"})  # transformers' defaults = ViT-B/32
  assert (default.text.hidden_size, default.vision.patch_size, default.projection_dim) == (512, 32, 512)


def test_loading_errors(dino_dir, clip_dir, tmp_path, monkeypatch):
  folder, _ = dino_dir
  # A missing tensor is named.
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "config.json").write_text((folder / "config.json").read_text())
  tensors = {k: np.array(v) for k, v in safetensors_io.load_file(folder / "model.safetensors").items()}
  del tensors["encoder.layer.1.output.dense.bias"]
  safetensors_io.save_file(tensors, broken / "model.safetensors")
  with pytest.raises(CheckpointError, match="encoder.layer.1.output.dense.bias"):
    encoders.load_dino(broken)
  # Pickles are refused.
  pickled = tmp_path / "pickled"
  pickled.mkdir()
  (pickled / "config.json").write_text((folder / "config.json").read_text())
  (pickled / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(CheckpointError, match="pickle"):
    encoders.load_dino(pickled)
  # A CLIP folder given as DINO: wrong model type, named.
  with pytest.raises(ValueError, match="model_type"):
    encoders.load_dino(clip_dir[0])
  with pytest.raises(CheckpointError, match="config.json"):
    encoders.load_clip(tmp_path)
  # A hub id without a network: the error says to pass a local folder.
  import huggingface_hub

  def offline(*args, **kwargs):
    raise OSError("no network")
  monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
  with pytest.raises(CheckpointError, match="local folder"):
    encoders.load_clip("openai/clip-vit-large-patch14")


# ----------------------------------------------------------------------------------------------- preprocessing

def random_images():
  rng = np.random.default_rng(0)
  smooth = lambda h, w: np.asarray(Image.fromarray(rng.integers(0, 256, (h // 8, w // 8, 3), np.uint8)).resize(
      (w, h), Image.BILINEAR))
  return [
      Image.fromarray(rng.integers(0, 256, (300, 200, 3), np.uint8)),            # portrait noise
      Image.fromarray(smooth(256, 384)),                                          # landscape, smooth
      Image.fromarray(rng.integers(0, 256, (150, 401, 4), np.uint8), "RGBA"),     # alpha over white
      Image.fromarray(rng.integers(0, 256, (100, 90), np.uint8), "L"),           # grey, smaller than the crop
      Image.fromarray(rng.integers(0, 256, (224, 224, 3), np.uint8)),
  ]


def compare(ours_spec, processor, images):
  for i, image in enumerate(images):
    # ViTImageProcessor does not convert to RGB (it fails on RGBA/L); CLIP's does, and is given the raw image.
    given = image if getattr(processor, "do_convert_rgb", False) else preprocess.to_rgb(image)
    expected = processor(images=given, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    got = preprocess.preprocess(image, ours_spec)
    assert got.shape == expected.shape, f"image {i}"
    # Within one grey level before normalisation (1/255 / std after it).
    bound = (1 / 255) / np.asarray(ours_spec.image_std).min() if ours_spec.do_normalize else 1 / 255
    assert np.abs(got - expected).max() <= bound, f"image {i}: {np.abs(got - expected).max()}"


def test_clip_preprocessing_matches_transformers():
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  compare(preprocess.CLIP_SPEC, CLIPImageProcessorPil(), random_images())


def test_preprocessor_config_is_read_as_transformers_reads_it(tmp_path):
  from transformers import AutoImageProcessor
  configs = {
      # facebook/dino-vits16's file: a legacy ViTFeatureExtractor with an int size (= 224x224 squash).
      "dino": ({"do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
                "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 2,
                "size": 224}, preprocess.DINO_SPEC),
      # A CLIP file with int sizes (= shortest edge) and another resolution.
      "clip": ({"image_processor_type": "CLIPImageProcessor", "crop_size": 112, "size": 128, "resample": 3,
                "do_center_crop": True, "image_mean": list(preprocess.OPENAI_CLIP_MEAN),
                "image_std": list(preprocess.OPENAI_CLIP_STD)}, preprocess.CLIP_SPEC),
  }
  for name, (config, defaults) in configs.items():
    folder = tmp_path / name
    folder.mkdir()
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    assert processor.backend == "pil"
    spec = preprocess.spec_for_folder(folder, defaults)
    compare(spec, processor, random_images())
  assert preprocess.spec_for_folder(tmp_path / "dino", preprocess.DINO_SPEC) == preprocess.DINO_SPEC
  assert preprocess.spec_for_folder(tmp_path / "none", preprocess.CLIP_SPEC) == preprocess.CLIP_SPEC


def test_dino_eval_spec_is_resize_256_crop_224():
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  processor = CLIPImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                    resample=3, image_mean=list(preprocess.IMAGENET_DEFAULT_MEAN),
                                    image_std=list(preprocess.IMAGENET_DEFAULT_STD))
  compare(preprocess.DINO_EVAL_SPEC, processor, random_images())


def test_unreadable_image_is_named(tmp_path):
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  with pytest.raises(ValueError, match="bad.png"):
    preprocess.load_batch([bad], preprocess.CLIP_SPEC)
