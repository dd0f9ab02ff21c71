"""Parity of our SDXL models (UNet with "text_time" conditioning, CLIPTextModel and CLIPTextModelWithProjection
with penultimate / pooled / projected outputs) with diffusers/transformers (torch, fp32) on the same random weights.

Tolerance as tests/test_models.py: fp32, max |ours - torch| <= 1e-4 * max(1, max |torch|).
"""

import json
import math
import pathlib

import jax
import numpy as np
from flax import nnx
import pytest
import torch

from reference_models import to_numpy
from test_models import assert_close
from dreambooth_jax.io import diffusers_folder as weights
from dreambooth_jax.models import layers
from dreambooth_jax.models.clip_text import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                                             TEXT_MODEL_CLASSES, projection_model_keys)
from dreambooth_jax.models.unet import UNet2DConditionModel, UNetConfig

SDXL_CONFIGS = pathlib.Path(weights.__file__).resolve().parents[1] / "assets" / "sdxl-configs"
SDXL_UNET_PARAMS = 2_567_463_684  # stabilityai/stable-diffusion-xl-base-1.0 unet

BOS, EOS = 49406, 49407

# Tiny text encoders shaped like SDXL's pair: CLIP-L-like (quick_gelu) and bigG-like (gelu, projection, no bias).
TINY_TEXT_1 = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                   max_position_embeddings=16, vocab_size=49408, hidden_act="quick_gelu", projection_dim=32)
TINY_TEXT_2 = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   max_position_embeddings=16, vocab_size=49408, hidden_act="gelu", projection_dim=40)
TIME_IDS = 6  # original (h, w), crop top-left (y, x), target (h, w)

# Tiny SDXL-shaped UNet: DownBlock2D first, linear projections, a transformer depth per level (the mid block takes the
# last level's 2), text_time conditioning of pooled (40) + 6 time ids x 8, context = both encoders' widths (32 + 48).
TINY_SDXL_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 2, 4), norm_num_groups=8,
    cross_attention_dim=TINY_TEXT_1["hidden_size"] + TINY_TEXT_2["hidden_size"], use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=TIME_IDS * 8 + TINY_TEXT_2["projection_dim"],
)



def nchw(x_BHWC):
  return np.asarray(x_BHWC).transpose(0, 3, 1, 2)


def perturb(module, seed):
  """Default inits leave norm scales at 1 and many biases at 0, which would hide layout mistakes."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.1 * torch.randn(p.shape, generator=gen))
  return module.eval()


def numpy_state(module) -> dict:
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def param_count(module) -> int:
  return sum(math.prod(v.get_value().shape) for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)))


def token_ids(batch: int, length: int, pad: int, seed: int = 0) -> np.ndarray:
  """CLIP-tokenizer-like ids: BOS, words, EOS, then padding (SDXL's tokenizer_2 pads with "!" = 0, tokenizer 1
  with EOS). Sequences of different lengths, so every row's EOS sits elsewhere."""
  rng = np.random.default_rng(seed)
  ids = np.full((batch, length), pad, np.int64)
  for b in range(batch):
    n = 1 + (3 * b) % (length - 2)
    ids[b, 0], ids[b, 1:n + 1], ids[b, n + 1] = BOS, rng.integers(1, 49000, n), EOS
  return ids


# ----------------------------------------------------------------------------------------------- text encoders

def build_text_encoders(spec_1, spec_2, eos_token_id, seed=0):
  """(torch CLIPTextModel, ours, torch CLIPTextModelWithProjection, ours) on the same random weights."""
  from transformers import CLIPTextConfig as TorchConfig, CLIPTextModel as TorchModel
  from transformers import CLIPTextModelWithProjection as TorchProjection
  torch.manual_seed(seed)
  ref_1 = perturb(TorchModel(TorchConfig(**spec_1, eos_token_id=eos_token_id)), seed + 1)
  ref_2 = perturb(TorchProjection(TorchConfig(**spec_2, eos_token_id=eos_token_id)), seed + 2)
  config_1 = CLIPTextConfig.from_dict(ref_1.config.to_dict())
  config_2 = CLIPTextConfig.from_dict(ref_2.config.to_dict())
  ours_1 = weights.load_module(lambda: CLIPTextModel(config_1, rngs=nnx.Rngs(0)),
                               weights.normalize_keys(numpy_state(ref_1), "text_encoder"), where="text_encoder")
  # The projection model's keys keep their `text_model.` prefix (see clip_text.py).
  ours_2 = weights.load_module(lambda: CLIPTextModelWithProjection(config_2, rngs=nnx.Rngs(0)),
                               projection_model_keys(numpy_state(ref_2)), where="text_encoder_2")
  return ref_1, ours_1, ref_2, ours_2


