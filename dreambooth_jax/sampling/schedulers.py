"""The samplers people use, equal to diffusers' schedulers built with `XScheduler.from_config(config)`.

  ddim      DDIMScheduler (schedules.ddim_*, unchanged)
  dpmpp_2m  DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint, lower_order_final; karras optional)
  euler     EulerDiscreteScheduler (karras optional)
  euler_a   EulerAncestralDiscreteScheduler (this diffusers offers no Karras sigmas for it)

Designed for jit + lax.fori_loop: `make_plan` computes in numpy, once per (scheduler, steps, config), the tables
diffusers' `set_timesteps` builds (model-input timesteps, sigmas) and the per-step scalars of its `step`, in
float32 in diffusers' order of operations; `scale_model_input` and `step` are pure jnp functions of the step
index. Everything that would be Python state in diffusers (step index, DPM++'s previous x0 prediction) is the
loop index or the `carry`. Ancestral noise comes from the caller (per-image keys folded with the step index).

Config fields read (NoiseSchedule): betas, prediction_type, timestep_spacing, steps_offset, interpolation_type,
final_sigmas_type, sigma_min/max; Karras comes from the caller (a config's own use_karras_sigmas is not read).
Numerics: alphas_cumprod as torch.cumprod gives them (schedules.torch_alphas_cumprod); integer timesteps equal
diffusers' exactly, sigmas within a few float32 ulps (torch's CPU float32 sqrt is not always correctly rounded).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dreambooth_jax.sampling import schedules as schedule_lib

SCHEDULERS = ("ddim", "dpmpp_2m", "euler", "euler_a")
KARRAS = ("dpmpp_2m", "euler")  # the ones whose diffusers class takes use_karras_sigmas
_f32 = np.float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Plan:
  """Precomputed tables of one scheduler for one step count; `coefs` holds (steps,) float32 per-step scalars."""
  timesteps: jax.Array  # (n,) model-input t: int32 for DDIM (as before), float32 otherwise (Karras: fractional)
  prev_timesteps: jax.Array  # (n,) int32, DDIM only
  sigmas: jax.Array  # diffusers' scheduler.sigmas (n+1 or, for log_linear Euler, n+2); empty for DDIM
  coefs: dict
  schedule: schedule_lib.NoiseSchedule
  name: str = dataclasses.field(metadata=dict(static=True))
  steps: int = dataclasses.field(metadata=dict(static=True))
  eta: float = dataclasses.field(metadata=dict(static=True))
  init_noise_sigma: float = dataclasses.field(metadata=dict(static=True))


def check_name(name: str, karras: bool = False, eta: float = 0.0):
  """Refuses an unknown scheduler, Karras sigmas where diffusers has none, and eta outside DDIM."""
  if name not in SCHEDULERS:
    raise ValueError(f"scheduler {name!r} is not supported (supported: {list(SCHEDULERS)})")
  if karras and name not in KARRAS:
    raise ValueError(f"karras sigmas are offered (as in diffusers) for {list(KARRAS)} only, not {name!r}")
  if eta and name != "ddim":
    raise ValueError(f"eta={eta} applies to the ddim scheduler only, not {name!r}")


def _train_sigmas(schedule) -> np.ndarray:
  """((1 - alphas_cumprod) / alphas_cumprod) ** 0.5 in float32, as every diffusers scheduler's __init__."""
  ac = schedule_lib.torch_alphas_cumprod(schedule)
  return np.sqrt((_f32(1) - ac) / ac)


