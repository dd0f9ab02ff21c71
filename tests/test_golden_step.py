"""Golden one-step tests (nanodo style): one train step of the tiny model on a fixed synthetic batch, its loss,
instance loss, prior loss, gradient norm and the norm of the parameter update pinned. A refactor must keep these numbers;
a change of the numerics must change them here, on purpose, in the same commit.

The equalities that must hold whatever the implementation (cached latents = uncached, gradient accumulation,
remat) are in test_golden_equalities.py: the two files' eight compiles run on two workers.
Tolerance: 1e-5 relative (XLA may fuse differently after a refactor; a real change moves these by far more).
"""

import pathlib

import jax
import numpy as np
import pytest

from dreambooth_jax import config_files

ROOT = pathlib.Path(__file__).resolve().parents[1]
RTOL = 1e-5
RES = 32
INSTANCE, CLASS = "a photo of sks dog", "a photo of dog"

# (loss, instance_loss, prior_loss, grad_norm, L2 norm of the parameter update) of one step. The losses and gradient
# norms were recorded at commit f5c5a47, before the model-family refactor (the slot fix that makes accumulation
# exact leaves a single micro-batch's draws as they were).
GOLDEN = {
    "epsilon": (2.613018751144409, 1.1826083660125732, 1.430410385131836, 7.425831317901611, 0.8959010702646172),
    "v_prediction": (1.710371971130371, 0.4760906994342804, 1.234281301498413, 6.670238494873047, 0.8958670160477322),
    "snr_gamma": (2.528242588043213, 1.1826083660125732, 1.3456342220306396, 7.220373630523682, 0.895898791091704),
    "offset_noise": (2.62483549118042, 1.163796305656433, 1.4610390663146973, 7.548940181732178, 0.8958927814542404),
}


def make_config(*overrides):
  config = config_files.load(ROOT / "configs" / "tiny.py")
  config.resolution = RES
  config.lr_scheduler, config.lr_warmup_steps = "constant", 0
  for key, value in overrides:
    config[key] = value
  return config


def pixels(n, seed):
  return np.random.default_rng(seed).uniform(-1, 1, (n, RES, RES, 3)).astype(np.float32)


def run_step(config, *, prediction_type=None, accum=1, cached=True):
  """One train step through the trainer's own model building and AOT compile, on a fixed batch of
  2 instance + 2 class examples split into `accum` micro-batches of (1 + 1) or one of (2 + 2)."""
  from dreambooth_jax import sharding
  from dreambooth_jax.training import run, run_state
  from dreambooth_jax.training import step as train_step_lib
  from dreambooth_jax.sampling import schedules as schedule_lib
  from dreambooth_jax.io.tokenizers import tokenize

  config.gradient_accumulation_steps = accum
  config.train_batch_size = 2 // accum
  sd = run_state.load_model(config)
  if prediction_type:
    sd.schedule = schedule_lib.schedule_from_config({**sd.configs["scheduler"], "prediction_type": prediction_type})
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  graphdefs, params, frozen = run_state.trainable_state(sd, config)
  step = run.compile_step(config, sd, graphdefs, params, frozen, mesh)

  # Global example order: instance 0, 1, class 0, 1; micro-batch a takes instance a and class a.
  pix = np.concatenate([pixels(2, 0), pixels(2, 1)])
  prior = np.array([0, 0, 1, 1], np.float32)
  slot = np.array([0, 1, 2, 3], np.int32)
  ids = np.asarray(tokenize(sd.tokenizer, [INSTANCE, INSTANCE, CLASS, CLASS]))
  full = {"pixels": pix, "prior": prior, "slot": slot}
  if cached:
    mean, std = jax.jit(lambda m, x: m.encode(x))(sd.vae, pix)
    full = {"latent_mean": np.asarray(mean), "latent_std": np.asarray(std), "prior": prior, "slot": slot}
  if "text_encoder" in frozen or "text_encoder" in params:
    full["ids"] = ids
  else:
    full["context"] = np.asarray(sd.text_encoder(ids)[0])
  order = [0, 2, 1, 3] if accum == 2 else [0, 1, 2, 3]  # slots stay the examples' global positions
  batch = {k: v[order].reshape(accum, 4 // accum, *v.shape[1:]) for k, v in full.items()}
  params = jax.tree.map(np.asarray, params)  # the step donates the state: keep a copy of the old values
  state = jax.jit(lambda p: train_step_lib.init_train_state(p, step.tx), out_shardings=step.state_shardings)(params)
  frozen = jax.device_put(frozen, step.frozen_shardings)
  new_state, metrics = step.fn(state, batch, jax.random.key(config.seed), frozen)
  update_norm = np.sqrt(sum(float(np.sum(np.square(np.asarray(new, np.float64) - old))) for new, old in
                            zip(jax.tree.leaves(new_state["params"]), jax.tree.leaves(params))))
  return {k: float(v) for k, v in metrics.items()}, update_norm


def values(metrics, update_norm):
  return (metrics["loss"], metrics["instance_loss"], metrics["prior_loss"], metrics["grad_norm"], update_norm)


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_one_step_matches_golden(case):
  overrides = {"snr_gamma": [("snr_gamma", 5.0)], "offset_noise": [("offset_noise", 0.1)]}.get(case, [])
  metrics, update_norm = run_step(make_config(*overrides),
                                  prediction_type="v_prediction" if case == "v_prediction" else None)
  np.testing.assert_allclose(values(metrics, update_norm), GOLDEN[case], rtol=RTOL)
