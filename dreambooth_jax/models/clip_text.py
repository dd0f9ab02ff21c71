"""CLIP text encoder as transformers' CLIPTextModel (Stable Diffusion's conditioning), in Flax NNX.

The transformer layers (CLIPEncoder) are shared with the CLIP vision tower used by evaluation.
"""

import dataclasses

import jax.numpy as jnp
from flax import nnx

from dreambooth_jax.models.layers import Layers, activation, attention


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  projection_dim: int = 768

  @classmethod
  def from_dict(cls, config: dict) -> "CLIPTextConfig":
    config = config.get("text_config", config)  # a full CLIPModel config.json holds it nested
    if config.get("model_type", "clip_text_model") not in ("clip_text_model", "clip"):
      raise ValueError(f"text_encoder: config key 'model_type' = {config['model_type']!r} is not supported "
                       "(supported: 'clip_text_model')")
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in fields})


class CLIPAttention(nnx.Module):
  def __init__(self, dim: int, heads: int, layers: Layers):
    self.heads = heads
    self.q_proj, self.k_proj = layers.linear(dim, dim), layers.linear(dim, dim)
    self.v_proj, self.out_proj = layers.linear(dim, dim), layers.linear(dim, dim)

  def __call__(self, x_BTD, causal: bool):
    split = lambda y: y.reshape(*y.shape[:2], self.heads, -1)
    out = attention(split(self.q_proj(x_BTD)), split(self.k_proj(x_BTD)), split(self.v_proj(x_BTD)),
                    is_causal=causal)
    return self.out_proj(out.reshape(x_BTD.shape))


class CLIPMLP(nnx.Module):
  def __init__(self, dim: int, hidden: int, act: str, layers: Layers):
    self.act = activation(act, "CLIP")
    self.fc1, self.fc2 = layers.linear(dim, hidden), layers.linear(hidden, dim)

  def __call__(self, x):
    return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
  def __init__(self, dim: int, heads: int, hidden: int, act: str, eps: float, layers: Layers):
    self.self_attn = CLIPAttention(dim, heads, layers)
    self.layer_norm1 = layers.layer_norm(dim, eps)
    self.mlp = CLIPMLP(dim, hidden, act, layers)
    self.layer_norm2 = layers.layer_norm(dim, eps)

  def __call__(self, x_BTD, causal: bool):
    x_BTD = x_BTD + self.self_attn(self.layer_norm1(x_BTD), causal)
    return x_BTD + self.mlp(self.layer_norm2(x_BTD))


class CLIPEncoder(nnx.Module):
  def __init__(self, num_layers: int, dim: int, heads: int, hidden: int, act: str, eps: float, layers: Layers):
    self.layers = nnx.List([CLIPEncoderLayer(dim, heads, hidden, act, eps, layers) for _ in range(num_layers)])

  def __call__(self, x_BTD, causal: bool):
    """Returns every hidden state: [embeddings, after layer 1, ..., after the last layer]."""
    hidden_states = [x_BTD]
    for layer in self.layers:
      x_BTD = layer(x_BTD, causal)
      hidden_states.append(x_BTD)
    return hidden_states


class CLIPTextEmbeddings(nnx.Module):
  def __init__(self, config: CLIPTextConfig, layers: Layers):
    self.token_embedding = layers.embed(config.vocab_size, config.hidden_size)
    self.position_embedding = layers.embed(config.max_position_embeddings, config.hidden_size)

  def __call__(self, ids_BT):
    return self.token_embedding(ids_BT) + self.position_embedding(jnp.arange(ids_BT.shape[1]))[None]


class CLIPTextModel(nnx.Module):
  """Parameter paths = transformers' CLIPTextModel keys without the `text_model.` prefix."""

  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    layers = Layers(rngs, dtype, param_dtype)
    self.config = config
    self.embeddings = CLIPTextEmbeddings(config, layers)
    self.encoder = CLIPEncoder(config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                               config.intermediate_size, config.hidden_act, config.layer_norm_eps, layers)
    self.final_layer_norm = layers.layer_norm(config.hidden_size, config.layer_norm_eps)

  def __call__(self, ids_BT, *, skip_last_layers: int = 0):
    """Returns (last_hidden_state_BTD, pooled_BD).

    skip_last_layers > 0 is the "CLIP skip" of the SD UIs: the hidden state that many layers before the end,
    passed through the final layer norm (as diffusers' `clip_skip`).
    """
    hidden_states = self.encoder(self.embeddings(ids_BT), causal=True)
    last_BTD = self.final_layer_norm(hidden_states[-1 - skip_last_layers])
    # transformers: eos_token_id == 2 marks old configs whose eos is the highest id; otherwise the first eos.
    if self.config.eos_token_id == 2:
      eos_B = jnp.argmax(ids_BT, axis=-1)
    else:
      eos_B = jnp.argmax((ids_BT == self.config.eos_token_id).astype(jnp.int32), axis=-1)
    pooled_BD = jnp.take_along_axis(self.final_layer_norm(hidden_states[-1]), eos_B[:, None, None], axis=1)[:, 0]
    return last_BTD, pooled_BD
