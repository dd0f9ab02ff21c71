"""diffusers' UNet2DConditionModel (Stable Diffusion 1.x / 2.x and SDXL) in Flax NNX, NHWC.

SDXL adds the "text_time" conditioning (pooled text embedding + sinusoidal embeddings of the size/crop time ids
through `add_embedding`, added to the timestep embedding) and a transformer depth per level.

Configured from the diffusers config.json; a value this code does not implement fails at construction with the
key and value named, never a silently different model.
"""

import dataclasses
import math
import jax
import jax.numpy as jnp
from flax import nnx

from dreambooth_jax.models.layers import Attention, Layers, check_attention, require

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  in_channels: int = 4
  out_channels: int = 4
  sample_size: int = 64
  block_out_channels: tuple = (320, 640, 1280, 1280)
  down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  layers_per_block: int = 2
  heads: tuple = (8, 8, 8, 8)  # per down block
  transformer_layers: tuple = (1, 1, 1, 1)
  cross_attention_dim: int = 768
  use_linear_projection: bool = False
  upcast_attention: bool = False  # our attention always computes softmax in fp32
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  # SDXL's "text_time" added conditioning (None: SD 1.x/2.x, no added conditioning).
  addition_embed_type: str | None = None
  addition_time_embed_dim: int | None = None
  projection_class_embeddings_input_dim: int | None = None

  @classmethod
  def from_dict(cls, config: dict) -> "UNetConfig":
    where = "unet"
    # Features of UNet2DConditionModel that SD 1.x/2.x do not use: refuse rather than ignore.
    for key, allowed in {
        "mid_block_type": ("UNetMidBlock2DCrossAttn",), "act_fn": ("silu",), "center_input_sample": (False,),
        "only_cross_attention": (False,), "dual_cross_attention": (False,), "class_embed_type": (None,),
        "addition_embed_type": (None, "text_time"), "num_class_embeds": (None,), "encoder_hid_dim": (None,),
        "encoder_hid_dim_type": (None,), "resnet_time_scale_shift": ("default",),
        "time_embedding_type": ("positional",), "time_embedding_dim": (None,), "time_embedding_act_fn": (None,),
        "timestep_post_act": (None,), "time_cond_proj_dim": (None,), "conv_in_kernel": (3,),
        "conv_out_kernel": (3,), "attention_type": ("default",), "resnet_skip_time_act": (False,),
        "resnet_out_scale_factor": (1.0, 1), "cross_attention_norm": (None,), "class_embeddings_concat": (False,),
        "mid_block_only_cross_attention": (None, False), "reverse_transformer_layers_per_block": (None,),
        "dropout": (0.0, 0),
    }.items():
      require(config, key, allowed, where)
    addition = config.get("addition_embed_type")
    time_dim = config.get("addition_time_embed_dim")
    projection_dim = config.get("projection_class_embeddings_input_dim")
    if addition is None:
      # Without "text_time" these only matter for conditionings we refuse (class_embed_type "projection").
      for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        require(config, key, (None,), where)
    else:
      for key, value in (("addition_time_embed_dim", time_dim), ("projection_class_embeddings_input_dim",
                                                                   projection_dim)):
        if not isinstance(value, int) or value <= 0:
          raise ValueError(f"{where}: config key {key!r} = {value!r} is not supported with addition_embed_type "
                           f"'text_time' (a positive int expected)")
    channels = tuple(config.get("block_out_channels", cls.block_out_channels))
    n = len(channels)
    down = tuple(config.get("down_block_types", cls.down_block_types))
    up = tuple(config.get("up_block_types", cls.up_block_types))
    for key, types, allowed in (("down_block_types", down, DOWN_BLOCKS), ("up_block_types", up, UP_BLOCKS)):
      if len(types) != n or any(t not in allowed for t in types):
        raise ValueError(f"{where}: config key {key!r} = {list(types)} is not supported "
                         f"({n} blocks from {list(allowed)} expected)")
    if [t.startswith("CrossAttn") for t in down] != [t.startswith("CrossAttn") for t in reversed(up)]:
      raise ValueError(f"{where}: down_block_types {list(down)} and up_block_types {list(up)} do not mirror")

    def per_block(key, default):
      value = config.get(key, default)
      if isinstance(value, (list, tuple)) and any(isinstance(v, (list, tuple)) for v in value):
        # diffusers allows per-layer counts (nested lists, with reverse_transformer_layers_per_block for the up
        # path: asymmetric UNets such as SSD-1B); SDXL base/refiner use one count per level.
        raise ValueError(f"{where}: config key {key!r} = {value!r} is not supported (nested per-layer lists; "
                         f"an int or {n} ints expected)")
      value = (value,) * n if isinstance(value, int) else tuple(value)
      if len(value) != n or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{where}: config key {key!r} = {config.get(key)!r} is not supported "
                         f"(an int or {n} ints expected)")
      return value

    # diffusers' naming quirk: `attention_head_dim` is the number of heads unless num_attention_heads is set.
    heads_key = "num_attention_heads" if config.get("num_attention_heads") is not None else "attention_head_dim"
    cross_dim = config.get("cross_attention_dim", cls.cross_attention_dim)
    if not isinstance(cross_dim, int):
      raise ValueError(f"{where}: config key 'cross_attention_dim' = {cross_dim!r} is not supported (an int)")
    layers_per_block = config.get("layers_per_block", cls.layers_per_block)
    if not isinstance(layers_per_block, int):
      raise ValueError(f"{where}: config key 'layers_per_block' = {layers_per_block!r} is not supported (an int)")
    return cls(
        in_channels=config.get("in_channels", 4), out_channels=config.get("out_channels", 4),
        sample_size=config.get("sample_size") or 64, block_out_channels=channels,
        down_block_types=down, up_block_types=up, layers_per_block=layers_per_block,
        heads=per_block(heads_key, 8), transformer_layers=per_block("transformer_layers_per_block", 1),
        cross_attention_dim=cross_dim, use_linear_projection=bool(config.get("use_linear_projection", False)),
        upcast_attention=bool(config.get("upcast_attention", False)),
        flip_sin_to_cos=bool(config.get("flip_sin_to_cos", True)), freq_shift=config.get("freq_shift", 0),
        norm_num_groups=config.get("norm_num_groups", 32), norm_eps=config.get("norm_eps", 1e-5),
        downsample_padding=config.get("downsample_padding", 1),
        mid_block_scale_factor=config.get("mid_block_scale_factor", 1.0),
        addition_embed_type=addition, addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=projection_dim,
    )


