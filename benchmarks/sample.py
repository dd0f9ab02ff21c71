"""Sampler benchmark: our jitted DDIM loop vs diffusers-torch on the same device, in one run.

  python benchmarks/sample.py --model=tiny --batch=4 --steps=20 --size=64         # CPU, the bundled tiny model
  python benchmarks/sample.py --model=sd15 --batch=8 --steps=50 --size=512 --dtype=bfloat16  # GPU, SD 1.5 shapes
  python benchmarks/sample.py --model=/path/to/sd15 ...                             # a real diffusers folder

Prints compile time, images/s for both and the ratio (ours / torch). Target on a GPU: >= 1.5x.
"""

import argparse
import json
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp

from dreambooth_jax.sampling import sampler as sampling
from dreambooth_jax.io import diffusers_folder as weights


def ours_images_per_s(pipe, prompts, settings, repeats) -> tuple[float, float]:
  """(images/s, seconds of the first batch, compile included) of sampling.generate_all, as the product samples:
  `repeats` batches of len(prompts), uint8 images on the host (torch's pipeline returns numpy images too)."""
  generate = lambda seed, batches: sum(len(images) for _, images in sampling.generate_all(
      pipe, list(prompts) * batches, seed=seed, batch_size=len(prompts), settings=settings))
  t0 = time.perf_counter()
  generate(0, 1)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  return generate(1, repeats) / (time.perf_counter() - t0), first


def torch_images_per_s(model_dir, prompts, steps, size, guidance, dtype, repeats):
  """The folder's diffusers pipeline (StableDiffusion, StableDiffusionXL: DDIM as ours; Flux: its flow-matching
  Euler and the distilled guidance input, as ours) at `guidance`."""
  import torch  # noqa: PLC0415
  from diffusers import DDIMScheduler, DiffusionPipeline, FluxPipeline  # noqa: PLC0415
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
  index = json.loads((pathlib.Path(model_dir) / "model_index.json").read_text())
  extra = {"add_watermarker": False} if index["_class_name"] == "StableDiffusionXLPipeline" else {}
  pipe = DiffusionPipeline.from_pretrained(model_dir, torch_dtype=torch_dtype, **extra).to(device)
  if not isinstance(pipe, FluxPipeline):
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
  pipe.set_progress_bar_config(disable=True)
  run = lambda: pipe(prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                     output_type="np")
  run()  # warm-up
  if device == "cuda":
    torch.cuda.synchronize()
  t0 = time.perf_counter()
  for _ in range(repeats):
    run()
  if device == "cuda":
    torch.cuda.synchronize()
  return len(prompts) * repeats / (time.perf_counter() - t0), device


SD_CONFIGS = weights.TINY_MODEL.parent / "sd-configs"
RANDOM_MODELS = {"tiny": weights.TINY_MODEL, "sd15": SD_CONFIGS / "sd15", "sd21": SD_CONFIGS / "sd21"}
TARGET_RATIO = 1.5  # on a GPU: our images/s over diffusers-torch's, same model, batch, steps and dtype


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", default="tiny", help="'tiny', 'sd15', 'sd21' (random weights from the bundled "
                      "configs: speed does not depend on the values) or a diffusers folder")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--guidance", type=float, default=7.5)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no_torch", action="store_true")
  args = parser.parse_args()
  dtype = getattr(jnp, args.dtype)
  if args.model in RANDOM_MODELS:
    sd = weights.random_pipeline(RANDOM_MODELS[args.model], dtype=dtype)
    model_dir = pathlib.Path(tempfile.mkdtemp()) / args.model
    if not args.no_torch:
      weights.save_pipeline(sd, model_dir)  # the same weights for diffusers-torch
  else:
    sd, model_dir = weights.load_pipeline(args.model, dtype=dtype), args.model
  prompts = ["a photo of sks dog"] * args.batch
  settings = sampling.SamplerSettings(steps=args.steps, guidance=args.guidance, height=args.size, width=args.size)
  ours, first = ours_images_per_s(sd, prompts, settings, args.repeats)
  result = {"device": str(jax.devices()[0].device_kind), "model": args.model, "batch": args.batch,
            "steps": args.steps, "size": args.size, "dtype": args.dtype,
            "first_call_incl_compile_s": round(first, 2), "ours_images_per_s": round(ours, 3)}
  if not args.no_torch:
    theirs, device = torch_images_per_s(model_dir, prompts, args.steps, args.size, args.guidance, args.dtype,
                                        args.repeats)
    result.update(torch_device=device, torch_images_per_s=round(theirs, 3), ratio=round(ours / theirs, 2))
    if jax.default_backend() == "gpu":
      result["target"] = {"ratio_min": TARGET_RATIO, "met": ours / theirs >= TARGET_RATIO}
  print(json.dumps(result))


if __name__ == "__main__":
  main()
