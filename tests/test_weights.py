"""Loading and saving diffusers folders: round trip through diffusers-torch, variants, shards, bad input."""

import json
import shutil

import numpy as np
import pytest
import torch

from reference_models import to_numpy
from dreambooth_jax.io import safetensors as safetensors_io
from dreambooth_jax import families
from dreambooth_jax.io import diffusers_folder as weights
from dreambooth_jax.io.safetensors import CheckpointError


def unet_inputs():
  rng = np.random.default_rng(0)
  return (rng.standard_normal((1, 8, 8, 4)).astype(np.float32), np.array([321], np.int32),
          rng.standard_normal((1, 77, 32)).astype(np.float32))


def test_round_trip_through_diffusers_torch(tiny_sd1_dir, tmp_path):
  """load -> save -> diffusers-torch load -> same outputs (max abs error <= 1e-5: pure copies of fp32 weights)."""
  from diffusers import StableDiffusionPipeline
  ours = weights.load_pipeline(tiny_sd1_dir)
  out = weights.save_pipeline(ours, tmp_path / "saved")
  original = StableDiffusionPipeline.from_pretrained(tiny_sd1_dir)
  reloaded = StableDiffusionPipeline.from_pretrained(out)
  for name in ("unet", "vae", "text_encoder"):
    a, b = getattr(original, name).state_dict(), getattr(reloaded, name).state_dict()
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(to_numpy(a[key]), to_numpy(b[key]), err_msg=f"{name}.{key}")
  x, t, ctx = unet_inputs()
  with torch.no_grad():
    expected = reloaded.unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                             torch.from_numpy(ctx)).sample
  got = np.asarray(ours.unet(x, t, ctx)).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(got, to_numpy(expected), atol=1e-5)
  # Our loader reads our own output back identically.
  again = weights.load_pipeline(out)
  np.testing.assert_array_equal(np.asarray(again.unet(x, t, ctx)), np.asarray(ours.unet(x, t, ctx)))


def test_text_encoder_keys_with_and_without_prefix(tiny_sd1_dir, tmp_path):
  model = shutil.copytree(tiny_sd1_dir, tmp_path / "m")
  path = model / "text_encoder" / "model.safetensors"
  tensors = {k: np.array(v) for k, v in safetensors_io.load_file(path).items()}
  assert not any(k.startswith("text_model.") for k in tensors)  # transformers 5 writes them bare
  bare, _ = weights.load_component(model, families.get("sd"), "text_encoder")
  safetensors_io.save_file({f"text_model.{k}": v for k, v in tensors.items()}, path)  # as hub checkpoints
  prefixed, _ = weights.load_component(model, families.get("sd"), "text_encoder")
  ids = np.arange(77, dtype=np.int32)[None] % 100
  np.testing.assert_array_equal(np.asarray(bare(ids)[0]), np.asarray(prefixed(ids)[0]))


def test_fp16_variant_and_sharded_index(tiny_sd2_dir, tmp_path):
  sd = weights.load_pipeline(tiny_sd2_dir, variant="fp16")  # only fp16 files exist; found without asking too
  sd_auto = weights.load_pipeline(tiny_sd2_dir)
  x, t, ctx = unet_inputs()
  np.testing.assert_array_equal(np.asarray(sd.unet(x, t, ctx)), np.asarray(sd_auto.unet(x, t, ctx)))
  # Shard the UNet into two files with an index, as large hub checkpoints are.
  model = shutil.copytree(tiny_sd2_dir, tmp_path / "m")
  unet_file = model / "unet" / "diffusion_pytorch_model.fp16.safetensors"
  tensors = {k: np.array(v) for k, v in safetensors_io.load_file(unet_file).items()}
  keys = sorted(tensors)
  halves = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:len(keys) // 2],
            "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
  for name, part in halves.items():
    safetensors_io.save_file({k: tensors[k] for k in part}, model / "unet" / name)
  unet_file.unlink()
  (model / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {}, "weight_map": {k: name for name, part in halves.items() for k in part}}))
  sharded = weights.load_pipeline(model)
  np.testing.assert_array_equal(np.asarray(sharded.unet(x, t, ctx)), np.asarray(sd.unet(x, t, ctx)))
  assert sd.unet.conv_in.kernel.get_value().dtype == np.float32  # fp16 files, fp32 params by default


def test_bad_input_names_the_file_or_key(tiny_sd1_dir, tmp_path):
  with pytest.raises(CheckpointError, match="model_index.json"):
    weights.load_pipeline(tmp_path)  # a folder without model_index.json

  missing = shutil.copytree(tiny_sd1_dir, tmp_path / "missing")
  shutil.rmtree(missing / "vae")
  with pytest.raises(CheckpointError, match=r"vae.*missing"):
    weights.load_pipeline(missing)

  truncated = shutil.copytree(tiny_sd1_dir, tmp_path / "truncated")
  f = truncated / "unet" / "diffusion_pytorch_model.safetensors"
  f.write_bytes(f.read_bytes()[:-1000])
  with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.safetensors.*truncated"):
    weights.load_pipeline(truncated)

  wrong = shutil.copytree(tiny_sd1_dir, tmp_path / "wrong")
  f = wrong / "unet" / "diffusion_pytorch_model.safetensors"
  tensors = {k: np.array(v) for k, v in safetensors_io.load_file(f).items()}
  tensors["conv_in.weight"] = np.zeros((32, 4, 5, 5), np.float32)
  safetensors_io.save_file(tensors, f)
  with pytest.raises(CheckpointError, match=r"'conv_in.weight' has shape \(32, 4, 5, 5\)"):
    weights.load_pipeline(wrong)

  del tensors["conv_in.weight"]
  tensors["extra.weight"] = np.zeros(3, np.float32)
  safetensors_io.save_file(tensors, f)
  with pytest.raises(CheckpointError, match=r"missing keys \(1\): \['conv_in.weight'\][\s\S]*unexpected keys "
                                            r"\(1\): \['extra.weight'\]"):
    weights.load_pipeline(wrong)


