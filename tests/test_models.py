"""Parity of our Flax UNet, VAE and CLIP text encoder with diffusers/transformers (torch) on the same weights.

Tolerance: fp32, max |ours - torch| <= 1e-4 * max(1, max |torch|) (relative to the output's scale).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
import pytest
import torch

from reference_models import TINY_SD1, TINY_SD2, to_numpy
from dreambooth_jax import weights
from dreambooth_jax.tokenizer import tokenize

TOL = 1e-4


def assert_close(ours, ref, tol=TOL):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape
  scale = max(1.0, np.abs(ref).max())
  err = np.abs(ours - ref).max()
  assert err <= tol * scale, f"max abs error {err:.3g} > {tol} * {scale:.3g}"


def nchw(x_BHWC):
  return np.asarray(x_BHWC).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def case(request, tiny_sd1_dir, tiny_sd2_dir):
  spec, folder = {"sd1": (TINY_SD1, tiny_sd1_dir), "sd2": (TINY_SD2, tiny_sd2_dir)}[request.param]
  from diffusers import StableDiffusionPipeline
  kwargs = {"variant": "fp16"} if request.param == "sd2" else {}
  ref = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32, **kwargs)
  ours = weights.load_pipeline(folder)
  return ref, ours


def test_unet_matches_diffusers(case):
  ref, ours = case
  rng = np.random.default_rng(0)
  x_BHWC = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  context = rng.standard_normal((2, 77, 32)).astype(np.float32)
  t = np.array([10, 999], np.int32)
  with torch.no_grad():
    expected = ref.unet(torch.from_numpy(nchw(x_BHWC)), torch.from_numpy(t), torch.from_numpy(context)).sample
  got = jax.jit(lambda m, *a: m(*a))(ours.unet, x_BHWC, t, context)
  assert_close(nchw(got), to_numpy(expected))


def test_vae_encode_decode_match_diffusers(case):
  ref, ours = case
  rng = np.random.default_rng(1)
  pixels = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    dist = ref.vae.encode(torch.from_numpy(nchw(pixels))).latent_dist
    z = dist.mean
    decoded = ref.vae.decode(z).sample
  mean, std = ours.vae.encode(pixels)
  assert_close(nchw(mean), to_numpy(dist.mean))
  assert_close(nchw(std), to_numpy(dist.std))
  assert_close(nchw(ours.vae.decode(jnp.asarray(nchw(mean)).transpose(0, 2, 3, 1))), to_numpy(decoded))


def test_clip_text_matches_transformers(case):
  ref, ours = case
  ids = tokenize(ours.tokenizer, ["a photo of sks dog", "a dog"])
  expected_ids = ref.tokenizer(["a photo of sks dog", "a dog"], padding="max_length", max_length=77,
                               truncation=True, return_tensors="np").input_ids
  np.testing.assert_array_equal(ids, expected_ids)
  with torch.no_grad():
    out = ref.text_encoder(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
  last, pooled = ours.text_encoder(ids)
  assert_close(last, to_numpy(out.last_hidden_state))
  assert_close(pooled, to_numpy(out.pooler_output))
  skip1, _ = ours.text_encoder(ids, skip_last_layers=1)
  with torch.no_grad():
    expected_skip = ref.text_encoder.final_layer_norm(out.hidden_states[-2])
  assert_close(skip1, to_numpy(expected_skip))


def test_bf16_compute_with_fp32_params(tiny_sd1_dir):
  sd = weights.load_pipeline(tiny_sd1_dir, dtype=jnp.bfloat16, param_dtype=jnp.float32)
  ref = weights.load_pipeline(tiny_sd1_dir)
  assert sd.unet.conv_in.kernel.get_value().dtype == jnp.float32
  x = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
  ctx = np.random.default_rng(1).standard_normal((1, 77, 32)).astype(np.float32)
  run = nnx.jit(lambda unet: unet(x, np.array([500]), ctx))  # compiled: eager bf16 op by op is slow on CPU
  out = run(sd.unet)
  assert out.dtype == jnp.bfloat16
  # bf16 has 8 bits of mantissa: a loose bound that still catches a wrong layer.
  assert_close(np.asarray(out, np.float32), np.asarray(run(ref.unet)), tol=0.1)
