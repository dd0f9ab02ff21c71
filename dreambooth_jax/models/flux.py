"""diffusers' FluxTransformer2DModel (Flux.1 dev / schnell) in Flax NNX, and FluxPipeline's latent packing.

The transformer works on packed latents: each 2 x 2 patch of the (B, H/8, W/8, C) VAE latent is one token of
4C channels (`pack_latents`), positioned by 3-axis ids (0, row, col) (`image_ids`); the T5 text tokens have ids
(0, 0, 0) (`text_ids`). Double-stream blocks keep image and text weights apart and attend jointly; single-stream
blocks run on the concatenated [text, image] sequence with a parallel MLP. Parameter paths = diffusers' state-dict
keys (`transformer_blocks.0.attn.add_q_proj.weight`, `single_transformer_blocks.0.proj_mlp.weight`, ...), so the
generic converter in io/diffusers_folder.py loads and saves them.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreambooth_jax.models.flux_layers import (AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle,
                                               CombinedTimestepTextProjEmbeddings, FeedForward, FluxAttention,
                                               modulate, rope)
from dreambooth_jax.models.layers import Layers
from dreambooth_jax.models.unet import remat_policy


@dataclasses.dataclass(frozen=True)
class FluxConfig:
  patch_size: int = 1
  in_channels: int = 64
  out_channels: int | None = None
  num_layers: int = 19
  num_single_layers: int = 38
  attention_head_dim: int = 128
  num_attention_heads: int = 24
  joint_attention_dim: int = 4096
  pooled_projection_dim: int = 768
  guidance_embeds: bool = False
  axes_dims_rope: tuple = (16, 56, 56)

  @classmethod
  def from_dict(cls, config: dict) -> "FluxConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    config = {k: v for k, v in config.items() if k in fields}
    if "axes_dims_rope" in config:
      config["axes_dims_rope"] = tuple(config["axes_dims_rope"])
    out = cls(**config)
    if sum(out.axes_dims_rope) != out.attention_head_dim or any(d % 2 for d in out.axes_dims_rope):
      raise ValueError(f"transformer: config key 'axes_dims_rope' = {list(out.axes_dims_rope)} must be even sizes "
                       f"summing to attention_head_dim = {out.attention_head_dim}")
    return out

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def output_channels(self) -> int:
    return self.patch_size ** 2 * (self.out_channels or self.in_channels)


class FluxTransformerBlock(nnx.Module):
  """Double-stream (MMDiT) block: per-stream adaLN-Zero modulation, joint attention, per-stream gated MLPs."""

  def __init__(self, dim: int, heads: int, head_dim: int, layers: Layers, implementation: str | None):
    self.norm1 = AdaLayerNormZero(dim, layers)
    self.norm1_context = AdaLayerNormZero(dim, layers)
    self.attn = FluxAttention(dim, heads, head_dim, layers, context_dim=dim, implementation=implementation)
    self.ff = FeedForward(dim, layers)
    self.ff_context = FeedForward(dim, layers)

  def __call__(self, x_BSD, ctx_BTD, temb_BD, rope_cos_sin):
    norm_x, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x_BSD, temb_BD)
    norm_ctx, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(ctx_BTD, temb_BD)
    attn_x, attn_ctx = self.attn(norm_x, rope_cos_sin, norm_ctx)
    x_BSD = x_BSD + gate_msa[:, None] * attn_x
    x_BSD = x_BSD + gate_mlp[:, None] * self.ff(modulate(x_BSD, shift_mlp, scale_mlp))
    ctx_BTD = ctx_BTD + c_gate_msa[:, None] * attn_ctx
    ctx_BTD = ctx_BTD + c_gate_mlp[:, None] * self.ff_context(modulate(ctx_BTD, c_shift_mlp, c_scale_mlp))
    return _clip_fp16(x_BSD), _clip_fp16(ctx_BTD)


class FluxSingleTransformerBlock(nnx.Module):
  """Single-stream block over [text, image]: attention (no output projection) and a tanh-GELU MLP side by side,
  concatenated into one gated output projection."""

  def __init__(self, dim: int, heads: int, head_dim: int, layers: Layers, implementation: str | None,
               mlp_ratio: float = 4.0):
    mlp = int(dim * mlp_ratio)
    self.norm = AdaLayerNormZeroSingle(dim, layers)
    self.proj_mlp = layers.linear(dim, mlp)
    self.proj_out = layers.linear(dim + mlp, dim)
    self.attn = FluxAttention(dim, heads, head_dim, layers, pre_only=True, implementation=implementation)

  def __call__(self, xs_BSD, temb_BD, rope_cos_sin):
    norm_xs, gate = self.norm(xs_BSD, temb_BD)
    mlp_BSF = jax.nn.gelu(self.proj_mlp(norm_xs), approximate=True)
    out_BSD = self.proj_out(jnp.concatenate([self.attn(norm_xs, rope_cos_sin), mlp_BSF], axis=-1))
    return _clip_fp16(xs_BSD + gate[:, None] * out_BSD)


def _clip_fp16(x):
  """diffusers clips each block's fp16 output to the fp16 range; a no-op in fp32/bf16."""
  return jnp.clip(x, -65504, 65504) if x.dtype == jnp.float16 else x


