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
from dreambooth_jax.io import diffusers_folder as weights
from dreambooth_jax.io.tokenizers import tokenize

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


# ----------------------------------------------------------------------------------------------- attention

def random_qkv(t, s, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((2, t, 2, 8)).astype(dtype)
  k, v = (rng.standard_normal((2, s, 2, 8)).astype(dtype) for _ in range(2))
  return q, k, v


@pytest.mark.parametrize("extra", ["plain", "mask", "causal", "bias_scale", "bf16"])
def test_xla_attention_equals_jax_nn_forward_and_backward(extra):
  """Our head-major layout and written-out gradient compute jax.nn.dot_product_attention's XLA arithmetic (fp32
  logits and softmax), with every option, forward and backward."""
  from dreambooth_jax.models import layers
  q, k, v = (jnp.asarray(x) for x in random_qkv(12, 12 if extra == "causal" else 7))
  rng = np.random.default_rng(2)
  mask = jnp.asarray(rng.random((2, 1, 1, 7)) > 0.3).at[..., 0].set(True)  # padded keys
  bias = jnp.asarray(rng.standard_normal((1, 2, 12, 7)), jnp.float32)
  kwargs = {"mask": {"mask": mask}, "causal": {"is_causal": True},
            "bias_scale": {"bias": bias, "scale": 1.0}}.get(extra, {})
  if extra == "bf16":
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  tol = 2e-2 if extra == "bf16" else 1e-5
  w = jnp.asarray(rng.standard_normal((2, 12, 2, 8)), jnp.float32)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v, **kwargs).astype(jnp.float32) * w)
  assert_close(layers.xla_attention(q, k, v, **kwargs).astype(jnp.float32),
               jax.nn.dot_product_attention(q, k, v, **kwargs).astype(jnp.float32), tol=tol)
  ours = jax.grad(loss(layers.xla_attention), argnums=(0, 1, 2))(q, k, v)
  reference = jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
  for got, expected in zip(ours, reference):
    assert_close(got.astype(jnp.float32), expected.astype(jnp.float32), tol=tol)
  if extra == "bias_scale":  # the bias's gradient, summed over the batch it was broadcast to
    bias_loss = lambda f: lambda b: jnp.sum(f(q, k, v, bias=b, scale=1.0) * w)
    assert_close(jax.grad(bias_loss(layers.xla_attention))(bias),
                 jax.grad(bias_loss(jax.nn.dot_product_attention))(bias), tol=tol)


@pytest.mark.parametrize("s", [77, 1100])  # cross-attention to text; self-attention
def test_chunked_attention_equals_xla_forward_and_backward(s):
  from dreambooth_jax.models import layers
  q, k, v = random_qkv(1100, s)  # 1100 queries: a chunk of 1024 and a padded one
  w = np.random.default_rng(1).standard_normal((2, 1100, 2, 8)).astype(np.float32)
  loss = lambda impl: lambda q, k, v: jnp.sum(layers.attention(q, k, v, implementation=impl) * w)
  out_xla, out_chunked = (layers.attention(q, k, v, implementation=impl) for impl in ("xla", "chunked"))
  assert_close(out_chunked, out_xla, tol=1e-5)  # fp32, same math in another order: errors seen ~1e-7
  grads_xla = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  grads_chunked = jax.grad(loss("chunked"), argnums=(0, 1, 2))(q, k, v)
  for got, expected in zip(grads_chunked, grads_xla):
    assert_close(got, expected, tol=1e-5)


def test_chunked_attention_holds_no_full_score_matrix():
  """What the option is for: the compiled backward pass's temporaries shrink (XLA's memory analysis; 4096 tokens
  as SD at 512 px: the full fp32 score matrix is 2 x 4096 x 4096 x 4 B = 128 MiB, a chunk's a quarter of it)."""
  from dreambooth_jax.models import layers
  q = jax.ShapeDtypeStruct((1, 4096, 2, 8), jnp.float32)
  temp = {}
  for impl in ("xla", "chunked"):
    grad = jax.grad(lambda q, k, v: jnp.sum(layers.attention(q, k, v, implementation=impl)), argnums=(0, 1, 2))
    temp[impl] = jax.jit(grad).lower(q, q, q).compile().memory_analysis().temp_size_in_bytes
  assert temp["xla"] >= 128 * 2**20
  assert temp["chunked"] <= temp["xla"] / 2, temp