def check_text_encoders(ref_1, ours_1, ref_2, ours_2, ids_BT, jit=True):
  encode = jax.jit(lambda m, ids: m.encode(ids)) if jit else (lambda m, ids: m.encode(ids))
  with torch.no_grad():
    out_1 = ref_1(torch.from_numpy(ids_BT), output_hidden_states=True)
    out_2 = ref_2(torch.from_numpy(ids_BT), output_hidden_states=True)
    pooled_2 = ref_2.text_model(torch.from_numpy(ids_BT)).pooler_output
  got_1, got_2 = encode(ours_1, ids_BT), encode(ours_2, ids_BT)
  # What SDXL's encode_prompt takes: hidden_states[-2] of both (no final layer norm), text_embeds of the second.
  assert_close(got_1.penultimate, to_numpy(out_1.hidden_states[-2]))
  assert_close(got_1.last, to_numpy(out_1.last_hidden_state))
  assert_close(got_1.pooled, to_numpy(out_1.pooler_output))
  assert got_1.text_embeds is None
  assert_close(got_2.penultimate, to_numpy(out_2.hidden_states[-2]))
  assert_close(got_2.last, to_numpy(out_2.last_hidden_state))
  assert_close(got_2.pooled, to_numpy(pooled_2))
  assert_close(got_2.text_embeds, to_numpy(out_2.text_embeds))
  return got_1, got_2


@pytest.fixture(scope="module", params=[2, EOS], ids=["eos_id_2_legacy", "eos_id_49407"])
def text_encoders(request):
  """eos_token_id 2 is what SDXL's hub configs hold (transformers then pools at the argmax id); 49407 is the
  by-id rule of newer configs."""
  return build_text_encoders(TINY_TEXT_1, TINY_TEXT_2, request.param)


@pytest.mark.parametrize("pad", [0, EOS], ids=["pad_0", "pad_eos"])
def test_text_encoders_match_transformers(text_encoders, pad):
  ids_BT = token_ids(3, TINY_TEXT_1["max_position_embeddings"], pad)
  got_1, got_2 = check_text_encoders(*text_encoders, ids_BT)
  # The pooled vector is the EOS token's row of `last` (not the last row, not a pad row).
  eos_B = np.argmax(ids_BT == EOS, axis=-1)
  np.testing.assert_array_equal(np.asarray(got_2.pooled), np.asarray(got_2.last)[np.arange(3), eos_B])
  # The existing API is unchanged: (last_hidden_state, pooled) for CLIPTextModel, (text_embeds, last) here.
  last, pooled = text_encoders[1](ids_BT)
  assert_close(last, got_1.last, tol=1e-6)
  assert_close(pooled, got_1.pooled, tol=1e-6)
  text_embeds, last_2 = text_encoders[3](ids_BT)
  assert_close(text_embeds, got_2.text_embeds, tol=1e-6)


def test_projection_model_parameter_paths_are_transformers_keys(text_encoders):
  ref_2, ours_2 = text_encoders[2], text_encoders[3]
  assert set(weights.module_state_dict(ours_2)) == set(ref_2.state_dict())
  assert "text_projection.weight" in ref_2.state_dict() and "text_projection.bias" not in ref_2.state_dict()
  # A state dict written without the prefix (as normalize_keys(..., "text_encoder") would leave it) loads the same.
  stripped = {k.removeprefix("text_model."): v for k, v in numpy_state(ref_2).items()}
  assert projection_model_keys(stripped).keys() == ref_2.state_dict().keys()


# ----------------------------------------------------------------------------------------------- UNet

@pytest.fixture(scope="module")
def tiny_unet():
  from diffusers import UNet2DConditionModel as TorchUNet
  torch.manual_seed(0)
  ref = perturb(TorchUNet(**TINY_SDXL_UNET), 1)
  config = UNetConfig.from_dict(dict(ref.config))
  ours = weights.load_module(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0)), numpy_state(ref),
                             where="unet")
  return ref, ours


