"""Noise schedules, training targets and the DDIM update, equal to diffusers' DDPM/DDIM schedulers.

Read from a diffusers scheduler_config.json of any scheduler class (SD hub repos ship PNDM configs): only the
beta and prediction fields matter for training, the DDIM fields take DDIM's defaults when absent.
"""

import dataclasses
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
INTERPOLATIONS = ("linear", "log_linear")
FINAL_SIGMAS = ("zero", "sigma_min")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
  alphas_cumprod: jax.Array  # (T,) float32
  final_alpha_cumprod: float = dataclasses.field(metadata=dict(static=True))
  num_train_timesteps: int = dataclasses.field(metadata=dict(static=True))
  prediction_type: str = dataclasses.field(metadata=dict(static=True))
  steps_offset: int = dataclasses.field(metadata=dict(static=True))
  timestep_spacing: str = dataclasses.field(metadata=dict(static=True))
  clip_sample: bool = dataclasses.field(metadata=dict(static=True))
  clip_sample_range: float = dataclasses.field(metadata=dict(static=True))
  # Fields only the other samplers read (sampling/schedulers.py); diffusers' defaults when the config lacks them.
  interpolation_type: str = dataclasses.field(default="linear", metadata=dict(static=True))  # Euler
  final_sigmas_type: str = dataclasses.field(default="zero", metadata=dict(static=True))  # Euler, DPM++
  sigma_min: float | None = dataclasses.field(default=None, metadata=dict(static=True))  # Euler's Karras range
  sigma_max: float | None = dataclasses.field(default=None, metadata=dict(static=True))
  # The beta config again, so the other samplers can rebuild alphas_cumprod exactly as torch.cumprod does.
  beta_schedule: str = dataclasses.field(default="linear", metadata=dict(static=True))
  beta_start: float = dataclasses.field(default=0.0001, metadata=dict(static=True))
  beta_end: float = dataclasses.field(default=0.02, metadata=dict(static=True))
  trained_betas: tuple | None = dataclasses.field(default=None, metadata=dict(static=True))


def betas_from_config(config: dict) -> np.ndarray:
  """float32 betas exactly as diffusers builds them (torch float32 linspace for the linear kinds)."""
  n = int(config.get("num_train_timesteps", 1000))
  if config.get("trained_betas") is not None:
    return np.asarray(config["trained_betas"], np.float32)
  kind = config.get("beta_schedule", "linear")
  start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
  if kind == "linear":
    return np.linspace(start, end, n, dtype=np.float64).astype(np.float32)
  if kind == "scaled_linear":  # linear in sqrt(beta), the Stable Diffusion schedule
    return (np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float64).astype(np.float32) ** 2).astype(np.float32)
  if kind == "squaredcos_cap_v2":
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], np.float32)
  raise ValueError(f"scheduler: config key 'beta_schedule' = {kind!r} is not supported (supported: "
                   f"{list(BETA_SCHEDULES)})")


