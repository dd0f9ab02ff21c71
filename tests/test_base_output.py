"""Base-model-output prior preservation (prior_preservation="base_output"): the class examples are the instance
images with the class prompt, their target the frozen base model's prediction on the same noised latents, so no class
image is generated. Golden: at step 0 the trained model is the base (zero-initialised LoRA up factors; a full fine-tune
before its first update), so the prior loss is exactly 0."""

import jax
import numpy as np
import pytest

from test_train import fast_config


def two_steps(config, workdir):
  """(metrics of the first two train steps, job, first batch) through the trainer's own set-up and compiled step."""
  from dreambooth_jax.training import run
  job = run.setup(config, workdir)
  batch = job.data.next_batch()
  state, first = job.step_fn(job.state, batch, job.rng, job.frozen)
  state, second = job.step_fn(state, job.data.next_batch(), job.rng, job.frozen)
  return [{k: float(v) for k, v in m.items()} for m in (first, second)], job, batch


@pytest.mark.parametrize("lora", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["lora", "full"])
def test_prior_loss_is_exactly_zero_at_step_zero(lora, tmp_path):
  config = fast_config("prior_preservation=base_output", "train_batch_size=2")
  config.lora.enabled = lora
  (metrics, after), job, batch = two_steps(config, tmp_path / "run")
  assert metrics["prior_loss"] == 0.0 and metrics["instance_loss"] > 0, metrics
  assert after["prior_loss"] > 0, after  # one update on: the model has left its base
  assert not (tmp_path / "run" / "class_images").exists()  # nothing generated
  # the class examples: the instance photos' latents with the class prompt's embeddings
  prior = np.asarray(batch["prior"][0]).astype(bool)
  assert prior.sum() == 2
  instance_means = [m[0] for m in job.data.latents["instance"]["mean"]]  # per image: (unflipped, flipped)
  for mean in np.asarray(batch["latent_mean"][0])[prior]:
    assert any(np.array_equal(mean, m) for m in instance_means)
  class_row = job.data.caption_rows[config.class_prompt]
  np.testing.assert_array_equal(np.asarray(batch["context"][0])[prior][0], job.data.text_table["context"][class_row])
  if lora:  # no extra weights: the base is the frozen LoRA base with the adapters off
    assert not any(k.startswith("prior_") for k in job.frozen)
  else:  # a frozen copy of the denoiser (counted by the memory plan with the other frozen weights)
    copy, trained = job.frozen["prior_unet"], job.state["params"]["unet"]
    assert jax.tree.structure(copy) == jax.tree.structure(trained)


def test_unknown_values_and_a_trained_text_encoder_are_refused():
  from dreambooth_jax.training import run_state, step as step_lib
  with pytest.raises(ValueError, match=r"prior_preservation='class_image' is not one of \['class_images', "
                                       r"'base_output'\]"):
    step_lib.loss_settings(fast_config("prior_preservation=class_image"))
  config = fast_config("prior_preservation=base_output", "train_text_encoder=True")
  with pytest.raises(ValueError, match="prior_preservation='base_output' with train_text_encoder=True"):
    run_state.trainable_state(run_state.load_model(config), config)
