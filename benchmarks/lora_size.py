"""What LoRA saves: trainable parameters, optimizer state and checkpoint size, full fine-tune vs LoRA.

  python benchmarks/lora_size.py [--ranks=4,16] [--tiny_run]

SD 1.5 / SD 2.1 counts are exact (abstract models from the bundled configs, LoRA applied as the trainer does);
checkpoint bytes = fp32 params + AdamW's two fp32 moments (what the Orbax checkpoint holds). --tiny_run also trains
the tiny model 2 steps each way and measures the checkpoint folders on disk.
"""

import argparse
import json
import pathlib
import tempfile

from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]


def counts(model: str, rank: int) -> dict:
  from dreambooth_jax.models import lora
  from dreambooth_jax.io import diffusers_folder as weights  # noqa: PLC0415
  sd = weights.random_pipeline(ROOT / "dreambooth_jax" / "assets" / "sd-configs" / model, abstract=True)
  full = lora.count_params(nnx.state(sd.unet, nnx.Param))
  if rank:
    lora.apply_lora(sd.unet, lora.LoRASettings(rank=rank), rngs=nnx.Rngs(0))
    trained = lora.count_params(nnx.state(sd.unet, lora.LoRAParam))
  else:
    trained = full
  return {"model": model, "rank": rank, "trainable_params": trained, "unet_params": full,
          "checkpoint_bytes": 3 * 4 * trained}


def du(path: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tiny_runs() -> dict:
  from dreambooth_jax import config_files
  from dreambooth_jax.training import run  # noqa: PLC0415
  out = {}
  for name in ("full", "lora"):
    config = config_files.load(ROOT / "configs" / "tiny.py", "lora" if name == "lora" else None)
    config.max_train_steps, config.checkpointing_steps, config.validation_steps = 2, 2, 0
    config.with_prior_preservation, config.export_at_end = False, False
    workdir = pathlib.Path(tempfile.mkdtemp()) / name
    run.train(config, workdir)
    out[name] = du(workdir / "checkpoints")
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--ranks", default="4,16")
  p.add_argument("--tiny_run", action="store_true")
  args = p.parse_args()
  rows = [counts(m, r) for m in ("sd15", "sd21") for r in [0] + [int(x) for x in args.ranks.split(",")]]
  print("| model | trained | trainable params | share of UNet | checkpoint (params + Adam) |")
  print("|---|---|---|---|---|")
  for r in rows:
    what = "full UNet" if r["rank"] == 0 else f"LoRA rank {r['rank']}"
    print(f"| {r['model']} | {what} | {r['trainable_params'] / 1e6:.2f} M | "
          f"{100 * r['trainable_params'] / r['unet_params']:.2f} % | {r['checkpoint_bytes'] / 2**20:.1f} MiB |")
  result = {"rows": rows}
  if args.tiny_run:
    result["tiny_checkpoint_bytes"] = tiny_runs()
    print(f"tiny model checkpoints on disk: {result['tiny_checkpoint_bytes']}")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
