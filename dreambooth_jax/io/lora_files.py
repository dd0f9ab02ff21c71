"""LoRA factors <-> the two LoRA file layouts Stable Diffusion tools read.

Our LoRA is {diffusers module path: (down (rank, in), up (out, rank))} per component (numpy, torch layout) with one
alpha: each module adds (alpha / rank) * up @ down to its weight, rank = down.shape[0] (the kohya/PEFT convention).
UNet paths look like "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", text encoder paths like
"text_model.encoder.layers.0.self_attn.q_proj" (given with or without "text_model."; returned with it).

kohya (sd-scripts; read by AUTOMATIC1111, ComfyUI and diffusers):
  lora_unet_<path with . -> _>.lora_down.weight / .lora_up.weight / .alpha (0-d), lora_te_<path> for the text encoder.
diffusers PEFT (written by pipe.save_lora_weights, read by pipe.load_lora_weights):
  unet.<path>.lora_A.weight (= down) / .lora_B.weight (= up), text_encoder.<path>...; alpha and rank travel as a
  peft LoraConfig in the safetensors metadata entry "lora_adapter_metadata" (JSON, keys "unet.r", "unet.lora_alpha",
  ...), which is how diffusers honours scale = alpha / rank. Readers that ignore it (ComfyUI, older diffusers) apply
  scale 1, so the kohya file is the one to hand to other tools.
"""

import collections
import json
import pathlib
import re

import numpy as np

from dreambooth_jax.io import safetensors as safetensors_io

KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
PEFT_PREFIXES = {"unet": "unet.", "text_encoder": "text_encoder."}
PEFT_METADATA_KEY = "lora_adapter_metadata"
# Multi-word names in SD UNet / CLIP module paths, used to undo kohya's "." -> "_" (longest match first).
COMPOUND_NAMES = (
    "time_emb_proj", "conv_norm_out", "final_layer_norm", "down_blocks", "up_blocks", "mid_block",
    "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in", "proj_out", "conv_shortcut", "conv_in",
    "conv_out", "time_embedding", "linear_1", "linear_2", "text_model", "self_attn", "q_proj", "k_proj", "v_proj",
    "out_proj", "layer_norm1", "layer_norm2", "token_embedding", "position_embedding",
)
COMPOUND_TOKENS = {tuple(n.split("_")): n for n in COMPOUND_NAMES}


class LoraFormatError(ValueError):
  """A LoRA state dict or file that cannot be converted; the message names the key."""


# --------------------------------------------------------------------------------------------------- helpers

def _text_path(path: str) -> str:
  return path if path.startswith("text_model.") else "text_model." + path


def _components(unet_lora: dict | None, text_lora: dict | None) -> dict[str, dict]:
  comps = {"unet": dict(unet_lora or {}), "text_encoder": {_text_path(k): v for k, v in (text_lora or {}).items()}}
  for comp, lora in comps.items():
    for path, factors in lora.items():
      _check_pair(f"{comp} {path}", *factors)
  return comps


def _check_pair(name: str, down, up):
  down, up = np.asarray(down), np.asarray(up)
  if down.ndim != 2 or up.ndim != 2:
    raise LoraFormatError(f"{name}: LoRA factors must be 2-D linear weights (conv LoRA is not supported), got "
                          f"down {down.shape} and up {up.shape}")
  if down.shape[0] != up.shape[1]:
    raise LoraFormatError(f"{name}: rank mismatch: down {down.shape} (rank, in) vs up {up.shape} (out, rank)")


def _unify_alpha(entries: dict[str, dict[str, tuple]], alphas: dict[tuple, float]) -> tuple[dict, dict, float]:
  """One alpha for all modules: the most common one; modules with another alpha get it folded into `up`."""
  if not alphas:
    raise LoraFormatError("no LoRA modules found")
  alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
  for (comp, path), a in alphas.items():
    if a != alpha:
      down, up = entries[comp][path]
      entries[comp][path] = (down, (up * np.float32(a / alpha)).astype(up.dtype))
  return entries["unet"], entries["text_encoder"], float(alpha)


