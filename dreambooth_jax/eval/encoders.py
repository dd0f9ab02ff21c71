"""The image/text encoders of DreamBooth's metrics, in Flax NNX: DINO (transformers' ViTModel) and CLIP
(transformers' CLIPModel). Images are NHWC float arrays as preprocess.py makes them.

Attribute names mirror the torch module names of the checkpoints on the hub (`encoder.layer.0.attention.attention
.query`, `vision_model.pre_layrnorm` [sic]), so weights.load_module converts a state dict without key tables.
"""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

from dreambooth_jax.io import safetensors as safetensors_io
from dreambooth_jax.models.clip_text import CLIPEncoder, CLIPTextConfig, CLIPTextModel
from dreambooth_jax.models.layers import Layers, activation, attention
from dreambooth_jax.io.safetensors import CheckpointError
from dreambooth_jax.io.diffusers_folder import fetch_from_hub, load_module


def config_fields(cls, config: dict) -> dict:
  names = {f.name for f in dataclasses.fields(cls)}
  return {k: v for k, v in config.items() if k in names}


# ------------------------------------------------------------------------------------------------ DINO (ViT)

@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """transformers' ViTConfig defaults (dino-vits16's config.json overrides size, heads and layer_norm_eps)."""

  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  qkv_bias: bool = True

  @classmethod
  def from_dict(cls, config: dict) -> "ViTConfig":
    if config.get("model_type", "vit") != "vit":
      raise ValueError(f"DINO model: config key 'model_type' = {config['model_type']!r} is not supported "
                       "(supported: 'vit', e.g. facebook/dino-vits16; DINOv2 is a different architecture)")
    return cls(**config_fields(cls, config))


class ViTPatchEmbeddings(nnx.Module):
  def __init__(self, config: ViTConfig, layers: Layers):
    self.projection = layers.conv(config.num_channels, config.hidden_size, kernel=config.patch_size,
                                  stride=config.patch_size, padding=0)

  def __call__(self, pixels_BHWC):
    x_BhwD = self.projection(pixels_BHWC)
    return x_BhwD.reshape(x_BhwD.shape[0], -1, x_BhwD.shape[-1])  # row-major = torch's flatten(2).transpose


