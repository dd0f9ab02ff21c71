"""LoRA factors <-> the LoRA file layouts Stable Diffusion (1.x/2.x and XL) tools read.

Our LoRA is {component: {diffusers module path: (down (rank, in), up (out, rank))}} (numpy, torch layout) with one
alpha: each module adds (alpha / rank) * up @ down to its weight, rank = down.shape[0] (the kohya/PEFT convention).
Components are the pipeline's: "unet", "text_encoder" and, for SDXL, "text_encoder_2". UNet paths look like
"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", text encoder paths like
"text_model.encoder.layers.0.self_attn.q_proj" (given with or without "text_model."; returned with it).

kohya (sd-scripts; read by AUTOMATIC1111, ComfyUI and diffusers):
  <prefix><path with . -> _>.lora_down.weight / .lora_up.weight / .alpha (0-d). SD: lora_unet_, lora_te_.
  SDXL (sdxl_train_network): lora_unet_ + the ORIGINAL SGM module path (input_blocks_4_1_transformer_blocks_0_attn1_
  to_q; pass unet_names = sgm_keys.unet_module_names(unet config)), lora_te1_ (CLIP-L), lora_te2_ (bigG).
  diffusers' own kohya-style SDXL names (lora_unet_down_blocks_1_...) are read as well.
diffusers PEFT (written by pipe.save_lora_weights, read by pipe.load_lora_weights):
  <component>.<path>.lora_A.weight (= down) / .lora_B.weight (= up); alpha and rank travel as a peft LoraConfig in
  the safetensors metadata entry "lora_adapter_metadata" (JSON, keys "unet.r", "unet.lora_alpha", ...), which is
  how diffusers honours scale = alpha / rank. Readers that ignore it (ComfyUI, older diffusers) apply scale 1, so the
  kohya file is the one to hand to other tools.
"""

import collections
import json
import pathlib
import re

import numpy as np

from dreambooth_jax.io import safetensors as safetensors_io
from dreambooth_jax.models import lora as lora_lib

KOHYA_PREFIXES_SD = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
KOHYA_PREFIXES_SDXL = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
# Reading: every kohya prefix and the component it names (lora_te_ and lora_te1_ are both the first text encoder).
KOHYA_COMPONENTS = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                    "lora_te2_": "text_encoder_2"}
PEFT_PREFIXES = {"unet": "unet.", "transformer": "transformer.", "text_encoder": "text_encoder.",
                 "text_encoder_2": "text_encoder_2."}
PEFT_METADATA_KEY = "lora_adapter_metadata"
# UNet module names of the original SGM/ldm layout (kohya SDXL), as opposed to diffusers' down_blocks/mid_block/...
SGM_UNET_NAME = re.compile(r"(input_blocks|middle_block|output_blocks|label_emb|time_embed|out)_\d")
# Multi-word names in SD UNet / CLIP module paths, used to undo kohya's "." -> "_" (longest match first).
COMPOUND_NAMES = (
    "time_emb_proj", "conv_norm_out", "final_layer_norm", "down_blocks", "up_blocks", "mid_block",
    "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in", "proj_out", "conv_shortcut", "conv_in",
    "conv_out", "time_embedding", "linear_1", "linear_2", "text_model", "self_attn", "q_proj", "k_proj", "v_proj",
    "out_proj", "layer_norm1", "layer_norm2", "token_embedding", "position_embedding", "add_embedding",
)
COMPOUND_TOKENS = {tuple(n.split("_")): n for n in COMPOUND_NAMES}


class LoraFormatError(ValueError):
  """A LoRA state dict or file that cannot be converted, or does not fit the model; the message names the key."""


def kohya_prefixes(text_encoders) -> dict[str, str]:
  """The kohya prefixes of a family by its text encoders: one (SD 1.x/2.x) or two (SDXL)."""
  return KOHYA_PREFIXES_SD if len(tuple(text_encoders)) == 1 else KOHYA_PREFIXES_SDXL


# --------------------------------------------------------------------------------------------------- helpers

def is_text(component: str) -> bool:
  return component.startswith("text_encoder")


def _text_path(path: str) -> str:
  return path if path.startswith("text_model.") else "text_model." + path


