"""The layers of diffusers' FluxTransformer2DModel (models/transformers/transformer_flux.py, embeddings.py,
normalization.py) in Flax NNX: 3-axis rotary position embedding, joint attention with RMS q/k norms, the adaptive
layer norms and the timestep/guidance/pooled-text embedding. Module attribute names are diffusers' (see layers.py).
Tokens are (B, S, D); attention heads (B, S, N, H).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreambooth_jax.models.layers import Layers, attention
from dreambooth_jax.models.unet import TimestepEmbedding, timestep_embedding

NORM_EPS = 1e-6  # every Flux norm (adaptive layer norms, q/k RMS norms)
ROPE_THETA = 10000
TIME_PROJ_DIM = 256  # Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)


# ----------------------------------------------------------------------------------------------- rotary embedding

def rope(ids_SA, axes_dims) -> tuple[jax.Array, jax.Array]:
  """FluxPosEmbed: (cos, sin), each (S, sum(axes_dims)) fp32, from position ids (S, n_axes).

  Axis a rotates axes_dims[a] channels at frequencies theta^(-2k/d); each frequency's cos/sin is repeated twice
  (repeat_interleave: the channel pairs (0, 1), (2, 3), ... rotate together). diffusers computes the frequencies and
  angles in fp64; here the frequencies are fp64 numpy constants and the angles fp32 (positions are small integers,
  so the angle error is ~1e-7 relative)."""
  if ids_SA.shape[-1] != len(axes_dims):
    raise ValueError(f"position ids have {ids_SA.shape[-1]} axes, axes_dims_rope has {len(axes_dims)}")
  cos, sin = [], []
  for a, dim in enumerate(axes_dims):
    freqs = jnp.asarray(1.0 / ROPE_THETA ** (np.arange(0, dim, 2, dtype=np.float64) / dim), jnp.float32)
    angles_SK = ids_SA[:, a].astype(jnp.float32)[:, None] * freqs[None]
    cos.append(jnp.repeat(jnp.cos(angles_SK), 2, axis=-1))
    sin.append(jnp.repeat(jnp.sin(angles_SK), 2, axis=-1))
  return jnp.concatenate(cos, axis=-1), jnp.concatenate(sin, axis=-1)


def apply_rope(x_BSNH, cos_SH, sin_SH):
  """diffusers' apply_rotary_emb(use_real=True, use_real_unbind_dim=-1): pairs (x0, x1) -> (x0 cos - x1 sin,
  x1 cos + x0 sin), in fp32, back in x's dtype."""
  x = x_BSNH.astype(jnp.float32)
  x_real, x_imag = x[..., 0::2], x[..., 1::2]
  rotated = jnp.stack([-x_imag, x_real], axis=-1).reshape(x.shape)
  out = x * cos_SH[None, :, None] + rotated * sin_SH[None, :, None]
  return out.astype(x_BSNH.dtype)


# ----------------------------------------------------------------------------------------------- attention

class FluxAttention(nnx.Module):
  """FluxAttention + FluxAttnProcessor. With `context_dim` (double-stream blocks) the text stream has its own
  projections and norms (add_q_proj ..., norm_added_q/k, to_add_out) and attends jointly with the image stream,
  text tokens first; pre_only (single-stream blocks) has no output projection."""

  def __init__(self, dim: int, heads: int, head_dim: int, layers: Layers, *, context_dim: int | None = None,
               pre_only: bool = False, implementation: str | None = "auto"):
    inner = heads * head_dim
    self.heads, self.head_dim, self.implementation = heads, head_dim, implementation
    self.norm_q, self.norm_k = layers.rms_norm(head_dim, NORM_EPS), layers.rms_norm(head_dim, NORM_EPS)
    self.to_q, self.to_k, self.to_v = (layers.linear(dim, inner) for _ in range(3))
    self.to_out = None if pre_only else nnx.List([layers.linear(inner, dim)])  # torch: to_out.1 is dropout
    if context_dim is not None:
      self.norm_added_q = layers.rms_norm(head_dim, NORM_EPS)
      self.norm_added_k = layers.rms_norm(head_dim, NORM_EPS)
      self.add_q_proj, self.add_k_proj, self.add_v_proj = (layers.linear(context_dim, inner) for _ in range(3))
      self.to_add_out = layers.linear(inner, context_dim)
    self.joint = context_dim is not None

  def _heads(self, y_BSD):
    return y_BSD.reshape(*y_BSD.shape[:2], self.heads, self.head_dim)

  def __call__(self, x_BSD, rope_cos_sin, ctx_BTD=None):
    """Self-attention over x (single blocks: x is already [text, image]); joint attention over [ctx, x] when ctx
    is given. Returns the attended x, or (x, ctx) for joint attention."""
    q = self.norm_q(self._heads(self.to_q(x_BSD)))
    k = self.norm_k(self._heads(self.to_k(x_BSD)))
    v = self._heads(self.to_v(x_BSD))
    if ctx_BTD is not None:
      q = jnp.concatenate([self.norm_added_q(self._heads(self.add_q_proj(ctx_BTD))), q], axis=1)
      k = jnp.concatenate([self.norm_added_k(self._heads(self.add_k_proj(ctx_BTD))), k], axis=1)
      v = jnp.concatenate([self._heads(self.add_v_proj(ctx_BTD)), v], axis=1)
    cos, sin = rope_cos_sin
    out_BSNH = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, implementation=self.implementation)
    out_BSD = out_BSNH.reshape(*out_BSNH.shape[:2], -1).astype(x_BSD.dtype)
    if ctx_BTD is None:
      return out_BSD if self.to_out is None else self.to_out[0](out_BSD)
    text = ctx_BTD.shape[1]
    return self.to_out[0](out_BSD[:, text:]), self.to_add_out(out_BSD[:, :text])


