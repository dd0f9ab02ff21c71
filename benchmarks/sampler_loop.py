"""The sampler's loop forms side by side (issue #16): lax.fori_loop, unrolled, and a compiled step driven from the
host, on several model shapes, in one run on whatever backend JAX has.

  python benchmarks/sampler_loop.py                                  # tiny and diffusers-test, batch 4 x 20 steps
  python benchmarks/sampler_loop.py --models=sd15 --size=512 --batch=8 --steps=25 --dtype=bfloat16   # a GPU

One JSON line per (model, loop): first call (compile included), steady images/s (best of --repeats), and the max
abs difference of its images from fori's (all forms must agree). The default loop (sampler.DEFAULT_LOOP) is chosen
from these figures; docs/benchmarks.md has the table.
"""

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from dreambooth_jax.io import diffusers_folder as weights
from dreambooth_jax.sampling import sampler

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPES = {"tiny": weights.TINY_MODEL, "diffusers-test": ROOT / "benchmarks" / "shapes" / "diffusers-test",
          "sd15": ROOT / "dreambooth_jax" / "assets" / "sd-configs" / "sd15",
          "sdxl": ROOT / "dreambooth_jax" / "assets" / "sdxl-configs"}


def measure(pipe, settings, batch: int, repeats: int):
  prompts, indices = ["a photo of sks dog"] * batch, list(range(batch))
  t0 = time.perf_counter()
  first_images = np.asarray(jax.block_until_ready(sampler.generate(pipe, prompts, indices, settings=settings)))
  first = time.perf_counter() - t0
  best = float("inf")
  for r in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(sampler.generate(pipe, prompts, indices, seed=r + 1, settings=settings))
    best = min(best, time.perf_counter() - t0)
  return first, batch / best, first_images


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--models", default="tiny,diffusers-test")
  p.add_argument("--loops", default=",".join(sampler.LOOPS))
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  for model in args.models.split(","):
    pipe = weights.random_pipeline(SHAPES[model], dtype=getattr(jnp, args.dtype))
    reference = None
    for loop in args.loops.split(","):
      settings = sampler.SamplerSettings(steps=args.steps, guidance=7.5, height=args.size, width=args.size, loop=loop)
      first, images_per_s, images = measure(pipe, settings, args.batch, args.repeats)
      reference = images if reference is None else reference
      print(json.dumps({"device": str(jax.devices()[0].device_kind), "model": model, "loop": loop,
                        "batch": args.batch, "steps": args.steps, "size": args.size, "dtype": args.dtype,
                        "first_call_s": round(first, 2), "images_per_s": round(images_per_s, 3),
                        "max_abs_diff_vs_first_loop": float(np.abs(images - reference).max())}), flush=True)


if __name__ == "__main__":
  main()
