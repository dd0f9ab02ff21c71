"""Flux LoRA files in kohya's layout (sd-scripts' networks/lora_flux.py, as its Flux scripts write them): modules
named by the original BFL checkpoint (`lora_unet_double_blocks_0_img_attn_qkv`, `lora_unet_single_blocks_3_linear1`)
where diffusers keeps separate layers:

  double_blocks_N_img_attn_qkv   = transformer_blocks.N.attn.to_q | to_k | to_v (stacked along the output)
  double_blocks_N_txt_attn_qkv   = transformer_blocks.N.attn.add_q_proj | add_k_proj | add_v_proj
  single_blocks_N_linear1        = single_transformer_blocks.N.attn.to_q | to_k | to_v | proj_mlp
  and one to one: img/txt_attn_proj (to_out.0 / to_add_out), img/txt_mlp_0/2 (ff[_context].net.0.proj / net.2),
  img/txt_mod_lin (norm1[_context].linear), single linear2 (proj_out) and modulation_lin (norm.linear).

Writing: the S separate rank-r LoRAs of a fused layer become one rank-S r LoRA, down = the S downs stacked, up
block-diagonal (zero blocks for parts without LoRA), alpha x S (the same alpha / rank scale): exactly the same
update, and the block-sparse form diffusers' _convert_kohya_flux_lora_to_diffusers splits back into per-part LoRAs.
Reading: a block-sparse fused LoRA is split the same way (all-zero parts dropped); a dense one (kohya's own
training) gives every part the whole down and its rows of up (rank R each), as diffusers does.
"""

import collections
import re

import numpy as np

from dreambooth_jax.io.lora_files import LoraFormatError, _check_pair, _unify_alpha

DOUBLE = {  # kohya suffix -> diffusers module paths under transformer_blocks.N
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn_proj": ("attn.to_out.0",), "txt_attn_proj": ("attn.to_add_out",),
    "img_mlp_0": ("ff.net.0.proj",), "img_mlp_2": ("ff.net.2",),
    "txt_mlp_0": ("ff_context.net.0.proj",), "txt_mlp_2": ("ff_context.net.2",),
    "img_mod_lin": ("norm1.linear",), "txt_mod_lin": ("norm1_context.linear",),
}
SINGLE = {  # under single_transformer_blocks.N
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",), "modulation_lin": ("norm.linear",),
}
BLOCKS = {"double_blocks": ("transformer_blocks", DOUBLE), "single_blocks": ("single_transformer_blocks", SINGLE)}
KOHYA_KEY = re.compile(r"lora_unet_(double_blocks|single_blocks)_(\d+)_(\w+)\.(lora_down\.weight|lora_up\.weight|"
                       r"alpha)")


def _part_dims(parts: tuple, transformer_config: dict) -> list[int]:
  """Output widths of a fused layer's parts: inner_dim each, the single blocks' MLP 4 x inner_dim."""
  dim = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
  return [4 * dim if p == "proj_mlp" else dim for p in parts]


def _kohya_module(path: str):
  """diffusers module path -> (kohya name, part index, parts), or None for a module kohya's layout lacks."""
  for bfl, (block, table) in BLOCKS.items():
    match = re.fullmatch(rf"{block}\.(\d+)\.(.+)", path)
    if match:
      for suffix, parts in table.items():
        if match[2] in parts:
          return f"lora_unet_{bfl}_{match[1]}_{suffix}", parts.index(match[2]), parts
  return None


