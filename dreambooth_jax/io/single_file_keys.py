"""Diffusers state dicts <-> the original Stable Diffusion (CompVis/ldm) single-checkpoint layout.

The single file is what AUTOMATIC1111, ComfyUI and `StableDiffusionPipeline.from_single_file` read:
  model.diffusion_model.*   UNet (input_blocks / middle_block / output_blocks)
  first_stage_model.*       VAE (encoder.down.i.block.j ..., mid attention q/k/v/proj_out as 1x1 convs)
  cond_stage_model.transformer.text_model.*   SD1.x CLIP (OpenAI layout, same names as transformers)
  cond_stage_model.model.*  SD2.x OpenCLIP (resblocks with a fused q/k/v in_proj)

All functions work on {key: np.ndarray} in torch layout. The key maps are generated from the configs (block counts,
layers per block, which blocks have attention, channel widths for the shortcut convs), so every key of both sides is
known in advance: conversions are strict in both directions and round trips are exact.
Reference: diffusers scripts/convert_diffusers_to_original_stable_diffusion.py and loaders/single_file_utils.py.
"""

import pathlib
import re

import ml_dtypes
import numpy as np

from dreambooth_jax.io import safetensors as safetensors_io

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
# Buffers of the ldm DDPM wrapper and EMA copies that full training checkpoints carry; we import the non-EMA
# weights (as diffusers does by default) and recompute the noise schedule from the scheduler config.
IGNORED_EXACT = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
    CLIP_PREFIX + "embeddings.position_ids", OPEN_CLIP_PREFIX + "text_projection", OPEN_CLIP_PREFIX + "logit_scale",
}
IGNORED_PREFIXES = ("model_ema.",)
UNSUPPORTED_UNET_OPTIONS = ("class_embed_type", "num_class_embeds", "encoder_hid_dim", "time_cond_proj_dim")
DTYPES = {"fp16": np.float16, "fp32": np.float32, "bf16": ml_dtypes.bfloat16}

# (diffusers leaf, ldm leaf) of one resnet; the time projection only exists in the UNet.
UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
               ("norm2", "out_layers.0"), ("conv2", "out_layers.3"))
VAE_RESNET = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"))
# The ldm VAE attention uses 1x1 convs where diffusers uses linears: marked True (reshaped (O,I) <-> (O,I,1,1)).
VAE_ATTENTION = (("group_norm", "norm", False), ("to_q", "q", True), ("to_k", "k", True), ("to_v", "v", True),
                 ("to_out.0", "proj_out", True))
CLIP_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "layer_norm1",
              "layer_norm2", "mlp.fc1", "mlp.fc2")
OPEN_CLIP_LAYER = (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                   ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))
WB = ("weight", "bias")


def cfg(config, name: str, default=None):
  """A config value from a dict (config.json) or an object with attributes (dataclass, diffusers/transformers)."""
  if isinstance(config, dict):
    return config.get(name, default)
  return getattr(config, name, default)


def per_block(value, n: int, name: str) -> list:
  if isinstance(value, int):
    return [value] * n
  if len(value) != n:
    raise ValueError(f"unet config: {name}={value!r} has {len(value)} entries for {n} blocks")
  return list(value)


# ------------------------------------------------------------------------------------------------- key maps

def _pairs(out: dict, d_prefix: str, l_prefix: str, leaves, conv: bool = False):
  for d_leaf, l_leaf in leaves:
    for p in WB:
      out[f"{d_prefix}{d_leaf}.{p}"] = (f"{l_prefix}{l_leaf}.{p}", conv and p == "weight")


def _unet_resnet(out, d, l, shortcut: bool):
  _pairs(out, d, l, UNET_RESNET + ((("conv_shortcut", "skip_connection"),) if shortcut else ()))


def _unet_attention(out, d, l, layers: int):
  names = ["norm", "proj_in", "proj_out"]  # a Transformer2DModel keeps the ldm SpatialTransformer's names
  for t in range(layers):
    b = f"transformer_blocks.{t}."
    names += [b + n for n in ("norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2", "attn1.to_out.0",
                              "attn2.to_out.0")]
    for a in ("attn1", "attn2"):  # SD attention q/k/v projections have no bias
      for proj in ("to_q", "to_k", "to_v"):
        out[f"{d}{b}{a}.{proj}.weight"] = (f"{l}{b}{a}.{proj}.weight", False)
  _pairs(out, d, l, [(n, n) for n in names])


