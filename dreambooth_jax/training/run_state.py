"""Model and run state shared by training, export, evaluation and sampling from a run: the model a config names,
its dtypes, LoRA settings, the trainable/frozen split as pure dicts, the trained view of a checkpoint.

Params and optimizer state are separate checkpoint items, so export and evaluation restore the params alone,
without building an optimizer.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import nnx

from dreambooth_jax import cli, config_files
from dreambooth_jax.data import batches
from dreambooth_jax.families import Pipeline
from dreambooth_jax.io import diffusers_folder, load, lora_files
from dreambooth_jax.models import lora as lora_lib
from dreambooth_jax.training import checkpoint, step as step_lib


def compute_dtype(config):
  if config.mixed_precision not in ("no", "bf16"):
    raise ValueError(f"mixed_precision={config.mixed_precision!r} is not supported: use 'bf16' (bf16 compute with "
                     "fp32 master params; no loss scaling needed) or 'no' (fp32)")
  return jnp.bfloat16 if config.mixed_precision == "bf16" else jnp.float32


def param_dtype(config):
  name = config.get("param_dtype", "float32")
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"param_dtype={name!r}: use 'float32' (fp32 master params) or 'bfloat16' (half the memory "
                     "for params, gradients and optimizer state; less precise updates)")
  return jnp.dtype(name)


def denoiser_kwargs(config) -> dict:
  return {"remat": config.remat, "attention_impl": config.get("attention", "auto")}


def resolve_defaults(config):
  """Fills the settings whose default is the model's own, in place, before anything uses them (the saved config
  holds the resolved values): resolution = 0 -> the family's default resolution for this model (SD 1.5 512,
  SD 2.1 768, SDXL 1024); a kohya dataset_config's concepts and settings applied (data/kohya_toml.py);
  config.concepts checked and each entry completed with its defaults."""
  from dreambooth_jax.data import concepts, kohya_toml  # noqa: PLC0415
  kohya_toml.apply_dataset_config(config)
  concepts.resolve_into(config)
  if config.resolution > 0:
    return config
  from dreambooth_jax import families  # noqa: PLC0415
  from dreambooth_jax.training import plan  # noqa: PLC0415 (the model's config folder, no weights read)
  folder = plan.model_config_dir(config)
  family = families.for_model_index(diffusers_folder.read_json(folder / "model_index.json"), str(folder))
  configs = {name: diffusers_folder.read_json(folder / name / "config.json") for name in (family.DENOISER, "vae")}
  config.resolution = family.default_resolution(configs)
  logging.info("resolution: %d (the %s model's default)", config.resolution, family.NAME)
  return config


def load_model(config) -> Pipeline:
  path = config.pretrained_model_name_or_path
  if config.random_init and path == "tiny":
    path = diffusers_folder.TINY_MODEL
  dtype, params_dtype = compute_dtype(config), param_dtype(config)  # refused by their own names first
  try:
    pipe = load.load_or_init_pipeline(
        path, random_init=config.random_init, seed=config.seed, dtype=dtype, param_dtype=params_dtype,
        variant=config.variant or None, unet_kwargs=denoiser_kwargs(config),
        single_file_config=config.get("single_file_config", "auto"))
  except (ValueError, FileNotFoundError) as e:  # which setting to change: the message names the key
    raise cli.with_context(e, f"pretrained_model_name_or_path={config.pretrained_model_name_or_path!r}") from None
  pipe.family.set_max_sequence_length(pipe.tokenizers, config.get("max_sequence_length") or None)
  check_resolution(config, pipe)
  return pipe


def check_resolution(config, pipe):
  """The UNet halves the latents once per down block: the resolution must divide by that and the VAE's factor."""
  multiple = pipe.size_multiple()
  if config.resolution <= 0 or config.resolution % multiple:
    nearest = max(multiple, round(config.resolution / multiple) * multiple)
    raise ValueError(f"resolution={config.resolution}: this model takes multiples of {multiple} (e.g. {nearest})")


def lora_settings(config, family=None) -> lora_lib.LoRASettings | None:
  """config.lora as LoRASettings (the family's default targets), or None when LoRA is off."""
  if not config.get("lora") or not config.lora.get("enabled"):
    return None
  if config.train_text_encoder:
    raise ValueError("train_text_encoder=True with lora.enabled=True: the text encoder would be fully trained; set "
                     "lora.text_encoder=True instead to train LoRA factors on it")
  return lora_lib.settings_from_config(config.lora, family)