def timestep_embedding(t_B, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0):
  """diffusers' get_timestep_embedding (sinusoidal, computed in fp32); an odd dim gets a zero last column."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
  angles_BH = t_B.astype(jnp.float32)[:, None] * freqs[None]
  sin, cos = jnp.sin(angles_BH), jnp.cos(angles_BH)
  emb_BD = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  return jnp.pad(emb_BD, ((0, 0), (0, 1))) if dim % 2 else emb_BD


class TimestepEmbedding(nnx.Module):
  def __init__(self, dim_in: int, dim: int, layers: Layers):
    self.linear_1, self.linear_2 = layers.linear(dim_in, dim), layers.linear(dim, dim)

  def __call__(self, x):
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


class ResnetBlock2D(nnx.Module):
  def __init__(self, c_in: int, c_out: int, temb_dim: int | None, groups: int, eps: float, layers: Layers,
               output_scale_factor: float = 1.0):
    self.norm1 = layers.group_norm(c_in, groups, eps)
    self.conv1 = layers.conv(c_in, c_out)
    self.time_emb_proj = layers.linear(temb_dim, c_out) if temb_dim else None
    self.norm2 = layers.group_norm(c_out, groups, eps)
    self.conv2 = layers.conv(c_out, c_out)
    self.conv_shortcut = layers.conv(c_in, c_out, kernel=1) if c_in != c_out else None
    self.output_scale_factor = output_scale_factor

  def __call__(self, x_BHWC, temb_BD=None):
    h = self.conv1(jax.nn.silu(self.norm1(x_BHWC)))
    if self.time_emb_proj is not None:
      h = h + self.time_emb_proj(jax.nn.silu(temb_BD))[:, None, None, :]
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    skip = x_BHWC if self.conv_shortcut is None else self.conv_shortcut(x_BHWC)
    return (skip + h) / self.output_scale_factor


class Downsample2D(nnx.Module):
  def __init__(self, channels: int, padding: int, layers: Layers):
    self.padding = padding
    self.conv = layers.conv(channels, channels, stride=2, padding=padding)

  def __call__(self, x_BHWC):
    if self.padding == 0:  # diffusers pads right/bottom only in this case (the VAE encoder)
      x_BHWC = jnp.pad(x_BHWC, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return self.conv(x_BHWC)


class Upsample2D(nnx.Module):
  def __init__(self, channels: int, layers: Layers):
    self.conv = layers.conv(channels, channels)

  def __call__(self, x_BHWC):
    x_BHWC = jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
    return self.conv(x_BHWC)


class GEGLU(nnx.Module):
  def __init__(self, dim: int, inner: int, layers: Layers):
    self.proj = layers.linear(dim, inner * 2)

  def __call__(self, x):
    hidden, gate = jnp.split(self.proj(x), 2, axis=-1)
    return hidden * jax.nn.gelu(gate, approximate=False)  # diffusers' GEGLU uses exact gelu


class FeedForward(nnx.Module):
  def __init__(self, dim: int, layers: Layers):
    # torch: net.0 = GEGLU, net.1 = Dropout, net.2 = Linear. A parameterless placeholder keeps the indices.
    self.net = nnx.List([GEGLU(dim, dim * 4, layers), None, layers.linear(dim * 4, dim)])

  def __call__(self, x):
    return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
  def __init__(self, dim: int, heads: int, cross_dim: int, layers: Layers, attention_impl: str | None):
    head_dim = dim // heads
    self.norm1 = layers.layer_norm(dim, 1e-5)
    self.attn1 = Attention(dim, heads, head_dim, layers, implementation=attention_impl)
    self.norm2 = layers.layer_norm(dim, 1e-5)
    self.attn2 = Attention(dim, heads, head_dim, layers, context_dim=cross_dim, implementation=attention_impl)
    self.norm3 = layers.layer_norm(dim, 1e-5)
    self.ff = FeedForward(dim, layers)

  def __call__(self, x_BTC, context_BSD):
    x_BTC = x_BTC + self.attn1(self.norm1(x_BTC))
    x_BTC = x_BTC + self.attn2(self.norm2(x_BTC), context_BSD)
    return x_BTC + self.ff(self.norm3(x_BTC))


class Transformer2DModel(nnx.Module):
  def __init__(self, channels: int, heads: int, depth: int, config: UNetConfig, layers: Layers,
               attention_impl: str | None):
    self.linear = config.use_linear_projection
    self.norm = layers.group_norm(channels, config.norm_num_groups, 1e-6)  # eps fixed at 1e-6 in diffusers
    project = (lambda: layers.linear(channels, channels)) if self.linear else (
        lambda: layers.conv(channels, channels, kernel=1))
    self.proj_in = project()
    self.transformer_blocks = nnx.List([
        BasicTransformerBlock(channels, heads, config.cross_attention_dim, layers, attention_impl)
        for _ in range(depth)])
    self.proj_out = project()

  def __call__(self, x_BHWC, context_BSD):
    b, h, w, c = x_BHWC.shape
    # 1x1 conv and linear projections are the same map on NHWC; the order vs reshape does not matter here.
    tokens_BTC = self.proj_in(self.norm(x_BHWC)).reshape(b, h * w, c)
    for block in self.transformer_blocks:
      tokens_BTC = block(tokens_BTC, context_BSD)
    return self.proj_out(tokens_BTC.reshape(b, h, w, c)) + x_BHWC


class UNetBlock(nnx.Module):
  """Down, mid or up block: resnets interleaved with optional attentions, then an optional resampler."""

  def __init__(self, resnets: list, attentions: list | None, downsamplers=None, upsamplers=None):
    self.resnets = nnx.List(resnets)
    self.attentions = nnx.List(attentions) if attentions else None
    self.downsamplers = nnx.List([downsamplers]) if downsamplers is not None else None
    self.upsamplers = nnx.List([upsamplers]) if upsamplers is not None else None


REMAT_POLICIES = ("none", "full", "dots", "attention")


def remat_policy(remat: bool | str) -> str | None:
  """config.remat -> None or one of REMAT_POLICIES (True = "full"); anything else is an error naming the value."""
  if remat in (False, None, "", "none"):
    return None
  if remat is True:
    return "full"
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r}: expected one of {list(REMAT_POLICIES)} (or True/False)")
  return remat


class UNet2DConditionModel(nnx.Module):
  def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               attention_impl: str | None = "auto", remat: bool | str = False):
    attention_impl = check_attention(attention_impl)  # at build time, not first at trace time
    layers = Layers(rngs, dtype, param_dtype)
    self.config, self.remat, self.dtype = config, remat_policy(remat), dtype
    ch = config.block_out_channels
    groups, eps = config.norm_num_groups, config.norm_eps
    temb_dim = ch[0] * 4
    self.conv_in = layers.conv(config.in_channels, ch[0])
    self.time_embedding = TimestepEmbedding(ch[0], temb_dim, layers)
    # SDXL: diffusers' add_time_proj (parameterless sinusoids) + add_embedding (2816 -> 1280 for SDXL base).
    self.add_embedding = (TimestepEmbedding(config.projection_class_embeddings_input_dim, temb_dim, layers)
                          if config.addition_embed_type == "text_time" else None)
    resnet = lambda c_in, c_out, scale=1.0: ResnetBlock2D(c_in, c_out, temb_dim, groups, eps, layers, scale)
    transformer = lambda c, i: Transformer2DModel(c, config.heads[i], config.transformer_layers[i], config,
                                                  layers, attention_impl)
    n = len(ch)

    down_blocks, c_prev = [], ch[0]
    for i, block_type in enumerate(config.down_block_types):
      c = ch[i]
      resnets = [resnet(c_prev if j == 0 else c, c) for j in range(config.layers_per_block)]
      attns = ([transformer(c, i) for _ in range(config.layers_per_block)]
               if block_type.startswith("CrossAttn") else None)
      down = Downsample2D(c, config.downsample_padding, layers) if i < n - 1 else None
      down_blocks.append(UNetBlock(resnets, attns, downsamplers=down))
      c_prev = c
    self.down_blocks = nnx.List(down_blocks)

    self.mid_block = UNetBlock([resnet(ch[-1], ch[-1], config.mid_block_scale_factor),
                                resnet(ch[-1], ch[-1], config.mid_block_scale_factor)],
                               [transformer(ch[-1], n - 1)])

    up_blocks, rev = [], list(reversed(ch))
    for i, block_type in enumerate(config.up_block_types):
      c_prev_out, c_out, c_in = rev[max(i - 1, 0)], rev[i], rev[min(i + 1, n - 1)]
      resnets = []
      for j in range(config.layers_per_block + 1):
        skip = c_in if j == config.layers_per_block else c_out
        resnets.append(resnet((c_prev_out if j == 0 else c_out) + skip, c_out))
      attns = ([transformer(c_out, n - 1 - i) for _ in range(config.layers_per_block + 1)]
               if block_type.startswith("CrossAttn") else None)
      up = Upsample2D(c_out, layers) if i < n - 1 else None
      up_blocks.append(UNetBlock(resnets, attns, upsamplers=up))
    self.up_blocks = nnx.List(up_blocks)

    self.conv_norm_out = layers.group_norm(ch[0], groups, eps)
    self.conv_out = layers.conv(ch[0], config.out_channels)

  def _apply(self, module, *args, attention: bool = False):
    # Rematerialise blocks on the backward pass when asked (memory for compute): "full" keeps only block inputs,
    # "dots" also keeps matmul outputs (less recompute), "attention" remats the transformer blocks only.
    if self.remat and (self.remat != "attention" or attention):
      policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if self.remat == "dots" else None
      return nnx.remat(lambda m, *a: m(*a), policy=policy)(module, *args)
    return module(*args)

  def added_embedding(self, added_cond: dict | None, batch: int):
    """SDXL's "text_time" embedding (B, temb): diffusers' get_aug_embed. added_cond = {"text_embeds": (B, P),
    "time_ids": (B, K)} (K = 6 for SDXL base: original size, crop top-left, target size; 5 for the refiner)."""
    config = self.config
    if config.addition_embed_type is None:
      if added_cond is not None:
        raise ValueError("UNet: added_cond was given, but this UNet's config has no addition_embed_type "
                         "(an SD 1.x/2.x UNet takes no added conditioning)")
      return None
    if added_cond is None or not all(k in added_cond for k in ("text_embeds", "time_ids")):
      raise ValueError("UNet: addition_embed_type 'text_time' (SDXL) needs added_cond={'text_embeds': (B, P), "
                       f"'time_ids': (B, K)}}; got {None if added_cond is None else sorted(added_cond)}")
    text_BP, ids_BK = jnp.asarray(added_cond["text_embeds"]), jnp.asarray(added_cond["time_ids"])
    if ids_BK.ndim == 1:
      ids_BK = ids_BK[None]
    text_BP = jnp.broadcast_to(text_BP, (batch, text_BP.shape[-1]))
    ids_BK = jnp.broadcast_to(ids_BK, (batch, ids_BK.shape[-1]))
    width = text_BP.shape[-1] + ids_BK.shape[-1] * config.addition_time_embed_dim
    if width != config.projection_class_embeddings_input_dim:
      raise ValueError(f"UNet: text_embeds {text_BP.shape} and time_ids {ids_BK.shape} give {width} features, "
                       f"projection_class_embeddings_input_dim is {config.projection_class_embeddings_input_dim}")
    time_BKD = timestep_embedding(ids_BK.reshape(-1), config.addition_time_embed_dim, config.flip_sin_to_cos,
                                  config.freq_shift)
    # Pooled text first, then the flattened time-id embeddings (diffusers' concat order).
    add_BF = jnp.concatenate([text_BP.astype(jnp.float32), time_BKD.reshape(batch, -1)], axis=-1)
    return self.add_embedding(add_BF.astype(self.dtype))

  def __call__(self, x_BHWC, t_B, context_BSD, added_cond: dict | None = None):
    """Predicts noise (or v) for latents x_BHWC at integer/float timesteps t_B given text states context_BSD.

    added_cond: SDXL's conditioning (diffusers' added_cond_kwargs) {"text_embeds": pooled text_encoder_2
    projection (B, 1280), "time_ids": (B, 6) = (orig_h, orig_w, crop_top, crop_left, target_h, target_w) in
    pixels}; a single (K,) or (1, K) row of time ids is broadcast over the batch. Required for an
    addition_embed_type "text_time" UNet (ValueError without it), refused (ValueError) by an SD 1.x/2.x UNet.
    """
    aug_BD = self.added_embedding(added_cond, x_BHWC.shape[0])  # first: a wrong added_cond fails before any work
    t_B = jnp.broadcast_to(jnp.asarray(t_B), (x_BHWC.shape[0],))
    temb_BD = self.time_embedding(timestep_embedding(
        t_B, self.config.block_out_channels[0], self.config.flip_sin_to_cos, self.config.freq_shift
    ).astype(self.dtype))
    if aug_BD is not None:
      temb_BD = temb_BD + aug_BD
    context_BSD = context_BSD.astype(self.dtype)
    h = self.conv_in(x_BHWC.astype(self.dtype))
    skips = [h]
    for block in self.down_blocks:
      for j, res in enumerate(block.resnets):
        h = self._apply(res, h, temb_BD)
        if block.attentions is not None:
          h = self._apply(block.attentions[j], h, context_BSD, attention=True)
        skips.append(h)
      if block.downsamplers is not None:
        h = block.downsamplers[0](h)
        skips.append(h)

    h = self._apply(self.mid_block.resnets[0], h, temb_BD)
    h = self._apply(self.mid_block.attentions[0], h, context_BSD, attention=True)
    h = self._apply(self.mid_block.resnets[1], h, temb_BD)

    for block in self.up_blocks:
      for j, res in enumerate(block.resnets):
        h = self._apply(res, jnp.concatenate([h, skips.pop()], axis=-1), temb_BD)
        if block.attentions is not None:
          h = self._apply(block.attentions[j], h, context_BSD, attention=True)
      if block.upsamplers is not None:
        h = block.upsamplers[0](h)

    return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


def latent_size_ok(config: UNetConfig, height: int, width: int) -> bool:
  factor = 2 ** (len(config.block_out_channels) - 1)
  return height % factor == 0 and width % factor == 0