def _normalise(factors: dict) -> dict[str, dict]:
  """Copies with text paths under text_model., every pair checked."""
  comps = {}
  for comp, lora in (factors or {}).items():
    comps[comp] = {(_text_path(k) if is_text(comp) else k): v for k, v in (lora or {}).items()}
    for path, pair in comps[comp].items():
      _check_pair(f"{comp} {path}", *pair)
  return comps


def _check_pair(name: str, down, up):
  down, up = np.asarray(down), np.asarray(up)
  if down.ndim != 2 or up.ndim != 2:
    raise LoraFormatError(f"{name}: LoRA factors must be 2-D linear weights (conv LoRA is not supported), got "
                          f"down {down.shape} and up {up.shape}")
  if down.shape[0] != up.shape[1]:
    raise LoraFormatError(f"{name}: rank mismatch: down {down.shape} (rank, in) vs up {up.shape} (out, rank)")


def _unify_alpha(entries: dict[str, dict[str, tuple]], alphas: dict[tuple, float]) -> tuple[dict, float]:
  """One alpha for all modules: the most common one; modules with another alpha get it folded into `up`."""
  if not alphas:
    raise LoraFormatError("no LoRA modules found")
  alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
  for (comp, path), a in alphas.items():
    if a != alpha:
      down, up = entries[comp][path]
      entries[comp][path] = (down, (up * np.float32(a / alpha)).astype(up.dtype))
  return dict(entries), float(alpha)


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

def to_kohya(factors: dict, alpha: float, prefixes: dict = KOHYA_PREFIXES_SD,
             unet_names: dict | None = None) -> dict[str, np.ndarray]:
  """kohya sd-scripts keys (<prefix><module>.lora_down.weight, .lora_up.weight, 0-d .alpha) of {component: lora}.

  unet_names: {diffusers UNet module path: SGM module path} to name UNet modules as sdxl_train_network does.
  """
  out = {}
  for comp, lora in _normalise(factors).items():
    if comp not in prefixes:
      raise LoraFormatError(f"component {comp!r} has no kohya prefix here (known: {sorted(prefixes)})")
    for path, (down, up) in lora.items():
      if comp == "unet" and unet_names is not None:
        if path not in unet_names:
          raise LoraFormatError(f"unet {path}: no SGM name for this module")
        path = unet_names[path]
      name = prefixes[comp] + path.replace(".", "_")
      out[f"{name}.lora_down.weight"] = np.asarray(down)
      out[f"{name}.lora_up.weight"] = np.asarray(up)
      out[f"{name}.alpha"] = np.asarray(alpha, np.float32)
  return out


def _resolve_kohya(comp: str, name: str, known_modules, unet_names) -> str:
  if comp == "unet" and SGM_UNET_NAME.match(name):
    if unet_names is None:
      raise LoraFormatError(f"lora_unet_{name}: an SGM-named (kohya SDXL) UNet module; reading it needs the UNet's "
                            "SGM names (unet_names)")
    sgm = {s.replace(".", "_"): d for d, s in unet_names.items()}
    if name not in sgm:
      raise LoraFormatError(f"lora_unet_{name}: matches no SGM module of the UNet")
    return sgm[name]
  known = (known_modules or {}).get(comp)
  if known is not None and is_text(comp):
    known = [_text_path(m) for m in known]
  path = kohya_name_to_path(name, known)
  return _text_path(path) if is_text(comp) else path


