"""Text-encoder training on the tiny model: train_text_encoder=True trains (and checkpoints) the whole text encoder
alongside the UNet; lora.text_encoder=True trains LoRA factors on it, the base weights staying frozen."""

import jax
import numpy as np
import pytest

from test_train import fast_config


def train_steps(config, workdir, steps=2):
  """(params before, params after `steps` train steps) as numpy trees."""
  from dreambooth_jax.training import run
  job = run.setup(config, workdir)
  before = jax.device_get(job.state["params"])
  state = job.state
  for _ in range(steps):
    state, metrics = job.step_fn(state, job.data.next_batch(), job.rng, job.frozen)
    assert np.isfinite(float(metrics["loss"]))
  return job, before, jax.device_get(state["params"])


def changed(before, after) -> dict:
  flat_before = dict(jax.tree_util.tree_flatten_with_path(before)[0])
  return {jax.tree_util.keystr(k): not np.array_equal(v, flat_before[k])
          for k, v in jax.tree_util.tree_flatten_with_path(after)[0]}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_text_encoder_is_trained(lora, tmp_path):
  config = fast_config("with_prior_preservation=False", "learning_rate=1e-3")
  if lora:
    config.lora.enabled, config.lora.text_encoder, config.lora.rank = True, True, 2
  else:
    config.train_text_encoder = True
  job, before, after = train_steps(config, tmp_path / "run")
  assert set(after) == {"unet", "text_encoder"}
  text = changed(before["text_encoder"], after["text_encoder"])
  if lora:  # only factors are trainable; lora_up starts at zero and moves
    assert text and all(k.endswith(("['lora_down']", "['lora_up']")) for k in text), sorted(text)[:5]
    assert any(v for k, v in text.items() if k.endswith("['lora_up']"))
    assert "text_encoder_base" in job.frozen  # the base weights, frozen
  else:
    assert sum(text.values()) > 0.9 * len(text), f"{sum(text.values())} of {len(text)} text encoder arrays changed"
    assert "text_encoder" not in job.frozen
  assert any(changed(before["unet"], after["unet"]).values())