def test_auto_attention_uses_cudnn_on_gpu_for_half_precision(monkeypatch):
  """No GPU here: the choice is checked with the backend query and the kernel calls stubbed."""
  from dreambooth_jax.models import layers
  calls, real_xla = [], layers.xla_attention

  def cudnn(*args, implementation=None, **kwargs):
    calls.append(implementation)
    if fail_cudnn:
      raise ValueError("head size not supported by the flash kernel")
    return real_xla(*args, **kwargs)

  def xla(*args, **kwargs):
    calls.append("xla")
    return real_xla(*args, **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", cudnn)
  monkeypatch.setattr(layers, "xla_attention", xla)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  fail_cudnn = False
  q, k, v = random_qkv(16, 16)
  layers.attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
  layers.attention(q, k, v)  # fp32: the flash kernel takes fp16/bf16 only
  fail_cudnn = True
  layers.attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
  assert calls == ["cudnn", "xla", "cudnn", "xla"]
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  calls.clear()
  layers.attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
  assert calls == ["xla"]
  with pytest.raises(ValueError, match="attention='flash'"):
    layers.attention(q, k, v, implementation="flash")


def test_unet_with_chunked_attention_matches_diffusers(tiny_sd1_dir, monkeypatch):
  from diffusers import UNet2DConditionModel
  from dreambooth_jax.models import layers
  monkeypatch.setattr(layers, "QUERY_CHUNK", 24)  # the tiny model's 8 x 8 = 64 tokens: 3 chunks, one padded
  ours = weights.load_pipeline(tiny_sd1_dir, unet_kwargs={"attention_impl": "chunked"}).unet
  ref = UNet2DConditionModel.from_pretrained(tiny_sd1_dir, subfolder="unet")
  rng = np.random.default_rng(3)
  x_BHWC = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  context = rng.standard_normal((2, 77, 32)).astype(np.float32)
  t = np.array([10, 999], np.int32)
  with torch.no_grad():
    expected = ref(torch.from_numpy(nchw(x_BHWC)), torch.from_numpy(t), torch.from_numpy(context)).sample
  assert_close(nchw(ours(x_BHWC, t, context)), to_numpy(expected))
  with pytest.raises(ValueError, match="attention='flash'"):
    weights.load_pipeline(tiny_sd1_dir, unet_kwargs={"attention_impl": "flash"})


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_group_norm_matches_torch_when_the_mean_dwarfs_the_spread(offset):
  """Our one-pass GroupNorm keeps two-pass precision (one-pass E[x^2]-E[x]^2 errs by ~2e-3 at offset 1e3)."""
  from dreambooth_jax.models.layers import GroupNorm
  rng = np.random.default_rng(0)
  x_BHWC = (rng.standard_normal((2, 16, 16, 64)) + offset * rng.standard_normal(64)).astype(np.float32)
  norm = GroupNorm(64, num_groups=32, epsilon=1e-6, rngs=nnx.Rngs(0))
  norm.scale[...] = jnp.asarray(rng.uniform(0.5, 2, 64), jnp.float32)
  norm.bias[...] = jnp.asarray(rng.standard_normal(64), jnp.float32)
  expected = torch.nn.functional.group_norm(torch.from_numpy(x_BHWC).double().permute(0, 3, 1, 2), 32,
                                            torch.tensor(np.asarray(norm.scale[...])).double(),
                                            torch.tensor(np.asarray(norm.bias[...])).double(), 1e-6)
  np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x_BHWC))), expected.permute(0, 2, 3, 1).numpy(),
                             rtol=0, atol=2e-5)
  # The gradient equals two-pass nnx.GroupNorm's (the pivot is a constant to autodiff).
  two_pass = nnx.GroupNorm(64, num_groups=32, epsilon=1e-6, use_fast_variance=False, rngs=nnx.Rngs(0))
  two_pass.scale[...], two_pass.bias[...] = norm.scale[...], norm.bias[...]
  grad = lambda module: jax.grad(lambda x: jnp.sum(module(x) ** 3))(jnp.asarray(x_BHWC))
  ours, reference = grad(norm), grad(two_pass)
  np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4 * float(jnp.abs(reference).max()))


@pytest.mark.parametrize("hw, stride, padding", [((2, 2), 1, 1), ((1, 1), 1, 1), ((2, 2), 2, 1), ((1, 3), 1, 1),
                                                 ((4, 4), 1, 1)])
def test_conv_on_a_map_smaller_than_its_window_is_a_matmul_with_the_convolutions_result(hw, stride, padding):
  """Layers.conv computes maps smaller than the 3 x 3 window as a matmul (XLA:CPU's operand-swapped convolution
  is ~10x slower there) with torch's Conv2d result and lax's gradients; maps as large as the window stay one
  convolution."""
  from dreambooth_jax.models.layers import Layers
  conv = Layers(nnx.Rngs(0)).conv(5, 7, stride=stride, padding=padding)
  rng = np.random.default_rng(0)
  conv.bias[...] = jnp.asarray(rng.standard_normal(7), jnp.float32)
  x_BHWC = jnp.asarray(rng.standard_normal((3, *hw, 5)), jnp.float32)
  reference = torch.nn.functional.conv2d(torch.from_numpy(np.array(x_BHWC)).permute(0, 3, 1, 2),
                                         torch.from_numpy(np.array(conv.kernel[...])).permute(3, 2, 0, 1),
                                         torch.from_numpy(np.array(conv.bias[...])), stride=stride, padding=padding)
  assert_close(conv(x_BHWC), reference.permute(0, 2, 3, 1).numpy(), tol=1e-5)

  def lax_conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((padding, padding),) * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv.bias[...]
  w = jnp.asarray(rng.standard_normal(reference.permute(0, 2, 3, 1).shape), jnp.float32)
  dmodule, dx = nnx.grad(lambda module, x: jnp.sum(module(x) * w), argnums=(0, 1))(conv, x_BHWC)
  expected = jax.grad(lambda x, k: jnp.sum(lax_conv(x, k) * w), (0, 1))(x_BHWC, conv.kernel[...])
  for got, want in zip((dx, dmodule["kernel"][...]), expected):
    assert_close(got, want, tol=1e-5)
  hlo = jax.jit(conv).lower(x_BHWC).as_text()
  assert ("convolution" in hlo) == (hw[0] * hw[1] >= 9), hlo