def from_kohya(sd: dict, known_modules: dict[str, set] | None = None,
               unet_names: dict | None = None) -> tuple[dict[str, dict], float]:
  """({component: lora}, alpha) from a kohya state dict (SD or SDXL prefixes; UNet modules by diffusers or, with
  unet_names, SGM names). A module without .alpha has alpha = rank (kohya's default). known_modules: optional
  {component: module paths} for exact name resolution. LoRA on 1x1 convs comes back as 2-D factors."""
  groups = collections.defaultdict(dict)
  for key, value in sd.items():
    match = re.fullmatch(r"(lora_unet_|lora_te1_|lora_te2_|lora_te_)(\w+)\.(lora_down\.weight|lora_up\.weight|alpha)",
                         key)
    if not match:
      raise LoraFormatError(f"{key}: not a kohya LoRA key (lora_unet_/lora_te_/lora_te1_/lora_te2_ with "
                            ".lora_down.weight, .lora_up.weight or .alpha)")
    groups[(match[1], match[2])][match[3]] = np.asarray(value)
  te_prefixes = {p for p, _ in groups if p.startswith("lora_te")}
  if "lora_te_" in te_prefixes and te_prefixes - {"lora_te_"}:
    raise LoraFormatError(f"kohya LoRA mixes the SD text-encoder prefix lora_te_ with SDXL's {sorted(te_prefixes)}")
  entries, alphas = collections.defaultdict(dict), {}
  for (prefix, name), parts in groups.items():
    where = prefix + name
    for part in ("lora_down.weight", "lora_up.weight"):
      if part not in parts:
        raise LoraFormatError(f"{where}: has {sorted(parts)} but no {where}.{part}")
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    if down.ndim == 4 and down.shape[2:] == (1, 1) and up.ndim == 4 and up.shape[2:] == (1, 1):
      down, up = down[:, :, 0, 0], up[:, :, 0, 0]  # kohya stores LoRA on 1x1 convs (proj_in/out) as convs
    _check_pair(where, down, up)
    comp = KOHYA_COMPONENTS[prefix]
    path = _resolve_kohya(comp, name, known_modules, unet_names)
    if path in entries[comp]:
      raise LoraFormatError(f"{where}: a second LoRA for {comp} {path}")
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


def to_diffusers_peft(factors: dict, alpha: float) -> tuple[dict, dict]:
  """(tensors, metadata) of {component: lora} in the layout of diffusers' save_lora_weights; pass both to save_lora."""
  tensors, config = {}, {}
  for comp, lora in _normalise(factors).items():
    if not lora:
      continue
    if comp not in PEFT_PREFIXES:
      raise LoraFormatError(f"component {comp!r} has no diffusers LoRA prefix (known: {sorted(PEFT_PREFIXES)})")
    for path, (down, up) in lora.items():
      tensors[f"{PEFT_PREFIXES[comp]}{path}.lora_A.weight"] = np.asarray(down)
      tensors[f"{PEFT_PREFIXES[comp]}{path}.lora_B.weight"] = np.asarray(up)
    # transformers>=5 CLIPTextModel has no `text_model.` level; peft matches target names as suffixes, so the
    # names without it work with both the flat and the nested model.
    strip = "text_model." if is_text(comp) else ""
    config.update({f"{PEFT_PREFIXES[comp]}{k}": v for k, v in _lora_config(lora, alpha, strip).items()})
  if not tensors:
    raise LoraFormatError("no LoRA modules to write")
  return tensors, {PEFT_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}


def from_diffusers_peft(sd: dict, metadata: dict | None = None) -> tuple[dict[str, dict], float]:
  """({component: lora}, alpha) from PEFT-format tensors and the file's metadata (lora_adapter_metadata).

  Without a LoraConfig in the metadata diffusers applies scale 1 (alpha = rank), and so do we.
  """
  groups = collections.defaultdict(dict)
  for key, value in sd.items():
    match = re.fullmatch(r"(unet|transformer|text_encoder|text_encoder_2)\.(.+)\.(lora_A|lora_B)\.weight", key)
    if not match:
      raise LoraFormatError(f"{key}: not a diffusers PEFT LoRA key (unet.*/transformer.*/text_encoder.*/"
                            "text_encoder_2.* ending in .lora_A.weight or .lora_B.weight)")
    groups[(match[1], match[2])][match[3]] = np.asarray(value)
  config = json.loads((metadata or {}).get(PEFT_METADATA_KEY) or "{}")
  entries, alphas = collections.defaultdict(dict), {}
  for (comp, path), parts in groups.items():
    where = f"{comp}.{path}"
    for part in ("lora_A", "lora_B"):
      if part not in parts:
        raise LoraFormatError(f"{where}: has {sorted(parts)} but no {where}.{part}.weight")
    down, up = parts["lora_A"], parts["lora_B"]
    _check_pair(where, down, up)
    if is_text(comp):
      path = _text_path(path)
    entries[comp][path] = (down, up)
    alpha = config.get(f"{comp}.lora_alpha")
    if config.get(f"{comp}.alpha_pattern"):
      raise LoraFormatError(f"{PEFT_METADATA_KEY}: {comp}.alpha_pattern (per-module alphas) is not supported")
    alphas[(comp, path)] = float(alpha) if alpha is not None else float(down.shape[0])
  return _unify_alpha(entries, alphas)