def schedule_from_config(config: dict) -> NoiseSchedule:
  if str(config.get("_class_name", "")).startswith("FlowMatch"):  # no betas: DDPM defaults would be silently wrong
    raise ValueError(f"scheduler: {config['_class_name']} is a flow-matching schedule (Flux), not a noise schedule "
                     "with betas; read it with sampling/flow_matching.FlowMatchConfig")
  for key, allowed in (("prediction_type", PREDICTION_TYPES), ("timestep_spacing", SPACINGS)):
    default = {"prediction_type": "epsilon", "timestep_spacing": "leading"}[key]
    if config.get(key, default) not in allowed:
      raise ValueError(f"scheduler: config key {key!r} = {config.get(key)!r} is not supported (supported: "
                       f"{list(allowed)})")
  for key, allowed in (("interpolation_type", INTERPOLATIONS), ("final_sigmas_type", FINAL_SIGMAS)):
    if config.get(key, allowed[0]) not in allowed:
      raise ValueError(f"scheduler: config key {key!r} = {config.get(key)!r} is not supported (supported: "
                       f"{list(allowed)})")
  for key in ("thresholding", "rescale_betas_zero_snr"):
    if config.get(key):
      raise ValueError(f"scheduler: config key {key!r} = {config[key]!r} is not supported (supported: [False])")
  betas = betas_from_config(config)
  # torch.cumprod in float32, reproduced step by step in float32.
  alphas_cumprod = np.cumprod(1.0 - betas, dtype=np.float32)
  set_alpha_to_one = config.get("set_alpha_to_one", True)
  return NoiseSchedule(
      alphas_cumprod=jnp.asarray(alphas_cumprod),
      final_alpha_cumprod=1.0 if set_alpha_to_one else float(alphas_cumprod[0]),
      num_train_timesteps=len(betas), prediction_type=config.get("prediction_type", "epsilon"),
      steps_offset=int(config.get("steps_offset", 0)), timestep_spacing=config.get("timestep_spacing", "leading"),
      clip_sample=bool(config.get("clip_sample", True)), clip_sample_range=float(config.get("clip_sample_range", 1.0)),
      interpolation_type=config.get("interpolation_type", "linear"),
      final_sigmas_type=config.get("final_sigmas_type", "zero"),
      sigma_min=None if config.get("sigma_min") is None else float(config["sigma_min"]),
      sigma_max=None if config.get("sigma_max") is None else float(config["sigma_max"]),
      beta_schedule=config.get("beta_schedule", "linear"), beta_start=float(config.get("beta_start", 0.0001)),
      beta_end=float(config.get("beta_end", 0.02)),
      trained_betas=None if config.get("trained_betas") is None else tuple(float(b) for b in config["trained_betas"]))


def torch_alphas_cumprod(schedule: NoiseSchedule) -> np.ndarray:
  """float32 alphas_cumprod exactly as diffusers' torch.cumprod gives them (it accumulates in float64, so they
  differ from `alphas_cumprod` by an ulp here and there). The DPM++ and Euler tables use these; DDIM and training
  keep `alphas_cumprod`, unchanged."""
  betas = betas_from_config(dict(num_train_timesteps=schedule.num_train_timesteps, trained_betas=schedule.trained_betas,
                                 beta_schedule=schedule.beta_schedule, beta_start=schedule.beta_start,
                                 beta_end=schedule.beta_end))
  return np.cumprod((np.float32(1) - betas).astype(np.float64)).astype(np.float32)


def load_schedule(model_dir) -> NoiseSchedule:
  path = pathlib.Path(model_dir) / "scheduler" / "scheduler_config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path}: missing")
  return schedule_from_config(json.loads(path.read_text()))


def _bcast(values_B, like):
  return values_B.reshape(values_B.shape + (1,) * (like.ndim - values_B.ndim))


def add_noise(schedule: NoiseSchedule, x0, noise, t_B):
  a = schedule.alphas_cumprod[t_B]
  return _bcast(jnp.sqrt(a), x0) * x0 + _bcast(jnp.sqrt(1.0 - a), x0) * noise


def velocity(schedule: NoiseSchedule, x0, noise, t_B):
  a = schedule.alphas_cumprod[t_B]
  return _bcast(jnp.sqrt(a), x0) * noise - _bcast(jnp.sqrt(1.0 - a), x0) * x0


def training_target(schedule: NoiseSchedule, x0, noise, t_B):
  if schedule.prediction_type == "epsilon":
    return noise
  if schedule.prediction_type == "v_prediction":
    return velocity(schedule, x0, noise, t_B)
  return x0


def _x0_eps(prediction_type, model_output, x_t, alpha_prod):
  a, b = jnp.sqrt(alpha_prod), jnp.sqrt(1.0 - alpha_prod)
  if prediction_type == "epsilon":
    return (x_t - b * model_output) / a, model_output
  if prediction_type == "sample":
    return model_output, (x_t - a * model_output) / b
  return a * x_t - b * model_output, a * model_output + b * x_t  # v_prediction


