"""CLIP text encoders as transformers' CLIPTextModel (Stable Diffusion's conditioning) and
CLIPTextModelWithProjection (SDXL's text_encoder_2, OpenCLIP bigG), in Flax NNX.

The transformer layers (CLIPEncoder) are shared with the CLIP vision tower used by evaluation.

Parameter paths and checkpoint keys:
  - CLIPTextModel: transformers' keys without the `text_model.` prefix (`embeddings.token_embedding.weight`, ...);
    weights.normalize_keys strips the prefix that hub checkpoints (and transformers 4.x) carry.
  - CLIPTextModelWithProjection: exactly transformers' keys, prefix included (`text_model.embeddings...`,
    `text_model.final_layer_norm.weight`, `text_projection.weight`): that is what its state_dict() gives (4.x and
    5.x) and what SDXL's text_encoder_2/model.safetensors holds, so the prefix must be KEPT when loading it (do not
    pass its state dict through normalize_keys(..., "text_encoder")). `projection_model_keys` accepts both spellings.

SDXL conditions on the *penultimate* hidden state of both encoders (hidden_states[-2], not through the final layer
norm) and on text_encoder_2's projected pooled output: see `encode`.
"""

import dataclasses

import jax
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CLIPTextOutput:
  """What `encode` returns (a pytree: fine as a jit output).

  penultimate: (B, T, D) hidden_states[-2], the output of the second-to-last layer WITHOUT the final layer norm
    (what SDXL concatenates as context: diffusers' `output_hidden_states=True ... hidden_states[-2]`).
  last: (B, T, D) final_layer_norm(last layer) = transformers' last_hidden_state.
  pooled: (B, D) `last` at the EOS position = transformers' pooler_output.
  text_embeds: (B, projection_dim) text_projection(pooled) for CLIPTextModelWithProjection (SDXL's pooled
    conditioning), None for CLIPTextModel.
  """

  penultimate: jax.Array
  last: jax.Array
  pooled: jax.Array
  text_embeds: jax.Array | None = None


def eos_positions(ids_BT, eos_token_id: int):
  """transformers' pooling position: eos_token_id == 2 marks old configs (SD, SDXL hub configs) whose EOS is the
  highest id (argmax of the ids); otherwise the first position holding eos_token_id. (For CLIP-tokenized ids padded
  with "!" = 0 or with EOS both rules find the first EOS.)"""
  if eos_token_id == 2:
    return jnp.argmax(ids_BT, axis=-1)
  return jnp.argmax((ids_BT == eos_token_id).astype(jnp.int32), axis=-1)


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
    return last_BTD, self._pool(ids_BT, hidden_states[-1])

  def _pool(self, ids_BT, hidden_BTD):
    eos_B = eos_positions(ids_BT, self.config.eos_token_id)
    return jnp.take_along_axis(self.final_layer_norm(hidden_BTD), eos_B[:, None, None], axis=1)[:, 0]

  def encode(self, ids_BT) -> CLIPTextOutput:
    """Penultimate and last hidden states and the pooled output in one pass (text_embeds None)."""
    hidden_states = self.encoder(self.embeddings(ids_BT), causal=True)
    last_BTD = self.final_layer_norm(hidden_states[-1])
    eos_B = eos_positions(ids_BT, self.config.eos_token_id)
    pooled_BD = jnp.take_along_axis(last_BTD, eos_B[:, None, None], axis=1)[:, 0]
    return CLIPTextOutput(penultimate=hidden_states[-2], last=last_BTD, pooled=pooled_BD)


class CLIPTextModelWithProjection(nnx.Module):
  """transformers' CLIPTextModelWithProjection (SDXL's text_encoder_2): a CLIPTextModel under `text_model` and a
  bias-free `text_projection`. Parameter paths = its state-dict keys, `text_model.` prefix included."""

  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    self.config = config
    self.text_model = CLIPTextModel(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.text_projection = Layers(rngs, dtype, param_dtype).linear(config.hidden_size, config.projection_dim,
                                                                   use_bias=False)

  def __call__(self, ids_BT):
    """Returns (text_embeds_BP, last_hidden_state_BTD), as transformers' output fields."""
    out = self.encode(ids_BT)
    return out.text_embeds, out.last

  def encode(self, ids_BT) -> CLIPTextOutput:
    out = self.text_model.encode(ids_BT)
    return dataclasses.replace(out, text_embeds=self.text_projection(out.pooled))


# config.json "architectures" / model_index.json class name -> our module.
TEXT_MODEL_CLASSES = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}


def projection_model_keys(state_dict: dict) -> dict:
  """A CLIPTextModelWithProjection state dict in our (= transformers') key spelling: keys without the
  `text_model.` prefix (as some converters write them) get it back, the position_ids buffer is dropped."""
  out = {}
  for key, value in state_dict.items():
    if key.endswith("embeddings.position_ids"):
      continue
    if not key.startswith(("text_model.", "text_projection.")):
      key = f"text_model.{key}"
    out[key] = value
  return out


def hub_keys(state_dict: dict) -> dict:
  """Our CLIP state dict as hub checkpoints (and transformers 4.x) write it: the transformer under `text_model.`
  (what a diffusers folder's text_encoder*/ holds; the inverse of the loader's key clean-up)."""
  return {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
          for k, v in state_dict.items()}
