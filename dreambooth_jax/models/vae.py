"""diffusers' AutoencoderKL (the Stable Diffusion VAE) in Flax NNX, NHWC."""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dreambooth_jax.models.layers import Layers, attention, require
from dreambooth_jax.models.unet import Downsample2D, ResnetBlock2D, UNetBlock, Upsample2D

VAE_EPS = 1e-6  # diffusers hard-codes the VAE's norm eps (resnets, attention, conv_norm_out)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0
  mid_block_add_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  force_upcast: bool = True  # the VAE overflows in fp16 (diffusers' default; SDXL pipelines honour it)

  @classmethod
  def from_dict(cls, config: dict) -> "VAEConfig":
    where = "vae"
    require(config, "act_fn", ("silu",), where)
    channels = tuple(config.get("block_out_channels", cls.block_out_channels))
    n = len(channels)
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
      types = tuple(config.get(key, (kind,) * n))
      if types != (kind,) * n:
        raise ValueError(f"{where}: config key {key!r} = {list(types)} is not supported ({n} x {kind!r} expected)")
    return cls(
        in_channels=config.get("in_channels", 3), out_channels=config.get("out_channels", 3),
        latent_channels=config.get("latent_channels", 4), block_out_channels=channels,
        layers_per_block=config.get("layers_per_block", 2), norm_num_groups=config.get("norm_num_groups", 32),
        scaling_factor=config.get("scaling_factor", 0.18215), shift_factor=config.get("shift_factor") or 0.0,
        mid_block_add_attention=config.get("mid_block_add_attention", True),
        use_quant_conv=config.get("use_quant_conv", True), use_post_quant_conv=config.get("use_post_quant_conv", True),
        force_upcast=bool(config.get("force_upcast", True)),
    )


class VAEAttention(nnx.Module):
  """Single-head spatial self-attention with its own group norm and a residual (diffusers' mid-block Attention)."""

  def __init__(self, channels: int, groups: int, layers: Layers):
    self.group_norm = layers.group_norm(channels, groups, VAE_EPS)
    self.to_q, self.to_k = layers.linear(channels, channels), layers.linear(channels, channels)
    self.to_v = layers.linear(channels, channels)
    self.to_out = nnx.List([layers.linear(channels, channels)])

  def __call__(self, x_BHWC):
    b, h, w, c = x_BHWC.shape
    tokens = self.group_norm(x_BHWC).reshape(b, h * w, 1, c)
    out = attention(self.to_q(tokens), self.to_k(tokens), self.to_v(tokens))
    return self.to_out[0](out.reshape(b, h, w, c)) + x_BHWC


def mid_block(c: int, config: VAEConfig, layers: Layers) -> UNetBlock:
  resnet = lambda: ResnetBlock2D(c, c, None, config.norm_num_groups, VAE_EPS, layers)
  attns = [VAEAttention(c, config.norm_num_groups, layers)] if config.mid_block_add_attention else None
  return UNetBlock([resnet(), resnet()], attns)


def run_mid_block(block: UNetBlock, x):
  x = block.resnets[0](x)
  if block.attentions is not None:
    x = block.attentions[0](x)
  return block.resnets[1](x)


class Encoder(nnx.Module):
  def __init__(self, config: VAEConfig, layers: Layers):
    ch, groups = config.block_out_channels, config.norm_num_groups
    self.conv_in = layers.conv(config.in_channels, ch[0])
    blocks, c_prev = [], ch[0]
    for i, c in enumerate(ch):
      resnets = [ResnetBlock2D(c_prev if j == 0 else c, c, None, groups, VAE_EPS, layers)
                 for j in range(config.layers_per_block)]
      down = Downsample2D(c, 0, layers) if i < len(ch) - 1 else None
      blocks.append(UNetBlock(resnets, None, downsamplers=down))
      c_prev = c
    self.down_blocks = nnx.List(blocks)
    self.mid_block = mid_block(ch[-1], config, layers)
    self.conv_norm_out = layers.group_norm(ch[-1], groups, VAE_EPS)
    self.conv_out = layers.conv(ch[-1], 2 * config.latent_channels)

  def __call__(self, x_BHWC):
    h = self.conv_in(x_BHWC)
    for block in self.down_blocks:
      for res in block.resnets:
        h = res(h)
      if block.downsamplers is not None:
        h = block.downsamplers[0](h)
    h = run_mid_block(self.mid_block, h)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class Decoder(nnx.Module):
  def __init__(self, config: VAEConfig, layers: Layers):
    rev, groups = list(reversed(config.block_out_channels)), config.norm_num_groups
    self.conv_in = layers.conv(config.latent_channels, rev[0])
    self.mid_block = mid_block(rev[0], config, layers)
    blocks, c_prev = [], rev[0]
    for i, c in enumerate(rev):
      resnets = [ResnetBlock2D(c_prev if j == 0 else c, c, None, groups, VAE_EPS, layers)
                 for j in range(config.layers_per_block + 1)]
      up = Upsample2D(c, layers) if i < len(rev) - 1 else None
      blocks.append(UNetBlock(resnets, None, upsamplers=up))
      c_prev = c
    self.up_blocks = nnx.List(blocks)
    self.conv_norm_out = layers.group_norm(rev[-1], groups, VAE_EPS)
    self.conv_out = layers.conv(rev[-1], config.out_channels)

  def __call__(self, z_BHWC):
    h = run_mid_block(self.mid_block, self.conv_in(z_BHWC))
    for block in self.up_blocks:
      for res in block.resnets:
        h = res(h)
      if block.upsamplers is not None:
        h = block.upsamplers[0](h)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class AutoencoderKL(nnx.Module):
  def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    layers = Layers(rngs, dtype, param_dtype)
    self.config, self.dtype = config, dtype
    self.encoder = Encoder(config, layers)
    self.decoder = Decoder(config, layers)
    z2 = 2 * config.latent_channels
    self.quant_conv = layers.conv(z2, z2, kernel=1) if config.use_quant_conv else None
    self.post_quant_conv = (layers.conv(config.latent_channels, config.latent_channels, kernel=1)
                            if config.use_post_quant_conv else None)

  def encode(self, pixels_BHWC):
    """Pixels in [-1, 1] -> (mean, std) of the latent posterior, unscaled (as diffusers' latent_dist)."""
    moments = self.encoder(pixels_BHWC.astype(self.dtype))
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))

  # The one home of the latent-scaling rule (diffusers: latents = (z - shift_factor) * scaling_factor): training
  # scales the posterior sample, sampling unscales before decoding.
  def scale_latents(self, z_BHWC):
    """Posterior sample -> the denoiser's latent space."""
    return (z_BHWC - self.config.shift_factor) * self.config.scaling_factor

  def unscale_latents(self, latents_BHWC):
    """The denoiser's latent space -> what decode takes."""
    return latents_BHWC / self.config.scaling_factor + self.config.shift_factor

  def decode(self, z_BHWC):
    """Unscaled latents -> pixels (about [-1, 1])."""
    z_BHWC = z_BHWC.astype(self.dtype)
    if self.post_quant_conv is not None:
      z_BHWC = self.post_quant_conv(z_BHWC)
    return self.decoder(z_BHWC)

