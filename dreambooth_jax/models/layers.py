"""Building blocks shared by the UNet, the VAE and the CLIP text encoder (Flax NNX, NHWC).

Module attribute names mirror the PyTorch module names of diffusers/transformers (`to_q`, `to_out[0]`,
`resnets[1].conv1`, ...), so a parameter path in our state is the torch state-dict key with `weight` renamed
(`kernel`/`scale`/`embedding`). weights.py relies on that to convert checkpoints without per-model key tables.
"""

import dataclasses
import functools
import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Layers:
  """Creates layers with one compute dtype and one parameter dtype (fp32 params + bf16 compute works)."""

  rngs: nnx.Rngs
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def linear(self, features_in: int, features_out: int, use_bias: bool = True) -> nnx.Linear:
    return nnx.Linear(features_in, features_out, use_bias=use_bias, dtype=self.dtype,
                      param_dtype=self.param_dtype, rngs=self.rngs)

  def conv(self, features_in: int, features_out: int, kernel: int = 3, stride: int = 1,
           padding: int | None = None) -> nnx.Conv:
    padding = kernel // 2 if padding is None else padding
    return nnx.Conv(features_in, features_out, kernel_size=(kernel, kernel), strides=(stride, stride),
                    padding=((padding, padding), (padding, padding)), dtype=self.dtype,
                    param_dtype=self.param_dtype, conv_general_dilated=conv_general_dilated, rngs=self.rngs)

  def group_norm(self, channels: int, groups: int, eps: float) -> "GroupNorm":
    return GroupNorm(channels, num_groups=groups, epsilon=eps, dtype=self.dtype, param_dtype=self.param_dtype,
                     rngs=self.rngs)

  def layer_norm(self, dim: int, eps: float) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, dtype=self.dtype,
                         param_dtype=self.param_dtype, rngs=self.rngs)

  def rms_norm(self, dim: int, eps: float) -> nnx.RMSNorm:
    return nnx.RMSNorm(dim, epsilon=eps, dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs)

  def embed(self, count: int, dim: int) -> nnx.Embed:
    return nnx.Embed(count, dim, dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs)


def conv_general_dilated(lhs_NHWC, rhs_HWIO, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
  """jax.lax.conv_general_dilated for nnx.Conv (channels last), except on feature maps smaller than the window.

  Why: XLA's CPU compiler swaps a convolution's operands when the input's spatial area is smaller than the kernel's
  (the algebraic simplifier's operand swap; XLA:GPU turns it off), and the swapped convolution (the kernel as
  input, the batch as features) runs below 1 GFLOP/s: a 3 x 3 convolution over SD 1.5's 2 x 2 level took 6-13 ms of
  a 64 px sampler step where the same work as a matmul takes 0.2 ms (docs/benchmarks.md, "Small feature maps").
  There the convolution is computed as one matmul over the window's taps (im2col), leaving out taps that only ever
  see padding. Same result within fp32 rounding, forward and backward; feature maps at least as large as the
  window (every SD level at 256 px and above) take lax's convolution unchanged.
  """
  spatial, window = lhs_NHWC.shape[1:-1], rhs_HWIO.shape[:-2]
  n = lhs_NHWC.ndim  # nnx.Conv's channels-last dimension numbers (flax.nnx.nn.linear._conv_dimension_numbers)
  channels_last = jax.lax.ConvDimensionNumbers((0, n - 1, *range(1, n - 1)), (n - 1, n - 2, *range(n - 2)),
                                               (0, n - 1, *range(1, n - 1)))
  plain = (feature_group_count == 1 and not isinstance(padding, str) and dimension_numbers == channels_last
           and all(lo >= 0 and hi >= 0 for lo, hi in padding) and kwargs.get("out_sharding") is None
           and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))))
  if not plain or math.prod(spatial) >= math.prod(window):
    return jax.lax.conv_general_dilated(lhs_NHWC, rhs_HWIO, window_strides, padding, lhs_dilation=lhs_dilation,
                                        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                        feature_group_count=feature_group_count, precision=precision, **kwargs)
  return _conv_as_matmul(lhs_NHWC, rhs_HWIO, tuple(window_strides), tuple(map(tuple, padding)), precision,
                         kwargs.get("preferred_element_type"))


