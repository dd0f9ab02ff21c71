"""EMA of the trained weights (use_ema): the decay schedule equals diffusers' EMAModel; golden checks through the
trainer, both on one run (d = 0 copies the raw weights; d = 1 holds the average, which is what is exported and read
back by export). A resumed run has bitwise the EMA of an uninterrupted one: test_train_lora.py (its run keeps an
EMA); the memory plan counts it: test_plan.py."""

import jax
import numpy as np
import pytest

from test_train import fast_config, step_records

STEPS = 3
EMA = ("with_prior_preservation=False", "validation_steps=0", f"max_train_steps={STEPS}", "checkpointing_steps=1",
       f"checkpoints_total_limit={STEPS}", "use_ema=True", "ema_ramp=False")


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


def assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
  """One run (one compile) whose EMA both copies and holds: ema_decay=1 after ema_update_after_step=1, so the update
  of step 1 has d = 0 (the EMA becomes the raw weights) and those of steps 2 and 3 have d = 1 (the EMA stays).
  Checkpoints every step, all kept: (workdir, config, job, {step: restored train state})."""
  from dreambooth_jax.training import checkpoint, run
  config = fast_config(*EMA, "ema_decay=1.0", "ema_update_after_step=1")
  workdir = tmp_path_factory.mktemp("ema") / "run"
  job = run.train(config, workdir)
  abstract = checkpoint.abstract_like(job.state, job.state_shardings)
  return workdir, config, job, {step: checkpoint.restore(job.mgr, step, abstract)[1] for step in range(1, STEPS + 1)}


def test_decay_zero_is_the_raw_weights(ema_run):
  from dreambooth_jax.training import run_state
  workdir, config, job, states = ema_run
  assert [r["ema_decay"] for r in step_records(workdir)] == [0.0, 1.0, 1.0]
  initial = run_state.trainable_state(run_state.load_model(config), config)[1]
  assert not np.array_equal(jax.tree.leaves(states[1]["params"])[0], jax.tree.leaves(initial)[0])  # trained
  assert_trees_equal(states[1]["ema"], states[1]["params"])


def test_decay_one_holds_the_average_and_is_exported(ema_run, tmp_path):
  from dreambooth_jax.io import diffusers_folder
  from dreambooth_jax.training import run, run_state
  workdir, config, job, states = ema_run
  fresh = run.setup(config, tmp_path / "fresh")  # the trainer's initial state (its step: the run's, from the cache)
  assert_trees_equal(fresh.state["ema"], fresh.state["params"])  # the average starts as the initial weights
  for step in (2, 3):  # the weights move; the EMA stays step 1's weights
    assert not np.array_equal(jax.tree.leaves(states[step]["params"])[0],
                              jax.tree.leaves(states[step - 1]["params"])[0])
    assert_trees_equal(states[step]["ema"], states[1]["params"])
  assert_trees_equal(job.state["ema"], states[1]["params"])
  _, view, step = run_state.load_run(workdir, None)  # what `export` and evaluation read: the checkpoint's EMA
  assert step == STEPS
  ours = diffusers_folder.module_state_dict(view.unet)
  exported = diffusers_folder.module_state_dict(diffusers_folder.load_pipeline(workdir / "export").unet)
  held, raw = (diffusers_folder.module_state_dict(run_state.trained_view(
      job.pipe, job.graphdefs, jax.device_get(params), job.frozen).unet)
      for params in (states[1]["params"], job.state["params"]))
  assert exported.keys() == ours.keys() == held.keys()
  for name, value in held.items():
    np.testing.assert_array_equal(ours[name], value, err_msg=name)
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  assert any(not np.array_equal(exported[k], raw[k]) for k in raw)  # the EMA, not the trained weights
