"""The DreamBooth loss and the pure, jitted train step.

loss = mean over instance examples of ||eps_hat(z_t, c) - target||^2
     + prior_loss_weight * the same mean over class (prior-preservation) examples,
the two kinds told apart by a per-example `prior` flag rather than by batch halves, so the loss is the same on any
number of devices and any sharding of the batch. With prior_preservation="base_output" a class example's target is
the frozen base model's prediction on the same noised latents and prompt, not the noise (or v). With several
concepts (config.concepts) a class example's term is weighted by its concept's prior_loss_weight (a per-example
`concept` index), and the step also returns per-concept sums and counts of the losses (CONCEPT_METRICS).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dreambooth_jax.data import concepts as concepts_lib
from dreambooth_jax.models import lora as lora_lib
from dreambooth_jax.training import optim
from dreambooth_jax.sampling import flow_matching, schedules as schedule_lib

ROUNDING_STREAM = 0x7FFFFFFF  # fold_in data of the bf16 rounding key (micro-batches take 0, 1, ... of the step key)
PRIOR_PRESERVATIONS = ("class_images", "base_output")
# per-concept (C,) metrics of a concepts run: loss sums and example counts, read as losses by metrics.concept_losses
CONCEPT_METRICS = ("concept_instance_sum", "concept_instance_count", "concept_prior_sum", "concept_prior_count")


@dataclasses.dataclass(frozen=True)
class LossSettings:
  prior_loss_weight: float = 1.0
  snr_gamma: float = 0.0  # 0 = off; else min-SNR-gamma weighting (Hang et al. 2023)
  snr_weighting: str = "min_snr"  # the v-prediction formula: schedules.min_snr_loss_weight
  offset_noise: float = 0.0  # 0 = off; else noise += offset_noise * N(0, 1) per (example, channel)
  prior_preservation: str = "class_images"  # the class examples' target: the noise (or v) | "base_output"
  # flow matching (Flux): timestep density and loss weighting (flow_matching.WEIGHTING_SCHEMES), guidance input
  weighting_scheme: str = "none"
  logit_mean: float = 0.0
  logit_std: float = 1.0
  mode_scale: float = 1.29
  guidance_scale: float = 3.5
  # config.concepts: each concept's prior_loss_weight (static), indexed by the batch's `concept`; () = one subject
  concept_prior_weights: tuple[float, ...] = ()

  def __post_init__(self):  # refused at set-up, by name, not at the first traced step
    if self.snr_weighting not in schedule_lib.SNR_WEIGHTINGS:
      raise ValueError(f"snr_weighting={self.snr_weighting!r} is not one of {list(schedule_lib.SNR_WEIGHTINGS)}")
    if self.prior_preservation not in PRIOR_PRESERVATIONS:
      raise ValueError(f"prior_preservation={self.prior_preservation!r} is not one of {list(PRIOR_PRESERVATIONS)}")
    flow_matching.check_weighting_scheme(self.weighting_scheme)


def loss_settings(config) -> LossSettings:
  """The config's loss keys (the flow-matching ones, which Flux reads, by LossSettings' names)."""
  flow_keys = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "guidance_scale")
  prior = bool(config.with_prior_preservation)
  concept_weights = tuple(c.prior_loss_weight if prior else 0.0 for c in concepts_lib.resolve(config))
  return LossSettings(prior_loss_weight=config.prior_loss_weight if prior else 0.0,
                      snr_gamma=config.snr_gamma, snr_weighting=config.snr_weighting, offset_noise=config.offset_noise,
                      prior_preservation=config.prior_preservation, concept_prior_weights=concept_weights,
                      **{k: config[k] for k in flow_keys})


def base_modules(graphdefs: dict, params: dict, frozen: dict, settings: LossSettings) -> dict | None:
  """The frozen base model whose predictions are the class examples' targets with prior_preservation="base_output"
  (else None): a LoRA component with zero factors (the adapters off: exactly the base network, no extra weights), a
  fully trained denoiser's frozen copy frozen["prior_" + name]; the frozen components as they are."""
  if settings.prior_preservation != "base_output":
    return None
  base = {name: jax.tree.map(jnp.zeros_like, p) if f"{name}_base" in frozen else frozen[f"prior_{name}"]
          for name, p in params.items()}
  return merge_modules(graphdefs, base, frozen)


