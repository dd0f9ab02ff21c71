"""SDXL file formats against diffusers' own loaders on the tiny SDXL pipeline: the original (SGM) single file, and
LoRA files for the UNet and both text encoders (kohya SGM names, diffusers-kohya names, PEFT)."""

import json
import re

import numpy as np
import pytest
import torch
from reference_models import to_numpy

from dreambooth_jax.io import lora_files as kohya
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


# ------------------------------------------------------------------------------------------------------- LoRA

RANK, ALPHA = 4, 8.0  # scale alpha / rank = 2, so a file that drops alpha is caught
LORA_ATOL = 1e-5
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def random_lora(model, suffixes, rng) -> dict:
  """{module path (torch named_modules, i.e. our spelling): (down, up)} for the model's Linear layers."""
  return {name: (rng.normal(0, 0.2, (RANK, m.weight.shape[1])).astype(np.float32),
                 rng.normal(0, 0.2, (m.weight.shape[0], RANK)).astype(np.float32))
          for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name.endswith(suffixes)}


@pytest.fixture(scope="module")
def sdxl_lora(sdxl):
  """Random factors for the UNet attention and both text encoders, with our component names and paths."""
  pipe, configs, _ = sdxl
  rng = np.random.default_rng(0)
  factors = {"unet": random_lora(pipe.unet, UNET_TARGETS, rng),
             "text_encoder": random_lora(pipe.text_encoder, TEXT_TARGETS, rng),
             "text_encoder_2": random_lora(pipe.text_encoder_2, TEXT_TARGETS, rng)}
  assert [len(f) for f in factors.values()] == [64, 12, 12]
  assert "encoder.layers.0.self_attn.q_proj" in factors["text_encoder"]  # flat CLIPTextModel (transformers 5)
  assert "text_model.encoder.layers.0.self_attn.q_proj" in factors["text_encoder_2"]
  return factors


def with_text_model(factors: dict) -> dict:
  """What the readers return: text paths under `text_model.`."""
  return {c: {(k if c == "unet" or k.startswith("text_model.") else "text_model." + k): v for k, v in f.items()}
          for c, f in factors.items()}


def assert_same_factors(got: dict, want: dict):
  assert got.keys() == want.keys()
  for comp in want:
    assert got[comp].keys() == want[comp].keys(), (comp, sorted(set(got[comp]) ^ set(want[comp]))[:5])
    for path, pair in want[comp].items():
      assert all(np.array_equal(g, w) for g, w in zip(got[comp][path], pair)), (comp, path)


def sdxl_files(factors: dict, configs: dict) -> dict[str, tuple[dict, dict]]:
  """{spelling: (tensors, metadata)} written by our functions."""
  from dreambooth_jax.io import sgm_keys

  names = sgm_keys.unet_module_names(configs["unet"])
  return {
      "kohya_sgm": (kohya.to_kohya(factors, ALPHA, kohya.KOHYA_PREFIXES_SDXL, unet_names=names), {}),
      "kohya": (kohya.to_kohya(factors, ALPHA, kohya.KOHYA_PREFIXES_SDXL), {}),  # diffusers' kohya-style names
      "peft": kohya.to_diffusers_peft(factors, ALPHA),
  }


@pytest.mark.parametrize("spelling", ["kohya_sgm", "peft"])
def test_sdxl_lora_file_loads_in_diffusers(sdxl, sdxl_lora, spelling, tmp_path):
  """diffusers loads our file and, fused, holds exactly base + (alpha / rank) * up @ down in every target."""
  import copy

  pipe, configs, states = sdxl
  tensors, metadata = sdxl_files(sdxl_lora, configs)[spelling]
  if spelling == "kohya_sgm":
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha" not in tensors  # 2 levels only
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k.lora_down.weight" in tensors
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in tensors
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in tensors
    assert "lora_te2_text_model_encoder_layers_2_self_attn_out_proj.lora_down.weight" in tensors
  else:
    assert "text_encoder_2.text_model.encoder.layers.0.self_attn.v_proj.lora_B.weight" in tensors
  kohya.save_lora(tmp_path / "lora.safetensors", tensors, metadata)
  target = copy.deepcopy(pipe)
  target.load_lora_weights(str(tmp_path / "lora.safetensors"))
  target.fuse_lora()
  target.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
  for comp in ("unet", "text_encoder", "text_encoder_2"):
    got = {k: to_numpy(v) for k, v in getattr(target, comp).state_dict().items()}
    assert got.keys() == states[comp].keys(), comp
    for path, (down, up) in sdxl_lora[comp].items():
      want = states[comp][path + ".weight"] + ALPHA / RANK * up @ down
      np.testing.assert_allclose(got[path + ".weight"], want, atol=LORA_ATOL, rtol=0, err_msg=f"{comp} {path}")
    untouched = [k for k in got if k.removesuffix(".weight") not in sdxl_lora[comp]]
    assert all(np.array_equal(got[k], states[comp][k]) for k in untouched), comp