def test_pickle_weights_are_refused(tiny_sd1_dir, tmp_path):
  model = shutil.copytree(tiny_sd1_dir, tmp_path / "m")
  (model / "unet" / "diffusion_pytorch_model.safetensors").rename(model / "unet" / "diffusion_pytorch_model.bin")
  with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.bin.*pickle.*refused"):
    weights.load_pipeline(model)


def test_unsupported_config_value_fails_at_load(tiny_sd1_dir, tmp_path):
  model = shutil.copytree(tiny_sd1_dir, tmp_path / "m")
  config_path = model / "unet" / "config.json"
  config = json.loads(config_path.read_text())
  config["class_embed_type"] = "timestep"
  config_path.write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"unet: config key 'class_embed_type' = 'timestep' is not supported"):
    weights.load_pipeline(model)


def test_offline_hub_id_says_how_to_pass_a_local_path(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(CheckpointError, match="huggingface-cli download someone.*pass the local folder"):
    weights.resolve_model_dir("someone/some-model-that-is-not-cached")


def test_hub_ids_offline_and_bad_names(monkeypatch, tmp_path):
  """A hub id that cannot be fetched says how to pass a local folder; a path-like name that does not exist is not
  sent to the hub. The same rule serves the diffusers models and the metric encoders."""
  import huggingface_hub

  from dreambooth_jax.eval import encoders

  def offline(*_args, **_kwargs):
    raise ConnectionError("no network")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
  with pytest.raises(CheckpointError, match=r"^owner/sd: could not fetch.*huggingface-cli download owner/sd"):
    weights.resolve_model_dir("owner/sd")
  with pytest.raises(CheckpointError, match=r"^DINO model facebook/dino-vits16: could not fetch.*"
                                            r"huggingface-cli download facebook/dino-vits16"):
    encoders.resolve_folder("facebook/dino-vits16", "DINO model")
  with pytest.raises(CheckpointError, match="no such folder, and not a hub id"):
    weights.resolve_model_dir(str(tmp_path / "missing"))


def test_hub_id_loads_offline_from_a_prefilled_cache(tiny_sd1_dir, tmp_path):
  """A hub id in offline mode loads from huggingface_hub's cache layout (models--owner--name/refs/main +
  snapshots/<sha>/), as a cache filled on another machine leaves it; the same weights as the folder."""
  import os
  import subprocess
  import sys
  repo = tmp_path / "hub" / "models--owner--tiny-sd"
  sha = "0123456789abcdef0123456789abcdef01234567"
  shutil.copytree(tiny_sd1_dir, repo / "snapshots" / sha)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(sha)
  script = ("import json, numpy as np\nfrom dreambooth_jax.io import diffusers_folder as w\n"
            "pipe = w.load_pipeline('owner/tiny-sd')\n"
            "print(json.dumps({k: float(np.abs(v).sum()) for k, v in w.module_state_dict(pipe.unet).items()}))")
  env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  got = json.loads(result.stdout.strip().splitlines()[-1])
  expected = {k: float(np.abs(v).sum()) for k, v in weights.module_state_dict(weights.load_pipeline(tiny_sd1_dir).unet).items()}
  assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_hub_patterns_select_only_the_component_files(variant):
  """What a hub download fetches: model_index, scheduler, tokenizer and the chosen variant's component configs and
  weights (single or sharded), not the repository's other checkpoints, pickles or unused components."""
  from huggingface_hub.utils import filter_repo_objects
  family = families.FAMILIES["sd"]
  suffix = f".{variant}" if variant else ""
  wanted = {"model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
            "unet/config.json", f"unet/diffusion_pytorch_model{suffix}.safetensors", "vae/config.json",
            f"vae/diffusion_pytorch_model-00001-of-00002{suffix}.safetensors",
            f"vae/diffusion_pytorch_model{suffix}.safetensors.index.json",
            "text_encoder/config.json", f"text_encoder/model{suffix}.safetensors"}
  other = f"{'' if variant else '.fp16'}"  # the variant not asked for
  unwanted = {"v1-5-pruned.safetensors", "v1-5-pruned-emaonly.ckpt", "unet/diffusion_pytorch_model.bin",
              f"unet/diffusion_pytorch_model{other}.safetensors" if variant is None else
              "unet/diffusion_pytorch_model.non_ema.safetensors",
              "text_encoder/pytorch_model.bin", "text_encoder/flax_model.msgpack", "safety_checker/model.safetensors",
              "feature_extractor/preprocessor_config.json", "README.md"}
  selected = set(filter_repo_objects(sorted(wanted | unwanted), allow_patterns=weights.hub_patterns(family, variant)))
  assert selected == wanted, (sorted(selected - wanted), sorted(wanted - selected))