def kohya_name_to_path(name: str, known_modules=None) -> str:
  """'down_blocks_0_attentions_0_..._attn1_to_q' -> 'down_blocks.0.attentions.0....attn1.to_q'.

  kohya's names lose the dots; with known_modules (module paths of the model) the match is exact, otherwise the
  SD module vocabulary (COMPOUND_NAMES) decides which underscores were dots.
  """
  if known_modules is not None:
    lookup = {m.replace(".", "_"): m for m in known_modules}
    if name not in lookup:
      raise LoraFormatError(f"LoRA module {name!r} matches no module of the model")
    return lookup[name]
  tokens, parts, i = name.split("_"), [], 0
  while i < len(tokens):
    for n in (3, 2, 1):
      word = tuple(tokens[i:i + n])
      if n == 1 or word in COMPOUND_TOKENS:
        parts.append("_".join(word))
        i += n
        break
  return ".".join(parts)


# ----------------------------------------------------------------------------------------------------- kohya

def to_kohya(unet_lora: dict | None, text_lora: dict | None, alpha: float) -> dict[str, np.ndarray]:
  """kohya sd-scripts keys: lora_unet_*/lora_te_* with .lora_down.weight, .lora_up.weight and a 0-d .alpha."""
  out = {}
  for comp, lora in _components(unet_lora, text_lora).items():
    for path, (down, up) in lora.items():
      name = KOHYA_PREFIXES[comp] + path.replace(".", "_")
      out[f"{name}.lora_down.weight"] = np.asarray(down)
      out[f"{name}.lora_up.weight"] = np.asarray(up)
      out[f"{name}.alpha"] = np.asarray(alpha, np.float32)
  return out


def from_kohya(sd: dict, known_modules: dict[str, set] | None = None) -> tuple[dict, dict, float]:
  """(unet_lora, text_lora, alpha) from a kohya state dict. A module without .alpha has alpha = rank (kohya's
  default). known_modules: optional {"unet": module paths, "text_encoder": ...} for exact name resolution.
  LoRA on 1x1 convs (kohya trains proj_in/proj_out of SD1 that way) comes back as 2-D factors."""
  groups = collections.defaultdict(dict)
  for key, value in sd.items():
    match = re.fullmatch(r"(lora_unet_|lora_te_)(\w+)\.(lora_down\.weight|lora_up\.weight|alpha)", key)
    if not match:
      raise LoraFormatError(f"{key}: not a kohya SD LoRA key (lora_unet_*/lora_te_* with .lora_down.weight, "
                            ".lora_up.weight or .alpha)")
    groups[(match[1], match[2])][match[3]] = np.asarray(value)
  entries, alphas = {"unet": {}, "text_encoder": {}}, {}
  for (prefix, name), parts in groups.items():
    where = prefix + name
    for part in ("lora_down.weight", "lora_up.weight"):
      if part not in parts:
        raise LoraFormatError(f"{where}: has {sorted(parts)} but no {where}.{part}")
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    if down.ndim == 4 and down.shape[2:] == (1, 1) and up.ndim == 4 and up.shape[2:] == (1, 1):
      down, up = down[:, :, 0, 0], up[:, :, 0, 0]  # kohya stores LoRA on 1x1 convs (proj_in/out) as convs
    _check_pair(where, down, up)
    comp = "unet" if prefix == "lora_unet_" else "text_encoder"
    path = kohya_name_to_path(name, None if known_modules is None else known_modules[comp])
    if comp == "text_encoder":
      path = _text_path(path)
    entries[comp][path] = (down, up)
    alpha = parts.get("alpha")
    if alpha is not None and alpha.size != 1:
      raise LoraFormatError(f"{where}.alpha: expected a scalar, got shape {alpha.shape}")
    alphas[(comp, path)] = float(alpha.reshape(())) if alpha is not None else float(down.shape[0])
  return _unify_alpha(entries, alphas)


# ------------------------------------------------------------------------------------------------------ PEFT