def test_sdxl_lora_read_back_every_spelling(sdxl, sdxl_lora):
  from dreambooth_jax.io import sgm_keys

  _, configs, states = sdxl
  names = sgm_keys.unet_module_names(configs["unet"])
  known = {c: kohya.lora_targets(states[c]) for c in ("unet", "text_encoder", "text_encoder_2")}
  want = with_text_model(sdxl_lora)
  for spelling, (tensors, metadata) in sdxl_files(sdxl_lora, configs).items():
    assert kohya.lora_spelling(tensors) == spelling
    assert kohya.lora_family_hint(tensors) == "SDXL"  # lora_te1_/lora_te2_ or text_encoder_2.
    factors, alpha = kohya.read_lora(tensors, metadata, family_name="SDXL", text_encoders=("text_encoder",
                                     "text_encoder_2"), unet_names=names, known_modules_by_component=known,
                                     source=f"{spelling}.safetensors")
    assert alpha == ALPHA, spelling
    assert_same_factors(factors, want)
    # Without the model's module list the names resolve by the SD vocabulary alone, to the same paths.
    factors, _ = (kohya.from_diffusers_peft(tensors, metadata) if spelling == "peft"
                  else kohya.from_kohya(tensors, unet_names=names))
    assert_same_factors(factors, want)
  sgm_tensors = sdxl_files(sdxl_lora, configs)["kohya_sgm"][0]
  with pytest.raises(kohya.LoraFormatError, match=r"SGM-named .*unet_names"):
    kohya.from_kohya(sgm_tensors)


def test_lora_for_another_family_is_refused_by_name(sdxl, sdxl_lora):
  _, configs, states = sdxl
  known = {c: kohya.lora_targets(states[c]) for c in ("unet", "text_encoder", "text_encoder_2")}
  sdxl_args = dict(family_name="SDXL", text_encoders=("text_encoder", "text_encoder_2"),
                   known_modules_by_component=known, source="sd15_lora.safetensors")
  rng = np.random.default_rng(1)
  # An SD 1.5 LoRA: lora_te_ text encoder and 768-wide cross-attention keys/values.
  sd15 = {"unet": {p: ((rng.normal(size=(RANK, 768)).astype(np.float32), u) if ".attn2.to_k" in p or ".attn2.to_v"
                       in p else (d, u)) for p, (d, u) in sdxl_lora["unet"].items()},
          "text_encoder": sdxl_lora["text_encoder"]}
  with pytest.raises(kohya.LoraFormatError, match=r"sd15_lora\.safetensors: key lora_te_text_model_\S+ says this "
                     r"LoRA was made for SD 1\.x/2\.x, not for the SDXL model"):
    kohya.read_lora(kohya.to_kohya(sd15, ALPHA), None, **sdxl_args)
  # The same as PEFT names no family; the shapes do, and nothing is returned.
  with pytest.raises(kohya.LoraFormatError, match=r"sd15_lora\.safetensors: does not fit the SDXL model \(16 "
                     r"problems, 76 modules\); it looks made for SD 1\.x \(768-wide text\): unet down_blocks\.1\."
                     r"attentions\.0\.transformer_blocks\.0\.attn2\.to_k: LoRA is \(out 64, in 768\), the weight is "
                     r"\(out 64, in 80\)"):
    kohya.read_lora(*kohya.to_diffusers_peft(sd15, ALPHA), **sdxl_args)
  # kohya names of modules SDXL lacks (SD 1.5 has attention at level 0): every misfit listed, with the family.
  sd15_unet = {"unet": {**sd15["unet"], "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (
      rng.normal(size=(RANK, 768)).astype(np.float32), rng.normal(size=(32, RANK)).astype(np.float32))}}
  with pytest.raises(kohya.LoraFormatError, match=r"sd15_lora\.safetensors: does not fit the SDXL model \(17 "
                     r"problems, 65 modules\); it looks made for SD 1\.x .*down_blocks\.0\.attentions\.0\."
                     r"transformer_blocks\.0\.attn2\.to_k: no such module"):
    kohya.read_lora(kohya.to_kohya(sd15_unet, ALPHA), None, **sdxl_args)
  with pytest.raises(kohya.LoraFormatError, match=r"unet mid_block\.attentions\.0\.foo\.to_q: no such module"):
    kohya.check_lora_matches({"unet": {"mid_block.attentions.0.foo.to_q": sdxl_lora["unet"][
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"]}}, known, "SDXL")
  # And the other way round: an SDXL file on a one-text-encoder (SD) model.
  tensors, _ = sdxl_files(sdxl_lora, configs)["kohya_sgm"]
  with pytest.raises(kohya.LoraFormatError, match=r"x\.safetensors: key lora_te1_\S+ says this LoRA was made for "
                     r"SDXL, not for the SD 1\.5 model"):
    kohya.read_lora(tensors, None, family_name="SD 1.5", text_encoders=("text_encoder",), source="x.safetensors")
  # Names only (no shapes): the module list alone still refuses an unknown module.
  with pytest.raises(kohya.LoraFormatError, match=r"text_encoder_2 text_model\.encoder\.layers\.9\.self_attn\.q_proj: "
                     r"no such module"):
    kohya.check_lora_matches({"text_encoder_2": {"text_model.encoder.layers.9.self_attn.q_proj": (
        np.zeros((RANK, 48), np.float32), np.zeros((48, RANK), np.float32))}}, {
        c: set(m) for c, m in known.items()}, "SDXL")