# --------------------------------------------------------------------------------------- spelling and family

def lora_spelling(names) -> str:
  """Which layout a LoRA file is: 'peft', 'kohya_sgm' (SDXL sd-scripts, SGM UNet names) or 'kohya' (diffusers UNet
  names: SD sd-scripts, or diffusers' kohya-style SDXL names)."""
  names = list(names)
  if any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in names):
    return "peft"
  if any(k.startswith("lora_unet_") and SGM_UNET_NAME.match(k.removeprefix("lora_unet_")) for k in names):
    return "kohya_sgm"
  if any(k.startswith(tuple(KOHYA_COMPONENTS)) for k in names):
    return "kohya"
  raise LoraFormatError(f"not a LoRA file we know (kohya lora_unet_/lora_te*_ or diffusers PEFT lora_A/lora_B "
                        f"keys); first keys: {sorted(names)[:5]}")


def lora_family_hint(names) -> str | None:
  """The family a LoRA file's key names betray, if any: SDXL (two text encoders, SGM UNet names) or SD 1.x/2.x."""
  for k in names:
    if k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) or (
        k.startswith("lora_unet_") and SGM_UNET_NAME.match(k.removeprefix("lora_unet_"))):
      return "SDXL"
  if any(k.startswith("lora_te_") for k in names):
    return "SD 1.x/2.x"
  return None


def _shape_hint(component: str, path: str, in_width: int) -> str:
  """Cross-attention key/value inputs are the text width, which tells the families apart."""
  if component == "unet" and path.endswith(("attn2.to_k", "attn2.to_v")):
    return {768: "SD 1.x (768-wide text)", 1024: "SD 2.x (1024-wide text)", 2048: "SDXL (2048-wide text)"}.get(
        in_width, f"a model with {in_width}-wide text")
  return ""


def check_lora_matches(factors: dict, known_modules_by_component: dict, family_name: str, source: str = "LoRA"):
  """Refuses (one LoraFormatError naming the modules) a LoRA whose components, module paths or factor shapes do not
  exist in the model, before anything is applied: a LoRA made for another family must not half-apply.

  known_modules_by_component: {component: {module path: weight shape (out, in)}} (see lora_targets), or
  {component: module paths} to check names only; text paths may be spelled with or without `text_model.`.
  """
  problems, hints, total = [], set(), 0
  for comp, lora in factors.items():
    known = known_modules_by_component.get(comp)
    if known is None:
      problems.append(f"component {comp!r} ({len(lora)} modules): the {family_name} model has none "
                      f"(components: {sorted(known_modules_by_component)})")
      continue
    if not isinstance(known, dict):  # bare module paths: names are checked, shapes cannot be
      known = dict.fromkeys(known)
    if is_text(comp):
      known = {_text_path(p): s for p, s in known.items()}
    for path, (down, up) in lora.items():
      total += 1
      path_n = _text_path(path) if is_text(comp) else path
      if path_n not in known:
        problems.append(f"{comp} {path}: no such module")
        continue
      if known[path_n] is None:
        continue
      out_w, in_w = tuple(known[path_n])[:2]
      if np.shape(up)[0] != out_w or np.shape(down)[1] != in_w:
        problems.append(f"{comp} {path}: LoRA is (out {np.shape(up)[0]}, in {np.shape(down)[1]}), the weight is "
                        f"(out {out_w}, in {in_w})")
        hints.add(_shape_hint(comp, path, np.shape(down)[1]))
  if problems:
    problems.sort(key=lambda p: not p.endswith("no such module"))  # the plainest evidence first
    hints.discard("")
    made_for = f"; it looks made for {', '.join(sorted(hints))}" if hints else ""
    raise LoraFormatError(f"{source}: does not fit the {family_name} model ({len(problems)} problems, "
                          f"{total} modules){made_for}: " + "; ".join(problems[:8])
                          + (" ..." if len(problems) > 8 else ""))