@dataclasses.dataclass(frozen=True)
class EmaSettings:
  """Exponential moving average of the trained weights, updated after each optimizer step u = 1, 2, ...:
  ema = d_u * ema + (1 - d_u) * params. d_u = 0 (a copy) for the first `update_after_step` updates, then `decay`;
  with `ramp`, diffusers' EMAModel: d_u = 0 while u <= update_after_step + 1, then min(decay, (1 + n) / (10 + n))
  with n = u - update_after_step - 1, so the early average does not hold the first weights for long."""

  decay: float = 0.9999
  update_after_step: int = 0
  ramp: bool = True

  def __post_init__(self):
    if not 0.0 <= self.decay <= 1.0:
      raise ValueError(f"ema_decay={self.decay}: must be in [0, 1] (0.9999 is usual; 0 = the raw weights)")
    if self.update_after_step < 0:
      raise ValueError(f"ema_update_after_step={self.update_after_step}: must be >= 0")

  def decay_at(self, update):
    """d_u of update u (1-based, traced int)."""
    n = (update - self.update_after_step - 1).astype(jnp.float32)
    if not self.ramp:
      return jnp.where(update <= self.update_after_step, 0.0, jnp.float32(self.decay))
    return jnp.where(n <= 0, 0.0, jnp.minimum(jnp.float32(self.decay), (1.0 + n) / (10.0 + n)))


def ema_settings(config) -> EmaSettings | None:
  """config's EMA, or None when use_ema is off."""
  if not config.use_ema:
    return None
  return EmaSettings(decay=config.ema_decay, update_after_step=config.ema_update_after_step, ramp=config.ema_ramp)


def update_ema(ema: dict, params: dict, decay) -> dict:
  # d * ema + (1 - d) * p rather than ema + (1 - d) * (p - ema): exactly p at d = 0 and exactly ema at d = 1
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(jnp.float32), ema, params)


def example_losses(family, modules: dict, schedule, micro: dict, rng, settings: LossSettings, base=None):
  """Per-example MSE (B,) of one micro-batch; the family says how the text and image conditioning reach its
  denoiser. With `base` (base_modules) the class examples' target is the base's prediction (one extra forward,
  without gradients).

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
  cached = all(k in micro for k in family.TEXT_KEYS)  # cached embeddings of the frozen text encoders
  encode = lambda m: {k: micro[k] for k in family.TEXT_KEYS} if cached else family.encode_text(
      m, {k: micro[k] for k in family.ID_KEYS})
  text = encode(modules)
  image = {k: micro[k] for k in family.image_conditioning_keys()}
  noise = draw(lambda k: jax.random.normal(k, shape_HWC, jnp.float32), 1)
  if settings.offset_noise:
    noise = noise + settings.offset_noise * draw(lambda k: jax.random.normal(k, (1, 1, shape_HWC[-1])), 2)
  # the family's objective: timesteps (from each example's key 3), noised input, target, loss weight
  noised = family.training_inputs(modules, schedule, x0, noise, keys_B4[:, 3], settings)
  image, target = {**image, **noised.image}, noised.target
  if base is not None:
    base_prediction = jax.lax.stop_gradient(
        family.denoise(base, noised.x_t, noised.t_B, encode(base), image).astype(jnp.float32))
    target = jnp.where(micro["prior"][:, None, None, None] > 0, base_prediction, target)
  prediction = family.denoise(modules, noised.x_t, noised.t_B, text, image)
  squared_BHWC = jnp.square(prediction.astype(jnp.float32) - target)
  if "mask" in micro:
    # masked_loss: kohya's apply_masked_loss, the (B, h, w, 1) mask on the latent grid multiplied in, then the plain
    # mean: no renormalisation by the mask's area (a half mask gives half the kept half's mean)
    squared_BHWC = squared_BHWC * micro["mask"]
  mse_B = jnp.mean(squared_BHWC, axis=(1, 2, 3))
  return mse_B if noised.weight_B is None else mse_B * noised.weight_B


def combine_losses(mse_B, prior_B, prior_loss_weight: float, concept_B=None, concept_weights: tuple = ()):
  """(loss, (instance_loss, prior_loss)); with concept_weights the prior term weights each class example by its
  concept's weight (prior_loss stays the unweighted mean)."""
  prior_B = prior_B.astype(jnp.float32)
  instance_B = 1.0 - prior_B
  instance_loss = jnp.sum(mse_B * instance_B) / jnp.maximum(jnp.sum(instance_B), 1.0)
  prior_loss = jnp.sum(mse_B * prior_B) / jnp.maximum(jnp.sum(prior_B), 1.0)
  if not concept_weights:
    return instance_loss + prior_loss_weight * prior_loss, (instance_loss, prior_loss)
  weight_B = jnp.asarray(concept_weights, jnp.float32)[concept_B]
  prior_term = jnp.sum(mse_B * prior_B * weight_B) / jnp.maximum(jnp.sum(prior_B), 1.0)
  return instance_loss + prior_term, (instance_loss, prior_loss)


def concept_sums(mse_B, prior_B, concept_B, count: int) -> dict:
  """CONCEPT_METRICS: per concept (C,), the sum of its instance (prior) examples' losses and their number."""
  onehot_BC = jax.nn.one_hot(concept_B, count, dtype=jnp.float32)
  prior_B = prior_B.astype(jnp.float32)
  instance_B = 1.0 - prior_B
  return {"concept_instance_sum": (mse_B * instance_B) @ onehot_BC, "concept_instance_count": instance_B @ onehot_BC,
          "concept_prior_sum": (mse_B * prior_B) @ onehot_BC, "concept_prior_count": prior_B @ onehot_BC}


