"""Flux.1's VAE (16 latent channels, use_quant_conv / use_post_quant_conv false, shift_factor) against diffusers'
AutoencoderKL built with that config; the latent scaling with the shift, as FluxPipeline and diffusers' Flux
training apply it. Tolerance as tests/test_models.py (fp32, 1e-4 of the output's scale)."""

import jax
import numpy as np
import torch
from flax import nnx

from reference_models import TINY_FLUX_VAE, to_numpy
from test_models import assert_close, nchw
from test_models_sdxl import numpy_state, perturb
from dreambooth_jax.io import diffusers_folder as weights
from dreambooth_jax.models.vae import AutoencoderKL, VAEConfig


def test_flux_vae_matches_diffusers():
  from diffusers import AutoencoderKL as TorchVAE
  torch.manual_seed(0)
  ref = perturb(TorchVAE(**TINY_FLUX_VAE), 1)
  assert ref.quant_conv is None and ref.post_quant_conv is None
  config = VAEConfig.from_dict(dict(ref.config))
  assert (config.use_quant_conv, config.use_post_quant_conv, config.latent_channels) == (False, False, 16)
  # strict load: a model that still built quant convs would report their keys missing
  ours = weights.load_module(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0)), numpy_state(ref), where="vae")
  assert ours.quant_conv is None and ours.post_quant_conv is None

  pixels_BHWC = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    dist = ref.encode(torch.from_numpy(nchw(pixels_BHWC))).latent_dist
  mean, std = jax.jit(lambda m, x: m.encode(x))(ours, pixels_BHWC)
  assert_close(nchw(mean), to_numpy(dist.mean))
  assert_close(nchw(std), to_numpy(dist.std))

  # training (train_dreambooth_lora_flux): (z - shift_factor) * scaling_factor; sampling (FluxPipeline):
  # z = latents / scaling_factor + shift_factor, then decode.
  shift, scale = ref.config.shift_factor, ref.config.scaling_factor
  latents = ours.scale_latents(mean)
  assert_close(nchw(latents), (to_numpy(dist.mean) - shift) * scale, tol=1e-6)
  with torch.no_grad():
    decoded = ref.decode(torch.from_numpy(np.array(nchw(latents))) / scale + shift).sample
  got = jax.jit(lambda m, x: m.decode(m.unscale_latents(x)))(ours, latents)
  assert_close(nchw(got), to_numpy(decoded))
