"""Single-file (ldm) and LoRA (kohya / diffusers PEFT) formats against diffusers' own loaders on tiny pipelines."""

import copy

import numpy as np
import pytest
import torch
from reference_models import TINY_SD1, TINY_SD2, build_pipeline, to_numpy

from dreambooth_jax.io import lora_files as kohya
from dreambooth_jax.io import single_file_keys as sf
from dreambooth_jax.io.safetensors import CheckpointError

COMPONENTS = ("unet", "vae", "text_encoder")
OUTPUT_ATOL = 1e-5  # single file: same fp32 weights, so outputs agree to float rounding
LORA_RTOL = 1e-4  # LoRA: diffusers adds the low-rank branch at run time instead of merging it into the weight


def numpy_state(pipe) -> dict[str, dict[str, np.ndarray]]:
  return {n: {k: to_numpy(v) for k, v in getattr(pipe, n).state_dict().items()} for n in COMPONENTS}


def configs(pipe) -> dict:
  return dict(unet_config=pipe.unet.config, vae_config=pipe.vae.config, text_config=pipe.text_encoder.config)


def to_single(pipe) -> dict:
  s = numpy_state(pipe)
  return sf.diffusers_to_single_file(s["unet"], s["vae"], s["text_encoder"], **configs(pipe))


def model_outputs(pipe, seed: int = 0) -> dict[str, torch.Tensor]:
  g = torch.Generator().manual_seed(seed)
  x = torch.randn(1, 4, 8, 8, generator=g)
  context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g)
  image = torch.randn(1, 3, 16, 16, generator=g)
  ids = torch.randint(0, 49408, (1, 77), generator=g)
  with torch.no_grad():
    return {
        "unet": pipe.unet(x, 10, encoder_hidden_states=context).sample,
        "vae_encode": pipe.vae.encode(image).latent_dist.mean,
        "vae_decode": pipe.vae.decode(x).sample,
        "text_encoder": pipe.text_encoder(ids).last_hidden_state,
    }


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pipe_and_dir(request, tmp_path_factory):
  """A tiny pipeline and a diffusers folder saved from it (the config folder from_single_file needs offline)."""
  pipe = build_pipeline(TINY_SD1 if request.param == "sd1" else TINY_SD2)
  folder = tmp_path_factory.mktemp(request.param) / "model"
  pipe.save_pretrained(str(folder))
  return pipe, folder


# ------------------------------------------------------------------------------------------------ single file

def test_single_file_loads_in_diffusers_with_same_outputs(pipe_and_dir, tmp_path):
  from diffusers import StableDiffusionPipeline

  pipe, folder = pipe_and_dir
  path = sf.save_single_file(tmp_path / "model.safetensors", to_single(pipe), dtype="fp32", metadata={"base": "tiny"})
  loaded = StableDiffusionPipeline.from_single_file(
      str(path), config=str(folder), local_files_only=True, safety_checker=None, requires_safety_checker=False)
  for name in COMPONENTS:  # every parameter was filled (missing ones would stay on the meta device or random)
    want, got = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
    assert want.keys() == got.keys(), name
  want, got = model_outputs(pipe), model_outputs(loaded)
  for name in want:
    np.testing.assert_allclose(got[name].numpy(), want[name].numpy(), atol=OUTPUT_ATOL, rtol=0, err_msg=name)


def test_single_file_round_trip_is_exact(pipe_and_dir):
  pipe, _ = pipe_and_dir
  state = numpy_state(pipe)
  text_with_prefix = {"text_model." + k: v for k, v in state["text_encoder"].items()}
  single = sf.diffusers_to_single_file(state["unet"], state["vae"], text_with_prefix, **configs(pipe))
  if pipe.text_encoder.config.hidden_act == "gelu":
    assert any(k.endswith("attn.in_proj_weight") for k in single)
  else:
    assert f"{sf.CLIP_PREFIX}encoder.layers.0.self_attn.q_proj.weight" in single
  back = sf.single_file_to_diffusers(single, **configs(pipe))
  for name, got in zip(COMPONENTS, back):
    assert got.keys() == state[name].keys(), name
    for key, value in got.items():
      assert value.dtype == state[name][key].dtype and np.array_equal(value, state[name][key]), key
  prefixed = sf.single_file_to_diffusers(single, **configs(pipe), text_model_prefix=True)[2]
  assert prefixed.keys() == text_with_prefix.keys()