def _lora_config(lora: dict, alpha: float, strip: str = "") -> dict:
  ranks = {path.removeprefix(strip): down.shape[0] for path, (down, _) in lora.items()}
  r = collections.Counter(ranks.values()).most_common(1)[0][0]
  # rank_pattern keys are regexes matched against the end of module names; a $ anchors them.
  return {"r": int(r), "lora_alpha": float(alpha), "target_modules": sorted(ranks),
          "rank_pattern": {f"{re.escape(p)}$": int(k) for p, k in ranks.items() if k != r}}


def to_diffusers_peft(unet_lora: dict | None, text_lora: dict | None, alpha: float) -> tuple[dict, dict]:
  """(tensors, metadata) in the layout of diffusers' save_lora_weights; pass both to save_lora."""
  tensors, config = {}, {}
  for comp, lora in _components(unet_lora, text_lora).items():
    if not lora:
      continue
    for path, (down, up) in lora.items():
      tensors[f"{PEFT_PREFIXES[comp]}{path}.lora_A.weight"] = np.asarray(down)
      tensors[f"{PEFT_PREFIXES[comp]}{path}.lora_B.weight"] = np.asarray(up)
    # transformers>=5 CLIPTextModel has no `text_model.` level; peft matches target names as suffixes, so the
    # names without it work with both the flat and the nested model.
    strip = "text_model." if comp == "text_encoder" else ""
    config.update({f"{PEFT_PREFIXES[comp]}{k}": v for k, v in _lora_config(lora, alpha, strip).items()})
  if not tensors:
    raise LoraFormatError("no LoRA modules to write")
  return tensors, {PEFT_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}


def from_diffusers_peft(sd: dict, metadata: dict | None = None) -> tuple[dict, dict, float]:
  """(unet_lora, text_lora, alpha) from PEFT-format tensors and the file's metadata (lora_adapter_metadata).

  Without a LoraConfig in the metadata diffusers applies scale 1 (alpha = rank), and so do we.
  """
  groups = collections.defaultdict(dict)
  for key, value in sd.items():
    match = re.fullmatch(r"(unet|text_encoder)\.(.+)\.(lora_A|lora_B)\.weight", key)
    if not match:
      raise LoraFormatError(f"{key}: not a diffusers PEFT LoRA key (unet.*/text_encoder.* ending in "
                            ".lora_A.weight or .lora_B.weight)")
    groups[(match[1], match[2])][match[3]] = np.asarray(value)
  config = json.loads((metadata or {}).get(PEFT_METADATA_KEY) or "{}")
  entries, alphas = {"unet": {}, "text_encoder": {}}, {}
  for (comp, path), parts in groups.items():
    where = f"{comp}.{path}"
    for part in ("lora_A", "lora_B"):
      if part not in parts:
        raise LoraFormatError(f"{where}: has {sorted(parts)} but no {where}.{part}.weight")
    down, up = parts["lora_A"], parts["lora_B"]
    _check_pair(where, down, up)
    if comp == "text_encoder":
      path = _text_path(path)
    entries[comp][path] = (down, up)
    alpha = config.get(f"{comp}.lora_alpha")
    if config.get(f"{comp}.alpha_pattern"):
      raise LoraFormatError(f"{PEFT_METADATA_KEY}: {comp}.alpha_pattern (per-module alphas) is not supported")
    alphas[(comp, path)] = float(alpha) if alpha is not None else float(down.shape[0])
  return _unify_alpha(entries, alphas)


# ----------------------------------------------------------------------------------------------------- files

def save_lora(path, sd: dict, metadata: dict | None = None) -> pathlib.Path:
  """One .safetensors file; metadata values (base model, rank, alpha, trigger prompt, ...) are stored as strings."""
  path = pathlib.Path(path)
  if path.suffix != ".safetensors":
    raise ValueError(f"{path}: LoRA files are written as .safetensors")
  safetensors_io.save_file({k: np.asarray(v) for k, v in sd.items()}, path,
                           metadata={"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}})
  return path


def load_lora(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(tensors, metadata) of a LoRA .safetensors file; pickles are refused."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such LoRA file")
  return safetensors_io.load_file(path), safetensors_io.read_metadata(path)