def lora_targets(state_dict: dict) -> dict[str, tuple]:
  """{module path: (out, in)} of the 2-D (linear) weights of a torch-named state dict: what a LoRA may target."""
  return {k.removesuffix(".weight"): tuple(np.shape(v)) for k, v in state_dict.items()
          if k.endswith(".weight") and len(np.shape(v)) == 2}


def read_lora(tensors: dict, metadata: dict | None, *, family_name: str, text_encoders, unet_names: dict | None = None,
              known_modules_by_component: dict | None = None, source: str = "LoRA",
              kohya_reader=None) -> tuple[dict[str, dict], float]:
  """({component: lora}, alpha) of a LoRA file in any spelling we know, for a family with these text encoders.

  Refuses, naming the file (source) and a key, a file whose names say it was made for the other family (lora_te_
  on a two-encoder model, lora_te1_/lora_te2_/text_encoder_2./SGM UNet names on a one-encoder model), and, with
  known_modules_by_component, one whose modules or shapes do not exist in the model (check_lora_matches).
  kohya_reader(tensors, known_modules): the family's kohya layout (families' from_kohya_lora); default SD's.
  """
  spelling = lora_spelling(tensors)
  hint = lora_family_hint(tensors)
  sdxl_like = len(tuple(text_encoders)) == 2
  if hint is not None and (hint == "SDXL") != sdxl_like:
    key = next(k for k in sorted(tensors) if lora_family_hint([k]) == hint)
    raise LoraFormatError(f"{source}: key {key} says this LoRA was made for {hint}, not for the {family_name} model")
  known = {c: list(m) for c, m in (known_modules_by_component or {}).items()} or None
  try:
    if spelling == "peft":
      factors, alpha = from_diffusers_peft(tensors, metadata)
    else:
      factors, alpha = (kohya_reader(tensors, known) if kohya_reader is not None
                        else from_kohya(tensors, unet_names=unet_names, known_modules=known))
  except LoraFormatError as e:
    if spelling != "peft" and known is not None and "matches no module" in str(e):
      # A kohya name the model lacks: re-read by the SD vocabulary alone so that the refusal can list every
      # module that does not fit and which family the shapes suggest.
      try:
        check_lora_matches(from_kohya(tensors, unet_names=unet_names)[0], known_modules_by_component, family_name,
                           source)
      except LoraFormatError as better:
        raise better from None
    raise LoraFormatError(f"{source} ({spelling} LoRA for the {family_name} model): {e}") from None
  if known_modules_by_component is not None:
    check_lora_matches(factors, known_modules_by_component, family_name, source)
  return factors, alpha


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


# ------------------------------------------------------------------------------------------ onto a pipeline

def parse_lora_arg(arg: str) -> tuple[pathlib.Path, float]:
  """'FILE' or 'FILE:SCALE' (the sample CLI's --lora) -> (path, scale)."""
  path, sep, scale = str(arg).rpartition(":")
  if sep:
    try:
      return pathlib.Path(path), float(scale)
    except ValueError:
      pass
  return pathlib.Path(arg), 1.0


def read_lora_for(pipe, path) -> tuple[dict[str, dict], float]:
  """({component: lora}, alpha) of a LoRA file in any spelling, checked against this pipeline's modules and
  shapes (a LoRA made for another family is refused by name before anything is applied)."""
  family = pipe.family
  tensors, metadata = load_lora(path)
  targets = (family.DENOISER, *family.TEXT_ENCODERS)
  known = {c: lora_lib.linear_shapes(pipe.modules[c]) for c in targets}
  return read_lora(tensors, metadata, family_name=family.NAME, text_encoders=family.TEXT_ENCODERS,
                   unet_names=family.kohya_unet_names(pipe.configs), known_modules_by_component=known,
                   source=str(path), kohya_reader=lambda t, k: family.from_kohya_lora(t, pipe.configs, k))


def apply_lora_files(pipe, files) -> None:
  """Folds LoRA files [(path, scale), ...] into the pipeline's weights, in place (sampling with LoRAs)."""
  for path, scale in files:
    factors, alpha = read_lora_for(pipe, path)
    for component, lora in factors.items():
      lora_lib.add_lora_weights(pipe.modules[component], lora, alpha=alpha, scale=scale)