def unet_inputs(seed=0, batch=3):
  rng = np.random.default_rng(seed)
  x_BHWC = rng.standard_normal((batch, 16, 16, 4)).astype(np.float32)
  t_B = np.array([1, 500, 999][:batch], np.int32)
  context_BSD = rng.standard_normal((batch, 7, TINY_SDXL_UNET["cross_attention_dim"])).astype(np.float32)
  text_BP = rng.standard_normal((batch, TINY_TEXT_2["projection_dim"])).astype(np.float32)
  # Realistic size/crop conditioning (pixels): the default 1024^2, a cropped portrait, a small upscaled image.
  time_ids_BK = np.array([[1024, 1024, 0, 0, 1024, 1024], [1344, 768, 64, 32, 1024, 1024],
                          [512, 512, 0, 0, 1024, 1024]][:batch], np.float32)
  return x_BHWC, t_B, context_BSD, {"text_embeds": text_BP, "time_ids": time_ids_BK}


def torch_unet(ref, x_BHWC, t_B, context_BSD, added):
  with torch.no_grad():
    return to_numpy(ref(torch.from_numpy(nchw(x_BHWC)), torch.from_numpy(t_B), torch.from_numpy(context_BSD),
                        added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()}).sample)


def test_sdxl_unet_matches_diffusers(tiny_unet):
  ref, ours = tiny_unet
  x_BHWC, t_B, context_BSD, added = unet_inputs()
  run = jax.jit(lambda m, *a: m(*a))
  got = run(ours, x_BHWC, t_B, context_BSD, added)
  assert_close(nchw(got), torch_unet(ref, x_BHWC, t_B, context_BSD, added))
  # The added conditioning reaches the output (a no-op add_embedding would pass the check above only by chance).
  other = dict(added, time_ids=added["time_ids"][::-1].copy())
  assert not np.allclose(np.asarray(run(ours, x_BHWC, t_B, context_BSD, other)), np.asarray(got), atol=1e-3)


def test_sdxl_unet_parameter_paths_and_depths(tiny_unet):
  ref, ours = tiny_unet
  assert set(weights.module_state_dict(ours)) == set(ref.state_dict())
  assert "add_embedding.linear_1.weight" in ref.state_dict()
  assert len(ours.down_blocks[1].attentions[0].transformer_blocks) == 1
  assert len(ours.down_blocks[2].attentions[1].transformer_blocks) == 2
  assert len(ours.mid_block.attentions[0].transformer_blocks) == 2  # the last level's depth (as diffusers)
  assert len(ours.up_blocks[0].attentions[2].transformer_blocks) == 2
  assert len(ours.up_blocks[1].attentions[0].transformer_blocks) == 1


def test_sdxl_unet_with_remat_and_chunked_attention_matches_diffusers(tiny_unet, monkeypatch):
  """remat and attention_impl wrap the SDXL blocks too (8 x 8 = 64 tokens at level 1 in 24-query chunks: 3 chunks,
  one padded). Forward only: remat changes what the backward pass stores, which tests/test_models.py and the
  train-step tests cover; here it is the SDXL block structure under nnx.remat that is new."""
  ref, plain = tiny_unet
  monkeypatch.setattr(layers, "QUERY_CHUNK", 24)
  ours = weights.load_module(
      lambda: UNet2DConditionModel(plain.config, rngs=nnx.Rngs(0), remat="full", attention_impl="chunked"),
      weights.module_state_dict(plain), where="unet")
  x_BHWC, t_B, context_BSD, added = unet_inputs(seed=1, batch=2)
  got = jax.jit(lambda m, *a: m(*a))(ours, x_BHWC, t_B, context_BSD, added)
  assert_close(nchw(got), torch_unet(ref, x_BHWC, t_B, context_BSD, added))


