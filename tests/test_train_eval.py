"""In-training evaluation: metrics every eval_steps, eval.jsonl, best.json, the best checkpoint kept by Orbax
beyond checkpoints_total_limit, and export --step=best."""

import json
import subprocess
import sys

import pytest

from test_eval_metrics import models  # noqa: F401 (tiny random DINO / CLIP folders)
from test_train import fast_config


def test_eval_steps_record_and_keep_the_best_checkpoint(tmp_path, models):  # noqa: F811
  import safetensors.torch

  from dreambooth_jax.training import run
  from lpips_reference import random_backbone_model
  safetensors.torch.save_model(random_backbone_model("alex"), str(tmp_path / "lpips_alex.safetensors"))
  config = fast_config("max_train_steps=6", "checkpointing_steps=100", "checkpoints_total_limit=1",
                       "validation_steps=0", "export_at_end=False", "with_prior_preservation=False",
                       "eval_steps=2", "eval_images_per_prompt=2", "eval_metric=clip_i",
                       f"eval_dino_model={models[0] / 'dino'}", f"eval_clip_model={models[0] / 'clip'}",
                       f"eval_lpips_model={tmp_path / 'lpips_alex.safetensors'}")
  workdir = tmp_path / "run"
  run.train(config, workdir)
  records = [json.loads(line) for line in (workdir / "eval.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [2, 4, 6]
  assert all(-1 <= r[k] <= 1 for r in records for k in ("dino", "clip_i", "clip_t"))
  assert all(r["div"] > 0 for r in records)  # 2 images per prompt: LPIPS between them (DIV)
  best = json.loads((workdir / "best.json").read_text())
  top = max(records, key=lambda r: r["clip_i"])
  assert best["step"] == top["step"] and best["metric"] == "clip_i" and best["value"] == top["clip_i"]
  kept = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert kept == sorted({6, best["step"]}), kept  # the latest (limit 1) plus the best
  out = tmp_path / "best_export"
  result = subprocess.run([sys.executable, "-m", "dreambooth_jax.export", f"--workdir={workdir}", "--step=best",
                           f"--out={out}"], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"exported step {best['step']}" in result.stdout
  assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_eval_config_errors():
  from dreambooth_jax.training import in_training_eval as train_eval
  with pytest.raises(ValueError, match="eval_metric='fid'"):
    train_eval.check_config(fast_config("eval_steps=2", "eval_metric=fid"))
  with pytest.raises(ValueError, match="eval_dino_model"):
    train_eval.check_config(fast_config("eval_steps=2", "eval_dino_model="))
  with pytest.raises(ValueError, match="eval_lpips_net='squeeze'"):
    train_eval.check_config(fast_config("eval_steps=2", "eval_lpips_model=x.safetensors", "eval_lpips_net=squeeze"))
