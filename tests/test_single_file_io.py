"""Single-file export/import of our pipeline against diffusers' StableDiffusionPipeline.from_single_file.

Tolerance: fp32 files, max |ours - torch| <= 1e-4 * max(1, max |torch|); our own round trip is exact.
"""

import json

import numpy as np
import pytest
import torch
from flax import nnx

from reference_models import to_numpy
from dreambooth_jax.models import lora
from dreambooth_jax.io import safetensors as safetensors_io
from dreambooth_jax.io import single_file as single_file_io
from dreambooth_jax.io import tokenizers
from dreambooth_jax import families
from dreambooth_jax.io import diffusers_folder as weights
from dreambooth_jax.io import single_file_keys as sf
from dreambooth_jax.io.safetensors import CheckpointError

TOL = 1e-4


def assert_close(ours, ref, tol=TOL, what=""):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, what
  scale = max(1.0, np.abs(ref).max())
  err = np.abs(ours - ref).max()
  assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol} * {scale:.3g}"


def inputs(cross_dim: int):
  rng = np.random.default_rng(0)
  return dict(x=rng.standard_normal((1, 8, 8, 4)).astype(np.float32), t=np.array([321], np.int32),
              context=rng.standard_normal((1, 77, cross_dim)).astype(np.float32),
              pixels=rng.uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32),
              ids=rng.integers(0, 49408, (1, 77)).astype(np.int32))


def ours_out(sd, io) -> dict:
  return {"unet": np.asarray(sd.unet(io["x"], io["t"], io["context"])),
          "vae_encode": np.asarray(sd.vae.encode(io["pixels"])[0]),
          "vae_decode": np.asarray(sd.vae.decode(io["x"])),
          "text_encoder": np.asarray(sd.text_encoder(io["ids"])[0])}


def torch_out(pipe, io) -> dict:
  nchw, nhwc = (lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2))), (lambda t: to_numpy(t).transpose(0, 2, 3, 1))
  with torch.no_grad():
    return {"unet": nhwc(pipe.unet(nchw(io["x"]), torch.from_numpy(io["t"]), torch.from_numpy(io["context"])).sample),
            "vae_encode": nhwc(pipe.vae.encode(nchw(io["pixels"])).latent_dist.mean),
            "vae_decode": nhwc(pipe.vae.decode(nchw(io["x"])).sample),
            "text_encoder": to_numpy(pipe.text_encoder(torch.from_numpy(io["ids"].astype(np.int64))).last_hidden_state)}


def params(sd) -> dict:
  return {c: weights.module_state_dict(sd.modules[c]) for c in sd.family.COMPONENTS}


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def exported(request, tiny_sd1_dir, tiny_sd2_dir, tmp_path_factory):
  """(our pipeline, its diffusers folder, the fp32 single file we exported from it)."""
  folder = tiny_sd1_dir if request.param == "sd1" else tiny_sd2_dir
  sd = weights.load_pipeline(folder)
  path = single_file_io.export_single_file(sd, tmp_path_factory.mktemp("single") / "model.safetensors",
                                           dtype="fp32", metadata={"trigger": "sks dog"})
  return sd, folder, path


def test_diffusers_from_single_file_matches_ours(exported):
  from diffusers import StableDiffusionPipeline

  sd, folder, path = exported
  assert safetensors_io.read_metadata(path)["trigger"] == "sks dog"
  pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True,
                                                  safety_checker=None, requires_safety_checker=False)
  io = inputs(sd.configs["unet"]["cross_attention_dim"])
  want, got = torch_out(pipe, io), ours_out(sd, io)
  for name in want:
    assert_close(got[name], want[name], what=name)


def test_import_round_trips_exactly(exported):
  sd, folder, path = exported
  back = single_file_io.load_single_file_pipeline(path, config=folder)
  want, got = params(sd), params(back)
  for c in sd.family.COMPONENTS:
    assert got[c].keys() == want[c].keys(), c
    for key in want[c]:
      np.testing.assert_array_equal(got[c][key], want[c][key], err_msg=f"{c}.{key}")
  assert back.schedule.prediction_type == sd.schedule.prediction_type
  np.testing.assert_array_equal(np.asarray(back.schedule.alphas_cumprod), np.asarray(sd.schedule.alphas_cumprod))
  assert back.tokenizer("a dog").input_ids == sd.tokenizer("a dog").input_ids


