"""Stable Diffusion single-file checkpoints (.safetensors, original ldm layout) <-> our pipeline.

  load_single_file_pipeline("model.safetensors")                 # SD 1.x / 2.x, configs from assets/sd-configs
  export_single_file(sd, "out.safetensors", replace={"unet": trained_unet})

A single file holds tensors only; the model configs come from `config`: "auto" (OpenCLIP text keys
`cond_stage_model.model.*` -> "sd21", else "sd15"), a bundled name, or a diffusers folder. A 2.x file cannot say
whether it is v-prediction 768 (2.0/2.1) or epsilon 512 (2.x-base): "auto" assumes 2.1; pass
prediction_type="epsilon" (or a folder) for a base model. Key conversion is formats.single_file's.
"""

import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreambooth_jax.models import lora
from dreambooth_jax.io import safetensors as safetensors_io
from dreambooth_jax.sampling import schedules as schedule
from dreambooth_jax.io import tokenizers as tokenizer
from dreambooth_jax.io import diffusers_folder as weights
from dreambooth_jax.io import single_file_keys as sf
from dreambooth_jax.io.safetensors import CheckpointError

BUNDLED_CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "assets" / "sd-configs"
CONFIG_NAMES = ("sd15", "sd21")


def detect_config(tensors: dict, where: str = "single file") -> str:
  """"sd21" for OpenCLIP text-encoder keys, "sd15" for OpenAI-CLIP ones."""
  if any(k.startswith(sf.OPEN_CLIP_PREFIX) for k in tensors):
    return "sd21"
  if any(k.startswith(sf.CLIP_PREFIX) for k in tensors):
    return "sd15"
  raise CheckpointError(f"{where}: no text-encoder keys ({sf.CLIP_PREFIX}* or {sf.OPEN_CLIP_PREFIX}*): not a "
                        "Stable Diffusion 1.x/2.x single-file checkpoint (SDXL and others are not supported)")


def config_dir(config, tensors: dict, where: str) -> pathlib.Path:
  if config == "auto":
    config = detect_config(tensors, where)
  if config in CONFIG_NAMES:
    return BUNDLED_CONFIGS / config
  folder = pathlib.Path(config).expanduser()
  if not (folder / "model_index.json").is_file():
    raise CheckpointError(f"config={str(config)!r}: expected 'auto', one of {list(CONFIG_NAMES)} or a diffusers "
                          "folder with model_index.json and unet/vae/text_encoder/scheduler configs")
  return folder


def read_configs(folder: pathlib.Path) -> dict:
  configs = {"model_index": weights.read_json(folder / "model_index.json")}
  for component in weights.COMPONENTS:
    configs[component] = weights.read_json(folder / component / "config.json")
  configs["scheduler"] = weights.read_json(folder / "scheduler" / "scheduler_config.json")
  return configs


def load_config_tokenizer(folder: pathlib.Path):
  """The folder's tokenizer/ if it has one; else the bundled CLIP BPE files with the folder's
  tokenizer_config.json settings (SD 2.x pads with "!")."""
  if (folder / "tokenizer" / "vocab.json").is_file():
    return tokenizer.load_tokenizer(folder / "tokenizer")
  settings = weights.read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() \
      else {}
  from transformers import CLIPTokenizer  # noqa: PLC0415 (slow import)

  kwargs = {k: settings[k] for k in ("pad_token", "bos_token", "eos_token", "unk_token") if k in settings}
  return CLIPTokenizer(str(tokenizer.BUNDLED_TOKENIZER / "vocab.json"), str(tokenizer.BUNDLED_TOKENIZER / "merges.txt"),
                       model_max_length=settings.get("model_max_length", 77), **kwargs)


def single_file_names(configs: dict) -> dict[str, dict[str, str]]:
  """{component: {our torch key: single-file key}}, to name the file's tensor in errors."""
  names = {"unet": {d: l for d, (l, _) in sf.unet_key_map(configs["unet"]).items()},
           "vae": {d: l for d, (l, _) in sf.vae_key_map(configs["vae"]).items()},
           "text_encoder": dict(sf.text_key_map(configs["text_encoder"]))}
  if sf.is_open_clip(configs["text_encoder"]):
    for i in range(configs["text_encoder"]["num_hidden_layers"]):
      for p in sf.WB:
        for q in "qkv":
          names["text_encoder"][f"encoder.layers.{i}.self_attn.{q}_proj.{p}"] = (
              f"{sf.OPEN_CLIP_PREFIX}transformer.resblocks.{i}.attn.in_proj_{p} ({q} part)")
  return names


def _torch_shape(path: tuple, shape: tuple) -> tuple:
  if path[-1] == "kernel":
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else tuple(reversed(shape))
  return tuple(shape)


