"""Single-file checkpoints (.safetensors in the original layout: ldm / sgm) <-> our pipeline.

  load_single_file_pipeline("model.safetensors")        # family and configs detected from the tensor names
  export_single_file(pipe, "out.safetensors", replace={"unet": trained_unet})

A single file holds tensors only; the family is recognised from its tensor names and the model configs come from
`config`: "auto" (the family's bundled configs, chosen from the names), a bundled name, or a diffusers folder. An
SD 2.x file cannot say whether it is v-prediction 768 (2.0/2.1) or epsilon 512 (2.x-base): "auto" assumes 2.1;
pass prediction_type="epsilon" (or a folder) for a base model. Each family owns its key maps.
"""

import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreambooth_jax import families
from dreambooth_jax.families import Pipeline
from dreambooth_jax.io import diffusers_folder, safetensors as safetensors_io, single_file_keys, tokenizers
from dreambooth_jax.io.safetensors import CheckpointError
from dreambooth_jax.models import lora


def detect_family(tensors, where: str = "single file"):
  try:
    return families.for_single_file(tensors, where)
  except ValueError as e:
    raise CheckpointError(str(e)) from None


def config_dir(config, tensors, where: str) -> pathlib.Path:
  """The folder of config.json files describing a single file's model."""
  family = detect_family(tensors, where)
  if config == "auto":
    config = family.single_file_config(tensors)
  bundled = sorted(family.BUNDLED_CONFIGS)
  if config in bundled:
    return family.BUNDLED_CONFIGS[config]
  folder = pathlib.Path(config).expanduser()
  if not (folder / "model_index.json").is_file():
    raise CheckpointError(f"config={str(config)!r}: expected 'auto', one of {bundled} or a diffusers folder with "
                          f"model_index.json and the {family.NAME} component configs "
                          f"({', '.join(family.COMPONENTS)}, scheduler)")
  return folder


def read_configs(folder: pathlib.Path, family) -> dict:
  configs = {"model_index": diffusers_folder.read_json(folder / "model_index.json")}
  for component in family.COMPONENTS:
    configs[component] = diffusers_folder.read_json(folder / component / "config.json")
  configs["scheduler"] = diffusers_folder.read_json(folder / "scheduler" / "scheduler_config.json")
  return configs


def _torch_shape(path: tuple, shape: tuple) -> tuple:
  if path[-1] == "kernel":
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else tuple(reversed(shape))
  return tuple(shape)


def _check_shapes(make, state_dict: dict, names: dict, where: str):
  """Shape mismatches named by the file's key (load_module would name only the diffusers key)."""
  for path, var in nnx.to_flat_state(nnx.state(nnx.eval_shape(make), nnx.Param)):
    key = diffusers_folder.torch_key(path)
    want = _torch_shape(path, var.get_value().shape)
    if key in state_dict and tuple(state_dict[key].shape) != want:
      raise CheckpointError(f"{where}: tensor {names.get(key, key)!r} (diffusers {key!r}) has shape "
                            f"{tuple(state_dict[key].shape)}, the model built from the config expects {want}")


def load_single_file_pipeline(path, *, config="auto", dtype=jnp.float32, param_dtype=jnp.float32,
                              prediction_type: str | None = None, unet_kwargs: dict | None = None) -> Pipeline:
  """Our pipeline from one .safetensors single file (pickles such as .ckpt are refused)."""
  path = pathlib.Path(path)
  if path.suffix in safetensors_io.PICKLE_SUFFIXES:
    safetensors_io.refuse_pickle(path)
  if path.suffix != ".safetensors":
    raise CheckpointError(f"{path}: expected a .safetensors single-file checkpoint")
  tensors = single_file_keys.load_single_file(path)
  family = detect_family(tensors, str(path))
  folder = config_dir(config, tensors, str(path))
  configs = read_configs(folder, family)
  if prediction_type is not None:
    configs["scheduler"] = {**configs["scheduler"], "prediction_type": prediction_type}
  try:
    converted = family.from_single_file(tensors, configs)
  except ValueError as e:
    raise CheckpointError(f"{path} (configs from {folder}): {e}") from None
  names = family.single_file_names(configs)
  modules = {}
  for component, spec in family.COMPONENTS.items():
    model_config = spec.config_class.from_dict(configs[component])
    kwargs = diffusers_folder.component_kwargs(family, component, unet_kwargs)

    def make(component=component, model_config=model_config, kwargs=kwargs):
      return diffusers_folder.make_model(family, component, model_config, dtype=dtype, param_dtype=param_dtype,
                                         **kwargs)

    where = f"{path} ({component}, configs from {folder})"
    _check_shapes(make, converted[component], names[component], where)
    modules[component] = diffusers_folder.load_module(make, converted[component], where=where,
                                                      param_dtype=param_dtype)
  return Pipeline(family=family, modules=modules,
                  tokenizers={t: tokenizers.load_config_tokenizer(folder, t) for t in family.TOKENIZERS},
                  schedule=family.schedule_from_config(configs["scheduler"]), configs=configs, model_dir=None)


def _torch_dict(module_or_state, component: str) -> dict[str, np.ndarray]:
  if isinstance(module_or_state, nnx.Module):
    if lora.lora_modules(module_or_state):  # a single file has no place for LoRA factors: fold them in
      module_or_state = lora.merge_lora(module_or_state)
    return diffusers_folder.module_state_dict(module_or_state)
  state = module_or_state if isinstance(module_or_state, nnx.State) else nnx.State(module_or_state)
  if any(str(p[-1]) in ("lora_down", "lora_up") for p, _ in nnx.to_flat_state(state)):
    raise ValueError(f"{component}: the state holds LoRA factors; merge them first (lora.merge_lora on the module)")
  return diffusers_folder.state_to_torch_dict(state)


def export_single_file(pipe: Pipeline, path, *, replace: dict | None = None, dtype: str = "fp16",
                       metadata: dict | None = None) -> pathlib.Path:
  """Writes pipe (with `replace`: component -> module / nnx.State / pure dict, e.g. the trained UNet) as one
  original-layout .safetensors file. LoRA modules are merged into their base weights."""
  replace = replace or {}
  components = pipe.family.COMPONENTS
  unknown = sorted(set(replace) - set(components))
  if unknown:
    raise ValueError(f"replace: unknown components {unknown} (expected some of {list(components)})")
  state_dicts = {c: _torch_dict(replace.get(c, pipe.modules[c]), c) for c in components}
  single = pipe.family.to_single_file(state_dicts, pipe.configs)
  prediction = pipe.configs.get("scheduler", {}).get("prediction_type", "epsilon")
  info = {"dreambooth_jax.prediction_type": prediction}
  return single_file_keys.save_single_file(path, single, dtype=dtype, metadata={**info, **(metadata or {})})
