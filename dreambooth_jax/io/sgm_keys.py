"""Diffusers state dicts <-> the original SDXL (Stability generative-models, "SGM") single-checkpoint layout.

The file AUTOMATIC1111, ComfyUI and `StableDiffusionXLPipeline.from_single_file` read:
  model.diffusion_model.*                        UNet: the ldm layout of SD (single_file_keys.unet_key_map), with
                                                 label_emb.0.0/.0.2 = add_embedding.linear_1/2
  first_stage_model.*                            VAE, as in SD
  conditioner.embedders.0.transformer.text_model.*   CLIP ViT-L, transformers naming (our text_encoder)
  conditioner.embedders.1.model.*                OpenCLIP bigG (our text_encoder_2): resblocks with fused q/k/v
                                                 in_proj, and text_projection stored as (hidden, proj), i.e. the
                                                 transpose of transformers' text_projection.weight
The layout of each text encoder is fixed by its position, not by its activation as in SD 1.x/2.x.

Same contract as single_file_keys: numpy state dicts in torch layout, key maps generated from the configs, strict in
both directions (every missing or unexpected key is named), exact round trips.
Reference: diffusers loaders/single_file_utils.py (convert_ldm_unet_checkpoint, convert_open_clip_checkpoint).
"""

import numpy as np

from dreambooth_jax.io import single_file_keys as sfk

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
EMBEDDERS_PREFIX = "conditioner.embedders."
CLIP_PREFIX = EMBEDDERS_PREFIX + "0.transformer.text_model."
OPEN_CLIP_PREFIX = EMBEDDERS_PREFIX + "1.model."
PROJECTION_KEY = OPEN_CLIP_PREFIX + "text_projection"  # (hidden, proj): x @ P, where transformers has x @ W.T
# Non-parameters a real SDXL file may carry: the DDPM wrapper's schedule buffers (same names as SD), CLIP-L's
# position ids and OpenCLIP's contrastive temperature; EMA copies as in SD.
IGNORED_EXACT = ({k for k in sfk.IGNORED_EXACT if not k.startswith("cond_stage_model.")}
                 | {CLIP_PREFIX + "embeddings.position_ids", OPEN_CLIP_PREFIX + "logit_scale"})


def is_sdxl_single_file(names) -> bool:
  """SDXL files keep their text encoders under conditioner.embedders.* (SD 1.x/2.x under cond_stage_model.*)."""
  return any(k.startswith(EMBEDDERS_PREFIX) for k in names)


def _text_prefixed(key: str) -> str:
  return key if key.startswith("text_model.") or key == "text_projection.weight" else "text_model." + key


def sdxl_key_maps(configs: dict) -> dict[str, dict[str, tuple[str, bool]]]:
  """{component: {diffusers key: (file key, whether linear (O,I) <-> 1x1 conv)}} for the one-to-one keys.

  Diffusers-side text keys are ours: text_encoder without `text_model.`, text_encoder_2 with it (transformers'
  CLIPTextModelWithProjection). The fused OpenCLIP q/k/v and the projection are in fused_keys / PROJECTION_KEY.
  """
  return {
      "unet": sfk.unet_key_map(configs["unet"]),
      "vae": sfk.vae_key_map(configs["vae"]),
      "text_encoder": {d: (l, False) for d, l in
                       sfk.text_key_map(configs["text_encoder"], CLIP_PREFIX, open_clip=False).items()},
      "text_encoder_2": {"text_model." + d: (l, False) for d, l in
                         sfk.text_key_map(configs["text_encoder_2"], OPEN_CLIP_PREFIX, open_clip=True).items()},
  }


def fused_keys(configs: dict) -> dict[str, list[str]]:
  """{file in_proj key: [text_encoder_2 q, k, v keys]}."""
  return {l: ["text_model." + d for d in ds]
          for l, ds in sfk.open_clip_fused_keys(configs["text_encoder_2"], OPEN_CLIP_PREFIX).items()}


def sdxl_single_file_names(configs: dict) -> dict[str, dict[str, str]]:
  """{component: {diffusers key: file key}}, to name the file's tensor in errors (q/k/v parts and the transposed
  projection say so)."""
  names = {c: {d: l for d, (l, _) in m.items()} for c, m in sdxl_key_maps(configs).items()}
  for l_key, ds in fused_keys(configs).items():
    names["text_encoder_2"].update({d: f"{l_key} ({q} part)" for d, q in zip(ds, "qkv")})
  names["text_encoder_2"]["text_projection.weight"] = f"{PROJECTION_KEY} (transposed)"
  return names