# ----------------------------------------------------------------------------------------------- norms

def layer_norm(x_BSD, eps: float = NORM_EPS):
  """nn.LayerNorm(elementwise_affine=False) (statistics in fp32, two-pass variance)."""
  x = x_BSD.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return ((x - mean) * jax.lax.rsqrt(var + eps)).astype(x_BSD.dtype)


def modulate(x_BSD, shift_BD, scale_BD):
  return layer_norm(x_BSD) * (1 + scale_BD[:, None]) + shift_BD[:, None]


class AdaLayerNormZero(nnx.Module):
  """linear(silu(temb)) -> shift, scale, gate (attention) and shift, scale, gate (MLP); returns the modulated norm
  of x and the other four."""

  def __init__(self, dim: int, layers: Layers, chunks: int = 6):
    self.linear, self.chunks = layers.linear(dim, chunks * dim), chunks

  def __call__(self, x_BSD, temb_BD):
    shift, scale, *rest = jnp.split(self.linear(jax.nn.silu(temb_BD)), self.chunks, axis=-1)
    return modulate(x_BSD, shift, scale), *rest


def AdaLayerNormZeroSingle(dim: int, layers: Layers) -> AdaLayerNormZero:  # noqa: N802 (diffusers' class name)
  """shift, scale, gate: returns (modulated norm, gate)."""
  return AdaLayerNormZero(dim, layers, chunks=3)


class AdaLayerNormContinuous(nnx.Module):
  """norm_out: linear(silu(temb)) -> scale, shift (in this order, unlike AdaLayerNormZero)."""

  def __init__(self, dim: int, layers: Layers):
    self.linear = layers.linear(dim, 2 * dim)

  def __call__(self, x_BSD, temb_BD):
    scale, shift = jnp.split(self.linear(jax.nn.silu(temb_BD).astype(x_BSD.dtype)), 2, axis=-1)
    return modulate(x_BSD, shift, scale)


# ----------------------------------------------------------------------------------------------- embeddings

class CombinedTimestepTextProjEmbeddings(nnx.Module):
  """temb = timestep_embedder(sinusoid(t)) [+ guidance_embedder(sinusoid(guidance))] + text_embedder(pooled).
  (CombinedTimestepGuidanceTextProjEmbeddings with guidance; the text embedder, diffusers' PixArtAlphaTextProjection
  with silu, has the same linear_1 / silu / linear_2 structure as TimestepEmbedding.)"""

  def __init__(self, dim: int, pooled_dim: int, guidance: bool, layers: Layers):
    self.timestep_embedder = TimestepEmbedding(TIME_PROJ_DIM, dim, layers)
    self.guidance_embedder = TimestepEmbedding(TIME_PROJ_DIM, dim, layers) if guidance else None
    self.text_embedder = TimestepEmbedding(pooled_dim, dim, layers)

  def __call__(self, t_B, pooled_BP, guidance_B=None):
    sinusoid = lambda s_B: timestep_embedding(s_B, TIME_PROJ_DIM, True, 0).astype(pooled_BP.dtype)
    temb_BD = self.timestep_embedder(sinusoid(t_B))
    if self.guidance_embedder is not None:
      if guidance_B is None:
        raise ValueError("this Flux transformer has guidance_embeds (a guidance-distilled model such as Flux.1-dev): "
                         "pass a guidance value")
      temb_BD = temb_BD + self.guidance_embedder(sinusoid(guidance_B))
    elif guidance_B is not None:
      raise ValueError("this Flux transformer has no guidance_embeds (e.g. Flux.1-schnell): it takes no guidance "
                       "value")
    return temb_BD + self.text_embedder(pooled_BP)


class GELUProjection(nnx.Module):
  """diffusers' GELU(approximate="tanh") activation module: a projection then tanh-gelu (FeedForward's net.0)."""

  def __init__(self, dim: int, inner: int, layers: Layers):
    self.proj = layers.linear(dim, inner)

  def __call__(self, x):
    return jax.nn.gelu(self.proj(x), approximate=True)


class FeedForward(nnx.Module):
  """FeedForward(activation_fn="gelu-approximate"): net.0 = GELU projection, net.1 dropout, net.2 linear."""

  def __init__(self, dim: int, layers: Layers, mult: int = 4):
    self.net = nnx.List([GELUProjection(dim, dim * mult, layers), None, layers.linear(dim * mult, dim)])

  def __call__(self, x):
    return self.net[2](self.net[0](x))
