"""EMA of the trained weights (use_ema): the decay schedule equals diffusers' EMAModel; golden checks through the
trainer (decay 0 = the raw weights, decay 1 = the initial ones, exported and read back by export). A resumed run
has bitwise the EMA of an uninterrupted one: test_train_lora.py (its run keeps an EMA); the memory plan counts it:
test_plan.py."""

import jax
import numpy as np
import pytest

from test_train import fast_config

STEPS = 3
EMA = ("with_prior_preservation=False", "validation_steps=0", f"max_train_steps={STEPS}",
       f"checkpointing_steps={STEPS}", "use_ema=True", "ema_ramp=False")


def test_decay_schedule_matches_diffusers_ema_model():
  import torch
  from diffusers.training_utils import EMAModel
  from dreambooth_jax.training import step as step_lib
  values = np.random.default_rng(0).standard_normal((25, 3)).astype(np.float32)
  for after in (0, 3):
    param = torch.nn.Parameter(torch.from_numpy(values[0]))
    reference = EMAModel([param], decay=0.8, update_after_step=after)
    ours = {"w": values[0]}
    settings = step_lib.EmaSettings(decay=0.8, update_after_step=after, ramp=True)
    for u, value in enumerate(values[1:], start=1):
      param.data = torch.from_numpy(value)
      reference.step([param])
      decay = settings.decay_at(jax.numpy.int32(u))
      np.testing.assert_allclose(float(decay), reference.cur_decay_value, rtol=1e-6)
      ours = step_lib.update_ema(ours, {"w": value}, decay)
      np.testing.assert_allclose(ours["w"], reference.shadow_params[0].numpy(), rtol=1e-5, atol=1e-6)
  plain = step_lib.EmaSettings(decay=0.8, update_after_step=2, ramp=False)
  decays = [float(plain.decay_at(jax.numpy.int32(u))) for u in (1, 2, 3, 4)]
  assert decays == [0.0, 0.0, np.float32(0.8), np.float32(0.8)]
  with pytest.raises(ValueError, match="ema_decay=1.5"):
    step_lib.EmaSettings(decay=1.5)


def initial_params(config):
  from dreambooth_jax.training import run_state
  return run_state.trainable_state(run_state.load_model(config), config)[1]


def assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_decay_zero_is_the_raw_weights(tmp_path):
  from dreambooth_jax.training import run
  job = run.setup(fast_config(*EMA, "ema_decay=0.0"), tmp_path / "run")
  state, before = job.state, jax.device_get(job.state["params"])
  for _ in range(STEPS):
    state, metrics = job.step_fn(state, job.data.next_batch(), job.rng, job.frozen)
    assert float(metrics["ema_decay"]) == 0.0
  assert not np.array_equal(jax.tree.leaves(state["params"])[0], jax.tree.leaves(before)[0])
  assert_trees_equal(state["ema"], state["params"])


def test_decay_one_is_the_initial_weights_and_is_exported(tmp_path):
  from dreambooth_jax.io import diffusers_folder
  from dreambooth_jax.training import run, run_state
  config = fast_config(*EMA, "ema_decay=1.0")
  workdir = tmp_path / "run"
  job = run.train(config, workdir)
  assert_trees_equal(job.state["ema"], initial_params(config))
  _, view, step = run_state.load_run(workdir, None)  # what `export` and evaluation read: the checkpoint's EMA
  assert step == STEPS
  ours = diffusers_folder.module_state_dict(view.unet)
  exported = diffusers_folder.module_state_dict(diffusers_folder.load_pipeline(workdir / "export").unet)
  initial = diffusers_folder.module_state_dict(run_state.load_model(config).unet)
  assert exported.keys() == ours.keys() == initial.keys()
  for name, value in initial.items():
    np.testing.assert_array_equal(ours[name], value, err_msg=name)
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
