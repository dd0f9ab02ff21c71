"""Validation loss: the training loss on a fixed, held-out draw, comparable across steps, checkpoints and resumes
(the same params give the same value whatever the step).

The examples: each instance image once and up to `validation_loss_class_images` class images (a fixed, seeded
choice), centre-cropped and not flipped, with their captions and the run's loss settings. Example k draws its
posterior sample, noise and timestep from fold_in(VALIDATION_KEY, k): keys of their own, never a training step's.
They are evaluated in chunks of the training batch's size by a small jitted function (no state donated) over
step.example_losses, the one home of the loss maths.
"""

import jax
import numpy as np
from absl import logging

from dreambooth_jax import sharding as sharding_lib
from dreambooth_jax.data import batches
from dreambooth_jax.training import step as step_lib

VALIDATION_STREAM = 0x7A11D  # fold_in data of the run's key for the validation draws (steps fold in their number)


def make_losses_fn(family, graphdefs: dict, settings: step_lib.LossSettings):
  """losses(params, frozen, chunk, rng) -> per-example loss (E,): the train step's loss terms without gradients."""

  def losses(params, frozen, chunk, rng):
    modules = step_lib.merge_modules(graphdefs, params, frozen)
    return step_lib.example_losses(family, modules, frozen["schedule"], chunk, rng, settings,
                                   step_lib.base_modules(graphdefs, params, frozen, settings))

  return losses


class ValidationLoss:
  """val/instance_loss and val/prior_loss of the trained (or EMA) params on the fixed examples."""

  def __init__(self, config, data: batches.TrainData, family, graphdefs: dict, settings: step_lib.LossSettings,
               mesh):
    counts = {"instance": len(data.sets["instance"].paths)}
    if "class" in data.sets:
      counts["class"] = min(len(data.sets["class"].paths), config.validation_loss_class_images)
    parts, first = [], 0
    for name, count in counts.items():
      if count:
        parts.append(data.fixed_examples(name, count, first_slot=first))
        first += count
    examples = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    self.size = first
    self.chunk = batches.global_batch_size(config)  # what the training step holds at once
    padded = -(-self.size // self.chunk) * self.chunk
    self.examples = {k: np.concatenate([v, np.repeat(v[:1], padded - self.size, axis=0)])
                     for k, v in examples.items()}
    self.prior_E = examples["prior"].astype(bool)
    self.sharding = sharding_lib.batch_sharding(mesh, self.chunk)
    self.fn = jax.jit(make_losses_fn(family, graphdefs, settings),
                      out_shardings=sharding_lib.replicated(mesh))
    self.rng = jax.random.fold_in(jax.random.key(config.seed), VALIDATION_STREAM)
    logging.info("validation loss on %s examples", counts)

  def _chunk(self, start: int) -> dict:
    def put(v):
      part = v[start:start + self.chunk]
      return jax.make_array_from_callback(part.shape, self.sharding, lambda index: part[index])
    return {k: put(v) for k, v in self.examples.items()}

  def __call__(self, params, frozen) -> dict:
    losses = np.concatenate([sharding_lib.to_host(self.fn(params, frozen, self._chunk(start), self.rng))
                             for start in range(0, len(self.examples["slot"]), self.chunk)])[:self.size]
    values = {"val/instance_loss": float(np.mean(losses[~self.prior_E], dtype=np.float64))}
    if self.prior_E.any():
      values["val/prior_loss"] = float(np.mean(losses[self.prior_E], dtype=np.float64))
    return values