ACCUMULATIONS = ("scan", "unrolled")


def accumulation_for(name: str, backend: str) -> str:
  """config.accumulation_loop -> the loop form: "auto" is unrolled on XLA:CPU (a gradient inside lax.scan measured
  2.4x slower there, docs/benchmarks.md) and scan elsewhere (compile time independent of the count)."""
  if name == "auto":
    return "unrolled" if backend == "cpu" else "scan"
  if name not in ACCUMULATIONS:
    raise ValueError(f"accumulation_loop={name!r} is not one of {['auto', *ACCUMULATIONS]}")
  return name


def make_train_step(family, graphdefs: dict, tx: optax.GradientTransformation, schedules: dict,
                    settings: LossSettings, ema: EmaSettings | None = None, accumulation: str = "scan"):
  """Returns train_step(state, batch, rng, frozen) -> (state, metrics).

  accumulation: how several micro-batches are looped (ACCUMULATIONS): "scan" (lax.scan) or "unrolled"; with one
  micro-batch there is no loop (docs/benchmarks.md: XLA:CPU runs a gradient inside a loop several times slower).

  state:  {"step": int32, "params": {"unet": ..., ["text_encoder": ...]}, "opt_state": ..., ["ema": float32 copy of
          params, with `ema`]} (donated)
  batch:  arrays with a leading gradient-accumulation axis (A, B, ...), the schema of data.batches.batch_schema:
          "pixels" or "latent_mean"/"latent_std", the family's ID_KEYS or cached TEXT_KEYS, its image
          conditioning, "prior" (B,) flags and "slot" (B,) the examples' positions in the step's whole batch
          (A x B; the keys of their noise), with masked_loss "mask" (B, h, w, 1).
  rng:    the run's base key; the step's key is fold_in(rng, step), so a resumed run draws the same noise.
  frozen: the parameters that are not trained ("vae", and "text_encoder" unless it is trained or its embeddings are
          cached), for LoRA the frozen base weights ("unet_base", ["text_encoder_base"]), and the schedule.
  """
  if accumulation not in ACCUMULATIONS:
    raise ValueError(f"accumulation_loop={accumulation!r} is not one of {list(ACCUMULATIONS)}")

  def loss_fn(params, frozen, micro, micro_rng, example_rng):
    modules = merge_modules(graphdefs, params, frozen)
    for module in modules.values():  # LoRA dropout (if any) draws from the micro-batch's key
      lora_lib.set_dropout_key(module, jax.random.fold_in(micro_rng, 1))
    base = base_modules(graphdefs, params, frozen, settings)
    mse_B = example_losses(family, modules, frozen["schedule"], micro, example_rng, settings, base)
    concepts = len(settings.concept_prior_weights)
    loss, (instance_loss, prior_loss) = combine_losses(mse_B, micro["prior"], settings.prior_loss_weight,
                                                       micro.get("concept"), settings.concept_prior_weights)
    metrics = {"loss": loss, "instance_loss": instance_loss, "prior_loss": prior_loss}
    if concepts:
      metrics.update(concept_sums(jax.lax.stop_gradient(mse_B), micro["prior"], micro["concept"], concepts))
    return loss, metrics

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
      if settings.concept_prior_weights:  # sums and counts both averaged: their ratio is unchanged
        metric_zeros.update({k: jnp.zeros((len(settings.concept_prior_weights),), jnp.float32)
                             for k in CONCEPT_METRICS})
      if accumulation == "scan":
        (grads, metrics), _ = jax.lax.scan(micro_step, (zeros, metric_zeros), (jnp.arange(accum), batch))
      else:  # "unrolled": every micro-batch traced (no loop in the program; compile time grows with accum)
        carry = (zeros, metric_zeros)
        for index in range(accum):
          carry, _ = micro_step(carry, (index, jax.tree.map(lambda x, index=index: x[index], batch)))
        grads, metrics = carry
      grads = jax.tree.map(lambda g: g / accum, grads)
      metrics = jax.tree.map(lambda m: m / accum, metrics)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    # bf16 parameters round stochastically (keyed by the step: a resumed run repeats it exactly)
    new_params = optim.apply_updates(params, updates, jax.random.fold_in(step_rng, ROUNDING_STREAM))
    metrics["grad_norm"] = optax.tree.norm(grads)
    for group, lr in schedules.items():
      metrics["lr" if group == family.DENOISER else f"lr_{group}"] = lr(state["step"])
    new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
    if ema is not None:
      decay = ema.decay_at(new_state["step"])
      new_state["ema"] = update_ema(state["ema"], new_params, decay)
      metrics["ema_decay"] = decay
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


def init_train_state(params: dict, tx: optax.GradientTransformation, ema: bool = False) -> dict[str, Any]:
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
  if ema:  # float32 whatever param_dtype (lr-sized changes average below bf16's resolution); a copy, not an alias
    state["ema"] = jax.tree.map(lambda p: jnp.array(p, jnp.float32, copy=True), params)
  return state