def _conv_as_matmul(x_NHWC, kernel_HWIO, strides, padding, precision, preferred_element_type):
  """The convolution as (the window's taps of x, concatenated over channels) @ (the kernel's matching rows)."""
  sizes = x_NHWC.shape[1:-1]
  window = kernel_HWIO.shape[:-2]
  out_sizes = [(size + lo + hi - k) // s + 1 for size, (lo, hi), k, s in zip(sizes, padding, window, strides)]
  # A tap that lands in the padding at every output position multiplies zeros only: left out, with its kernel rows.
  taps_per_dim = [[t for t in range(k) if any(lo <= t + s * o < lo + size for o in range(n))]
                  for size, (lo, _), k, s, n in zip(sizes, padding, window, strides, out_sizes)]
  taps = list(itertools.product(*taps_per_dim))
  x_NHWC = jnp.pad(x_NHWC, ((0, 0), *padding, (0, 0)))
  columns = [x_NHWC[(slice(None), *(slice(t, t + s * (n - 1) + 1, s) for t, s, n in zip(tap, strides, out_sizes)))]
             for tap in taps]
  cols_NHWK = jnp.concatenate(columns, axis=-1) if len(columns) > 1 else columns[0]
  kernel_KO = jnp.concatenate([kernel_HWIO[tap] for tap in taps], axis=0)
  return jax.lax.dot_general(cols_NHWK, kernel_KO, (((cols_NHWK.ndim - 1,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=preferred_element_type)


class GroupNorm(nnx.GroupNorm):
  """GroupNorm over channels-last inputs whose statistics take one fused pass over x, shifted for precision.

  Same parameters (`scale`, `bias`) and result as nnx.GroupNorm; only how the variance is computed differs:
  - two-pass E[(x - E[x])^2] (nnx's `use_fast_variance=False`) reads x twice, and on XLA:CPU that costs the
    SD 1.5-shaped train step a third of its time (docs/benchmarks.md, "The sd15-narrow gap");
  - one-pass E[x^2] - E[x]^2 (nnx's default) cancels catastrophically when |E[x]| >> std, as in VAE activations;
  - here: one pass over x - K, with K a pivot per (example, group) taken from the data (the group's mean at the
    first position), so |E[x] - K| is of the order of std and E[(x-K)^2] - E[x-K]^2 loses no more than two-pass.
  K is a constant to autodiff (stop_gradient): the variance and the mean do not depend on it.
  Statistics in at least float32 whatever the compute dtype, as nnx does.
  """

  def __call__(self, x):
    dtype = self.dtype or x.dtype
    stats_dtype = jnp.promote_types(dtype, jnp.float32)
    x_NLGC = x.astype(dtype).reshape(x.shape[0], -1, self.num_groups, self.group_size).astype(stats_dtype)
    pivot_N1G1 = jax.lax.stop_gradient(x_NLGC[:, :1].mean(-1, keepdims=True))
    shifted_NLGC = x_NLGC - pivot_N1G1
    mean_N1G1 = shifted_NLGC.mean((1, 3), keepdims=True)
    var_N1G1 = jnp.maximum(jnp.square(shifted_NLGC).mean((1, 3), keepdims=True) - jnp.square(mean_N1G1), 0.0)
    mul_N1GC = jax.lax.rsqrt(var_N1G1 + self.epsilon)
    if self.scale is not None:
      mul_N1GC = mul_N1GC * self.scale[...].astype(dtype).reshape(self.num_groups, self.group_size)
    y_NLGC = (shifted_NLGC - mean_N1G1) * mul_N1GC
    if self.bias is not None:
      y_NLGC = y_NLGC + self.bias[...].astype(dtype).reshape(self.num_groups, self.group_size)
    return y_NLGC.reshape(x.shape).astype(dtype)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch/HF "gelu" is the exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation(name: str, where: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"{where}: activation {name!r} is not supported (supported: {sorted(ACTIVATIONS)})")
  return ACTIVATIONS[name]


def require(config: dict, key: str, allowed, where: str):
  """Fails at load time for a config value the implementation does not support (never a silently wrong model)."""
  value = config.get(key, allowed[0])
  if value not in allowed:
    raise ValueError(f"{where}: config key {key!r} = {value!r} is not supported (supported: {list(allowed)})")
  return value


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "chunked")
QUERY_CHUNK = 1024  # "chunked": 1024 queries x 4096 keys (512 px) per score block


def attention(q_BTNH, k_BSNH, v_BSNH, *, mask=None, is_causal: bool = False, implementation: str | None = "auto",
              bias=None, scale: float | None = None):
  """Scaled dot-product attention; logits and softmax in fp32 whatever the inputs (= diffusers'
  upcast_attention/upcast_softmax). bias: added to the logits (T5's relative position bias, (1|B, N, T, S));
  scale: the logit scale (None = 1/sqrt(head_dim); T5 uses 1).

  implementation: "xla" (the plain einsum-softmax-einsum), "cudnn" (cuDNN flash attention: GPU, fp16/bf16),
  "chunked" (exact attention over query chunks, each rematerialised on the backward pass, so no T x S score
  matrix lives in memory: the memory lever where no flash kernel exists, e.g. TPU), or "auto": cuDNN on a GPU
  when the inputs qualify, else XLA. (jax.nn.dot_product_attention's own default is XLA on every backend.)
  """
  implementation = check_attention(implementation)
  if (implementation == "chunked" and mask is None and bias is None and scale is None and not is_causal
      and q_BTNH.shape[1] > QUERY_CHUNK):
    return chunked_attention(q_BTNH, k_BSNH, v_BSNH, QUERY_CHUNK)
  extra = dict(mask=mask, is_causal=is_causal, bias=bias, scale=scale)
  if implementation == "auto":
    if jax.default_backend() == "gpu" and q_BTNH.dtype in (jnp.bfloat16, jnp.float16):
      try:
        return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, implementation="cudnn", **extra)
      except (ValueError, NotImplementedError, RuntimeError):
        pass  # shape, head size or cuDNN version the flash kernel does not take: XLA below
    implementation = "xla"
  if implementation in ("xla", "chunked"):
    return xla_attention(q_BTNH, k_BSNH, v_BSNH, **extra)
  return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, **extra, implementation=implementation)


def xla_attention(q_BTNH, k_BSNH, v_BSNH, *, mask=None, is_causal: bool = False, bias=None,
                  scale: float | None = None):
  """jax.nn.dot_product_attention(implementation="xla")'s arithmetic (fp32 logits and softmax, probabilities cast
  to the value dtype), in the form XLA:CPU runs fastest (docs/benchmarks.md, "Attention layout" and "Profile"):
  heads next to the batch, so both contractions are plain batched matmuls (jax.nn's vmapped
  'BTNH,BSNH->BNTS' falls back to a slow loop: 3-4x slower forward, 5-6x slower gradient on Flux's shapes), and an
  explicit gradient (_attention_BN). mask: bool, broadcastable to (B, N, T, S), True = attend; bias: added to the
  logits, broadcastable to (B, N, T, S)."""
  if is_causal:
    causal_TS = jnp.tril(jnp.ones((q_BTNH.shape[1], k_BSNH.shape[1]), bool))
    mask = causal_TS if mask is None else jnp.logical_and(mask, causal_TS)
  scale = q_BTNH.shape[-1] ** -0.5 if scale is None else float(scale)
  q_BNTH, k_BNSH, v_BNSH = (jnp.swapaxes(a, 1, 2) for a in (q_BTNH, k_BSNH, v_BSNH))
  return jnp.swapaxes(_attention_BN(q_BNTH, k_BNSH, v_BNSH, bias, mask, scale), 1, 2)


def _attention_forward(q_BNTH, k_BNSH, v_BNSH, bias, mask, scale: float):
  """The output and the fp32 probabilities. The scale goes on the queries (T x H) rather than on the logits
  (T x S) when that rounds no differently, i.e. in fp32: XLA:CPU materialises the broadcast scalar of a scaled
  logit matrix as a whole T x S buffer and reads it on every use; bf16/fp16 inputs keep jax.nn's fp32 logit scale."""
  precision = {jnp.dtype(jnp.bfloat16): jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
               jnp.dtype(jnp.float16): jax.lax.DotAlgorithmPreset.F16_F16_F32}.get(jnp.dtype(q_BNTH.dtype))
  logits_dtype = jnp.promote_types(q_BNTH.dtype, jnp.float32)
  scale_queries = jnp.dtype(q_BNTH.dtype) == jnp.dtype(logits_dtype)
  if scale_queries:
    q_BNTH = q_BNTH * jnp.asarray(scale, q_BNTH.dtype)
  logits_BNTS = jnp.einsum("bnth,bnsh->bnts", q_BNTH, k_BNSH, precision=precision,
                           preferred_element_type=logits_dtype)
  if not scale_queries:
    logits_BNTS = logits_BNTS * jnp.asarray(scale, logits_dtype)
  if bias is not None:
    logits_BNTS = (logits_BNTS + bias).astype(logits_dtype)
  if mask is not None:
    logits_BNTS = jnp.where(mask, logits_BNTS, jnp.asarray(-0.7 * jnp.finfo(logits_dtype).max, logits_dtype))
  probs_BNTS = jax.nn.softmax(logits_BNTS.astype(jnp.float32), axis=-1)
  return jnp.einsum("bnts,bnsh->bnth", probs_BNTS.astype(v_BNSH.dtype), v_BNSH), probs_BNTS


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention_BN(q_BNTH, k_BNSH, v_BNSH, bias, mask, scale: float):
  """Attention on head-major inputs with the softmax gradient written out (FlashAttention's backward): the row
  term sum_s P*dP is taken as sum_h dO*O on the T x H side. Autodiff instead reduces a T x S product, which
  XLA:CPU's fused reduction runs up to 10x slower than the matmuls around it (one head: 25 of 37 ms), and it
  contracts the T x S cotangent over its second-to-last axis, a form XLA:CPU leaves to a slow generic dot; below
  both transposed products put the small operand first. Same results as autodiff within fp32 rounding."""
  return _attention_forward(q_BNTH, k_BNSH, v_BNSH, bias, mask, scale)[0]


def _attention_BN_fwd(q_BNTH, k_BNSH, v_BNSH, bias, mask, scale):
  out_BNTH, probs_BNTS = _attention_forward(q_BNTH, k_BNSH, v_BNSH, bias, mask, scale)
  return out_BNTH, (q_BNTH, k_BNSH, v_BNSH, bias, mask, probs_BNTS, out_BNTH)


def _attention_BN_bwd(scale, residuals, dout_BNTH):
  q_BNTH, k_BNSH, v_BNSH, bias, mask, probs_BNTS, out_BNTH = residuals
  f32 = jnp.float32
  row_BNT1 = jnp.sum(dout_BNTH.astype(f32) * out_BNTH.astype(f32), axis=-1, keepdims=True)
  dprobs_BNTS = jnp.einsum("bnth,bnsh->bnts", dout_BNTH, v_BNSH, preferred_element_type=f32)
  dlogits_BNTS = probs_BNTS * (dprobs_BNTS - row_BNT1)
  if mask is not None:
    dlogits_BNTS = jnp.where(mask, dlogits_BNTS, 0.0)
  dbias = None if bias is None else _sum_to_shape(dlogits_BNTS, bias.shape).astype(bias.dtype)
  scale = jnp.asarray(scale, f32)  # on the T x H operands: a scaled T x S matrix would be one more T x S buffer
  dq_BNTH = jnp.einsum("bnts,bnsh->bnth", dlogits_BNTS, k_BNSH.astype(f32) * scale).astype(q_BNTH.dtype)
  dk_BNSH = jnp.einsum("bnth,bnts->bnhs", q_BNTH.astype(f32) * scale, dlogits_BNTS)
  dk_BNSH = dk_BNSH.swapaxes(-1, -2).astype(k_BNSH.dtype)
  dv_BNSH = jnp.einsum("bnth,bnts->bnhs", dout_BNTH, probs_BNTS.astype(v_BNSH.dtype)).swapaxes(-1, -2)
  return dq_BNTH, dk_BNSH, dv_BNSH.astype(v_BNSH.dtype), dbias, None


_attention_BN.defvjp(_attention_BN_fwd, _attention_BN_bwd)


def _sum_to_shape(x, shape):
  """x summed over the axes that broadcasting a `shape` array to x.shape added or stretched."""
  lead = x.ndim - len(shape)
  x = jnp.sum(x, axis=tuple(range(lead))) if lead else x
  stretched = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
  return jnp.sum(x, axis=stretched, keepdims=True) if stretched else x


def check_attention(implementation: str | None) -> str:
  """The attention implementation by name (None = "auto"); anything else is an error naming the value."""
  implementation = implementation or "auto"
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention={implementation!r}: expected one of {list(ATTENTION_IMPLEMENTATIONS)}")
  return implementation


def chunked_attention(q_BTNH, k_BSNH, v_BSNH, chunk: int):
  """Exact attention, `chunk` queries at a time (a lax.map); each chunk is recomputed on the backward pass, so
  the largest live score block is B x N x chunk x S instead of B x N x T x S."""
  B, T, N, H = q_BTNH.shape
  n = -(-T // chunk)
  q_BPNH = jnp.pad(q_BTNH, ((0, 0), (0, n * chunk - T), (0, 0), (0, 0)))  # padded queries are sliced off
  q_nBCNH = q_BPNH.reshape(B, n, chunk, N, H).swapaxes(0, 1)
  one_chunk = jax.checkpoint(lambda q_BCNH: xla_attention(q_BCNH, k_BSNH, v_BSNH))
  out_nBCNH = jax.lax.map(one_chunk, q_nBCNH)
  return out_nBCNH.swapaxes(0, 1).reshape(B, n * chunk, N, H)[:, :T]


class Attention(nnx.Module):
  """diffusers' `Attention` (to_q/to_k/to_v/to_out.0), self- or cross-attention over tokens."""

  def __init__(self, query_dim: int, heads: int, head_dim: int, layers: Layers, *, context_dim: int | None = None,
               qkv_bias: bool = False, implementation: str | None = "auto"):
    inner = heads * head_dim
    context_dim = context_dim or query_dim
    self.heads, self.head_dim, self.implementation = heads, head_dim, implementation
    self.to_q = layers.linear(query_dim, inner, use_bias=qkv_bias)
    self.to_k = layers.linear(context_dim, inner, use_bias=qkv_bias)
    self.to_v = layers.linear(context_dim, inner, use_bias=qkv_bias)
    self.to_out = nnx.List([layers.linear(inner, query_dim)])  # torch: to_out.0 (to_out.1 is dropout)

  def __call__(self, x_BTC, context_BSC=None):
    context_BSC = x_BTC if context_BSC is None else context_BSC
    split = lambda y: y.reshape(*y.shape[:2], self.heads, self.head_dim)
    q, k, v = split(self.to_q(x_BTC)), split(self.to_k(context_BSC)), split(self.to_v(context_BSC))
    out_BTNH = attention(q, k, v, implementation=self.implementation)
    return self.to_out[0](out_BTNH.reshape(*out_BTNH.shape[:2], -1))
