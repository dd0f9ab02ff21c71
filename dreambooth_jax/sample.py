"""Generate images with the jitted sampler (DDIM, or --scheduler=dpmpp_2m|euler|euler_a [--karras]; Flux folders:
flow-matching Euler with the distilled --guidance, --true_cfg with --negative_prompt, --max_sequence_length).

  python -m dreambooth_jax.sample --model=PATH_OR_HUB_ID --prompt="a photo of sks dog" --num_images=4 \
      --steps=50 --guidance=7.5 --seed=0 --height=512 --width=512 --out=DIR

Writes DIR/00000.png ... and DIR/index.json (file -> prompt, plus every setting), so evaluate.py can group images
by prompt and a run can be reproduced. --init_latents takes an (N, C, H/8, W/8) float32 .npy (NCHW, as diffusers'
`latents=` argument; for Flux the unpacked latent, packed as FluxPipeline packs it) to reproduce an image across
frameworks.
"""

import json
import pathlib
import time

import numpy as np
from absl import app, flags, logging
from PIL import Image
from tqdm import tqdm

from dreambooth_jax import cli, sharding
from dreambooth_jax.io import load, lora_files
from dreambooth_jax.sampling import flow_matching, sampler as sampling, schedulers


def read_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
  if bool(prompt) == bool(prompts_file):
    raise app.UsageError("give exactly one of --prompt and --prompts_file")
  if prompt:
    return [prompt]
  path = pathlib.Path(prompts_file)
  if not path.is_file():
    raise app.UsageError(f"--prompts_file {path}: no such file")
  prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
  if not prompts:
    raise app.UsageError(f"--prompts_file {path}: no prompts in it")
  return prompts


@cli.main("sample")
def main(argv):
  del argv
  import jax.numpy as jnp  # noqa: PLC0415
  prompts = read_prompts(flags.FLAGS.prompt, flags.FLAGS.prompts_file)
  f = flags.FLAGS
  all_prompts = [p for p in prompts for _ in range(f.num_images)]
  init = None
  if f.init_latents:
    init = np.load(f.init_latents).astype(np.float32)
    if init.ndim != 4 or init.shape[0] != len(all_prompts):
      raise app.UsageError(f"--init_latents {f.init_latents}: shape {init.shape}, expected "
                           f"({len(all_prompts)}, C, H/8, W/8)")
    init = init.transpose(0, 2, 3, 1)
  try:  # refused before the model loads
    settings = sampling.SamplerSettings(steps=f.steps, guidance=f.guidance, eta=f.eta, height=f.height,
                                        width=f.width, scheduler=f.scheduler, karras=f.karras, true_cfg=f.true_cfg,
                                        loop=f.loop or None)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[f.dtype]
  try:
    pipe = load.load_or_init_pipeline(f.model, random_init=f.random_init, seed=f.seed, dtype=dtype)
  except (ValueError, FileNotFoundError) as e:
    raise cli.with_context(e, f"--model={f.model}") from None
  try:
    pipe.family.set_max_sequence_length(pipe.tokenizers, f.max_sequence_length)
  except ValueError as e:
    raise app.UsageError(f"--max_sequence_length: {e}") from None
  lora_files.apply_lora_files(pipe, [lora_files.parse_lora_arg(arg) for arg in f.lora or []])
  mesh = sharding.make_mesh()
  out = pathlib.Path(f.out)
  out.mkdir(parents=True, exist_ok=True)
  index, start, first_batch = [], time.perf_counter(), None
  with tqdm(total=len(all_prompts), desc="sampling", unit="img") as bar:
    for indices, images in sampling.generate_all(pipe, all_prompts, seed=f.seed, batch_size=f.batch_size,
                                                 settings=settings, negative_prompt=f.negative_prompt,
                                                 init_latents_BHWC=init, mesh=mesh):
      first_batch = first_batch or time.perf_counter() - start
      for i, image in zip(indices, images):
        name = f"{i:05d}.png"
        Image.fromarray(image).save(out / name)
        index.append({"file": name, "prompt": all_prompts[i], "index": i})
      bar.update(len(indices))
  total = time.perf_counter() - start
  steady = len(all_prompts) - len(index[:f.batch_size])
  rate = steady / (total - first_batch) if steady and total > first_batch else len(index) / total
  logging.info("first batch (compile + run) %.1fs; %.2f images/s after it", first_batch, rate)
  print(f"wrote {len(index)} images to {out} (first batch incl. compile {first_batch:.1f}s, {rate:.2f} images/s)")
  settings_json = {k: v for k, v in f.flag_values_dict().items() if k in {
      "model", "prompt", "prompts_file", "negative_prompt", "num_images", "steps", "guidance", "eta", "seed",
      "height", "width", "batch_size", "init_latents", "random_init", "dtype", "lora", "scheduler", "karras", "true_cfg",
      "max_sequence_length"}}
  (out / "index.json").write_text(json.dumps({"settings": settings_json, "images": index}, indent=2))


def define_flags():
  flags.DEFINE_string("model", None, "Diffusers folder or hub id.", required=True)
  flags.DEFINE_string("prompt", None, "Prompt (or use --prompts_file).")
  flags.DEFINE_string("prompts_file", None, "Text file with one prompt per line.")
  flags.DEFINE_string("negative_prompt", "", "Negative prompt (the unconditional half of guidance).")
  flags.DEFINE_integer("num_images", 1, "Images per prompt.")
  flags.DEFINE_integer("steps", 50, "Sampler steps.")
  flags.DEFINE_enum("scheduler", None, [*schedulers.SCHEDULERS, flow_matching.SAMPLER_NAME],
                    "Sampler, equal to diffusers' DDIM (the default), DPMSolverMultistep (DPM++ 2M), EulerDiscrete, "
                    "EulerAncestralDiscrete schedulers built from the model's scheduler config; Flux: flow_euler "
                    "(FlowMatchEulerDiscreteScheduler, its only one and the default).")
  flags.DEFINE_bool("karras", False, "Karras sigmas (use_karras_sigmas; dpmpp_2m and euler).")
  flags.DEFINE_string("loop", "", "The loop over the steps: fori (default), unrolled or host; the same images "
                      "(docs/benchmarks.md compares their speed).")
  flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (1 = off; default 7.5); Flux: the distilled "
                     "guidance input of guidance-distilled models (dev; default 3.5).")
  flags.DEFINE_float("true_cfg", 1.0, "Flux: real classifier-free guidance scale with --negative_prompt (> 1 = on).")
  flags.DEFINE_integer("max_sequence_length", None, "Flux: T5 prompt tokens (default: the tokenizer's, 512).")
  flags.DEFINE_float("eta", 0.0, "DDIM eta (0 = deterministic DDIM; ddim only).")
  flags.DEFINE_integer("seed", 0, "Seed; image k uses fold_in(seed, k).")
  flags.DEFINE_integer("height", 512, "Image height.")
  flags.DEFINE_integer("width", 512, "Image width.")
  flags.DEFINE_integer("batch_size", 8, "Images per compiled batch (rounded up to a multiple of the devices).")
  flags.DEFINE_string("init_latents", None, ".npy of NCHW float32 initial latents, one per image.")
  flags.DEFINE_bool("random_init", False, "Build the model from its config.json files with random weights.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Compute dtype.")
  flags.DEFINE_multi_string("lora", [], "LoRA file (kohya, diffusers or PEFT .safetensors), FILE or FILE:SCALE; "
                            "repeatable. Folded into the weights before sampling.")
  flags.DEFINE_string("out", None, "Output folder.", required=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