def to_kohya_flux(lora: dict, alpha: float, transformer_config: dict) -> dict[str, np.ndarray]:
  """kohya Flux keys of the transformer's {module path: (down (r, in), up (out, r))} (torch layout)."""
  fused = collections.defaultdict(dict)
  for path, (down, up) in lora.items():
    _check_pair(f"transformer {path}", down, up)
    where = _kohya_module(path)
    if where is None:
      raise LoraFormatError(f"transformer {path}: kohya's Flux layout has no module for it (use the diffusers "
                            "LoRA format)")
    name, index, parts = where
    fused[(name, parts)][index] = (np.asarray(down), np.asarray(up))
  out = {}
  for (name, parts), present in fused.items():
    ranks = {d.shape[0] for d, _ in present.values()}
    if len(ranks) != 1:
      raise LoraFormatError(f"{name}: its parts have LoRA ranks {sorted(ranks)}; a fused kohya module needs one")
    r, n, in_dim = ranks.pop(), len(parts), next(iter(present.values()))[0].shape[1]
    dims = _part_dims(parts, transformer_config) if n > 1 else [next(iter(present.values()))[1].shape[0]]
    dtype = next(iter(present.values()))[0].dtype
    down = np.zeros((n * r, in_dim), dtype)
    up = np.zeros((sum(dims), n * r), dtype)
    offsets = np.cumsum([0, *dims])
    for j, (d, u) in present.items():
      if u.shape[0] != dims[j]:
        raise LoraFormatError(f"transformer {parts[j]} of {name}: LoRA output width {u.shape[0]}, expected "
                              f"{dims[j]}")
      down[j * r:(j + 1) * r] = d
      up[offsets[j]:offsets[j + 1], j * r:(j + 1) * r] = u
    out[f"{name}.lora_down.weight"] = down
    out[f"{name}.lora_up.weight"] = up
    out[f"{name}.alpha"] = np.asarray(alpha * n, np.float32)
  return out


def is_kohya_flux(names) -> bool:
  return any(KOHYA_KEY.fullmatch(k) for k in names)


def from_kohya_flux(tensors: dict, transformer_config: dict) -> tuple[dict[str, dict], float]:
  """({"transformer": {module path: (down, up)}}, alpha) of a kohya Flux LoRA (transformer modules only)."""
  groups = collections.defaultdict(dict)
  for key, value in tensors.items():
    match = KOHYA_KEY.fullmatch(key)
    if not match:
      raise LoraFormatError(f"{key}: not a kohya Flux transformer LoRA key (lora_unet_double_blocks_N_... / "
                            "lora_unet_single_blocks_N_... with .lora_down.weight, .lora_up.weight or .alpha); "
                            "text-encoder LoRA in kohya's Flux layout is not supported")
    groups[(match[1], match[2], match[3])][match[4]] = np.asarray(value)
  entries, alphas = {}, {}
  for (bfl, index, suffix), parts in groups.items():
    name = f"lora_unet_{bfl}_{index}_{suffix}"
    block, table = BLOCKS[bfl]
    if suffix not in table:
      raise LoraFormatError(f"{name}: not a {bfl} module of kohya's Flux layout (known: {sorted(table)})")
    for part in ("lora_down.weight", "lora_up.weight"):
      if part not in parts:
        raise LoraFormatError(f"{name}: has {sorted(parts)} but no {name}.{part}")
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    _check_pair(name, down, up)
    rank = down.shape[0]
    alpha = float(parts["alpha"].reshape(())) if "alpha" in parts else float(rank)
    targets = table[suffix]
    dims = _part_dims(targets, transformer_config) if len(targets) > 1 else [up.shape[0]]
    if sum(dims) != up.shape[0]:
      raise LoraFormatError(f"{name}: lora_up has {up.shape[0]} outputs, the model's layer {sum(dims)}")
    offsets = np.cumsum([0, *dims])
    n = len(targets)
    sparse = rank % n == 0 and n > 1 and all(
        not np.any(up[offsets[j]:offsets[j + 1], k * (rank // n):(k + 1) * (rank // n)])
        for j in range(n) for k in range(n) if j != k)
    for j, target in enumerate(targets):
      rows = up[offsets[j]:offsets[j + 1]]
      if sparse:
        r = rank // n
        part_down, part_up, part_alpha = down[j * r:(j + 1) * r], rows[:, j * r:(j + 1) * r], alpha / n
        if not np.any(part_down) and not np.any(part_up):
          continue  # a part written without LoRA
      else:
        part_down, part_up, part_alpha = down, rows, alpha
      path = f"{block}.{index}.{target}"
      entries[path] = (part_down, part_up)
      alphas[("transformer", path)] = part_alpha
  factors, alpha = _unify_alpha({"transformer": entries}, alphas)
  return factors, alpha
