"""The DreamBooth loss and the pure, jitted train step.

loss = mean over instance examples of ||eps_hat(z_t, c) - target||^2
     + prior_loss_weight * the same mean over class (prior-preservation) examples,
the two kinds told apart by a per-example `prior` flag rather than by batch halves, so the loss is the same on any
number of devices and any sharding of the batch.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dreambooth_jax.models import lora as lora_lib
from dreambooth_jax.training import optim
from dreambooth_jax.sampling import flow_matching, schedules as schedule_lib

ROUNDING_STREAM = 0x7FFFFFFF  # fold_in data of the bf16 rounding key (micro-batches take 0, 1, ... of the step key)


@dataclasses.dataclass(frozen=True)
class LossSettings:
  prior_loss_weight: float = 1.0
  snr_gamma: float = 0.0  # 0 = off; else min-SNR-gamma weighting (Hang et al. 2023)
  snr_weighting: str = "min_snr"  # the v-prediction formula: schedules.min_snr_loss_weight
  offset_noise: float = 0.0  # 0 = off; else noise += offset_noise * N(0, 1) per (example, channel)
  # flow matching (Flux): timestep density and loss weighting (flow_matching.WEIGHTING_SCHEMES), guidance input
  weighting_scheme: str = "none"
  logit_mean: float = 0.0
  logit_std: float = 1.0
  mode_scale: float = 1.29
  guidance_scale: float = 3.5

  def __post_init__(self):  # refused at set-up, by name, not at the first traced step
    if self.snr_weighting not in schedule_lib.SNR_WEIGHTINGS:
      raise ValueError(f"snr_weighting={self.snr_weighting!r} is not one of {list(schedule_lib.SNR_WEIGHTINGS)}")
    flow_matching.check_weighting_scheme(self.weighting_scheme)


def example_losses(family, modules: dict, schedule, micro: dict, rng, settings: LossSettings):
  """Per-example MSE (B,) of one micro-batch; the family says how the text and image conditioning reach its
  denoiser.

  Each example draws its posterior sample, noise and timestep from fold_in(rng, its global slot in the step's
  batch), so the loss is the same however the batch is split over processes, devices and micro-batches."""
  vae = modules["vae"]
  if "pixels" in micro:
    mean, std = vae.encode(micro["pixels"])
    mean, std = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(std)
  else:  # cached posterior of the frozen VAE
    mean, std = micro["latent_mean"], micro["latent_std"]
  keys_B4 = jax.vmap(lambda slot: jax.random.split(jax.random.fold_in(rng, slot), 4))(micro["slot"])
  draw = lambda fn, k: jax.vmap(fn)(keys_B4[:, k])
  shape_HWC = mean.shape[1:]
  x0 = vae.scale_latents(mean + std * draw(lambda k: jax.random.normal(k, shape_HWC, jnp.float32), 0))
  if all(k in micro for k in family.TEXT_KEYS):  # cached embeddings of the frozen text encoders
    text = {k: micro[k] for k in family.TEXT_KEYS}
  else:
    text = family.encode_text(modules, {k: micro[k] for k in family.ID_KEYS})
  image = {k: micro[k] for k in family.image_conditioning_keys()}
  noise = draw(lambda k: jax.random.normal(k, shape_HWC, jnp.float32), 1)
  if settings.offset_noise:
    noise = noise + settings.offset_noise * draw(lambda k: jax.random.normal(k, (1, 1, shape_HWC[-1])), 2)
  # the family's objective: timesteps (from each example's key 3), noised input, target, loss weight
  noised = family.training_inputs(modules, schedule, x0, noise, keys_B4[:, 3], settings)
  prediction = family.denoise(modules, noised.x_t, noised.t_B, text, {**image, **noised.image})
  mse_B = jnp.mean(jnp.square(prediction.astype(jnp.float32) - noised.target), axis=(1, 2, 3))
  return mse_B if noised.weight_B is None else mse_B * noised.weight_B


def combine_losses(mse_B, prior_B, prior_loss_weight: float):
  prior_B = prior_B.astype(jnp.float32)
  instance_B = 1.0 - prior_B
  instance_loss = jnp.sum(mse_B * instance_B) / jnp.maximum(jnp.sum(instance_B), 1.0)
  prior_loss = jnp.sum(mse_B * prior_B) / jnp.maximum(jnp.sum(prior_B), 1.0)
  return instance_loss + prior_loss_weight * prior_loss, (instance_loss, prior_loss)


def make_train_step(family, graphdefs: dict, tx: optax.GradientTransformation, schedules: dict,
                    settings: LossSettings):
  """Returns train_step(state, batch, rng, frozen) -> (state, metrics).

  state:  {"step": int32, "params": {"unet": ..., ["text_encoder": ...]}, "opt_state": ...} (donated)
  batch:  arrays with a leading gradient-accumulation axis (A, B, ...), the schema of data.batches.batch_schema:
          "pixels" or "latent_mean"/"latent_std", the family's ID_KEYS or cached TEXT_KEYS, its image
          conditioning, "prior" (B,) flags and "slot" (B,) the examples' positions in the step's whole batch
          (A x B; the keys of their noise).
  rng:    the run's base key; the step's key is fold_in(rng, step), so a resumed run draws the same noise.
  frozen: the parameters that are not trained ("vae", and "text_encoder" unless it is trained or its embeddings are
          cached), for LoRA the frozen base weights ("unet_base", ["text_encoder_base"]), and the schedule.
  """

  def loss_fn(params, frozen, micro, micro_rng, example_rng):
    modules = merge_modules(graphdefs, params, frozen)
    for module in modules.values():  # LoRA dropout (if any) draws from the micro-batch's key
      lora_lib.set_dropout_key(module, jax.random.fold_in(micro_rng, 1))
    mse_B = example_losses(family, modules, frozen["schedule"], micro, example_rng, settings)
    loss, (instance_loss, prior_loss) = combine_losses(mse_B, micro["prior"], settings.prior_loss_weight)
    return loss, {"loss": loss, "instance_loss": instance_loss, "prior_loss": prior_loss}

  grad_fn = jax.grad(loss_fn, has_aux=True)

  def train_step(state: dict, batch: dict, rng, frozen: dict):
    step_rng = jax.random.fold_in(rng, state["step"])
    params = state["params"]
    accum = jax.tree.leaves(batch)[0].shape[0]

    def micro_step(carry, inputs):
      grads_sum, metrics_sum = carry
      index, micro = inputs
      # examples draw from one stream by their global slot: a split into micro-batches changes no draw
      grads, metrics = grad_fn(params, frozen, micro, jax.random.fold_in(step_rng, index),
                               jax.random.fold_in(step_rng, 0))
      return (jax.tree.map(jnp.add, grads_sum, grads), jax.tree.map(jnp.add, metrics_sum, metrics)), None

    if accum == 1:  # no loop: XLA:CPU runs a gradient inside a scan several times slower (docs/benchmarks.md)
      grads, metrics = grad_fn(params, frozen, jax.tree.map(lambda x: x[0], batch), jax.random.fold_in(step_rng, 0),
                               jax.random.fold_in(step_rng, 0))
    else:
      zeros = jax.tree.map(jnp.zeros_like, params)
      metric_zeros = {k: jnp.zeros((), jnp.float32) for k in ("loss", "instance_loss", "prior_loss")}
      (grads, metrics), _ = jax.lax.scan(micro_step, (zeros, metric_zeros), (jnp.arange(accum), batch))
      grads = jax.tree.map(lambda g: g / accum, grads)
      metrics = jax.tree.map(lambda m: m / accum, metrics)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    # bf16 parameters round stochastically (keyed by the step: a resumed run repeats it exactly)
    new_params = optim.apply_updates(params, updates, jax.random.fold_in(step_rng, ROUNDING_STREAM))
    metrics["grad_norm"] = optax.tree.norm(grads)
    for group, lr in schedules.items():
      metrics["lr" if group == family.DENOISER else f"lr_{group}"] = lr(state["step"])
    new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
    return new_state, metrics

  return train_step


def merge_modules(graphdefs: dict, params: dict, frozen: dict) -> dict:
  """{name: module} rebuilt from the trained params and the frozen ones. A LoRA component is its trained factors
  (params[name]) merged with its frozen base (frozen[name + "_base"])."""
  modules = {}
  for name, graphdef in graphdefs.items():
    if name in params:
      parts = [params[name]] + ([frozen[f"{name}_base"]] if f"{name}_base" in frozen else [])
    elif name in frozen:
      parts = [frozen[name]]
    else:
      continue
    modules[name] = nnx.merge(graphdef, *(nnx.State(p) for p in parts))
  return modules


def split_trainable(module: nnx.Module) -> tuple[dict, dict | None]:
  """(trainable params, frozen base or None) of a module: its LoRA factors and the rest when it carries LoRA,
  else all its params."""
  if lora_lib.lora_modules(module):
    _, factors, base = lora_lib.split_lora(module)
    return factors, base
  return pure_params(module), None


def pure_params(module: nnx.Module) -> dict:
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def init_train_state(params: dict, tx: optax.GradientTransformation) -> dict[str, Any]:
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