def _sigma_to_t(sigma, log_sigmas):
  """== EulerDiscreteScheduler._sigma_to_t (DPMSolverMultistepScheduler has the same), vectorised over sigma."""
  sigma = np.asarray(sigma)
  log_sigma = np.log(np.maximum(sigma, 1e-10))
  dists = log_sigma - log_sigmas[:, np.newaxis]
  low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
  high_idx = low_idx + 1
  low, high = log_sigmas[low_idx], log_sigmas[high_idx]
  w = np.clip((low - log_sigma) / (low - high), 0, 1)
  return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def _karras(in_sigmas, n, sigma_min=None, sigma_max=None):
  """== _convert_to_karras (rho 7; sigma_min/max from the config when it has them, Euler only)."""
  sigma_min = sigma_min if sigma_min is not None else in_sigmas[-1].item()
  sigma_max = sigma_max if sigma_max is not None else in_sigmas[0].item()
  rho = 7.0
  ramp = np.linspace(0, 1, n)
  min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
  return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def _torch_linspace_f32(start, end, steps):
  """torch.linspace(start, end, steps) in float32 (CPU kernel: from start in the first half, from end after)."""
  start, end = _f32(start), _f32(end)
  step = (end - start) / _f32(steps - 1)
  idx = np.arange(steps)
  return np.where(idx < steps // 2, start + step * idx.astype(_f32), end - step * (steps - 1 - idx).astype(_f32))


def _sigma_last(schedule, ac0):
  return _f32(np.sqrt((_f32(1) - ac0) / ac0)) if schedule.final_sigmas_type == "sigma_min" else 0.0


def euler_tables(schedule, n: int, karras: bool = False, ancestral: bool = False):
  """(timesteps, sigmas, init_noise_sigma) == Euler[Ancestral]DiscreteScheduler.set_timesteps(n) and its
  init_noise_sigma. Euler a has neither interpolation_type, Karras nor final_sigmas_type (always zero)."""
  total, spacing = schedule.num_train_timesteps, schedule.timestep_spacing
  if spacing == "linspace":
    ts = np.linspace(0, total - 1, n, dtype=np.float32)[::-1].copy()
  elif spacing == "leading":
    ts = (np.arange(0, n) * (total // n)).round()[::-1].copy().astype(np.float32) + schedule.steps_offset
  else:
    ts = np.arange(total, 0, -total / n).round().copy().astype(np.float32) - 1
  train = _train_sigmas(schedule)
  log_sigmas = np.log(train)
  if schedule.interpolation_type == "log_linear" and not ancestral:
    sigmas = np.exp(_torch_linspace_f32(np.log(train[-1]), np.log(train[0]), n + 1))
  else:
    sigmas = np.interp(ts, np.arange(0, len(train)), train)
  if karras:
    sigmas = _karras(sigmas, n, schedule.sigma_min, schedule.sigma_max)
    ts = _sigma_to_t(sigmas, log_sigmas)
  last = 0.0 if ancestral else _sigma_last(schedule, schedule_lib.torch_alphas_cumprod(schedule)[0])
  sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
  top = sigmas.max()
  init = top if spacing in ("linspace", "trailing") else np.sqrt(top * top + _f32(1))
  return ts.astype(np.float32), sigmas, float(init)


def dpm_tables(schedule, n: int, karras: bool = False):
  """(timesteps, sigmas) == DPMSolverMultistepScheduler.set_timesteps(n) (lambda_min_clipped = -inf)."""
  total, spacing = schedule.num_train_timesteps, schedule.timestep_spacing
  if spacing == "linspace":
    ts = np.linspace(0, total - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
  elif spacing == "leading":
    ts = (np.arange(0, n + 1) * (total // (n + 1))).round()[::-1][:-1].copy().astype(np.int64) + schedule.steps_offset
  else:
    ts = np.arange(total, 0, -total / n).round().copy().astype(np.int64) - 1
  train = _train_sigmas(schedule)
  log_sigmas = np.log(train)
  if karras:
    sigmas = _karras(np.flip(train).copy(), n)
    ts = _sigma_to_t(sigmas, log_sigmas)
    ts = ts.round() if schedule.beta_schedule != "squaredcos_cap_v2" else ts
  else:
    sigmas = np.interp(ts, np.arange(0, len(train)), train)
  last = _sigma_last(schedule, schedule_lib.torch_alphas_cumprod(schedule)[0])
  return ts.astype(np.int64), np.concatenate([sigmas, [last]]).astype(np.float32)


# inf and nan where torch has them too (DPM++'s zero final sigma: lambda = +inf, exp(-h) = 0), without warnings.
@np.errstate(divide="ignore", invalid="ignore")
def _euler_coefs(sigmas, n, ancestral):
  """Per-step float32 scalars of Euler[Ancestral]DiscreteScheduler.scale_model_input / step (s_churn = 0)."""
  s, s_next = sigmas[:n], sigmas[1:n + 1]
  var1 = s * s + _f32(1)  # sigma**2 + 1
  coefs = dict(sigma=s, in_div=np.sqrt(var1), v_skip_div=var1, v_out=-s / np.sqrt(var1))
  if ancestral:
    up = np.sqrt(s_next * s_next * (s * s - s_next * s_next) / (s * s))
    coefs.update(dt=np.sqrt(s_next * s_next - up * up) - s, sigma_up=up)
  else:
    coefs.update(dt=s_next - s)
  return coefs


@np.errstate(divide="ignore", invalid="ignore")
def _dpm_coefs(sigmas, n, schedule):
  """Per-step float32 scalars of DPMSolverMultistepScheduler.convert_model_output, dpm_solver_first_order_update
  and multistep_dpm_solver_second_order_update (order 2 from the second step; the last step is first order when
  final_sigmas_type is zero or n < 15, as lower_order_final=True)."""
  alpha = _f32(1) / np.sqrt(sigmas * sigmas + _f32(1))
  sigma = sigmas * alpha  # _sigma_to_alpha_sigma_t
  lam = np.log(alpha) - np.log(sigma)
  coefs = {k: np.zeros(n, np.float32) for k in ("alpha_s", "sigma_s", "ratio", "phi", "inv_r0", "half_phi")}
  for i in range(n):
    h = lam[i + 1] - lam[i]
    phi = alpha[i + 1] * (np.exp(-h) - _f32(1))
    coefs["alpha_s"][i], coefs["sigma_s"][i] = alpha[i], sigma[i]
    coefs["ratio"][i], coefs["phi"][i] = sigma[i + 1] / sigma[i], phi
    lower_final = i == n - 1 and (n < 15 or schedule.final_sigmas_type == "zero")
    if i > 0 and not lower_final:  # second order: D1 = (1 / r0) (m0 - m1), x -= 0.5 phi D1
      coefs["inv_r0"][i] = _f32(1) / ((lam[i] - lam[i - 1]) / h)
      coefs["half_phi"][i] = _f32(0.5) * phi
  return coefs


def make_plan(schedule, name: str, steps: int, *, karras: bool = False, eta: float = 0.0) -> Plan:
  """The tables of scheduler `name` with `steps` steps on `schedule` (the model's scheduler config)."""
  check_name(name, karras, eta)
  if name == "euler_a" and schedule.prediction_type == "sample":
    raise ValueError("euler_a: prediction_type 'sample' is not implemented (as in diffusers)")
  init, coefs = 1.0, {}
  if name == "ddim":
    timesteps = schedule_lib.ddim_timesteps(schedule, steps)
    prev, sigmas = schedule_lib.ddim_prev_timesteps(schedule, timesteps), np.zeros((0,), np.float32)
  elif name == "dpmpp_2m":
    timesteps, sigmas = dpm_tables(schedule, steps, karras)
    timesteps = timesteps.astype(np.float32)
    coefs = _dpm_coefs(sigmas, len(timesteps), schedule)
  else:
    timesteps, sigmas, init = euler_tables(schedule, steps, karras, ancestral=name == "euler_a")
    coefs = _euler_coefs(sigmas, len(timesteps), ancestral=name == "euler_a")
  if name != "ddim":
    prev = np.zeros((len(timesteps),), np.int32)
  # The loop runs over the table diffusers iterates (as it does, even if trailing's arange gave one more).
  return Plan(timesteps=jnp.asarray(timesteps), prev_timesteps=jnp.asarray(prev), sigmas=jnp.asarray(sigmas),
              coefs={k: jnp.asarray(v, jnp.float32) for k, v in coefs.items()}, schedule=schedule, name=name,
              steps=len(timesteps), eta=float(eta), init_noise_sigma=init)


def plan_for(schedule, settings, latent_shape_HWC) -> Plan:
  """The sampler protocol's plan (families.sd.SAMPLER): make_plan for a SamplerSettings (scheduler None = DDIM)."""
  del latent_shape_HWC
  name = settings.scheduler or "ddim"
  if name not in SCHEDULERS:
    raise ValueError(f"scheduler {name!r} is not one of this model's samplers {list(SCHEDULERS)}")
  return make_plan(schedule, name, settings.steps, karras=settings.karras, eta=settings.eta)


def denoiser_timestep(plan: Plan, i):
  """The timestep the denoiser is given at step i."""
  return plan.timesteps[i]


def initial_noise_scale(plan: Plan) -> float:
  """== scheduler.init_noise_sigma: the pipeline multiplies the initial latents by it (Euler: sigma_max-ish)."""
  return plan.init_noise_sigma


def needs_noise(plan: Plan) -> bool:
  return plan.name == "euler_a" or (plan.name == "ddim" and plan.eta > 0)


def initial_carry(plan: Plan, x):
  """The loop state besides x: DPM++ 2M's previous x0 prediction (unused at the first, first-order step)."""
  return jnp.zeros_like(x) if plan.name == "dpmpp_2m" else ()


def scale_model_input(plan: Plan, i, x):
  """== scheduler.scale_model_input(x, t): x / sqrt(sigma^2 + 1) for Euler (a), identity for DDIM and DPM++."""
  if plan.name in ("euler", "euler_a"):
    return x / plan.coefs["in_div"][i]
  return x


def _euler_x0(plan, i, model_output, x):
  c, kind = plan.coefs, plan.schedule.prediction_type
  if kind == "epsilon":
    return x - c["sigma"][i] * model_output
  if kind == "v_prediction":
    return model_output * c["v_out"][i] + x / c["v_skip_div"][i]
  return model_output


def step(plan: Plan, i, model_output, x, carry, noise=None):
  """One denoising step i -> (x_prev, carry) == scheduler.step(model_output, timesteps[i], x).prev_sample."""
  if plan.name == "ddim":
    return schedule_lib.ddim_step(plan.schedule, model_output, plan.timesteps[i], plan.prev_timesteps[i], x,
                                  eta=plan.eta, noise=noise), carry
  c = plan.coefs
  if plan.name == "dpmpp_2m":
    kind = plan.schedule.prediction_type
    if kind == "epsilon":
      x0 = (x - c["sigma_s"][i] * model_output) / c["alpha_s"][i]
    elif kind == "v_prediction":
      x0 = c["alpha_s"][i] * x - c["sigma_s"][i] * model_output
    else:
      x0 = model_output
    d1 = c["inv_r0"][i] * (x0 - carry)
    return c["ratio"][i] * x - c["phi"][i] * x0 - c["half_phi"][i] * d1, x0
  x0 = _euler_x0(plan, i, model_output, x)
  x_prev = x + (x - x0) / c["sigma"][i] * c["dt"][i]
  if plan.name == "euler_a":
    if noise is None:
      raise ValueError("euler_a needs `noise`")
    x_prev = x_prev + noise * c["sigma_up"][i]
  return x_prev, carry
