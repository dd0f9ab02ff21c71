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

from absl import app, flags

from dreambooth_jax import cli
from dreambooth_jax.io import export as export_lib
from dreambooth_jax.training import run_state


def resolve_step(workdir: pathlib.Path, step: str | None) -> int | None:
  if step is None:
    return None
  if step == "best":
    best = workdir / "best.json"
    if not best.is_file():
      raise app.UsageError(f"--step=best: {best} missing (train with eval_steps set to record one)")
    return int(json.loads(best.read_text())["step"])
  return int(step)


@cli.main("export")
def main(argv):
  del argv
  f = flags.FLAGS
  workdir = pathlib.Path(f.workdir)
  config, pipe, step = run_state.load_run(workdir, resolve_step(workdir, f.step))
  out = pathlib.Path(f.out) if f.out else workdir / f"export_step_{step}"
  path = export_lib.export(pipe, config, out, f.format, merge_lora=f.merge_lora, dtype=f.dtype)
  print(f"exported step {step} of {workdir} as {f.format} to {path}")


def define_flags():
  flags.DEFINE_string("workdir", None, "Training run folder (holds config.json and checkpoints/).", required=True)
  flags.DEFINE_string("step", None, "Checkpoint step to export: N, 'best' (needs eval_steps) or the latest.")
  flags.DEFINE_string("out", None, "Output folder or .safetensors file (default: WORKDIR/export_step_N).")
  flags.DEFINE_enum("format", "diffusers", export_lib.FORMATS, "What to write.")
  flags.DEFINE_bool("merge_lora", False, "LoRA run: fold the factors into the base for diffusers/single_file.")
  flags.DEFINE_string("dtype", "", "Weight dtype of the files: '' = float32 (single_file: fp16); float16, "
                      "bfloat16, float32.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