class ViTEmbeddings(nnx.Module):
  def __init__(self, config: ViTConfig, layers: Layers):
    self.config = config
    patches = (config.image_size // config.patch_size) ** 2
    init = nnx.initializers.truncated_normal(0.02)
    self.cls_token = nnx.Param(init(layers.rngs.params(), (1, 1, config.hidden_size), layers.param_dtype))
    self.position_embeddings = nnx.Param(
        init(layers.rngs.params(), (1, patches + 1, config.hidden_size), layers.param_dtype))
    self.patch_embeddings = ViTPatchEmbeddings(config, layers)

  def __call__(self, pixels_BHWC):
    size = self.config.image_size
    if pixels_BHWC.shape[1:] != (size, size, self.config.num_channels):
      raise ValueError(f"DINO model: expects images of shape (B, {size}, {size}, {self.config.num_channels}), "
                       f"got {pixels_BHWC.shape} (position-embedding interpolation is not implemented)")
    x_BND = self.patch_embeddings(pixels_BHWC.astype(self.patch_embeddings.projection.dtype))
    cls_B1D = jnp.broadcast_to(self.cls_token[...], (x_BND.shape[0], 1, x_BND.shape[-1])).astype(x_BND.dtype)
    return jnp.concatenate([cls_B1D, x_BND], axis=1) + self.position_embeddings[...].astype(x_BND.dtype)


class ViTSelfAttention(nnx.Module):
  def __init__(self, config: ViTConfig, layers: Layers):
    dim, self.heads = config.hidden_size, config.num_attention_heads
    self.query = layers.linear(dim, dim, use_bias=config.qkv_bias)
    self.key = layers.linear(dim, dim, use_bias=config.qkv_bias)
    self.value = layers.linear(dim, dim, use_bias=config.qkv_bias)

  def __call__(self, x_BTD):
    split = lambda y: y.reshape(*y.shape[:2], self.heads, -1)
    out = attention(split(self.query(x_BTD)), split(self.key(x_BTD)), split(self.value(x_BTD)))
    return out.reshape(x_BTD.shape)


class ViTSelfOutput(nnx.Module):
  def __init__(self, config: ViTConfig, layers: Layers):
    self.dense = layers.linear(config.hidden_size, config.hidden_size)

  def __call__(self, x):
    return self.dense(x)


class ViTAttention(nnx.Module):
  def __init__(self, config: ViTConfig, layers: Layers):
    self.attention = ViTSelfAttention(config, layers)
    self.output = ViTSelfOutput(config, layers)

  def __call__(self, x_BTD):
    return self.output(self.attention(x_BTD))


class ViTIntermediate(nnx.Module):
  def __init__(self, config: ViTConfig, layers: Layers):
    self.act = activation(config.hidden_act, "DINO model")
    self.dense = layers.linear(config.hidden_size, config.intermediate_size)

  def __call__(self, x):
    return self.act(self.dense(x))


class ViTOutput(nnx.Module):
  def __init__(self, config: ViTConfig, layers: Layers):
    self.dense = layers.linear(config.intermediate_size, config.hidden_size)

  def __call__(self, x):
    return self.dense(x)


class ViTLayer(nnx.Module):
  def __init__(self, config: ViTConfig, layers: Layers):
    self.attention = ViTAttention(config, layers)
    self.intermediate = ViTIntermediate(config, layers)
    self.output = ViTOutput(config, layers)
    self.layernorm_before = layers.layer_norm(config.hidden_size, config.layer_norm_eps)
    self.layernorm_after = layers.layer_norm(config.hidden_size, config.layer_norm_eps)

  def __call__(self, x_BTD):
    x_BTD = x_BTD + self.attention(self.layernorm_before(x_BTD))
    return x_BTD + self.output(self.intermediate(self.layernorm_after(x_BTD)))


class ViTEncoder(nnx.Module):
  def __init__(self, config: ViTConfig, layers: Layers):
    self.layer = nnx.List([ViTLayer(config, layers) for _ in range(config.num_hidden_layers)])

  def __call__(self, x_BTD):
    for layer in self.layer:
      x_BTD = layer(x_BTD)
    return x_BTD


class ViTModel(nnx.Module):
  """transformers' ViTModel without its pooler (DINO's features are the CLS token of the last hidden state)."""

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    layers = Layers(rngs, dtype, param_dtype)
    self.config = config
    self.embeddings = ViTEmbeddings(config, layers)
    self.encoder = ViTEncoder(config, layers)
    self.layernorm = layers.layer_norm(config.hidden_size, config.layer_norm_eps)

  def __call__(self, pixels_BHWC):
    """last_hidden_state (B, 1 + patches, D), after the final layer norm."""
    return self.layernorm(self.encoder(self.embeddings(pixels_BHWC)))

  def image_embeds(self, pixels_BHWC):
    return self(pixels_BHWC)[:, 0]


# ------------------------------------------------------------------------------------------------ CLIP

@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """transformers' CLIPVisionConfig defaults (= openai/clip-vit-base-patch32)."""

  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  text: CLIPTextConfig = CLIPTextConfig(hidden_size=512, intermediate_size=2048, num_attention_heads=8)
  vision: CLIPVisionConfig = CLIPVisionConfig()
  projection_dim: int = 512

  @classmethod
  def from_dict(cls, config: dict) -> "CLIPConfig":
    if config.get("model_type", "clip") != "clip":
      raise ValueError(f"CLIP model: config key 'model_type' = {config['model_type']!r} is not supported "
                       "(supported: 'clip', a full CLIPModel config.json with text_config and vision_config)")
    text = config.get("text_config") or {}
    # transformers' CLIPTextConfig defaults are the ViT-B/32 text tower (512 wide, 8 heads).
    text = {**dataclasses.asdict(cls.text), **config_fields(CLIPTextConfig, text)}
    vision = config_fields(CLIPVisionConfig, config.get("vision_config") or {})
    return cls(text=CLIPTextConfig(**text), vision=CLIPVisionConfig(**vision),
               projection_dim=config.get("projection_dim", 512))


class CLIPVisionEmbeddings(nnx.Module):
  def __init__(self, config: CLIPVisionConfig, layers: Layers):
    self.config = config
    dim = config.hidden_size
    self.class_embedding = nnx.Param(jax.random.normal(layers.rngs.params(), (dim,), layers.param_dtype) * 0.02)
    self.patch_embedding = nnx.Conv(config.num_channels, dim, kernel_size=(config.patch_size,) * 2,
                                    strides=(config.patch_size,) * 2, padding="VALID", use_bias=False,
                                    dtype=layers.dtype, param_dtype=layers.param_dtype, rngs=layers.rngs)
    self.position_embedding = layers.embed((config.image_size // config.patch_size) ** 2 + 1, dim)

  def __call__(self, pixels_BHWC):
    size = self.config.image_size
    if pixels_BHWC.shape[1:] != (size, size, self.config.num_channels):
      raise ValueError(f"CLIP model: expects images of shape (B, {size}, {size}, {self.config.num_channels}), "
                       f"got {pixels_BHWC.shape}")
    x_BhwD = self.patch_embedding(pixels_BHWC.astype(self.patch_embedding.dtype))
    x_BND = x_BhwD.reshape(x_BhwD.shape[0], -1, x_BhwD.shape[-1])
    cls_B1D = jnp.broadcast_to(self.class_embedding[...].astype(x_BND.dtype), (x_BND.shape[0], 1, x_BND.shape[-1]))
    x_BTD = jnp.concatenate([cls_B1D, x_BND], axis=1)
    return x_BTD + self.position_embedding(jnp.arange(x_BTD.shape[1]))[None]


class CLIPVisionTransformer(nnx.Module):
  def __init__(self, config: CLIPVisionConfig, layers: Layers):
    self.embeddings = CLIPVisionEmbeddings(config, layers)
    self.pre_layrnorm = layers.layer_norm(config.hidden_size, config.layer_norm_eps)
    self.encoder = CLIPEncoder(config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                               config.intermediate_size, config.hidden_act, config.layer_norm_eps, layers)
    self.post_layernorm = layers.layer_norm(config.hidden_size, config.layer_norm_eps)

  def __call__(self, pixels_BHWC):
    """The pooled output: the CLS token of the last hidden state, layer-normed."""
    last_BTD = self.encoder(self.pre_layrnorm(self.embeddings(pixels_BHWC)), causal=False)[-1]
    return self.post_layernorm(last_BTD[:, 0])


class CLIPModel(nnx.Module):
  """Parameter paths = transformers' CLIPModel keys (`text_model.`, `vision_model.`, `*_projection`)."""

  def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    layers = Layers(rngs, dtype, param_dtype)
    self.config = config
    self.text_model = CLIPTextModel(config.text, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.vision_model = CLIPVisionTransformer(config.vision, layers)
    self.visual_projection = layers.linear(config.vision.hidden_size, config.projection_dim, use_bias=False)
    self.text_projection = layers.linear(config.text.hidden_size, config.projection_dim, use_bias=False)
    self.logit_scale = nnx.Param(jnp.asarray(2.6592, param_dtype))  # log(1/0.07), transformers' init

  def image_embeds(self, pixels_BHWC):
    """(B, projection_dim), not normalised (as CLIPModel.get_image_features)."""
    return self.visual_projection(self.vision_model(pixels_BHWC))

  def text_embeds(self, ids_BT):
    """(B, projection_dim), not normalised (as CLIPModel.get_text_features)."""
    return self.text_projection(self.text_model(ids_BT)[1])


# ------------------------------------------------------------------------------------------------ loading

def resolve_folder(name_or_path, what: str) -> pathlib.Path:
  """A local folder as is; otherwise a hub id fetched with huggingface_hub (needs a network)."""
  path = pathlib.Path(str(name_or_path)).expanduser()
  if path.exists():
    if not path.is_dir():
      raise CheckpointError(f"{what} {path}: not a folder (expected config.json + model.safetensors)")
    return path
  return fetch_from_hub(name_or_path, what, ["*.json", "*.txt", "*.safetensors"])


def read_config(folder: pathlib.Path) -> dict:
  path = folder / "config.json"
  if not path.is_file():
    raise CheckpointError(f"{path}: missing (a transformers model folder needs config.json + model.safetensors)")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def read_weights(folder: pathlib.Path) -> dict:
  """model.safetensors, or the shards its index lists. Pickle checkpoints (.bin) are refused."""
  single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
  if single.is_file():
    return safetensors_io.load_file(single)
  if index.is_file():
    shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
    if not shards:
      raise CheckpointError(f"{index}: empty weight_map")
    tensors = {}
    for shard in shards:
      if not (folder / shard).is_file():
        raise CheckpointError(f"{folder / shard}: listed in {index.name} but missing")
      tensors.update(safetensors_io.load_file(folder / shard))
    return tensors
  pickles = sorted(p for p in folder.iterdir() if p.suffix in safetensors_io.PICKLE_SUFFIXES)
  if pickles:
    safetensors_io.refuse_pickle(pickles[0])
  raise CheckpointError(f"{folder}: no model.safetensors (or model.safetensors.index.json) found")


def vit_state_dict(tensors: dict) -> dict:
  """ViTModel keys; a ViTFor* checkpoint's `vit.` prefix is dropped, and the pooler/classifier (unused) too."""
  out = {}
  for key, value in tensors.items():
    key = key[len("vit."):] if key.startswith("vit.") else key
    if key.startswith(("pooler.", "classifier.")) or key == "embeddings.mask_token":
      continue
    out[key] = value
  return out


def clip_state_dict(tensors: dict) -> dict:
  ignored = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
  return {k: v for k, v in tensors.items() if k not in ignored}


def load_dino(name_or_path, *, dtype=jnp.float32) -> tuple[ViTModel, pathlib.Path]:
  """A DINO ViT (e.g. facebook/dino-vits16) from a transformers folder; returns (model, folder)."""
  folder = resolve_folder(name_or_path, "DINO model")
  config = ViTConfig.from_dict(read_config(folder))
  model = load_module(lambda: ViTModel(config, rngs=nnx.Rngs(0), dtype=dtype), vit_state_dict(read_weights(folder)),
                      where=f"DINO model {folder}")
  return model, folder


def load_clip(name_or_path, *, dtype=jnp.float32) -> tuple[CLIPModel, pathlib.Path]:
  """A CLIPModel (e.g. openai/clip-vit-large-patch14) from a transformers folder; returns (model, folder)."""
  folder = resolve_folder(name_or_path, "CLIP model")
  config = CLIPConfig.from_dict(read_config(folder))
  model = load_module(lambda: CLIPModel(config, rngs=nnx.Rngs(0), dtype=dtype),
                      clip_state_dict(read_weights(folder)), where=f"CLIP model {folder}")
  return model, folder
