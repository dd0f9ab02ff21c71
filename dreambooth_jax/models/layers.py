"""Building blocks shared by the UNet, the VAE and the CLIP text encoder (Flax NNX, NHWC).

Module attribute names mirror the PyTorch module names of diffusers/transformers (`to_q`, `to_out[0]`,
`resnets[1].conv1`, ...), so a parameter path in our state is the torch state-dict key with `weight` renamed
(`kernel`/`scale`/`embedding`). weights.py relies on that to convert checkpoints without per-model key tables.
"""

import dataclasses
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
                    param_dtype=self.param_dtype, rngs=self.rngs)

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
  to the key dtype) with the heads moved next to the batch first, so that both contractions are plain batched
  matmuls. Why: jax.nn's form (einsum 'BTNH,BSNH->BNTS' under a vmap over head groups) leaves batch dimensions
  where XLA:CPU's matmul emitter does not take them, and it falls back to a slow loop: 3-4x slower forward and 5-6x
  slower gradient on Flux's attention shapes (docs/benchmarks.md, "Attention layout"). mask: bool, broadcastable
  to (B, N, T, S), True = attend; bias: added to the logits, broadcastable to (B, N, T, S)."""
  precision = {jnp.dtype(jnp.bfloat16): jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
               jnp.dtype(jnp.float16): jax.lax.DotAlgorithmPreset.F16_F16_F32}.get(jnp.dtype(q_BTNH.dtype))
  logits_dtype = jnp.promote_types(q_BTNH.dtype, jnp.float32)
  q_BNTH, k_BNSH, v_BNSH = (jnp.swapaxes(a, 1, 2) for a in (q_BTNH, k_BSNH, v_BSNH))
  logits_BNTS = jnp.einsum("bnth,bnsh->bnts", q_BNTH, k_BNSH, precision=precision,
                           preferred_element_type=logits_dtype)
  logits_BNTS = logits_BNTS * jnp.asarray(q_BTNH.shape[-1] ** -0.5 if scale is None else scale, logits_dtype)
  if bias is not None:
    logits_BNTS = (logits_BNTS + bias).astype(logits_dtype)
  if is_causal:
    T, S = logits_BNTS.shape[-2:]
    causal_TS = jnp.tril(jnp.ones((T, S), bool))
    mask = causal_TS if mask is None else jnp.logical_and(mask, causal_TS)
  if mask is not None:
    logits_BNTS = jnp.where(mask, logits_BNTS, jnp.asarray(-0.7 * jnp.finfo(logits_dtype).max, logits_dtype))
  probs_BNTS = jax.nn.softmax(logits_BNTS.astype(jnp.float32), axis=-1).astype(k_BSNH.dtype)
  return jnp.swapaxes(jnp.einsum("bnts,bnsh->bnth", probs_BNTS, v_BNSH), 1, 2)


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