def predicted_x0_and_eps(schedule: NoiseSchedule, model_output, x_t, t):
  alpha_prod = _bcast(jnp.atleast_1d(schedule.alphas_cumprod[t]), x_t)
  return _x0_eps(schedule.prediction_type, model_output, x_t, alpha_prod)


def snr(schedule: NoiseSchedule, t_B):
  a = schedule.alphas_cumprod[t_B]
  return a / (1.0 - a)


SNR_WEIGHTINGS = ("min_snr", "snr_plus_one")


def min_snr_loss_weight(schedule: NoiseSchedule, t_B, gamma: float, weighting: str = "min_snr"):
  """Min-SNR-gamma loss weight (Hang et al. 2023), per timestep. Epsilon: min(snr, gamma) / snr for both.
  v-prediction:

    "min_snr"       min(snr, gamma) / (snr + 1): the paper's weight for v (Sec. 4.2), and diffusers'
                    examples/dreambooth/train_dreambooth.py --snr_gamma (the default here)
    "snr_plus_one"  min(snr + 1, gamma) / (snr + 1): the older diffusers train_text_to_image.py variant (adds one to
                    the SNR before clipping; also in scripts derived from it); it differs where snr < gamma <= snr + 1
                    and for snr + 1 < gamma (weight 1 instead of snr / (snr + 1))
  """
  if weighting not in SNR_WEIGHTINGS:
    raise ValueError(f"snr_weighting={weighting!r} is not one of {list(SNR_WEIGHTINGS)}")
  s = snr(schedule, t_B)
  if schedule.prediction_type != "v_prediction":
    return jnp.minimum(s, gamma) / s
  if weighting == "snr_plus_one":
    return jnp.minimum(s + 1.0, gamma) / (s + 1.0)
  return jnp.minimum(s, gamma) / (s + 1.0)


def ddim_timesteps(schedule: NoiseSchedule, num_inference_steps: int) -> np.ndarray:
  """== DDIMScheduler.set_timesteps(n).timesteps."""
  n, total = num_inference_steps, schedule.num_train_timesteps
  if n > total:
    raise ValueError(f"num_inference_steps={n} exceeds num_train_timesteps={total}")
  if schedule.timestep_spacing == "linspace":
    steps = np.linspace(0, total - 1, n).round()[::-1].astype(np.int64)
  elif schedule.timestep_spacing == "leading":
    steps = (np.arange(0, n) * (total // n)).round()[::-1].astype(np.int64) + schedule.steps_offset
  else:  # trailing
    steps = np.round(np.arange(total, 0, -total / n)).astype(np.int64) - 1
  return steps.astype(np.int32)


def ddim_prev_timesteps(schedule: NoiseSchedule, timesteps: np.ndarray) -> np.ndarray:
  """DDIMScheduler.step's previous timestep: t - T // n (negative = before the start: final_alpha_cumprod)."""
  return (np.asarray(timesteps) - schedule.num_train_timesteps // len(timesteps)).astype(np.int32)


def ddim_step(schedule: NoiseSchedule, model_output, t, prev_t, x_t, eta: float = 0.0, noise=None):
  """== DDIMScheduler.step(model_output, t, x_t, eta, variance_noise=noise).prev_sample; jit-safe in t, prev_t."""
  alpha_prod = schedule.alphas_cumprod[t]
  alpha_prev = jnp.where(prev_t >= 0, schedule.alphas_cumprod[jnp.maximum(prev_t, 0)],
                         schedule.final_alpha_cumprod)
  x0, eps = _x0_eps(schedule.prediction_type, model_output, x_t, alpha_prod)
  if schedule.clip_sample:
    x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
  variance = (1 - alpha_prev) / (1 - alpha_prod) * (1 - alpha_prod / alpha_prev)
  std = eta * jnp.sqrt(variance)
  direction = jnp.sqrt(1 - alpha_prev - std ** 2) * eps
  x_prev = jnp.sqrt(alpha_prev) * x0 + direction
  if eta > 0:
    if noise is None:
      raise ValueError("ddim_step with eta > 0 needs `noise`")
    x_prev = x_prev + std * noise
  return x_prev