@pytest.mark.parametrize("unet_kwargs", [
    dict(layers_per_block=2, block_out_channels=(16, 32, 32),
         down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), transformer_layers_per_block=2),
    dict(layers_per_block=(1, 2), block_out_channels=(16, 24),
         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
         use_linear_projection=True),
])
def test_unet_map_follows_config_and_matches_diffusers_reverse_converter(unet_kwargs):
  """Other block layouts: diffusers' own ldm->diffusers converter must give back the UNet state dict."""
  from diffusers import UNet2DConditionModel
  from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

  torch.manual_seed(0)
  unet = UNet2DConditionModel(sample_size=8, cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
                              **unet_kwargs)
  state = {k: to_numpy(v) for k, v in unet.state_dict().items()}
  key_map = sf.unet_key_map(unet.config)
  assert key_map.keys() == state.keys()
  single = {ldm: state[d] for d, (ldm, _) in key_map.items()}
  if isinstance(unet_kwargs["layers_per_block"], int):  # diffusers' converter only handles an int
    converted = convert_ldm_unet_checkpoint({k: torch.from_numpy(v) for k, v in single.items()}, unet.config)
    assert converted.keys() == state.keys()
    assert all(np.array_equal(converted[k].numpy(), state[k]) for k in state)


def test_vae_map_matches_diffusers_reverse_converter():
  from diffusers import AutoencoderKL
  from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

  torch.manual_seed(0)
  vae = AutoencoderKL(block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=8,
                      down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
  state = {k: to_numpy(v) for k, v in vae.state_dict().items()}
  key_map = sf.vae_key_map(vae.config)
  assert key_map.keys() == state.keys()
  single = {ldm: (state[d][:, :, None, None] if conv else state[d]) for d, (ldm, conv) in key_map.items()}
  assert single[f"{sf.VAE_PREFIX}encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
  converted = convert_ldm_vae_checkpoint({k: torch.from_numpy(v) for k, v in single.items()}, vae.config)
  assert converted.keys() == state.keys()
  assert all(np.array_equal(converted[k].numpy(), state[k]) for k in state)


def test_single_file_key_errors(pipe_and_dir):
  pipe, _ = pipe_and_dir
  state = numpy_state(pipe)
  unet = dict(state["unet"])
  del unet["mid_block.resnets.1.conv2.bias"]
  unet["extra.weight"] = np.zeros(1, np.float32)
  with pytest.raises(ValueError, match=r"unet.*missing keys \[mid_block\.resnets\.1\.conv2\.bias\].*extra\.weight"):
    sf.diffusers_to_single_file(unet, state["vae"], state["text_encoder"], **configs(pipe))

  single = to_single(pipe)
  # Buffers and EMA copies that real checkpoints carry are not parameters and are skipped.
  extras = {"alphas_cumprod": np.ones(1000, np.float32), "model_ema.decay": np.ones((), np.float32),
            sf.CLIP_PREFIX + "embeddings.position_ids": np.arange(77)[None]}
  sf.single_file_to_diffusers({**single, **extras}, **configs(pipe))
  broken = dict(single)
  del broken["model.diffusion_model.out.2.weight"]
  broken["model.diffusion_model.input_blocks.99.0.weight"] = np.zeros(1, np.float32)
  with pytest.raises(ValueError, match=r"missing keys \[model\.diffusion_model\.out\.2\.weight\].*input_blocks\.99"):
    sf.single_file_to_diffusers(broken, **configs(pipe))


def test_single_file_io(tmp_path):
  single = {"a.weight": np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3), "n": np.arange(3)}
  path = sf.save_single_file(tmp_path / "m.safetensors", single, dtype="fp16")
  loaded = sf.load_single_file(path)
  assert loaded["a.weight"].dtype == np.float16 and loaded["n"].dtype == single["n"].dtype
  np.testing.assert_array_equal(loaded["a.weight"], single["a.weight"].astype(np.float16))
  assert sf.load_single_file(sf.save_single_file(tmp_path / "b.safetensors", single, "bf16"))["a.weight"].dtype.name \
      == "bfloat16"
  (tmp_path / "m.ckpt").write_bytes(b"\x80\x04not really")
  for call in (lambda: sf.load_single_file(tmp_path / "m.ckpt"), lambda: sf.save_single_file(tmp_path / "x.ckpt", {})):
    with pytest.raises(CheckpointError, match=r"m?\.ckpt.*pickle"):
      call()
  with pytest.raises(ValueError, match="dtype 'fp8'"):
    sf.save_single_file(tmp_path / "c.safetensors", single, dtype="fp8")


# ------------------------------------------------------------------------------------------------------- LoRA

RANK, ALPHA = 4, 8.0
UNET_TARGETS = (".to_q", ".to_k", ".to_v", ".to_out.0")
TEXT_TARGETS = (".q_proj", ".k_proj", ".v_proj", ".out_proj")


def random_lora(model, suffixes, rng) -> dict:
  return {name: (rng.normal(0, 0.2, (RANK, m.weight.shape[1])).astype(np.float32),
                 rng.normal(0, 0.2, (m.weight.shape[0], RANK)).astype(np.float32))
          for name, m in model.named_modules() if name.endswith(suffixes)}


@pytest.fixture(scope="module")
def lora_case():
  """(unet LoRA, text LoRA with transformers>=5 paths (no text_model.), outputs of the weights merged by hand)."""
  rng = np.random.default_rng(0)
  pipe = build_pipeline(TINY_SD1)
  unet_lora, text_lora = random_lora(pipe.unet, UNET_TARGETS, rng), random_lora(pipe.text_encoder, TEXT_TARGETS, rng)
  assert len(unet_lora) == 32 and len(text_lora) == 8
  merged = copy.deepcopy(pipe)
  with torch.no_grad():
    for model, lora in ((merged.unet, unet_lora), (merged.text_encoder, text_lora)):
      modules = dict(model.named_modules())
      for name, (down, up) in lora.items():
        modules[name].weight += torch.from_numpy(ALPHA / RANK * up @ down)
  base, want = model_outputs(pipe), model_outputs(merged)
  for name in ("unet", "text_encoder"):  # the LoRA must matter, or the comparison below proves nothing
    assert (want[name] - base[name]).abs().max() > 100 * LORA_RTOL * want[name].abs().max()
  return pipe, unet_lora, text_lora, want


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_lora_file_loads_in_diffusers(lora_case, fmt, tmp_path):
  pipe, unet_lora, text_lora, want = lora_case
  if fmt == "kohya":
    tensors, metadata = kohya.to_kohya({"unet": unet_lora, "text_encoder": text_lora}, ALPHA), {}
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in tensors
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in tensors
  else:
    tensors, metadata = kohya.to_diffusers_peft({"unet": unet_lora, "text_encoder": text_lora}, ALPHA)
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in tensors
  kohya.save_lora(tmp_path / "lora.safetensors", tensors, {**metadata, "rank": RANK, "trigger": "a sks dog"})
  target = copy.deepcopy(pipe)
  target.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
  got = model_outputs(target)
  for name in ("unet", "text_encoder"):
    err = float((got[name] - want[name]).abs().max() / want[name].abs().max())
    assert err < LORA_RTOL, (fmt, name, err)


def assert_same_lora(got, want):
  assert got.keys() == want.keys()
  for key in want:
    assert all(np.array_equal(g, w) for g, w in zip(got[key], want[key])), key


def test_lora_round_trips(lora_case, tmp_path):
  _, unet_lora, text_lora, _ = lora_case
  text_prefixed = {"text_model." + k: v for k, v in text_lora.items()}
  kohya.save_lora(tmp_path / "k.safetensors", kohya.to_kohya({"unet": unet_lora, "text_encoder": text_lora}, ALPHA),
                  {"base": "x"})
  tensors, metadata = kohya.load_lora(tmp_path / "k.safetensors")
  assert metadata["base"] == "x"
  factors, alpha = kohya.from_kohya(tensors)
  u, t = factors["unet"], factors["text_encoder"]
  assert alpha == ALPHA
  assert_same_lora(u, unet_lora)
  assert_same_lora(t, text_prefixed)
  factors, alpha = kohya.from_diffusers_peft(*kohya.to_diffusers_peft({"unet": unet_lora, "text_encoder": text_prefixed},
                                                                      ALPHA))
  u, t = factors["unet"], factors["text_encoder"]
  assert alpha == ALPHA
  assert_same_lora(u, unet_lora)
  assert_same_lora(t, text_prefixed)
  # Without the LoraConfig metadata diffusers uses scale 1, i.e. alpha = rank.
  assert kohya.from_diffusers_peft(kohya.to_diffusers_peft({"unet": unet_lora}, ALPHA)[0])[1] == RANK


def test_kohya_names_resolve_for_every_sd_module(lora_case):
  pipe = lora_case[0]
  for model, prefix in ((pipe.unet, ""), (pipe.text_encoder, "text_model.")):
    names = [prefix + n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    for name in names:
      assert kohya.kohya_name_to_path(name.replace(".", "_")) == name
      assert kohya.kohya_name_to_path(name.replace(".", "_"), known_modules=names) == name


def test_kohya_per_module_alpha_is_folded_into_up():
  rng = np.random.default_rng(1)
  down, up = rng.normal(size=(2, 3)).astype(np.float32), rng.normal(size=(5, 2)).astype(np.float32)
  sd = {"lora_unet_a_to_q.lora_down.weight": down, "lora_unet_a_to_q.lora_up.weight": up,
        "lora_unet_a_to_q.alpha": np.float32(4), "lora_unet_a_to_k.lora_down.weight": down,
        "lora_unet_a_to_k.lora_up.weight": up, "lora_unet_a_to_k.alpha": np.float32(4),
        "lora_unet_b_to_v.lora_down.weight": down, "lora_unet_b_to_v.lora_up.weight": up}  # no alpha: alpha = rank
  factors, alpha = kohya.from_kohya(sd)
  unet, text = factors["unet"], factors.get("text_encoder")
  assert alpha == 4 and not text
  for path, module_alpha in (("a.to_q", 4), ("b.to_v", 2)):
    d, u = unet[path]
    np.testing.assert_allclose(alpha / 2 * u @ d, module_alpha / 2 * up @ down, rtol=1e-6)


def test_malformed_lora_files():
  down, up = np.zeros((4, 8), np.float32), np.zeros((16, 4), np.float32)
  with pytest.raises(kohya.LoraFormatError, match=r"lora_unet_x_to_q: .*no lora_unet_x_to_q\.lora_up\.weight"):
    kohya.from_kohya({"lora_unet_x_to_q.lora_down.weight": down, "lora_unet_x_to_q.alpha": np.float32(4)})
  with pytest.raises(kohya.LoraFormatError, match=r"lora_te_y: rank mismatch.*\(4, 8\).*\(16, 3\)"):
    kohya.from_kohya({"lora_te_y.lora_down.weight": down, "lora_te_y.lora_up.weight": up[:, :3]})
  with pytest.raises(kohya.LoraFormatError, match=r"lora_foo\.weight: not a kohya"):
    kohya.from_kohya({"lora_foo.weight": down})
  with pytest.raises(kohya.LoraFormatError, match=r"unet\.m\.to_k: .*no unet\.m\.to_k\.lora_A\.weight"):
    kohya.from_diffusers_peft({"unet.m.to_k.lora_B.weight": up})
  with pytest.raises(kohya.LoraFormatError, match=r"unet m\.to_k: rank mismatch"):
    kohya.to_kohya({"unet": {"m.to_k": (down, up[:, :2])}}, 4)
  with pytest.raises(kohya.LoraFormatError, match=r"text_encoder\.q_proj\.lora_A: not a diffusers PEFT"):
    kohya.from_diffusers_peft({"text_encoder.q_proj.lora_A": down})


def test_key_maps_accept_plain_config_json():
  """Our code passes config.json dicts (not diffusers config objects); the maps must cover the same models."""
  import json

  from diffusers import AutoencoderKL, UNet2DConditionModel
  from reference_models import ASSETS
  from transformers import CLIPTextConfig, CLIPTextModel

  folder = ASSETS / "tiny-sd"
  unet, vae, text = (json.loads((folder / c / "config.json").read_text()) for c in COMPONENTS)
  assert set(sf.unet_key_map(unet)) == set(UNet2DConditionModel.from_config(unet).state_dict())
  assert set(sf.vae_key_map(vae)) == set(AutoencoderKL.from_config(vae).state_dict())
  assert set(sf.text_key_map(text)) == set(CLIPTextModel(CLIPTextConfig(**text)).state_dict())
