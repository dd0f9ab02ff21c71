"""The T5 v1.1 encoder as transformers' T5EncoderModel (Flux's text_encoder_2, T5-XXL), in Flax NNX.

T5 v1.1: RMS layer norms without mean subtraction or bias, attention without the 1/sqrt(d) logit scale and with a
learned relative position bias (computed by the first layer, shared by all), a gated-GELU feed-forward
(gelu_new = tanh approximation), a final layer norm. Parameter paths = transformers' state-dict keys
(`shared.weight`, `encoder.block.0.layer.0.SelfAttention.q.weight`, `encoder.block.0.layer.1.DenseReluDense.wi_0
.weight`, `encoder.final_layer_norm.weight`); `encoder.embed_tokens.weight` is the same tensor as `shared.weight`
(tied), which `t5_encoder_keys` folds into one.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreambooth_jax.models.layers import Layers, activation, attention


@dataclasses.dataclass(frozen=True)
class T5Config:
  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dense_act_fn: str = "gelu_new"
  is_gated_act: bool = True

  @classmethod
  def from_dict(cls, config: dict) -> "T5Config":
    where = "text_encoder_2"
    if config.get("model_type", "t5") not in ("t5",):
      raise ValueError(f"{where}: config key 'model_type' = {config['model_type']!r} is not supported "
                       "(supported: 't5')")
    # transformers' T5Config: "gated-gelu" (v1.1) -> gated, gelu_new; "relu" (original T5) -> ungated relu.
    proj = config.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
      raise ValueError(f"{where}: config key 'feed_forward_proj' = {proj!r} is not supported "
                       "(expected 'gated-<act>' or '<act>')")
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    activation(act, f"{where}: feed_forward_proj {proj!r}")  # fails now for an activation we do not have
    fields = {f.name for f in dataclasses.fields(cls)} - {"dense_act_fn", "is_gated_act"}
    return cls(**{k: v for k, v in config.items() if k in fields}, dense_act_fn=act,
               is_gated_act=parts[0] == "gated")


class T5LayerNorm(nnx.Module):
  """x / rms(x) * weight: no mean subtraction, no bias; the mean of squares in fp32 (as transformers). The weight is
  `scale`, as every norm's here (the converter names it `weight`)."""

  def __init__(self, dim: int, eps: float, layers: Layers):
    self.scale = nnx.Param(jnp.ones((dim,), layers.param_dtype))
    self.eps, self.dtype = eps, layers.dtype

  def __call__(self, x_BTD):
    variance = jnp.mean(jnp.square(x_BTD.astype(jnp.float32)), axis=-1, keepdims=True)
    return (self.scale.get_value().astype(self.dtype) * (x_BTD * jax.lax.rsqrt(variance + self.eps))
            .astype(self.dtype))


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """transformers' T5Attention._relative_position_bucket for a bidirectional encoder, (T, S) int32 (static shapes:
  computed in numpy at trace time). Half the buckets per direction, half of those exact, the rest log-spaced up to
  max_distance."""
  relative_TS = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
  num_buckets //= 2
  buckets = (relative_TS > 0).astype(np.int64) * num_buckets
  distance = np.abs(relative_TS)
  max_exact = num_buckets // 2
  with np.errstate(divide="ignore"):  # log(0) for the exact buckets, not used there
    # float32 as torch computes it, then truncation toward zero (torch's .to(long))
    log_ratio = np.log(distance.astype(np.float32) / max_exact) / np.float32(math.log(max_distance / max_exact))
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(np.float32)
  large = np.minimum(np.where(distance < max_exact, 0, large).astype(np.int64), num_buckets - 1)
  return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


class T5Attention(nnx.Module):
  def __init__(self, config: T5Config, has_relative_attention_bias: bool, layers: Layers):
    inner = config.num_heads * config.d_kv
    self.config = config
    self.q = layers.linear(config.d_model, inner, use_bias=False)
    self.k = layers.linear(config.d_model, inner, use_bias=False)
    self.v = layers.linear(config.d_model, inner, use_bias=False)
    self.o = layers.linear(inner, config.d_model, use_bias=False)
    self.relative_attention_bias = (layers.embed(config.relative_attention_num_buckets, config.num_heads)
                                    if has_relative_attention_bias else None)

  def position_bias(self, length: int):
    """(1, N, T, T) relative position bias of a sequence of `length` tokens."""
    c = self.config
    buckets_TT = relative_position_buckets(length, length, c.relative_attention_num_buckets,
                                           c.relative_attention_max_distance)
    return self.relative_attention_bias(jnp.asarray(buckets_TT)).transpose(2, 0, 1)[None]

  def __call__(self, x_BTD, bias_1NTT):
    split = lambda y: y.reshape(*y.shape[:2], self.config.num_heads, self.config.d_kv)
    out_BTNH = attention(split(self.q(x_BTD)), split(self.k(x_BTD)), split(self.v(x_BTD)),
                         bias=bias_1NTT.astype(x_BTD.dtype), scale=1.0)  # T5: no 1/sqrt(d) scale
    return self.o(out_BTNH.reshape(*x_BTD.shape[:2], -1))