def test_added_cond_is_required_exactly_for_text_time(tiny_unet, tiny_sd1_dir):
  ours = tiny_unet[1]
  x_BHWC, t_B, context_BSD, added = unet_inputs(batch=1)
  with pytest.raises(ValueError, match="needs added_cond"):
    ours(x_BHWC, t_B, context_BSD)
  with pytest.raises(ValueError, match="needs added_cond"):
    ours(x_BHWC, t_B, context_BSD, {"text_embeds": added["text_embeds"]})
  # One row of time ids serves the whole batch (the usual case: every image at the same size and crop).
  one_row = dict(added, time_ids=added["time_ids"][0])
  np.testing.assert_array_equal(np.asarray(ours.added_embedding(one_row, 1)),
                                np.asarray(ours.added_embedding(added, 1)))
  with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
    ours(x_BHWC, t_B, context_BSD, dict(added, time_ids=added["time_ids"][:, :5]))  # refiner-style 5 ids
  sd_config = UNetConfig.from_dict(json.loads((tiny_sd1_dir / "unet" / "config.json").read_text()))
  sd_unet = nnx.eval_shape(lambda: UNet2DConditionModel(sd_config, rngs=nnx.Rngs(0)))  # fails before using weights
  assert sd_unet.add_embedding is None
  with pytest.raises(ValueError, match="no addition_embed_type"):
    sd_unet(x_BHWC[:, :8, :8], t_B, np.zeros((1, 77, 32), np.float32), added)


# ----------------------------------------------------------------------------------------------- configs

def sdxl_unet_config() -> dict:
  return json.loads((SDXL_CONFIGS / "unet" / "config.json").read_text())


@pytest.mark.parametrize("key, value", [
    ("addition_embed_type", "text"),  # Kandinsky-style text embedding, not implemented
    ("transformer_layers_per_block", [[1, 1], [2, 2], [10, 10]]),  # per-layer counts (asymmetric UNets)
    ("reverse_transformer_layers_per_block", [[10, 10, 10], [2, 2, 2], [1, 1, 1]]),
    ("addition_time_embed_dim", None),
    ("class_embed_type", "projection"),
    ("dropout", 0.1),
])
def test_sdxl_unet_config_refuses_unsupported_values_by_name(key, value):
  config = dict(sdxl_unet_config(), **{key: value})
  with pytest.raises(ValueError, match=repr(key)):
    UNetConfig.from_dict(config)


def test_sd_unet_config_still_refuses_text_time_dims():
  with pytest.raises(ValueError, match="'projection_class_embeddings_input_dim'"):
    UNetConfig.from_dict({"projection_class_embeddings_input_dim": 2816})


def test_sdxl_asset_unet_config_parses():
  config = UNetConfig.from_dict(sdxl_unet_config())
  assert config.heads == (5, 10, 20) and config.transformer_layers == (1, 2, 10)
  assert config.cross_attention_dim == 2048 and config.projection_class_embeddings_input_dim == 2816
  assert (config.addition_embed_type, config.addition_time_embed_dim) == ("text_time", 256)
  assert config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")


@pytest.mark.slow
def test_full_sdxl_unet_has_the_known_parameter_count():
  """The full SDXL base UNet built abstractly (nnx.eval_shape: nothing allocated) has SDXL's 2,567,463,684
  parameters, named as diffusers names them (its model built on torch's meta device).

  Slow (about 60-90 s on 2 cores) because of nnx.eval_shape itself: each of the ~1,700 parameter draws bumps
  nnx.Rngs' traced counter, and flax's Variable update then reads `.sharding` of a tracer, whose AttributeError
  message walks the whole jaxpr traced so far (jax partial_eval find_progenitors): quadratic in the layer count.
  weights.load_module of an SDXL UNet pays the same."""
  from diffusers import UNet2DConditionModel as TorchUNet
  config = UNetConfig.from_dict(sdxl_unet_config())
  unet = nnx.eval_shape(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0)))
  assert param_count(unet) == SDXL_UNET_PARAMS
  with torch.device("meta"):
    ref = TorchUNet.from_config(sdxl_unet_config())
  assert abstract_keys(unet) == set(ref.state_dict())
  assert sum(p.numel() for p in ref.parameters()) == SDXL_UNET_PARAMS


def abstract_keys(module) -> set:
  return {weights.torch_key(path) for path, _ in nnx.to_flat_state(nnx.state(module, nnx.Param))}


