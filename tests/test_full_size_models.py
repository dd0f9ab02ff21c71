"""Full-size SD 1.5 and SD 2.1 architectures (the bundled configs: 320/640/1280/1280 channels, 8 heads / head dims
5-10-20-20 with linear projections, CLIP ViT-L/14 / OpenCLIP ViT-H text encoders) against diffusers/transformers
with random weights, at a small spatial size. Not in the default suite (minutes, ~10 GB RAM):

  python -m pytest -m slow tests/test_full_size_models.py

Also the Flux transformer at full width (one block of each kind).

Tolerance: fp32, max |ours - reference| <= 1e-4 * max(1, max |reference|).
"""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from reference_models import to_numpy
from dreambooth_jax import families
from dreambooth_jax.io import diffusers_folder as weights

pytestmark = pytest.mark.slow
CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "dreambooth_jax" / "assets" / "sd-configs"
TOL = 1e-4


def close(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  err, scale = np.abs(ours - ref).max(), max(1.0, np.abs(ref).max())
  assert err <= TOL * scale, f"max abs error {err:.3g} > {TOL} x {scale:.3g}"


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_full_size_components_match_the_references(name, tmp_path):
  from diffusers import AutoencoderKL, UNet2DConditionModel
  from transformers import CLIPTextConfig, CLIPTextModel
  folder = CONFIGS / name
  config = lambda c: json.loads((folder / c / "config.json").read_text())
  torch.manual_seed(0)
  rng = np.random.default_rng(0)

  unet = UNet2DConditionModel.from_config(config("unet")).eval()
  unet.save_pretrained(tmp_path / "unet")
  x = rng.standard_normal((1, 16, 16, 4)).astype(np.float32)
  t = np.array([500], np.int64)
  context = rng.standard_normal((1, 77, config("unet")["cross_attention_dim"])).astype(np.float32)
  with torch.no_grad():
    want = to_numpy(unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                         torch.from_numpy(context)).sample).transpose(0, 2, 3, 1)
  del unet
  ours, _ = weights.load_component(tmp_path, families.get("sd"), "unet", dtype=jnp.float32)
  close(ours(x, t.astype(np.int32), context), want)
  del ours

  text = CLIPTextModel(CLIPTextConfig.from_dict(config("text_encoder"))).eval()
  text.save_pretrained(tmp_path / "text_encoder")
  ids = rng.integers(0, 49407, (1, 77))
  with torch.no_grad():
    want = to_numpy(text(torch.from_numpy(ids)).last_hidden_state)
  del text
  ours, _ = weights.load_component(tmp_path, families.get("sd"), "text_encoder")
  close(ours(ids.astype(np.int32))[0], want)
  del ours

  vae = AutoencoderKL.from_config(config("vae")).eval()
  vae.save_pretrained(tmp_path / "vae")
  pixels = rng.uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    posterior = vae.encode(torch.from_numpy(pixels.transpose(0, 3, 1, 2))).latent_dist
    want_mean = to_numpy(posterior.mean).transpose(0, 2, 3, 1)
    want_decoded = to_numpy(vae.decode(posterior.mean).sample).transpose(0, 2, 3, 1)
  ours, _ = weights.load_component(tmp_path, families.get("sd"), "vae")
  mean, _ = ours.encode(pixels)
  close(mean, want_mean)
  close(ours.decode(jnp.asarray(want_mean)), want_decoded)


def test_full_width_flux_blocks_match_diffusers():
  """FLUX.1-dev's width (24 heads of 128 = 3072, rope axes 16/56/56, T5-XXL context 4096, CLIP-L pooled 768,
  guidance embedding) with one double- and one single-stream block (~0.5B parameters), 16 image + 8 text tokens."""
  from test_models_flux import build_pair, torch_forward
  from dreambooth_jax.models import flux
  spec = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
              num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
              axes_dims_rope=(16, 56, 56))
  ref, ours = build_pair(spec)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 16, 64)).astype(np.float32)
  ctx = rng.standard_normal((1, 8, 4096)).astype(np.float32)
  pooled = rng.standard_normal((1, 768)).astype(np.float32)
  t, guidance = np.array([0.7], np.float32), np.array([3.5], np.float32)
  img_ids, txt_ids = flux.image_ids(8, 8), flux.text_ids(8)
  want = torch_forward(ref, x, ctx, pooled, t, img_ids, txt_ids, guidance)
  del ref
  close(ours(x, ctx, pooled, t, img_ids, txt_ids, guidance), want)


def test_t5_xxl_has_transformers_parameter_shapes():
  """FLUX.1's text_encoder_2 (T5 v1.1 XXL, 4.76B) built abstractly: transformers' parameter names and shapes
  (torch's built on the meta device; the tied encoder.embed_tokens is shared.weight, see t5_encoder_keys)."""
  from flax import nnx
  from transformers import T5Config as TorchConfig, T5EncoderModel as TorchT5
  from dreambooth_jax.models.t5 import T5Config, T5EncoderModel
  xxl = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
             feed_forward_proj="gated-gelu", model_type="t5")
  with torch.device("meta"):
    ref = TorchT5(TorchConfig(**xxl))
  want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k != "encoder.embed_tokens.weight"}
  ours = nnx.eval_shape(lambda: T5EncoderModel(T5Config.from_dict(xxl), rngs=nnx.Rngs(0)))
  got = {weights.torch_key(path): tuple(v.get_value().shape[::-1] if path[-1] == "kernel" else v.get_value().shape)
         for path, v in nnx.to_flat_state(nnx.state(ours, nnx.Param))}
  assert got == want
