"""SDXL file formats against diffusers' own loaders on the tiny SDXL pipeline: the original (SGM) single file, and
LoRA files for the UNet and both text encoders (kohya SGM names, diffusers-kohya names, PEFT)."""

import json
import re

import numpy as np
import pytest
import torch
from reference_models import to_numpy

from dreambooth_jax.io import single_file_keys as sf

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir):
  """(pipeline, configs as config.json dicts, our-convention numpy state dicts) of the tiny SDXL folder."""
  from diffusers import StableDiffusionXLPipeline

  pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir))
  configs = {c: json.loads((tiny_sdxl_dir / c / "config.json").read_text()) for c in COMPONENTS}
  states = {c: {k: to_numpy(v) for k, v in getattr(pipe, c).state_dict().items()} for c in COMPONENTS}
  # Our modules' spelling: CLIP-L without `text_model.` (transformers 5 already), bigG with it plus the projection.
  assert not any(k.startswith("text_model.") for k in states["text_encoder"])
  assert "text_projection.weight" in states["text_encoder_2"]
  return pipe, configs, states


def assert_same_states(got: dict, want: dict):
  for comp in want:
    assert got[comp].keys() == want[comp].keys(), (comp, sorted(set(got[comp]) ^ set(want[comp]))[:10])
    bad = [k for k in want[comp] if not np.array_equal(got[comp][k], want[comp][k])]
    assert not bad, (comp, bad[:10])


# ------------------------------------------------------------------------------------------------ single file

def test_sdxl_single_file_loads_in_diffusers_exactly(sdxl, tiny_sdxl_dir, tmp_path):
  from diffusers import StableDiffusionXLPipeline

  _, configs, states = sdxl
  tensors = sf.sdxl_diffusers_to_single_file(states, configs)
  assert sf.is_sdxl_single_file(tensors)
  # Spot checks of the SGM names diffusers and A1111 detect SDXL by.
  assert tensors["conditioner.embedders.1.model.text_projection"].shape == (48, 40)  # (hidden, proj): transposed
  assert "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight" in tensors
  assert "model.diffusion_model.label_emb.0.2.weight" in tensors
  assert "model.diffusion_model.input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight" in tensors  # depth 2
  assert not any(k.startswith("model.diffusion_model.input_blocks.1.1.") for k in tensors)  # no attention at level 0
  path = sf.save_single_file(tmp_path / "sdxl.safetensors", tensors, dtype="fp32")
  # Offline: the tiny folder is the config (model_index.json and each component's config).
  loaded = StableDiffusionXLPipeline.from_single_file(str(path), config=str(tiny_sdxl_dir), local_files_only=True)
  got = {c: {k: to_numpy(v) for k, v in getattr(loaded, c).state_dict().items()} for c in COMPONENTS}
  assert_same_states(got, states)


def test_sdxl_single_file_round_trip_and_refusals(sdxl):
  _, configs, states = sdxl
  tensors = sf.sdxl_diffusers_to_single_file(states, configs)
  # Non-parameters a real SDXL file carries are skipped, as diffusers does.
  extra = {"alphas_cumprod": np.ones(4, np.float32), "conditioner.embedders.1.model.logit_scale": np.float32(1),
           "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": np.arange(77)[None]}
  assert_same_states(sf.sdxl_single_file_to_diffusers({**tensors, **extra}, configs), states)
  # Text keys in either spelling (with/without `text_model.`) give the same file.
  respelled = {**states, "text_encoder": {"text_model." + k: v for k, v in states["text_encoder"].items()},
               "text_encoder_2": {k.removeprefix("text_model."): v for k, v in states["text_encoder_2"].items()}}
  again = sf.sdxl_diffusers_to_single_file(respelled, configs)
  assert again.keys() == tensors.keys() and all(np.array_equal(again[k], tensors[k]) for k in tensors)

  names = sf.sdxl_single_file_names(configs)
  assert names["unet"]["add_embedding.linear_1.weight"] == "model.diffusion_model.label_emb.0.0.weight"
  assert names["text_encoder_2"]["text_model.encoder.layers.2.self_attn.k_proj.bias"] == (
      "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_bias (k part)")
  assert sum(map(len, names.values())) == sum(map(len, states.values()))

  key = "model.diffusion_model.output_blocks.1.1.transformer_blocks.1.attn1.to_v.weight"
  assert key in tensors
  with pytest.raises(ValueError, match=r"missing keys \[" + re.escape(key)):
    sf.sdxl_single_file_to_diffusers({k: v for k, v in tensors.items() if k != key}, configs)
  with pytest.raises(ValueError, match=r"unexpected keys \[conditioner\.embedders\.1\.model\.foo\]"):
    sf.sdxl_single_file_to_diffusers({**tensors, "conditioner.embedders.1.model.foo": np.zeros(1)}, configs)
  bad = {**tensors, "conditioner.embedders.1.model.text_projection": tensors[
      "conditioner.embedders.1.model.text_projection"].T}
  with pytest.raises(ValueError, match=r"text_projection has shape \(40, 48\), expected .* \(48, 40\)"):
    sf.sdxl_single_file_to_diffusers(bad, configs)
  with pytest.raises(ValueError, match=r"text_encoder_2: .*missing keys \[text_projection\.weight\]"):
    sf.sdxl_diffusers_to_single_file(
        {**states, "text_encoder_2": {k: v for k, v in states["text_encoder_2"].items() if "projection" not in k}},
        configs)
  # An SD single file is not an SDXL one.
  assert not sf.is_sdxl_single_file(["cond_stage_model.transformer.text_model.final_layer_norm.weight"])