def _expected_diffusers_keys(configs: dict, maps: dict) -> dict[str, list[str]]:
  keys = {c: list(m) for c, m in maps.items()}
  keys["text_encoder_2"] += [d for ds in fused_keys(configs).values() for d in ds] + ["text_projection.weight"]
  return keys


def sdxl_diffusers_to_single_file(state_dicts: dict, configs: dict) -> dict[str, np.ndarray]:
  """One SGM-layout state dict from {component: diffusers/transformers state dict} (numpy, torch layout).

  Text keys may come with or without `text_model.` (transformers 5 flattened CLIPTextModel, not the
  WithProjection model); position_ids buffers are dropped.
  """
  maps = sdxl_key_maps(configs)
  expected = _expected_diffusers_keys(configs, maps)
  sds = {"unet": state_dicts["unet"], "vae": state_dicts["vae"],
         "text_encoder": sfk.strip_text_prefix(state_dicts["text_encoder"]),
         "text_encoder_2": {_text_prefixed(k): v for k, v in state_dicts["text_encoder_2"].items()
                            if not k.endswith("embeddings.position_ids")}}
  out = {}
  for comp in COMPONENTS:
    sfk._check_keys(comp, sds[comp], expected[comp])
    for d_key, (l_key, conv) in maps[comp].items():
      x = np.asarray(sds[comp][d_key])
      if conv:
        if x.ndim != 2:
          raise ValueError(f"{comp}: {d_key} has shape {x.shape}, expected a linear weight (out, in)")
        x = x[:, :, None, None]
      out[l_key] = x
  te2 = sds["text_encoder_2"]
  for l_key, ds in fused_keys(configs).items():
    out[l_key] = np.concatenate([np.asarray(te2[d]) for d in ds])
  out[PROJECTION_KEY] = np.ascontiguousarray(np.asarray(te2["text_projection.weight"]).T)
  return out


def sdxl_single_file_to_diffusers(tensors: dict, configs: dict) -> dict[str, dict[str, np.ndarray]]:
  """{"unet", "vae", "text_encoder", "text_encoder_2": diffusers-named state dict} of an SGM-layout file.

  Strict: a missing tensor or one that is neither mapped nor a known non-parameter (schedule buffers, EMA copies,
  position ids, logit_scale) raises, naming the file keys. text_encoder keys come without `text_model.`,
  text_encoder_2 keys with it (as our modules and transformers 5 name them).
  """
  maps, fused = sdxl_key_maps(configs), fused_keys(configs)
  expected = [l for m in maps.values() for l, _ in m.values()] + list(fused) + [PROJECTION_KEY]
  present = [k for k in tensors if k not in IGNORED_EXACT and not k.startswith(sfk.IGNORED_PREFIXES)]
  sfk._check_keys("SDXL single file", present, expected)
  out = {c: {} for c in COMPONENTS}
  for comp, m in maps.items():
    for d_key, (l_key, conv) in m.items():
      out[comp][d_key] = sfk.linear_from_conv(tensors[l_key], l_key) if conv else np.asarray(tensors[l_key])
  hidden = sfk.cfg(configs["text_encoder_2"], "hidden_size")
  for l_key, ds in fused.items():
    x = np.asarray(tensors[l_key])
    if x.shape[0] != 3 * hidden:
      raise ValueError(f"SDXL single file: {l_key} has shape {x.shape}; its first axis must stack q, k and v of "
                       f"width {hidden} (text_encoder_2 hidden_size)")
    out["text_encoder_2"].update(zip(ds, np.split(x, 3)))
  projection = np.asarray(tensors[PROJECTION_KEY])
  want = (hidden, sfk.cfg(configs["text_encoder_2"], "projection_dim"))
  if projection.shape != want:
    raise ValueError(f"SDXL single file: {PROJECTION_KEY} has shape {projection.shape}, expected (hidden, "
                     f"projection_dim) = {want}")
  out["text_encoder_2"]["text_projection.weight"] = np.ascontiguousarray(projection.T)
  return out


def unet_module_names(unet_config) -> dict[str, str]:
  """{diffusers UNet module path: SGM module path (no model.diffusion_model.)}, for kohya SDXL LoRA names
  (sd-scripts name UNet modules by their original path: input_blocks.4.1.transformer_blocks.0.attn1.to_q)."""
  names = {}
  for d_key, (l_key, _) in sfk.unet_key_map(unet_config).items():
    d_mod, _, d_leaf = d_key.rpartition(".")
    l_mod, _, l_leaf = l_key.removeprefix(sfk.UNET_PREFIX).rpartition(".")
    assert d_leaf == l_leaf, (d_key, l_key)
    names[d_mod] = l_mod
  return names
