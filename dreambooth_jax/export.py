"""Export a training run in the formats other tools load.

  python -m dreambooth_jax.export --workdir=runs/dog [--step=N|best] --out=PATH
      [--format=diffusers|single_file|lora_kohya|lora_diffusers] [--merge_lora] [--dtype=float16]

  diffusers       a folder StableDiffusionPipeline.from_pretrained loads (all components, trained ones replaced)
  single_file     one original-layout .safetensors (from_single_file, AUTOMATIC1111, ComfyUI)
  lora_kohya      kohya sd-scripts LoRA .safetensors (AUTOMATIC1111, ComfyUI, diffusers' load_lora_weights)
  lora_diffusers  diffusers/PEFT LoRA .safetensors (pipe.load_lora_weights)

A LoRA run exports as either LoRA format; for diffusers/single_file pass --merge_lora to fold the factors into the
base weights. The frozen components come from the base model named in WORKDIR/config.json.
"""

import json
import pathlib

import jax
import ml_collections
from absl import app, flags, logging

from dreambooth_jax.training import checkpoint
from dreambooth_jax.models import lora as lora_lib
from dreambooth_jax.training import optim
from dreambooth_jax.io import single_file as single_file_io
from dreambooth_jax.training import step as train_step_lib
from dreambooth_jax.io import diffusers_folder as weights
from dreambooth_jax.io import lora_files as kohya

FORMATS = ("diffusers", "single_file", "lora_kohya", "lora_diffusers")
DTYPES = {"": None, "float32": None, "fp32": None, "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16",
          "bf16": "bfloat16"}


def _merged(sd: weights.StableDiffusion) -> dict:
  return {name: lora_lib.merge_lora(getattr(sd, name)) for name in ("unet", "text_encoder")
          if lora_lib.lora_modules(getattr(sd, name))}


def export_diffusers(sd: weights.StableDiffusion, out, dtype: str | None = None) -> pathlib.Path:
  """Writes sd (the trained view; LoRA layers are merged into their base) as a diffusers folder."""
  out = weights.save_pipeline(sd, out, replace=_merged(sd) or None, dtype=dtype)
  logging.info("exported diffusers folder to %s", out)
  return out


def lora_metadata(sd: weights.StableDiffusion, config) -> dict:
  """What a LoRA file says about itself: base model, rank, alpha, trigger prompt (kohya ss_* and modelspec keys,
  which AUTOMATIC1111/ComfyUI show)."""
  rank = {node.rank for name in ("unet", "text_encoder")
          for node in lora_lib.lora_modules(getattr(sd, name)).values()}.pop()
  alpha = lora_lib.lora_scale(sd.unet) * rank
  return {"ss_base_model_version": str(config.pretrained_model_name_or_path), "ss_network_dim": rank,
          "ss_network_alpha": alpha, "ss_network_module": "networks.lora", "modelspec.trigger_phrase":
          config.instance_prompt, "dreambooth_jax.base_model": config.pretrained_model_name_or_path,
          "dreambooth_jax.rank": rank, "dreambooth_jax.alpha": alpha,
          "dreambooth_jax.instance_prompt": config.instance_prompt}


def export_lora(sd: weights.StableDiffusion, config, out, fmt: str) -> pathlib.Path:
  """Writes the LoRA factors of sd's UNet (and text encoder, when it has LoRA) as one .safetensors."""
  if not lora_lib.lora_modules(sd.unet):
    raise ValueError(f"--format={fmt}: this run trained the full model, not LoRA; export it with "
                     "--format=diffusers or --format=single_file")
  out = pathlib.Path(out)
  if out.suffix != ".safetensors":
    out = out / "pytorch_lora_weights.safetensors"
  out.parent.mkdir(parents=True, exist_ok=True)
  text = lora_lib.lora_factors(sd.text_encoder) if lora_lib.lora_modules(sd.text_encoder) else None
  meta = lora_metadata(sd, config)
  alpha = meta["dreambooth_jax.alpha"]
  if fmt == "lora_kohya":
    tensors, extra = kohya.to_kohya(lora_lib.lora_factors(sd.unet), text, alpha), {}
  else:
    tensors, extra = kohya.to_diffusers_peft(lora_lib.lora_factors(sd.unet), text, alpha)
  kohya.save_lora(out, tensors, {**meta, **extra})
  logging.info("exported %s LoRA to %s", fmt, out)
  return out