def trainable_modules(pipe: Pipeline, config) -> dict:
  """The modules being trained: the denoiser, and the text encoders when they are trained. With config.lora they
  are LoRA-wrapped in place (factors initialised from the seed)."""
  settings = lora_settings(config, pipe.family)
  names = [pipe.family.DENOISER] + (list(pipe.family.TEXT_ENCODERS) if batches.trains_text_encoder(config) else [])
  modules = {name: pipe.modules[name] for name in names}
  init = None
  if config.get("init_lora"):  # read (and checked against the model) before the layers are wrapped
    if not settings:
      raise ValueError(f"init_lora={config.init_lora!r} needs lora.enabled=True (the run continues a LoRA)")
    init = lora_files.read_lora_for(pipe, config.init_lora)
  if settings:
    for i, (name, module) in enumerate(modules.items()):
      paths = lora_lib.apply_lora(module, settings, rngs=nnx.Rngs(config.seed + 1 + i),
                                  role=pipe.family.COMPONENTS[name].role, component=name)
      logging.info("LoRA rank %d on %d %s layers", settings.rank, len(paths), name)
  if init is not None:
    factors, alpha = init
    if set(factors) != set(modules):
      raise ValueError(f"init_lora={config.init_lora}: the file has LoRA on {sorted(factors)}, this run trains "
                       f"{sorted(modules)} (set lora.text_encoder to match)")
    for name, lora in factors.items():
      try:
        lora_lib.load_lora_factors(modules[name], lora, alpha=alpha)
      except ValueError as e:
        raise ValueError(f"init_lora={config.init_lora} ({name}): {e}; set lora.rank and the lora targets to the "
                         "file's") from None
    logging.info("LoRA factors initialised from %s", config.init_lora)
  return modules


def trainable_state(pipe: Pipeline, config) -> tuple[dict, dict, dict]:
  """(graphdefs, trainable params, frozen params) as pure dicts. With LoRA only the factors are trained (and in
  the optimizer state and checkpoints); the base weights join the frozen ones as frozen[name + "_base"]. Text
  encoders are frozen unless trained, and absent when their outputs are cached."""
  params, frozen = {}, {"vae": step_lib.pure_params(pipe.vae), "schedule": pipe.schedule}
  for name, module in trainable_modules(pipe, config).items():
    params[name], base = step_lib.split_trainable(module)
    if base is not None:
      frozen[f"{name}_base"] = base
  if not batches.caches_text(config):
    for name in pipe.family.TEXT_ENCODERS:
      if name not in params:
        frozen[name] = step_lib.pure_params(pipe.modules[name])
  if batches.uses_base_output(config):  # a fully trained component's base: a frozen copy (LoRA: adapters off)
    for name in params:
      if f"{name}_base" not in frozen:
        if name != pipe.family.DENOISER:
          raise ValueError("prior_preservation='base_output' with train_text_encoder=True: the base's text encoder "
                           "would need a frozen copy too; set lora.text_encoder=True (with lora.enabled) or "
                           "train_text_encoder=False")
        frozen[f"prior_{name}"] = jax.tree.map(_copy, params[name])
  graphdefs = {name: nnx.split(module)[0] for name, module in pipe.modules.items()}
  return graphdefs, params, frozen


def _copy(x):
  """A new buffer (the trained params are donated to the step; their frozen copy must not be the same array)."""
  return x if isinstance(x, jax.ShapeDtypeStruct) else jnp.array(x, copy=True)


def trained_view(pipe: Pipeline, graphdefs, params, frozen) -> Pipeline:
  """pipe with the components being trained rebuilt from `params` (LoRA factors merged with their base)."""
  return pipe.replace(**step_lib.merge_modules({n: graphdefs[n] for n in params}, params, frozen))


def used_params(state: dict) -> dict:
  """The weights a run samples, evaluates and exports: their moving average when it keeps one (use_ema), else the
  trained params."""
  return state.get("ema", state["params"])


def read_run_config(workdir: pathlib.Path) -> ml_collections.ConfigDict:
  """The run's saved config over the defaults: a setting added since the run was written takes its default (new
  settings default to the behaviour before them); a setting this version does not know (the run was written by
  another version, or the file was edited) is refused by name, since its effect on the run cannot be known."""
  config_path = workdir / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"{config_path}: missing; is {workdir} a training run folder?")
  return with_defaults(json.loads(config_path.read_text()), config_path)


def with_defaults(saved: dict, source) -> ml_collections.ConfigDict:
  unknown = config_files.unknown_keys(saved)
  if unknown:
    raise ValueError(f"{source}: setting(s) this version of dreambooth_jax does not know: "
                     f"{config_files.describe_unknown(unknown)}; the run was written by another version (use that "
                     "one, or rename or remove them in the file if they do not change the run)")
  config = config_files.defaults()
  config.update(saved)
  return config


def load_run(workdir: pathlib.Path, step: int | None):
  """(config, trained pipeline view, step) of a run's checkpoint (LoRA layers kept, not merged). Restores the
  params item alone (with use_ema their moving average): no optimizer is built."""
  config = read_run_config(workdir)
  pipe = load_model(config)
  graphdefs, params, frozen = trainable_state(pipe, config)
  mgr = checkpoint.manager(workdir, None)
  if mgr.latest_step() is None:
    raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint to export")
  if step is not None and step not in mgr.all_steps():
    raise ValueError(f"step {step}: no such checkpoint in {workdir}/checkpoints (have {sorted(mgr.all_steps())})")
  abstract = jax.eval_shape(lambda p: step_lib.init_train_state(p, optax.identity(), config.use_ema), params)
  item = "ema" if config.use_ema else "params"
  step, restored = checkpoint.restore_params(mgr, step, abstract[item], item=item)
  return config, trained_view(pipe, graphdefs, jax.device_get(restored), frozen), step