def _check_shapes(make, state_dict: dict, names: dict, where: str):
  """Shape mismatches named by the file's key (weights.load_module would name only the diffusers key)."""
  for path, var in nnx.to_flat_state(nnx.state(nnx.eval_shape(make), nnx.Param)):
    key = weights.torch_key(path)
    want = _torch_shape(path, var.get_value().shape)
    if key in state_dict and tuple(state_dict[key].shape) != want:
      raise CheckpointError(f"{where}: tensor {names.get(key, key)!r} (diffusers {key!r}) has shape "
                            f"{tuple(state_dict[key].shape)}, the model built from the config expects {want}")


def load_single_file_pipeline(path, *, config="auto", dtype=jnp.float32, param_dtype=jnp.float32,
                              prediction_type: str | None = None,
                              unet_kwargs: dict | None = None) -> weights.StableDiffusion:
  """Our pipeline from one .safetensors single file (pickles such as .ckpt are refused)."""
  path = pathlib.Path(path)
  if path.suffix in safetensors_io.PICKLE_SUFFIXES:
    safetensors_io.refuse_pickle(path)
  if path.suffix != ".safetensors":
    raise CheckpointError(f"{path}: expected a .safetensors single-file checkpoint")
  tensors = sf.load_single_file(path)
  folder = config_dir(config, tensors, str(path))
  configs = read_configs(folder)
  if prediction_type is not None:
    configs["scheduler"] = {**configs["scheduler"], "prediction_type": prediction_type}
  try:
    converted = sf.single_file_to_diffusers(tensors, unet_config=configs["unet"], vae_config=configs["vae"],
                                            text_config=configs["text_encoder"])
  except ValueError as e:
    raise CheckpointError(f"{path} (configs from {folder}): {e}") from None
  names = single_file_names(configs)
  modules = {}
  for component, state_dict in zip(weights.COMPONENTS, converted):
    model_config = weights.CONFIG_CLASSES[component].from_dict(configs[component])
    kwargs = (unet_kwargs or {}) if component == "unet" else {}

    def make(component=component, model_config=model_config, kwargs=kwargs):
      return weights.make_model(component, model_config, dtype=dtype, param_dtype=param_dtype, **kwargs)

    where = f"{path} ({component}, configs from {folder})"
    _check_shapes(make, state_dict, names[component], where)
    modules[component] = weights.load_module(make, state_dict, where=where, param_dtype=param_dtype)
  return weights.StableDiffusion(**modules, tokenizer=load_config_tokenizer(folder),
                                 schedule=schedule.schedule_from_config(configs["scheduler"]), configs=configs,
                                 model_dir=None)


def _torch_dict(module_or_state, component: str) -> dict[str, np.ndarray]:
  if isinstance(module_or_state, nnx.Module):
    if lora.lora_modules(module_or_state):  # a single file has no place for LoRA factors: fold them in
      module_or_state = lora.merge_lora(module_or_state)
    return weights.module_state_dict(module_or_state)
  state = module_or_state if isinstance(module_or_state, nnx.State) else nnx.State(module_or_state)
  if any(str(p[-1]) in ("lora_down", "lora_up") for p, _ in nnx.to_flat_state(state)):
    raise ValueError(f"{component}: the state holds LoRA factors; merge them first (lora.merge_lora on the module)")
  return weights.state_to_torch_dict(state)


def export_single_file(sd: weights.StableDiffusion, path, *, replace: dict | None = None, dtype: str = "fp16",
                       metadata: dict | None = None) -> pathlib.Path:
  """Writes sd (with `replace`: component -> module / nnx.State / pure dict, e.g. the trained UNet) as one
  original-layout .safetensors file. LoRA modules are merged into their base weights."""
  replace = replace or {}
  unknown = sorted(set(replace) - set(weights.COMPONENTS))
  if unknown:
    raise ValueError(f"replace: unknown components {unknown} (expected some of {list(weights.COMPONENTS)})")
  state_dicts = {c: _torch_dict(replace.get(c, getattr(sd, c)), c) for c in weights.COMPONENTS}
  single = sf.diffusers_to_single_file(state_dicts["unet"], state_dicts["vae"], state_dicts["text_encoder"],
                                       unet_config=sd.configs["unet"], vae_config=sd.configs["vae"],
                                       text_config=sd.configs["text_encoder"])
  prediction = sd.configs.get("scheduler", {}).get("prediction_type", "epsilon")
  info = {"dreambooth_jax.prediction_type": prediction}
  return sf.save_single_file(path, single, dtype=dtype, metadata={**info, **(metadata or {})})