def unet_key_map(config) -> dict[str, tuple[str, bool]]:
  """{diffusers UNet key: (single-file key, False)} for an SD-1.x/2.x UNet2DConditionModel config."""
  for option in UNSUPPORTED_UNET_OPTIONS:
    if cfg(config, option) is not None:
      raise NotImplementedError(f"unet config: {option}={cfg(config, option)!r} has no SD single-file mapping here")
  addition = cfg(config, "addition_embed_type")
  if addition not in (None, "text_time"):
    raise NotImplementedError(f"unet config: addition_embed_type={addition!r} has no single-file mapping here")
  if cfg(config, "mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
    raise NotImplementedError(f"unet config: mid_block_type={cfg(config, 'mid_block_type')!r} is not supported")
  down_types, up_types = list(cfg(config, "down_block_types")), list(cfg(config, "up_block_types"))
  channels = list(cfg(config, "block_out_channels"))
  n = len(channels)
  if len(down_types) != n or len(up_types) != n:
    raise ValueError(f"unet config: {n} block_out_channels but {len(down_types)} down / {len(up_types)} up blocks")
  for t in down_types + up_types:
    if t not in ("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"):
      raise NotImplementedError(f"unet config: block type {t!r} is not supported")
  layers = per_block(cfg(config, "layers_per_block", 2), n, "layers_per_block")
  depth = per_block(cfg(config, "transformer_layers_per_block", 1) or 1, n, "transformer_layers_per_block")
  if cfg(config, "reverse_transformer_layers_per_block") is not None:  # per-layer depths: SDXL variants only
    raise NotImplementedError("unet config: reverse_transformer_layers_per_block is not supported")
  up_depth = depth[::-1]

  m = {}
  u = UNET_PREFIX
  _pairs(m, "", u, (("conv_in", "input_blocks.0.0"), ("time_embedding.linear_1", "time_embed.0"),
                    ("time_embedding.linear_2", "time_embed.2"), ("conv_norm_out", "out.0"), ("conv_out", "out.2")))
  if addition == "text_time":  # SDXL: the pooled-text + size/crop embedding is the SGM UNet's label_emb
    _pairs(m, "", u, (("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2")))
  index, out_ch = 0, channels[0]
  for i, block in enumerate(down_types):
    in_ch, out_ch = out_ch, channels[i]
    for j in range(layers[i]):
      index += 1
      shortcut = (in_ch if j == 0 else out_ch) != out_ch
      _unet_resnet(m, f"down_blocks.{i}.resnets.{j}.", f"{u}input_blocks.{index}.0.", shortcut)
      if block.startswith("CrossAttn"):
        _unet_attention(m, f"down_blocks.{i}.attentions.{j}.", f"{u}input_blocks.{index}.1.", depth[i])
    if i < n - 1:
      index += 1
      _pairs(m, f"down_blocks.{i}.downsamplers.0.", f"{u}input_blocks.{index}.0.", (("conv", "op"),))

  _unet_resnet(m, "mid_block.resnets.0.", f"{u}middle_block.0.", False)
  _unet_attention(m, "mid_block.attentions.0.", f"{u}middle_block.1.", depth[-1])
  _unet_resnet(m, "mid_block.resnets.1.", f"{u}middle_block.2.", False)

  rev_channels, rev_layers = channels[::-1], layers[::-1]
  index, out_ch = -1, rev_channels[0]
  for i, block in enumerate(up_types):
    prev_ch, out_ch = out_ch, rev_channels[i]
    skip_in_ch = rev_channels[min(i + 1, n - 1)]
    attention = block.startswith("CrossAttn")
    num = rev_layers[i] + 1
    for j in range(num):
      index += 1
      # Mirrors diffusers' up blocks: each resnet takes the previous output concatenated with a skip connection.
      in_ch = (prev_ch if j == 0 else out_ch) + (skip_in_ch if j == num - 1 else out_ch)
      _unet_resnet(m, f"up_blocks.{i}.resnets.{j}.", f"{u}output_blocks.{index}.0.", in_ch != out_ch)
      if attention:
        _unet_attention(m, f"up_blocks.{i}.attentions.{j}.", f"{u}output_blocks.{index}.1.", up_depth[i])
    if i < n - 1:
      # the upsampler follows the last resnet (and its attention, if any) of the level
      _pairs(m, f"up_blocks.{i}.upsamplers.0.", f"{u}output_blocks.{index}.{2 if attention else 1}.",
             (("conv", "conv"),))
  return m


def vae_key_map(config) -> dict[str, tuple[str, bool]]:
  """{diffusers VAE key: (single-file key, whether linear (O,I) <-> 1x1 conv (O,I,1,1))} for an AutoencoderKL."""
  channels = list(cfg(config, "block_out_channels"))
  n, layers = len(channels), cfg(config, "layers_per_block", 2)
  if not isinstance(layers, int):
    raise NotImplementedError(f"vae config: layers_per_block={layers!r} must be an int")
  v = VAE_PREFIX
  m = {}
  for part in ("encoder", "decoder"):
    _pairs(m, f"{part}.", f"{v}{part}.",
           (("conv_in", "conv_in"), ("conv_out", "conv_out"), ("conv_norm_out", "norm_out")))
    _pairs(m, f"{part}.mid_block.resnets.0.", f"{v}{part}.mid.block_1.", VAE_RESNET)
    _pairs(m, f"{part}.mid_block.resnets.1.", f"{v}{part}.mid.block_2.", VAE_RESNET)
    if cfg(config, "mid_block_add_attention", True):
      for d_leaf, l_leaf, conv in VAE_ATTENTION:
        _pairs(m, f"{part}.mid_block.attentions.0.", f"{v}{part}.mid.attn_1.", ((d_leaf, l_leaf),), conv)
  out_ch = channels[0]
  for i in range(n):
    in_ch, out_ch = out_ch, channels[i]
    for j in range(layers):
      shortcut = ((("conv_shortcut", "nin_shortcut"),) if (in_ch if j == 0 else out_ch) != out_ch else ())
      _pairs(m, f"encoder.down_blocks.{i}.resnets.{j}.", f"{v}encoder.down.{i}.block.{j}.", VAE_RESNET + shortcut)
    if i < n - 1:
      _pairs(m, f"encoder.down_blocks.{i}.downsamplers.0.", f"{v}encoder.down.{i}.downsample.", (("conv", "conv"),))
  rev, out_ch = channels[::-1], channels[-1]
  for i in range(n):
    in_ch, out_ch = out_ch, rev[i]
    level = n - 1 - i  # ldm numbers decoder levels by resolution, diffusers by order of execution
    for j in range(layers + 1):
      shortcut = ((("conv_shortcut", "nin_shortcut"),) if (in_ch if j == 0 else out_ch) != out_ch else ())
      _pairs(m, f"decoder.up_blocks.{i}.resnets.{j}.", f"{v}decoder.up.{level}.block.{j}.", VAE_RESNET + shortcut)
    if i < n - 1:
      _pairs(m, f"decoder.up_blocks.{i}.upsamplers.0.", f"{v}decoder.up.{level}.upsample.", (("conv", "conv"),))
  if cfg(config, "use_quant_conv", True):
    _pairs(m, "", v, (("quant_conv", "quant_conv"),))
  if cfg(config, "use_post_quant_conv", True):
    _pairs(m, "", v, (("post_quant_conv", "post_quant_conv"),))
  return m


def is_open_clip(text_config) -> bool:
  """SD2.x text encoders (OpenCLIP ViT-H, gelu) use the OpenCLIP layout; SD1.x (quick_gelu) the transformers one."""
  return cfg(text_config, "hidden_act", "quick_gelu") == "gelu"


def text_key_map(config, prefix: str | None = None, open_clip: bool | None = None) -> dict[str, str]:
  """{diffusers CLIP key (no `text_model.` prefix): single-file key} for keys that map one to one.

  The layout (OpenCLIP or transformers naming) follows the activation unless open_clip says otherwise, and the
  file prefix defaults to SD's (cond_stage_model.*); SDXL passes both, as its layout is fixed by position.
  """
  layers = cfg(config, "num_hidden_layers")
  if is_open_clip(config) if open_clip is None else open_clip:
    o = OPEN_CLIP_PREFIX if prefix is None else prefix
    m = {"embeddings.token_embedding.weight": o + "token_embedding.weight",
         "embeddings.position_embedding.weight": o + "positional_embedding",
         "final_layer_norm.weight": o + "ln_final.weight", "final_layer_norm.bias": o + "ln_final.bias"}
    for i in range(layers):
      for d_leaf, l_leaf in OPEN_CLIP_LAYER:
        for p in WB:
          m[f"encoder.layers.{i}.{d_leaf}.{p}"] = f"{o}transformer.resblocks.{i}.{l_leaf}.{p}"
    return m
  keys = ["embeddings.token_embedding.weight", "embeddings.position_embedding.weight", "final_layer_norm.weight",
          "final_layer_norm.bias"]
  keys += [f"encoder.layers.{i}.{leaf}.{p}" for i in range(layers) for leaf in CLIP_LAYER for p in WB]
  return {k: (CLIP_PREFIX if prefix is None else prefix) + k for k in keys}


def open_clip_fused_keys(config, prefix: str = OPEN_CLIP_PREFIX) -> dict[str, list[str]]:
  """{OpenCLIP in_proj key: [diffusers q, k, v keys]}: torch.nn.MultiheadAttention stacks q, k and v along the
  output axis of one in_proj weight/bias."""
  return {f"{prefix}transformer.resblocks.{i}.attn.in_proj_{p}": [f"encoder.layers.{i}.self_attn.{q}_proj.{p}"
                                                                 for q in "qkv"]
          for i in range(cfg(config, "num_hidden_layers")) for p in WB}


# ------------------------------------------------------------------------------------------------ conversion

def _check_keys(what: str, got, expected):
  missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
  if missing or unexpected:
    def show(keys):
      return ", ".join(keys[:20]) + (f" ... ({len(keys)} in all)" if len(keys) > 20 else "")
    raise ValueError(f"{what}: state dict does not match the config: missing keys [{show(missing)}]; "
                     f"unexpected keys [{show(unexpected)}]")


def strip_text_prefix(text_sd: dict) -> dict:
  return {k.removeprefix("text_model."): v for k, v in text_sd.items() if not k.endswith("embeddings.position_ids")}


def diffusers_to_single_file(unet_sd: dict, vae_sd: dict, text_encoder_sd: dict, *, unet_config, vae_config,
                             text_config) -> dict[str, np.ndarray]:
  """One ldm-layout state dict from the three diffusers/transformers component state dicts (numpy, torch layout)."""
  out = {}
  for what, sd, key_map in (("unet", unet_sd, unet_key_map(unet_config)), ("vae", vae_sd, vae_key_map(vae_config))):
    _check_keys(what, sd, key_map)
    for d_key, (l_key, conv) in key_map.items():
      x = np.asarray(sd[d_key])
      if conv:
        if x.ndim != 2:
          raise ValueError(f"vae: {d_key} has shape {x.shape}, expected a linear weight (out, in)")
        x = x[:, :, None, None]
      out[l_key] = x
  text_sd = strip_text_prefix(text_encoder_sd)
  key_map = text_key_map(text_config)
  fused = open_clip_fused_keys(text_config) if is_open_clip(text_config) else {}
  _check_keys("text_encoder", text_sd, list(key_map) + [k for keys in fused.values() for k in keys])
  out.update({l_key: np.asarray(text_sd[d_key]) for d_key, l_key in key_map.items()})
  # OpenCLIP uses torch.nn.MultiheadAttention: q, k and v stacked along the output axis.
  out.update({l_key: np.concatenate([np.asarray(text_sd[k]) for k in keys]) for l_key, keys in fused.items()})
  return out


def _ignored(key: str, text_config) -> bool:
  if key in IGNORED_EXACT or key.startswith(IGNORED_PREFIXES):
    return True
  # SD2 checkpoints keep OpenCLIP's last resblock, which SD2 skips (it uses the penultimate layer's output).
  match = re.match(re.escape(OPEN_CLIP_PREFIX) + r"transformer\.resblocks\.(\d+)\.", key)
  return bool(match) and is_open_clip(text_config) and int(match[1]) >= cfg(text_config, "num_hidden_layers")


def linear_from_conv(x, key: str) -> np.ndarray:
  """The original VAE's attention projections are 1x1 convs, diffusers' are linear; some converted files already
  store the linear form."""
  x = np.asarray(x)
  if x.ndim == 4 and x.shape[2:] == (1, 1):
    return x[:, :, 0, 0]
  if x.ndim != 2:
    raise ValueError(f"single file: {key} has shape {x.shape}, expected a 1x1 conv weight (out, in, 1, 1)")
  return x


def single_file_to_diffusers(sd: dict, *, unet_config, vae_config, text_config,
                             text_model_prefix: bool = False) -> tuple[dict, dict, dict]:
  """(unet, vae, text encoder) diffusers/transformers state dicts from an ldm-layout single checkpoint.

  Strict: any key that is neither mapped nor a known non-parameter buffer (noise schedule, EMA copy, position ids,
  OpenCLIP's unused last layer/projection) raises, as does any missing one. Text keys come without `text_model.`
  (as transformers>=5 CLIPTextModel.state_dict()) unless text_model_prefix.
  """
  unet_map, vae_map, text_map = unet_key_map(unet_config), vae_key_map(vae_config), text_key_map(text_config)
  fused = open_clip_fused_keys(text_config) if is_open_clip(text_config) else {}
  expected = [l for l, _ in unet_map.values()] + [l for l, _ in vae_map.values()] + list(text_map.values())
  expected += list(fused)
  _check_keys("single file", [k for k in sd if not _ignored(k, text_config)], expected)

  unet_sd = {d: np.asarray(sd[l]) for d, (l, _) in unet_map.items()}
  vae_sd = {d: linear_from_conv(sd[l], l) if conv else np.asarray(sd[l]) for d, (l, conv) in vae_map.items()}
  text_sd = {d: np.asarray(sd[l]) for d, l in text_map.items()}
  for l_key, keys in fused.items():
    x = np.asarray(sd[l_key])
    if x.shape[0] % 3:
      raise ValueError(f"single file: {l_key} has shape {x.shape}; its first axis must stack q, k and v")
    text_sd.update(zip(keys, np.split(x, 3)))
  if text_model_prefix:
    text_sd = {"text_model." + k: v for k, v in text_sd.items()}
  return unet_sd, vae_sd, text_sd


# ---------------------------------------------------------------------------------------------------- files

def save_single_file(path, state_dict: dict, dtype: str = "fp16", metadata: dict | None = None) -> pathlib.Path:
  """Writes a .safetensors single file; floating tensors are cast to dtype ('fp16', 'bf16' or 'fp32')."""
  path = pathlib.Path(path)
  if path.suffix in safetensors_io.PICKLE_SUFFIXES:
    safetensors_io.refuse_pickle(path)
  if path.suffix != ".safetensors":
    raise ValueError(f"{path}: a single-file checkpoint must be written as .safetensors")
  if dtype not in DTYPES:
    raise ValueError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
  tensors = {k: (np.asarray(v).astype(DTYPES[dtype]) if np.issubdtype(np.asarray(v).dtype, np.floating)
                 or np.asarray(v).dtype == ml_dtypes.bfloat16 else np.asarray(v)) for k, v in state_dict.items()}
  safetensors_io.save_file(tensors, path, metadata={"format": "pt", **(metadata or {})})
  return path


def load_single_file(path) -> dict[str, np.ndarray]:
  """All tensors of a .safetensors single file (memory-mapped); pickle checkpoints (.ckpt, .bin, ...) are refused."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such single-file checkpoint")
  return safetensors_io.load_file(path)


# The SDXL (SGM) layout lives in io/sgm_keys.py (size); its functions are importable from here as well. Lazy, so
# neither module imports the other at import time.
SGM_NAMES = ("sdxl_single_file_to_diffusers", "sdxl_diffusers_to_single_file", "sdxl_single_file_names",
             "is_sdxl_single_file", "sdxl_key_maps", "unet_module_names")


def __getattr__(name: str):
  if name in SGM_NAMES:
    from dreambooth_jax.io import sgm_keys
    return getattr(sgm_keys, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