class T5LayerSelfAttention(nnx.Module):
  def __init__(self, config: T5Config, has_relative_attention_bias: bool, layers: Layers):
    self.SelfAttention = T5Attention(config, has_relative_attention_bias, layers)
    self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon, layers)

  def __call__(self, x_BTD, bias_1NTT):
    return x_BTD + self.SelfAttention(self.layer_norm(x_BTD), bias_1NTT)


class T5DenseGatedActDense(nnx.Module):
  def __init__(self, config: T5Config, layers: Layers):
    self.act = activation(config.dense_act_fn, "text_encoder_2")
    self.wi_0 = layers.linear(config.d_model, config.d_ff, use_bias=False)
    self.wi_1 = layers.linear(config.d_model, config.d_ff, use_bias=False)
    self.wo = layers.linear(config.d_ff, config.d_model, use_bias=False)

  def __call__(self, x):
    return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))


class T5DenseActDense(nnx.Module):
  def __init__(self, config: T5Config, layers: Layers):
    self.act = activation(config.dense_act_fn, "text_encoder_2")
    self.wi = layers.linear(config.d_model, config.d_ff, use_bias=False)
    self.wo = layers.linear(config.d_ff, config.d_model, use_bias=False)

  def __call__(self, x):
    return self.wo(self.act(self.wi(x)))


class T5LayerFF(nnx.Module):
  def __init__(self, config: T5Config, layers: Layers):
    dense = T5DenseGatedActDense if config.is_gated_act else T5DenseActDense
    self.DenseReluDense = dense(config, layers)
    self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon, layers)

  def __call__(self, x_BTD):
    return x_BTD + self.DenseReluDense(self.layer_norm(x_BTD))


def clamp_fp16(x):
  """transformers clamps each layer's output to the fp16 range (T5 overflows there); a no-op in fp32/bf16."""
  if x.dtype != jnp.float16:
    return x
  big = jnp.finfo(jnp.float16).max
  limit = jnp.where(jnp.isinf(x).any(), big - 1000, big).astype(x.dtype)
  return jnp.clip(x, -limit, limit)


class T5Block(nnx.Module):
  def __init__(self, config: T5Config, has_relative_attention_bias: bool, layers: Layers):
    self.layer = nnx.List([T5LayerSelfAttention(config, has_relative_attention_bias, layers),
                           T5LayerFF(config, layers)])

  def __call__(self, x_BTD, bias_1NTT):
    x_BTD = clamp_fp16(self.layer[0](x_BTD, bias_1NTT))
    return clamp_fp16(self.layer[1](x_BTD))


class T5Stack(nnx.Module):
  def __init__(self, config: T5Config, layers: Layers):
    self.block = nnx.List([T5Block(config, i == 0, layers) for i in range(config.num_layers)])
    self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon, layers)

  def __call__(self, x_BTD):
    bias_1NTT = self.block[0].layer[0].SelfAttention.position_bias(x_BTD.shape[1])  # shared by every layer
    for block in self.block:
      x_BTD = block(x_BTD, bias_1NTT)
    return self.final_layer_norm(x_BTD)


class T5EncoderModel(nnx.Module):
  """transformers' T5EncoderModel (no attention mask: FluxPipeline and diffusers' Flux training encode the padded
  ids without one). Returns last_hidden_state (B, T, d_model)."""

  def __init__(self, config: T5Config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    layers = Layers(rngs, dtype, param_dtype)
    self.config = config
    self.shared = layers.embed(config.vocab_size, config.d_model)
    self.encoder = T5Stack(config, layers)

  def __call__(self, ids_BT):
    return self.encoder(self.shared(ids_BT))


def t5_encoder_keys(state_dict: dict) -> dict:
  """transformers' T5EncoderModel keys, the tied `encoder.embed_tokens.weight` folded into `shared.weight` (files
  hold either or both; both must then agree)."""
  out = dict(state_dict)
  tied = out.pop("encoder.embed_tokens.weight", None)
  if tied is not None:
    shared = out.setdefault("shared.weight", tied)
    if shared.shape != tied.shape or not np.array_equal(np.asarray(shared), np.asarray(tied)):
      raise ValueError("text_encoder_2: 'shared.weight' and 'encoder.embed_tokens.weight' differ; a T5 encoder ties "
                       "them (re-save the checkpoint with transformers)")
  return out
