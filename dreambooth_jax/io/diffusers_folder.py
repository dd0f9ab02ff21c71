"""Diffusers folders <-> our NNX modules: find, read, convert, load strictly, and save back.

Our parameter paths equal the torch state-dict keys (see models/layers.py), so conversion is generic:
  `<path>.kernel` (conv, HWIO) <- `<path>.weight` (OIHW);  `<path>.kernel` (linear, in x out) <- `.weight` (out x in)
  `<path>.scale` (norms) and `<path>.embedding` (embeddings) <- `<path>.weight`;  `<path>.bias` <- `.bias`.
"""

import functools
import json
import os
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreambooth_jax import families
from dreambooth_jax.families import Pipeline
from dreambooth_jax.io import safetensors as safetensors_io, tokenizers
from dreambooth_jax.io.safetensors import CheckpointError

# Buffers some checkpoints carry that are not parameters.
IGNORED_KEYS = ("text_model.embeddings.position_ids", "embeddings.position_ids")
# Old VAE checkpoints name the mid-block attention like this; diffusers renames them on load too.
DEPRECATED_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


# ----------------------------------------------------------------------------------------------- conversion

def torch_key(path: tuple) -> str:
  *prefix, leaf = (str(p) for p in path)
  leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
  return ".".join([*prefix, leaf])


