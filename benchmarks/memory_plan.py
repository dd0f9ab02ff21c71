"""Memory plan of SD 1.5 / SD 2.1 DreamBooth configs under each memory lever, from XLA's memory analysis of the
compiled train step (no weights needed: the model is abstract).

  python benchmarks/memory_plan.py --model=sd15 --resolution=512 [--variants=baseline,remat,remat+bf16moments]

The numbers are per device for the backend it runs on (compile on the GPU for GPU figures: XLA's CPU and GPU
compilers schedule differently). Prints a Markdown table and a JSON line.

Target (issue #6): SD 1.5 full-UNet fine-tune at 512 px, batch 1 + 1, peak <= 16 GiB on one GPU with some set of
levers; on a GPU each row says whether its peak estimate meets it.
"""

import argparse
import json
import pathlib

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
TARGET_PEAK_GIB = 16.0
VARIANTS = {
    "baseline": {},
    "remat": {"remat": "full"},
    "remat+bf16moments": {"remat": "full", "optimizer_moments_bf16": True},
    "remat+bf16moments+bf16params": {"remat": "full", "optimizer_moments_bf16": True, "param_dtype": "bfloat16"},
    "chunked": {"attention": "chunked"},
    "chunked+bf16moments": {"attention": "chunked", "optimizer_moments_bf16": True},
    "remat+chunked+bf16moments": {"remat": "full", "attention": "chunked", "optimizer_moments_bf16": True},
    "chunked+bf16moments+bf16params": {"attention": "chunked", "optimizer_moments_bf16": True,
                                       "param_dtype": "bfloat16"},
    "lora16": {"lora.enabled": True, "lora.rank": 16},
    "lora16+remat": {"lora.enabled": True, "lora.rank": 16, "remat": "full"},
}


def config_for(model: str, resolution: int, batch: int, overrides: dict):
  from dreambooth_jax import config_files  # noqa: PLC0415
  c = config_files.load(ROOT / "configs" / "common.py")
  c.pretrained_model_name_or_path = str(ROOT / "dreambooth_jax" / "assets" / "sd-configs" / model)
  c.random_init = True
  c.resolution, c.train_batch_size = resolution, batch
  c.mixed_precision = "bf16"
  for key, value in overrides.items():
    target = c
    *parents, leaf = key.split(".")
    for part in parents:
      target = target[part]
    target[leaf] = value
  return c


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="sd15", choices=["sd15", "sd21"])
  p.add_argument("--resolution", type=int, default=512)
  p.add_argument("--batch", type=int, default=1, help="instance images (+ as many class images)")
  p.add_argument("--variants", default=",".join(VARIANTS))
  args = p.parse_args()
  from dreambooth_jax.training import run  # noqa: PLC0415
  rows = []
  for name in args.variants.split(","):
    step = run.dry_run(config_for(args.model, args.resolution, args.batch, VARIANTS[name]))
    m = step.memory
    rows.append({"variant": name, "params_gib": m.params / 2**30, "optimizer_gib": m.optimizer / 2**30,
                 "frozen_gib": m.frozen / 2**30, "temporaries_gib": m.temporaries / 2**30,
                 "peak_gib": m.peak / 2**30, "compile_s": step.compile_seconds})
    if jax.default_backend() == "gpu" and args.model == "sd15" and args.resolution == 512 and args.batch == 1:
      rows[-1]["meets_16gib_target"] = rows[-1]["peak_gib"] <= TARGET_PEAK_GIB
  print("| variant | params | optimizer | frozen | temporaries | peak estimate | compile |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['variant']} | {r['params_gib']:.2f} GiB | {r['optimizer_gib']:.2f} GiB | {r['frozen_gib']:.2f} GiB"
          f" | {r['temporaries_gib']:.2f} GiB | {r['peak_gib']:.2f} GiB | {r['compile_s']:.0f} s |")
  print(json.dumps({"args": vars(args), "rows": rows}))


if __name__ == "__main__":
  main()