class FluxTransformer2DModel(nnx.Module):
  def __init__(self, config: FluxConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               attention_impl: str | None = "auto", remat: bool | str = False):
    layers = Layers(rngs, dtype, param_dtype)
    self.config, self.dtype, self.remat = config, dtype, remat_policy(remat)
    dim, heads, head_dim = config.inner_dim, config.num_attention_heads, config.attention_head_dim
    self.time_text_embed = CombinedTimestepTextProjEmbeddings(dim, config.pooled_projection_dim,
                                                              config.guidance_embeds, layers)
    self.context_embedder = layers.linear(config.joint_attention_dim, dim)
    self.x_embedder = layers.linear(config.in_channels, dim)
    self.transformer_blocks = nnx.List([FluxTransformerBlock(dim, heads, head_dim, layers, attention_impl)
                                        for _ in range(config.num_layers)])
    self.single_transformer_blocks = nnx.List([FluxSingleTransformerBlock(dim, heads, head_dim, layers,
                                                                          attention_impl)
                                               for _ in range(config.num_single_layers)])
    self.norm_out = AdaLayerNormContinuous(dim, layers)
    self.proj_out = layers.linear(dim, config.output_channels)

  def __call__(self, x_BSC, ctx_BTE, pooled_BP, t_B, img_ids_SA, txt_ids_TA, guidance_B=None):
    """The velocity prediction (B, S, output_channels) for packed latents x (B, S, in_channels).

    ctx: T5 hidden states (B, T, joint_attention_dim); pooled: CLIP pooled output (B, pooled_projection_dim);
    t: the sigma in [0, 1] (the model embeds 1000 t); guidance: the distilled guidance scale (guidance_embeds
    models only; embedded as 1000 g, like t); img_ids (S, 3), txt_ids (T, 3): position ids."""
    dtype = self.dtype
    x_BSD = self.x_embedder(x_BSC.astype(dtype))
    t_B = jnp.broadcast_to(jnp.asarray(t_B), x_BSC.shape[:1]).astype(dtype) * 1000  # in the compute dtype, as diffusers
    if guidance_B is not None:
      guidance_B = jnp.broadcast_to(jnp.asarray(guidance_B), x_BSC.shape[:1]).astype(dtype) * 1000
    temb_BD = self.time_text_embed(t_B, pooled_BP.astype(dtype), guidance_B)
    ctx_BTD = self.context_embedder(ctx_BTE.astype(dtype))
    rope_cos_sin = rope(jnp.concatenate([txt_ids_TA, img_ids_SA], axis=0), self.config.axes_dims_rope)

    for block in self.transformer_blocks:
      x_BSD, ctx_BTD = self._run(block, x_BSD, ctx_BTD, temb_BD, rope_cos_sin)
    text = ctx_BTD.shape[1]
    xs_BSD = jnp.concatenate([ctx_BTD, x_BSD], axis=1)
    for block in self.single_transformer_blocks:
      xs_BSD = self._run(block, xs_BSD, temb_BD, rope_cos_sin)
    x_BSD = self.norm_out(xs_BSD[:, text:], temb_BD)
    return self.proj_out(x_BSD)

  def _run(self, block, *args):
    if not self.remat:
      return block(*args)
    # "dots" keeps matmul outputs (less recompute); every other policy recomputes the whole block.
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if self.remat == "dots" else None
    return nnx.remat(lambda m, *a: m(*a), policy=policy)(block, *args)


# ----------------------------------------------------------------------------------------------- packing and ids

def pack_latents(z_BHWC):
  """FluxPipeline._pack_latents on our NHWC latents: each 2 x 2 patch becomes one token whose channels run
  (c, dy, dx) as diffusers' (B, C, H/2, 2, W/2, 2) -> (B, H/2, W/2, C, 2, 2) view gives them. (B, H/2 * W/2, 4C)."""
  B, H, W, C = z_BHWC.shape
  if H % 2 or W % 2:
    raise ValueError(f"Flux latents must have even height and width to pack into 2 x 2 patches, got {H} x {W}")
  z = z_BHWC.reshape(B, H // 2, 2, W // 2, 2, C).transpose(0, 1, 3, 5, 2, 4)
  return z.reshape(B, (H // 2) * (W // 2), C * 4)


def unpack_latents(x_BSC, latent_height: int, latent_width: int):
  """FluxPipeline._unpack_latents to NHWC: tokens (B, h*w, 4C) -> latents (B, 2h, 2w, C) for a latent of
  latent_height x latent_width (= pixel size / the VAE factor, even)."""
  B, S, C4 = x_BSC.shape
  h, w, C = latent_height // 2, latent_width // 2, C4 // 4
  if h * w != S:
    raise ValueError(f"{S} packed tokens do not make a {latent_height} x {latent_width} latent")
  z = x_BSC.reshape(B, h, w, C, 2, 2).transpose(0, 1, 4, 2, 5, 3)
  return z.reshape(B, 2 * h, 2 * w, C)


def image_ids(latent_height: int, latent_width: int) -> np.ndarray:
  """FluxPipeline._prepare_latent_image_ids for a latent of latent_height x latent_width (the packed grid is half
  that): (h*w, 3) float32 rows (0, row, col) in the order pack_latents emits the tokens."""
  h, w = latent_height // 2, latent_width // 2
  ids = np.zeros((h, w, 3), np.float32)
  ids[..., 1] = np.arange(h)[:, None]
  ids[..., 2] = np.arange(w)[None, :]
  return ids.reshape(h * w, 3)


def text_ids(length: int) -> np.ndarray:
  """FluxPipeline's text ids: (T, 3) zeros (text tokens all sit at position 0 on every axis)."""
  return np.zeros((length, 3), np.float32)