@pytest.mark.parametrize("component, cls, hidden, layers, act", [
    ("text_encoder", CLIPTextModel, 768, 12, "quick_gelu"),
    ("text_encoder_2", CLIPTextModelWithProjection, 1280, 32, "gelu"),
])
def test_sdxl_text_encoder_configs_parse(component, cls, hidden, layers, act):
  from transformers import CLIPTextConfig as TorchConfig, CLIPTextModel as TorchModel
  from transformers import CLIPTextModelWithProjection as TorchProjection
  raw = json.loads((SDXL_CONFIGS / component / "config.json").read_text())
  assert TEXT_MODEL_CLASSES[raw["architectures"][0]] is cls
  config = CLIPTextConfig.from_dict(raw)
  assert (config.hidden_size, config.num_hidden_layers, config.hidden_act) == (hidden, layers, act)
  assert config.eos_token_id == 2  # the hub configs' legacy value: pooling at the argmax id
  ours = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
  with torch.device("meta"):
    ref = {"CLIPTextModel": TorchModel, "CLIPTextModelWithProjection": TorchProjection}[cls.__name__](
        TorchConfig(**{k: v for k, v in raw.items() if not k.startswith("_")}))
  assert abstract_keys(ours) == set(ref.state_dict())
  assert param_count(ours) == sum(p.numel() for p in ref.parameters())


def test_sdxl_vae_config_parses():
  from dreambooth_jax.models.vae import VAEConfig
  config = VAEConfig.from_dict(json.loads((SDXL_CONFIGS / "vae" / "config.json").read_text()))
  assert config.scaling_factor == 0.13025


# ----------------------------------------------------------------------------------------------- slow

# The largest SDXL UNet slice that fits next to its torch twin in ~20 GB (fp32, both copies): the real config
# (widths 320/640/1280, heads 5/10/20, cross_attention_dim 2048, transformer depths 1/2/10 with the 10-layer mid
# block, text_time 256 x 6 + 1280 = 2816) with layers_per_block 1 instead of 2.
SDXL_UNET_SLICE = dict(layers_per_block=1)


@pytest.mark.slow
def test_full_width_sdxl_text_encoders_match_transformers():
  """CLIP ViT-L (768, 12 layers) and OpenCLIP bigG (1280, 32 layers, projection 1280) at full size, random
  weights, from the asset configs; ids padded with 0 (tokenizer_2) and with EOS (tokenizer). About 70 s, 7 GB."""
  spec = lambda c: {k: v for k, v in json.loads((SDXL_CONFIGS / c / "config.json").read_text()).items()
                    if k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                             "max_position_embeddings", "vocab_size", "hidden_act", "projection_dim")}
  encoders = build_text_encoders(spec("text_encoder"), spec("text_encoder_2"), eos_token_id=2)
  for pad in (0, EOS):
    check_text_encoders(*encoders, token_ids(2, 77, pad, seed=pad), jit=False)


@pytest.mark.slow
def test_sdxl_unet_slice_matches_diffusers():
  """SDXL base UNet with layers_per_block 1 instead of 2 (see SDXL_UNET_SLICE; 1,717,277,764 parameters, 67% of
  the real 2.57 B): every real width, head count, transformer depth (1/2/10, 10 in the mid block) and the
  text_time embedding; 32 x 32 latents (256 px), batch 2, random weights. About 2 minutes and 14 GB peak RSS on
  2 cores (torch and ours both in fp32)."""
  from diffusers import UNet2DConditionModel as TorchUNet
  torch.manual_seed(0)
  raw = dict(sdxl_unet_config(), **SDXL_UNET_SLICE)
  ref = perturb(TorchUNet.from_config(raw), 1)
  config = UNetConfig.from_dict(raw)
  ours = weights.load_module(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0)), numpy_state(ref),
                             where="unet")
  rng = np.random.default_rng(0)
  x_BHWC = rng.standard_normal((2, 32, 32, 4)).astype(np.float32)
  t_B = np.array([10, 999], np.int32)
  context_BSD = rng.standard_normal((2, 77, 2048)).astype(np.float32)
  added = {"text_embeds": rng.standard_normal((2, 1280)).astype(np.float32),
           "time_ids": np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 1344, 32, 0, 1024, 1024]], np.float32)}
  expected = torch_unet(ref, x_BHWC, t_B, context_BSD, added)
  del ref
  assert_close(nchw(ours(x_BHWC, t_B, context_BSD, added)), expected)
