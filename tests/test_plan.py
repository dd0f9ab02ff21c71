"""The memory plan (--dry_run): abstract model, batch spec equal to the real batches, per-device bytes that follow
the levers, and a refusal before any work when the step cannot fit."""

import jax
import pytest

from test_train import fast_config
from dreambooth_jax import sharding
from dreambooth_jax.data import batches
from dreambooth_jax.training import run
from dreambooth_jax.data import batches as train_data
from dreambooth_jax.io import diffusers_folder as weights


def test_batch_spec_matches_real_batches(tmp_path):
  config = fast_config("with_prior_preservation=False", "gradient_accumulation_steps=2")
  sd = weights.random_pipeline()
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  batch = train_data.TrainData(config, sd, mesh, tmp_path).next_batch()
  spec = batches.batch_spec(config, sd, mesh)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: (v.shape, v.dtype) for k, v in spec.items()}
  config = fast_config("cache_latents=False")  # pixels and token ids instead of latents and embeddings
  assert set(batches.batch_spec(config, sd, mesh)) == {"prior", "slot", "pixels", "ids"}


def test_plan_counts_the_trained_bytes_and_levers_shrink_them():
  # the tiny run's step (class images as the prior): test_run_refuses_a_config_that_cannot_fit compiles the same
  # step, from the persistent cache
  base = run.dry_run(fast_config())
  unet_bytes = sum(v.nbytes for v in weights.module_state_dict(weights.random_pipeline().unet).values())
  assert base.memory.params == unet_bytes  # fp32 master copy of the whole UNet on one device
  assert base.memory.optimizer >= 2 * unet_bytes  # Adam's two moments
  assert base.memory.temporaries > 0 and base.memory.peak > base.memory.params + base.memory.optimizer
  low = run.dry_run(fast_config("optimizer_moments_bf16=True", "param_dtype=bfloat16", "use_ema=True",
                                "prior_preservation=base_output"))
  assert low.memory.params == unet_bytes // 2 and low.memory.optimizer < 0.6 * base.memory.optimizer
  assert low.memory.ema == unet_bytes and base.memory.ema == 0  # the EMA stays float32
  assert base.memory.frozen < unet_bytes // 2 <= low.memory.frozen  # base_output: a frozen (bf16) copy of the UNet
  assert "EMA weights" in low.memory.table() and "EMA" not in base.memory.table()
  lora_config = fast_config("with_prior_preservation=False")
  lora_config.lora.enabled = True
  lora = run.dry_run(lora_config)
  assert lora.memory.params < 0.2 * unet_bytes and lora.memory.frozen > unet_bytes  # the UNet base is frozen


def test_run_refuses_a_config_that_cannot_fit(tmp_path):
  config = fast_config("device_memory_gib=0.001")
  with pytest.raises(MemoryError, match=r"(?s)needs about .* GiB per device.*remat=.*Levers"):
    run.train(config, tmp_path / "run")
  assert not (tmp_path / "run" / "class_images").exists()  # refused before generating anything
