"""Validation loss (training/val_loss.py): a fixed set (every instance image once, up to N class images, centre crop,
no flip) on fixed keys, so the value is a function of the params alone: repeatable, independent of the training
batch size (chunking) and of random_flip, and moved by a change of the params. Across a resume: test_train_lora.py."""

import jax
import numpy as np
import pytest

from test_train import fast_config

BUNDLED = "dreambooth_jax/assets/dog"


def validation_loss(*overrides):
  import pathlib
  from dreambooth_jax import sharding
  from dreambooth_jax.data import batches
  from dreambooth_jax.training import run_state, step as step_lib, val_loss
  root = pathlib.Path(__file__).resolve().parents[1]
  # the bundled photos stand in for class images too: nothing is generated
  config = fast_config(f"class_data_dir={root / BUNDLED}", "validation_loss=True", "validation_loss_class_images=3",
                       *overrides)
  pipe = run_state.load_model(config)
  graphdefs, params, frozen = run_state.trainable_state(pipe, config)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  data = batches.TrainData(config, pipe, mesh, pathlib.Path("/nonexistent"))
  loss = val_loss.ValidationLoss(config, data, pipe.family, graphdefs, step_lib.loss_settings(config), mesh)
  return loss, params, frozen


@pytest.fixture(scope="module")
def reference():
  loss, params, frozen = validation_loss("train_batch_size=1")
  return loss, params, frozen, loss(params, frozen)


def test_fixed_set_is_repeatable(reference):
  loss, params, frozen, values = reference
  assert loss.size == 5 + 3 and loss.prior_E.sum() == 3 and loss.chunk == 2
  assert set(values) == {"val/instance_loss", "val/prior_loss"} and all(v > 0 for v in values.values())
  assert loss(params, frozen) == values
  moved = jax.tree.map(lambda p: p * 1.01, params)
  assert loss(moved, frozen)["val/instance_loss"] != values["val/instance_loss"]


def test_independent_of_batch_size_and_flip(reference):
  _, _, _, values = reference
  loss, params, frozen = validation_loss("train_batch_size=3", "random_flip=True")
  assert loss.chunk == 6
  np.testing.assert_allclose([loss(params, frozen)[k] for k in sorted(values)], [values[k] for k in sorted(values)],
                             rtol=1e-5)