def test_export_merges_lora(tiny_sd1_dir, tmp_path):
  sd, folder = weights.load_pipeline(tiny_sd1_dir), tiny_sd1_dir
  unet = nnx.merge(*nnx.split(sd.unet))
  lora.apply_lora(unet, lora.LoRASettings(rank=2, alpha=4.0), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  lora.load_lora_factors(unet, {p: (rng.normal(0, 0.3, (2, n.in_features)).astype(np.float32),
                                    rng.normal(0, 0.3, (n.out_features, 2)).astype(np.float32))
                                for p, n in lora.lora_modules(unet).items()})
  path = single_file_io.export_single_file(sd, tmp_path / "m.safetensors", replace={"unet": unet}, dtype="fp32")
  back = single_file_io.load_single_file_pipeline(path, config=folder)
  want = weights.module_state_dict(lora.merge_lora(unet))
  got, base = weights.module_state_dict(back.unet), weights.module_state_dict(sd.unet)
  assert got.keys() == want.keys()
  changed = 0
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    changed += not np.array_equal(want[key], base[key])
  assert changed == len(lora.lora_modules(unet))  # exactly the wrapped kernels differ from the base
  with pytest.raises(ValueError, match="LoRA factors; merge them first"):
    single_file_io.export_single_file(sd, tmp_path / "x.safetensors", replace={"unet": nnx.state(unet)})


def test_bad_files_name_the_key(exported, tmp_path):
  sd, folder, path = exported
  tensors = {k: np.array(v) for k, v in sf.load_single_file(path).items()}
  missing = dict(tensors)
  del missing["model.diffusion_model.out.2.weight"]
  safetensors_io.save_file(missing, tmp_path / "missing.safetensors")
  with pytest.raises(CheckpointError, match=r"missing\.safetensors.*missing keys \[model\.diffusion_model\.out\.2"
                                            r"\.weight\]"):
    single_file_io.load_single_file_pipeline(tmp_path / "missing.safetensors", config=folder)
  shaped = dict(tensors)
  key = "first_stage_model.decoder.conv_in.weight"
  shaped[key] = np.zeros((3, *shaped[key].shape[1:]), np.float32)
  safetensors_io.save_file(shaped, tmp_path / "shape.safetensors")
  with pytest.raises(CheckpointError, match=rf"shape\.safetensors \(vae.*{key}.*decoder\.conv_in\.weight.*shape "
                                            r"\(3, 4, 3, 3\).*expects \(64, 4, 3, 3\)"):
    single_file_io.load_single_file_pipeline(tmp_path / "shape.safetensors", config=folder)
  # "auto" picks the real SD config, which the tiny model does not match: a key error, not a wrong model.
  with pytest.raises(CheckpointError, match=r"model\.safetensors.*sd-configs/sd(15|21).*missing keys"):
    single_file_io.load_single_file_pipeline(path)
  (tmp_path / "m.ckpt").write_bytes(b"\x80\x04 not really")
  with pytest.raises(CheckpointError, match=r"m\.ckpt.*pickle"):
    single_file_io.load_single_file_pipeline(tmp_path / "m.ckpt")
  with pytest.raises(CheckpointError, match=r"config='nowhere'"):
    single_file_io.load_single_file_pipeline(path, config="nowhere")
  with pytest.raises(CheckpointError, match="match no supported single-file layout"):
    single_file_io.detect_family({"model.diffusion_model.out.2.weight": None})
  family = single_file_io.detect_family(tensors)
  assert family.NAME == "sd"
  assert family.single_file_config(tensors) == ("sd21" if sf.is_open_clip(sd.configs["text_encoder"]) else "sd15")


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_bundled_configs_build_the_real_models(name):
  """Our models and diffusers/transformers' (on the meta device: no memory) have the same tensors."""
  from diffusers import AutoencoderKL, UNet2DConditionModel
  from transformers import CLIPTextConfig, CLIPTextModel

  family = families.get("sd")
  folder = family.BUNDLED_CONFIGS[name]
  configs = single_file_io.read_configs(folder, family)
  with torch.device("meta"):
    reference = {"unet": UNet2DConditionModel.from_config(configs["unet"]),
                 "vae": AutoencoderKL.from_config(configs["vae"]),
                 "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))}
  totals = {}
  for c, spec in family.COMPONENTS.items():
    want = {k: tuple(v.shape) for k, v in reference[c].state_dict().items() if not k.endswith("position_ids")}
    model_config = spec.config_class.from_dict(configs[c])
    abstract = nnx.eval_shape(lambda c=c, mc=model_config: weights.make_model(family, c, mc))
    got = {weights.torch_key(p): single_file_io._torch_shape(p, v.get_value().shape)
           for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    assert got == want, c
    totals[c] = sum(int(np.prod(s)) for s in got.values())
  # Published sizes: SD 1.5 UNet 859.5M, SD 2.1 865.9M; CLIP ViT-L text 123.1M; VAE 83.7M.
  assert totals["unet"] == {"sd15": 859_520_964, "sd21": 865_910_724}[name]
  assert totals["vae"] == 83_653_863
  if name == "sd15":
    assert totals["text_encoder"] == 123_060_480
  tok = tokenizers.load_config_tokenizer(folder)
  assert tok.pad_token == {"sd15": "<|endoftext|>", "sd21": "!"}[name] and tok.model_max_length == 77
  ids = tok("a dog", padding="max_length", max_length=77).input_ids
  assert ids[-1] == tok.convert_tokens_to_ids(tok.pad_token)
  scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
  assert scheduler["prediction_type" if name == "sd21" else "beta_schedule"] == \
      {"sd15": "scaled_linear", "sd21": "v_prediction"}[name]