def from_torch_layout(path: tuple, array: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":
    return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T
  return array


def to_torch_layout(path: tuple, array: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":
    return array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T
  return array


def normalize_keys(state_dict: dict, role: str) -> dict:
  """Accepts the key spellings found in the wild: CLIP with/without `text_model.`, deprecated VAE attention."""
  out = {}
  for key, value in state_dict.items():
    if key in IGNORED_KEYS:
      continue
    if role == "text" and key.startswith("text_model."):
      key = key[len("text_model."):]
    if role == "vae" and ".attentions." in key:
      head, name, leaf = key.rsplit(".", 2)
      if name in DEPRECATED_VAE_ATTENTION:
        key = f"{head}.{DEPRECATED_VAE_ATTENTION[name]}.{leaf}"
        if value.ndim == 4:  # ldm-era 1x1 conv weights
          value = value[:, :, 0, 0]
    out[key] = value
  return out


def module_state_dict(module: nnx.Module) -> dict[str, np.ndarray]:
  """Torch-named, torch-layout numpy arrays of a module's parameters (what diffusers' state_dict() holds)."""
  flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
  return {torch_key(path): to_torch_layout(path, np.asarray(jax.device_get(var.get_value())))
          for path, var in flat}


def state_to_torch_dict(state: nnx.State) -> dict[str, np.ndarray]:
  return {torch_key(path): to_torch_layout(path, np.asarray(jax.device_get(var.get_value())))
          for path, var in nnx.to_flat_state(state)}


def load_module(make: Callable[[], nnx.Module], state_dict: dict, *, where: str, param_dtype=jnp.float32,
                built_from: str = "its config.json"):
  """Builds `make()` abstractly (no random init) and fills it from a torch state dict, strictly."""
  abstract = nnx.eval_shape(make)
  graphdef, state = nnx.split(abstract)
  flat = nnx.to_flat_state(state)
  expected = {torch_key(path): (path, var) for path, var in flat if isinstance(var, nnx.Param)}
  missing = sorted(set(expected) - set(state_dict))
  unexpected = sorted(set(state_dict) - set(expected))
  if missing or unexpected:
    raise CheckpointError(f"{where}: checkpoint does not match the model built from {built_from}.\n"
                          f"  missing keys ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}\n"
                          f"  unexpected keys ({len(unexpected)}): {unexpected[:20]}"
                          f"{' ...' if len(unexpected) > 20 else ''}")
  values = []
  for path, var in flat:
    if not isinstance(var, nnx.Param):
      values.append((path, var))
      continue
    key = torch_key(path)
    array = from_torch_layout(path, state_dict[key])
    if array.shape != var.get_value().shape:
      raise CheckpointError(f"{where}: tensor {key!r} has shape {tuple(state_dict[key].shape)}, the model "
                            f"expects {to_torch_layout(path, np.empty(var.get_value().shape)).shape}")
    values.append((path, var.replace(jnp.asarray(array, dtype=param_dtype))))
  return nnx.merge(graphdef, nnx.from_flat_state(values))


# ----------------------------------------------------------------------------------------------- folders

def resolve_model_dir(name_or_path: str | os.PathLike, variant: str | None = None) -> pathlib.Path:
  """A local diffusers folder as is; otherwise a hub id fetched with huggingface_hub (needs a network): first its
  model_index.json, then only what its family's components need (configs, tokenizers, the weight files of the
  chosen variant), not every checkpoint the repository holds."""
  path = pathlib.Path(name_or_path).expanduser()
  if path.exists():
    if not (path / "model_index.json").is_file():
      raise CheckpointError(f"{path}: not a diffusers model folder (no model_index.json)")
    return path
  index_dir = fetch_from_hub(name_or_path, "", ["model_index.json"])
  family = families.for_model_index(read_json(index_dir / "model_index.json"), str(name_or_path))
  return fetch_from_hub(name_or_path, "", hub_patterns(family, variant))


def hub_patterns(family, variant: str | None) -> list[str]:
  """The files of a hub repository that a pipeline of this family (and variant) is loaded from."""
  patterns = ["model_index.json", "scheduler/*", *(f"{t}/*" for t in family.TOKENIZERS)]
  for name, component in family.COMPONENTS.items():
    stem = f"{name}/{component.weight_stem}" + (f".{variant}" if variant else "")
    patterns += [f"{name}/config.json", f"{stem}.safetensors", f"{stem}.safetensors.index.json",
                 f"{name}/{component.weight_stem}-*-of-*{f'.{variant}' if variant else ''}.safetensors"]
  return patterns


def fetch_from_hub(name_or_path, what: str, allow_patterns: list[str]) -> pathlib.Path:
  """A hub id ('owner/name') downloaded with huggingface_hub (needs a network); `what` prefixes the errors."""
  name, prefix = str(name_or_path), f"{what} " if what else ""
  if name.startswith((".", "/", "~")) or name.count("/") != 1:
    raise CheckpointError(f"{prefix}{name}: no such folder, and not a hub id of the form 'owner/name'")
  try:
    from huggingface_hub import snapshot_download
    return pathlib.Path(snapshot_download(name, allow_patterns=allow_patterns))
  except Exception as e:  # offline, unknown repo, gated repo ...
    raise CheckpointError(
        f"{prefix}{name}: could not fetch it from the Hugging Face hub ({type(e).__name__}: {e}). Without a network, "
        f"download it elsewhere (`huggingface-cli download {name}`) and pass the local folder instead.") from None


def read_json(path: pathlib.Path) -> dict:
  if not path.is_file():
    raise CheckpointError(f"{path}: missing")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def weight_files(folder: pathlib.Path, stem: str, variant: str | None) -> list[pathlib.Path]:
  """The safetensors file(s) of one component: single file or sharded index, preferring the variant."""
  if not folder.is_dir():
    raise CheckpointError(f"{folder}: missing component folder")
  variants = [variant, None] if variant else [None, "fp16"]
  for v in variants:
    name = f"{stem}.{v}.safetensors" if v else f"{stem}.safetensors"
    if (folder / name).is_file():
      return [folder / name]
    index = folder / f"{name}.index.json"
    if index.is_file():
      shards = sorted(set(read_json(index).get("weight_map", {}).values()))
      if not shards:
        raise CheckpointError(f"{index}: empty weight_map")
      return [folder / s for s in shards]
  pickles = [p for p in folder.iterdir() if p.suffix in safetensors_io.PICKLE_SUFFIXES]
  if pickles:
    safetensors_io.refuse_pickle(pickles[0])
  raise CheckpointError(f"{folder}: no {stem}.safetensors (or sharded index, or fp16 variant) found")


def read_component_weights(model_dir: pathlib.Path, family, component: str, variant: str | None = None) -> dict:
  spec = family.COMPONENTS[component]
  tensors = {}
  for f in weight_files(model_dir / component, spec.weight_stem, variant):
    if not f.is_file():
      raise CheckpointError(f"{f}: listed in the shard index but missing")
    tensors.update(safetensors_io.load_file(f))
  tensors = normalize_keys(tensors, spec.role)
  return spec.normalize(tensors) if spec.normalize else tensors


def make_model(family, component: str, config, *, seed: int = 0, dtype=jnp.float32, param_dtype=jnp.float32,
               **kwargs):
  dtype = family.component_dtype(component, config, dtype)  # e.g. SDXL's VAE never computes in fp16
  return family.COMPONENTS[component].model_class(config, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype,
                                                  **kwargs)


def component_kwargs(family, component: str, denoiser_kwargs: dict | None) -> dict:
  """Build options (remat, attention) go to the denoiser only."""
  return dict(denoiser_kwargs or {}) if family.COMPONENTS[component].role == "denoiser" else {}


def load_component(model_dir: pathlib.Path, family, component: str, *, dtype=jnp.float32, param_dtype=jnp.float32,
                   variant: str | None = None, **model_kwargs):
  raw = read_json(model_dir / component / "config.json")
  config = family.COMPONENTS[component].config_class.from_dict(raw)
  state_dict = read_component_weights(model_dir, family, component, variant)
  module = load_module(
      lambda: make_model(family, component, config, dtype=dtype, param_dtype=param_dtype, **model_kwargs),
      state_dict, where=str(model_dir / component), param_dtype=param_dtype)
  return module, raw


def load_pipeline(name_or_path, *, dtype=jnp.float32, param_dtype=jnp.float32, variant: str | None = None,
                  unet_kwargs: dict | None = None) -> Pipeline:
  """A diffusers folder (or hub id) of any supported family; `unet_kwargs` are the denoiser's build options."""

  model_dir = resolve_model_dir(name_or_path, variant)
  index = read_json(model_dir / "model_index.json")
  family = families.for_model_index(index, str(model_dir / "model_index.json"))
  configs, modules = {"model_index": index}, {}
  for component in family.COMPONENTS:
    if not (model_dir / component).is_dir():
      raise CheckpointError(f"{model_dir}: the {family.NAME} component folder {component}/ is missing")
    modules[component], configs[component] = load_component(
        model_dir, family, component, dtype=dtype, param_dtype=param_dtype, variant=variant,
        **component_kwargs(family, component, unet_kwargs))
  configs["scheduler"] = read_json(model_dir / "scheduler" / "scheduler_config.json")
  return Pipeline(family=family, modules=modules,
                  tokenizers={t: tokenizers.load_tokenizer(model_dir / t) for t in family.TOKENIZERS},
                  schedule=family.schedule_from_config(configs["scheduler"]), configs=configs, model_dir=model_dir)


# ----------------------------------------------------------------------------------------------- saving

def save_component(module_or_state, raw_config: dict, out_dir: pathlib.Path, family, component: str,
                   dtype: str | None = None):
  """Writes config.json + safetensors with the original key names into out_dir/component."""
  folder = out_dir / component
  folder.mkdir(parents=True, exist_ok=True)
  if isinstance(module_or_state, nnx.Module):
    tensors = module_state_dict(module_or_state)
  else:
    tensors = state_to_torch_dict(module_or_state)
  spec = family.COMPONENTS[component]
  if spec.save_keys is not None:
    tensors = spec.save_keys(tensors)
  if dtype is not None:
    tensors = {k: v.astype(dtype) for k, v in tensors.items()}
  (folder / "config.json").write_text(json.dumps(raw_config, indent=2, sort_keys=True))
  safetensors_io.save_file(tensors, folder / f"{spec.weight_stem}.safetensors", metadata={"format": "pt"})


def save_pipeline(pipe: Pipeline, out_dir, *, replace: dict | None = None, dtype: str | None = None):
  """A diffusers folder that the family's diffusers pipeline class loads with from_pretrained. `replace` maps
  component -> module or nnx.State to write instead of the pipeline's own (e.g. the trained UNet)."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  replace = replace or {}
  for component in pipe.family.COMPONENTS:
    save_component(replace.get(component, pipe.modules[component]), pipe.configs[component], out_dir, pipe.family,
                   component, dtype)
  (out_dir / "scheduler").mkdir(exist_ok=True)
  (out_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(pipe.configs["scheduler"], indent=2))
  for name, tokenizer in pipe.tokenizers.items():
    tokenizer.save_pretrained(str(out_dir / name))
  index = dict(pipe.configs["model_index"])
  for key in ("safety_checker", "feature_extractor", "image_encoder"):  # not exported: drop, don't dangle
    if key in index:
      index[key] = [None, None]
  for key, value in pipe.family.MODEL_INDEX_DEFAULTS.items():
    index.setdefault(key, value)
  (out_dir / "model_index.json").write_text(json.dumps(index, indent=2))
  return out_dir


TINY_MODEL = pathlib.Path(__file__).resolve().parents[1] / "assets" / "tiny-sd"


def random_pipeline(config_dir=TINY_MODEL, *, seed: int = 0, dtype=jnp.float32, param_dtype=jnp.float32,
                    unet_kwargs: dict | None = None, abstract: bool = False) -> Pipeline:
  """A pipeline with seeded random weights from a folder of config.json files only (the offline default).
  abstract: every parameter a ShapeDtypeStruct (nnx.eval_shape), nothing allocated (memory planning).
  A tokenizer folder without its vocabulary is the bundled CLIP BPE (with the folder's settings)."""

  config_dir = pathlib.Path(config_dir)
  index = read_json(config_dir / "model_index.json")
  family = families.for_model_index(index, str(config_dir / "model_index.json"))
  configs, modules = {"model_index": index}, {}
  for i, component in enumerate(family.COMPONENTS):
    configs[component] = read_json(config_dir / component / "config.json")
    config = family.COMPONENTS[component].config_class.from_dict(configs[component])
    make = functools.partial(make_model, family, component, config, seed=seed + i, dtype=dtype,
                             param_dtype=param_dtype, **component_kwargs(family, component, unet_kwargs))
    modules[component] = nnx.eval_shape(make) if abstract else make()
  configs["scheduler"] = read_json(config_dir / "scheduler" / "scheduler_config.json")
  return Pipeline(family=family, modules=modules,
                  tokenizers={t: tokenizers.load_config_tokenizer(config_dir, t) for t in family.TOKENIZERS},
                  schedule=family.schedule_from_config(configs["scheduler"]), configs=configs, model_dir=None)
