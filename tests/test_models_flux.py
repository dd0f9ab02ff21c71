"""Parity of our Flux transformer (models/flux.py) with diffusers' FluxTransformer2DModel (torch, fp32) on the same
random weights, for a guidance-distilled (dev-like) and a plain (schnell-like) config; FluxPipeline's latent packing
and position ids.

Tolerance as tests/test_models.py: fp32, max |ours - torch| <= 1e-4 * max(1, max |torch|).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from reference_models import to_numpy
from test_models import assert_close
from test_models_sdxl import numpy_state, perturb
from dreambooth_jax.io import diffusers_folder as weights
from dreambooth_jax.models import flux
from dreambooth_jax.models.flux import FluxConfig, FluxTransformer2DModel

# Tiny Flux: 2 double + 2 single blocks, 2 heads of 16 (rope axes 4 + 6 + 6), 16-channel latents packed to 64.
TINY_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=20, axes_dims_rope=(4, 6, 6))


def build_pair(spec: dict, seed: int = 0, **model_kwargs):
  from diffusers import FluxTransformer2DModel as TorchFlux
  torch.manual_seed(seed)
  ref = perturb(TorchFlux(**spec), seed + 1)
  config = FluxConfig.from_dict(dict(ref.config))
  ours = weights.load_module(lambda: FluxTransformer2DModel(config, rngs=nnx.Rngs(0), **model_kwargs),
                             numpy_state(ref), where="transformer")
  return ref, ours


def inputs(seed: int, latent_hw=(8, 6), text=5, batch=2):
  rng = np.random.default_rng(seed)
  h, w = latent_hw
  x_BSC = rng.standard_normal((batch, (h // 2) * (w // 2), 64)).astype(np.float32)
  ctx = rng.standard_normal((batch, text, TINY_TRANSFORMER["joint_attention_dim"])).astype(np.float32)
  pooled = rng.standard_normal((batch, TINY_TRANSFORMER["pooled_projection_dim"])).astype(np.float32)
  t = np.array([0.25, 0.9], np.float32)[:batch]
  return x_BSC, ctx, pooled, t, flux.image_ids(h, w), flux.text_ids(text)


def torch_forward(ref, x, ctx, pooled, t, img_ids, txt_ids, guidance=None):
  tt = torch.from_numpy
  with torch.no_grad():
    return to_numpy(ref(hidden_states=tt(x), encoder_hidden_states=tt(ctx), pooled_projections=tt(pooled),
                        timestep=tt(t), img_ids=tt(img_ids), txt_ids=tt(txt_ids),
                        guidance=None if guidance is None else tt(guidance)).sample)


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev", "schnell"])
def test_transformer_matches_diffusers(guidance_embeds):
  ref, ours = build_pair(dict(TINY_TRANSFORMER, guidance_embeds=guidance_embeds))
  x, ctx, pooled, t, img_ids, txt_ids = inputs(0)
  guidance = np.array([3.5, 1.0], np.float32) if guidance_embeds else None
  expected = torch_forward(ref, x, ctx, pooled, t, img_ids, txt_ids, guidance)
  got = jax.jit(lambda m, *a: m(*a))(ours, x, ctx, pooled, t, img_ids, txt_ids, guidance)
  assert_close(got, expected)
  with pytest.raises(ValueError, match="guidance"):  # a guidance value where there is no embedder, or none where
    ours(x, ctx, pooled, t, img_ids, txt_ids, None if guidance_embeds else np.ones(2, np.float32))


def test_remat_gives_the_same_prediction():
  spec = dict(TINY_TRANSFORMER, guidance_embeds=False, num_layers=1, num_single_layers=1)
  (_, ours), (_, rematted) = build_pair(spec), build_pair(spec, remat="full")
  x, ctx, pooled, t, img_ids, txt_ids = inputs(1, batch=1)
  loss = lambda m: (m(x, ctx, pooled, t, img_ids, txt_ids) ** 2).mean()
  g_plain, g_remat = nnx.jit(nnx.grad(loss))(ours), nnx.jit(nnx.grad(loss))(rematted)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g_plain, g_remat)


def test_config_rejects_rope_axes_not_summing_to_head_dim():
  with pytest.raises(ValueError, match="axes_dims_rope"):
    FluxConfig.from_dict(dict(TINY_TRANSFORMER, axes_dims_rope=[4, 4, 4]))


def test_packing_and_ids_match_flux_pipeline():
  from diffusers import FluxPipeline
  z_BCHW = np.random.default_rng(2).standard_normal((2, 16, 6, 10)).astype(np.float32)
  z_BHWC = z_BCHW.transpose(0, 2, 3, 1)
  packed = FluxPipeline._pack_latents(torch.from_numpy(z_BCHW), 2, 16, 6, 10)
  np.testing.assert_array_equal(flux.pack_latents(z_BHWC), to_numpy(packed))
  # _unpack_latents takes the pixel size and the VAE factor (8): latent 6 x 10 = pixels 48 x 80
  unpacked = FluxPipeline._unpack_latents(packed, 48, 80, 8)
  np.testing.assert_array_equal(flux.unpack_latents(flux.pack_latents(z_BHWC), 6, 10),
                                to_numpy(unpacked).transpose(0, 2, 3, 1))
  ids = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
  np.testing.assert_array_equal(flux.image_ids(6, 10), to_numpy(ids))
  with pytest.raises(ValueError, match="even"):
    flux.pack_latents(np.zeros((1, 5, 6, 16), np.float32))


# FLUX.1-dev's transformer/config.json (black-forest-labs/FLUX.1-dev).
FLUX_1_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                  axes_dims_rope=(16, 56, 56))


@pytest.mark.slow  # ~20 s: building 57 blocks abstractly on both sides
def test_full_flux_dev_has_diffusers_parameter_shapes():
  """The 12B model built abstractly (nothing allocated) has exactly diffusers' parameter names and shapes (torch's
  built on the meta device)."""
  from diffusers import FluxTransformer2DModel as TorchFlux
  with torch.device("meta"):
    ref = TorchFlux(**FLUX_1_DEV)
  want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  config = FluxConfig.from_dict(FLUX_1_DEV)
  ours = nnx.eval_shape(lambda: FluxTransformer2DModel(config, rngs=nnx.Rngs(0)))
  flat = nnx.to_flat_state(nnx.state(ours, nnx.Param))
  got = {weights.torch_key(path): tuple(var.get_value().shape[::-1] if path[-1] == "kernel" else var.get_value().shape)
         for path, var in flat}
  assert got == want
  assert sum(np.prod(s) for s in got.values()) == 11_901_408_320
  # FSDP over 8 devices (sharding.py's rules by parameter kind): bf16 weights come to 1/8 of 23.8 GB per device,
  # up to the few replicated vectors (norm scales, biases)
  from types import SimpleNamespace
  from dreambooth_jax import sharding
  mesh = SimpleNamespace(shape={"data": 1, "fsdp": 8})  # spec_for reads only the axis sizes
  per_device = sum(np.prod(var.get_value().shape) * 2 // (8 if any(sharding.spec_for(path, var.get_value().shape, mesh))
                                                          else 1) for path, var in flat)
  assert per_device < 1.01 * 2 * 11_901_408_320 / 8


def test_bf16_matches_diffusers_in_bf16():
  """bf16 weights and compute on both sides. (Against our own fp32 run bf16 is far off by design: diffusers casts
  the timestep to the compute dtype before the x1000, so bf16 sees t = 0.9 as 898.4 and its sinusoid moves.)"""
  ref, ours = build_pair(dict(TINY_TRANSFORMER, guidance_embeds=True))
  ref = ref.to(torch.bfloat16)
  bf16 = weights.load_module(lambda: FluxTransformer2DModel(ours.config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16),
                             weights.module_state_dict(ours), where="transformer", param_dtype=jnp.bfloat16)
  x, ctx, pooled, t, img_ids, txt_ids = inputs(3)
  guidance = np.array([3.5, 3.5], np.float32)
  bf = lambda a: torch.from_numpy(a).to(torch.bfloat16)
  with torch.no_grad():
    want = ref(hidden_states=bf(x), encoder_hidden_states=bf(ctx), pooled_projections=bf(pooled), timestep=bf(t),
               img_ids=torch.from_numpy(img_ids), txt_ids=torch.from_numpy(txt_ids), guidance=bf(guidance)).sample
  out = nnx.jit(lambda m: m(x, ctx, pooled, t, img_ids, txt_ids, guidance))(bf16)
  assert out.dtype == jnp.bfloat16
  assert_close(np.asarray(out, np.float32), want.float().numpy(), tol=0.02)  # bf16 rounding: 0.8% seen