def export(sd, config, out, fmt: str = "diffusers", *, merge_lora: bool = False, dtype: str = "") -> pathlib.Path:
  if fmt not in FORMATS:
    raise ValueError(f"--format={fmt!r}: expected one of {list(FORMATS)}")
  if dtype not in DTYPES:
    raise ValueError(f"--dtype={dtype!r}: expected one of {sorted(DTYPES)}")
  if fmt.startswith("lora_"):
    return export_lora(sd, config, out, fmt)
  if lora_lib.lora_modules(sd.unet) and not merge_lora:
    raise ValueError(f"--format={fmt}: this is a LoRA run; pass --merge_lora to write the base model with the LoRA "
                     "folded in, or use --format=lora_kohya / lora_diffusers")
  if fmt == "diffusers":
    return export_diffusers(sd, out, dtype=DTYPES[dtype])
  out = pathlib.Path(out)
  if out.suffix != ".safetensors":
    out = out / "model.safetensors"
  out.parent.mkdir(parents=True, exist_ok=True)
  file_dtype = {None: "fp32", "float16": "fp16", "bfloat16": "bf16"}[DTYPES[dtype or "fp16"]]
  path = single_file_io.export_single_file(sd, out, replace=_merged(sd) or None, dtype=file_dtype,
                                           metadata={"dreambooth_jax.base_model": config.pretrained_model_name_or_path,
                                                     "modelspec.trigger_phrase": config.instance_prompt})
  logging.info("exported single file to %s", path)
  return path


def load_run(workdir: pathlib.Path, step: int | None):
  """(config, trained pipeline view, step) of a run's checkpoint (LoRA layers kept, not merged)."""
  from dreambooth_jax import train  # noqa: PLC0415 (shares the trainer's model building)

  config_path = workdir / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"{config_path}: missing; is {workdir} a training run folder?")
  config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
  sd = train.load_model(config)
  graphdefs, params, frozen = train.trainable_state(sd, config)
  tx, _ = optim.make_optimizer(config, tuple(params))
  abstract = jax.eval_shape(lambda p: train_step_lib.init_train_state(p, tx), params)
  mgr = checkpoint.manager(workdir, None)
  if mgr.latest_step() is None:
    raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint to export")
  if step is not None and step not in mgr.all_steps():
    raise ValueError(f"step {step}: no such checkpoint in {workdir}/checkpoints (have {sorted(mgr.all_steps())})")
  step, state, _ = checkpoint.restore(mgr, step, abstract)
  view = train.trained_view(sd, graphdefs, jax.device_get(state["params"]), frozen)
  return config, view, step


def resolve_step(workdir: pathlib.Path, step: str | None) -> int | None:
  if step is None:
    return None
  if step == "best":
    best = workdir / "best.json"
    if not best.is_file():
      raise app.UsageError(f"--step=best: {best} missing (train with eval_steps set to record one)")
    return int(json.loads(best.read_text())["step"])
  return int(step)


def main(argv):
  del argv
  f = flags.FLAGS
  workdir = pathlib.Path(f.workdir)
  config, sd, step = load_run(workdir, resolve_step(workdir, f.step))
  out = pathlib.Path(f.out) if f.out else workdir / f"export_step_{step}"
  path = export(sd, config, out, f.format, merge_lora=f.merge_lora, dtype=f.dtype)
  print(f"exported step {step} of {workdir} as {f.format} to {path}")


def define_flags():
  flags.DEFINE_string("workdir", None, "Training run folder (holds config.json and checkpoints/).", required=True)
  flags.DEFINE_string("step", None, "Checkpoint step to export: N, 'best' (needs eval_steps) or the latest.")
  flags.DEFINE_string("out", None, "Output folder or .safetensors file (default: WORKDIR/export_step_N).")
  flags.DEFINE_enum("format", "diffusers", FORMATS, "What to write.")
  flags.DEFINE_bool("merge_lora", False, "LoRA run: fold the factors into the base for diffusers/single_file.")
  flags.DEFINE_string("dtype", "", "Weight dtype of the files: '' = float32 (single_file: fp16); float16, "
                      "bfloat16, float32.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
