"""Flow matching (Flux.1): diffusers' FlowMatchEulerDiscreteScheduler as FluxPipeline drives it, and the timestep
sampling and loss weighting of diffusers' examples/dreambooth/train_dreambooth_lora_flux.py, as pure functions.

The noisy latent at noise level sigma in [0, 1] is x_sigma = (1 - sigma) x0 + sigma noise; the transformer predicts
the velocity noise - x0 and sees the timestep sigma (1000 sigma embedded). Sampling walks sigma from 1 to 0 with
Euler steps x <- x + (sigma_next - sigma) v; the sigmas are linspace(1, 1/steps, steps) shifted towards 1 by an
amount mu that grows with the image's token count (`calculate_shift`, `time_shift`), then a final 0.

Schedules are computed in numpy float32 in diffusers' order of operations, so they equal diffusers' exactly.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

TIME_SHIFT_TYPES = ("exponential", "linear")
# train_dreambooth_lora_flux's --weighting_scheme: how timesteps are drawn (logit_normal, mode; the others draw
# uniformly) and how the loss is weighted (sigma_sqrt, cosmap; the others weight 1).
WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")
# Scheduler options FluxPipeline does not use; a config that sets one is refused rather than sampled differently.
UNSUPPORTED = ("invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
               "stochastic_sampling", "use_flow_sigmas")


@jax.tree_util.register_static  # hashable, no arrays: the training step takes it as a (leafless) argument
@dataclasses.dataclass(frozen=True)
class FlowMatchConfig:
  """The FlowMatchEulerDiscreteScheduler fields that FluxPipeline and the Flux training script read."""

  num_train_timesteps: int = 1000
  shift: float = 1.0
  use_dynamic_shifting: bool = False
  base_shift: float = 0.5
  max_shift: float = 1.15
  base_image_seq_len: int = 256
  max_image_seq_len: int = 4096
  time_shift_type: str = "exponential"

  @classmethod
  def from_dict(cls, config: dict) -> "FlowMatchConfig":
    where = "scheduler/scheduler_config.json"
    for key in UNSUPPORTED:
      if config.get(key):
        raise ValueError(f"{where}: config key {key!r} = {config[key]!r} is not supported by the flow-matching "
                         "sampler (FluxPipeline's schedule); remove it or set it to false/null")
    if config.get("time_shift_type", "exponential") not in TIME_SHIFT_TYPES:
      raise ValueError(f"{where}: config key 'time_shift_type' = {config['time_shift_type']!r} is not supported "
                       f"(supported: {list(TIME_SHIFT_TYPES)})")
    # absent or null keys take diffusers' defaults
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    return cls(**{k: (config[k] if config.get(k) is not None else default) for k, default in fields.items()})


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
  """FluxPipeline's mu: linear in the packed image's token count, base_shift at base_seq_len, max_shift at
  max_seq_len (extrapolated beyond)."""
  m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
  b = base_shift - m * base_seq_len
  return image_seq_len * m + b


def time_shift(mu: float, sigma: float, t: np.ndarray, kind: str = "exponential") -> np.ndarray:
  """FlowMatchEulerDiscreteScheduler.time_shift: exponential e^mu / (e^mu + (1/t - 1)^sigma), or linear
  mu / (mu + (1/t - 1)^sigma); t in (0, 1] (float32 arithmetic on a float32 t, as diffusers)."""
  if kind == "exponential":
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
  if kind == "linear":
    return mu / (mu + (1 / t - 1) ** sigma)
  raise ValueError(f"time_shift_type {kind!r}: expected one of {list(TIME_SHIFT_TYPES)}")


def static_shift(shift: float, sigmas: np.ndarray) -> np.ndarray:
  """The resolution-independent shift shift * s / (1 + (shift - 1) s) (schnell's configs: shift 1, the identity)."""
  return shift * sigmas / (1 + (shift - 1) * sigmas)


def sampling_schedule(config: FlowMatchConfig, num_steps: int, image_seq_len: int):
  """(sigmas (num_steps + 1,), timesteps (num_steps,)) float32 as FluxPipeline sets them: sigmas = linspace(1,
  1/steps, steps), shifted by time_shift(mu(image_seq_len)) under use_dynamic_shifting, else by the static shift;
  timesteps = 1000 sigmas; a final sigma 0 appended."""
  if num_steps < 1:
    raise ValueError(f"num_inference_steps = {num_steps}: must be at least 1")
  sigmas = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
  if config.use_dynamic_shifting:
    mu = calculate_shift(image_seq_len, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                         config.max_shift)
    sigmas = time_shift(mu, 1.0, sigmas, config.time_shift_type).astype(np.float32)
  else:
    sigmas = static_shift(config.shift, sigmas).astype(np.float32)
  timesteps = (sigmas * np.float32(config.num_train_timesteps)).astype(np.float32)
  return np.concatenate([sigmas, np.zeros(1, np.float32)]), timesteps


def model_timestep(timestep, num_train_timesteps: int = 1000):
  """What the transformer is given for a scheduler timestep (FluxPipeline: timestep / 1000; the model multiplies
  by 1000 again). Divide schedules here in numpy float32, outside jit: XLA may compile x / 1000 as x * 0.001, one
  ulp away from torch's quotient."""
  return (np.asarray(timestep, np.float32) / np.float32(num_train_timesteps)).astype(np.float32)


def euler_step(x, velocity, sigma, sigma_next):
  """FlowMatchEulerDiscreteScheduler.step (deterministic): x + (sigma_next - sigma) v in fp32, returned in the
  model output's dtype."""
  prev = x.astype(jnp.float32) + (sigma_next - sigma) * velocity.astype(jnp.float32)
  return prev.astype(velocity.dtype)


# ----------------------------------------------------------------------------------------------- the sampler

SAMPLER_NAME = "flow_euler"  # FlowMatchEulerDiscreteScheduler, the one FluxPipeline uses


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FlowPlan:
  """sampling_schedule's tables for one step count and image size: sigmas (n+1,), model timesteps (n,)."""
  sigmas: jax.Array
  model_timesteps: jax.Array
  steps: int = dataclasses.field(metadata=dict(static=True))


# The sampler protocol of sampling/sampler.py (as sampling/schedulers.py for the noise-schedule families).

def plan_for(config: FlowMatchConfig, settings, latent_shape_HWC) -> FlowPlan:
  """The schedule FluxPipeline sets for settings.steps on a latent of latent_shape_HWC (its packed token count
  (H/2)(W/2) sets the shift); the model timesteps divided in numpy (see model_timestep)."""
  if settings.scheduler not in (None, SAMPLER_NAME):
    raise ValueError(f"scheduler {settings.scheduler!r}: this flow-matching model samples with {SAMPLER_NAME!r} "
                     "(FlowMatchEulerDiscreteScheduler) only")
  if settings.karras or settings.eta:
    raise ValueError("karras sigmas and eta do not apply to the flow-matching sampler; leave them off")
  h, w, _ = latent_shape_HWC
  sigmas, timesteps = sampling_schedule(config, settings.steps, (h // 2) * (w // 2))
  return FlowPlan(sigmas=jnp.asarray(sigmas), model_timesteps=jnp.asarray(model_timestep(timesteps,
                                                                                          config.num_train_timesteps)),
                  steps=len(timesteps))


def initial_noise_scale(plan: FlowPlan) -> float:
  del plan
  return 1.0


def initial_carry(plan: FlowPlan, x):
  del plan, x
  return ()


def scale_model_input(plan: FlowPlan, i, x):
  del plan, i
  return x


def denoiser_timestep(plan: FlowPlan, i):
  return plan.model_timesteps[i]


def needs_noise(plan: FlowPlan) -> bool:
  del plan
  return False


def step(plan: FlowPlan, i, velocity, x, carry, noise=None):
  del noise
  return euler_step(x, velocity, plan.sigmas[i], plan.sigmas[i + 1]), carry


# ----------------------------------------------------------------------------------------------- training

def training_schedule(config: FlowMatchConfig):
  """(sigmas (N,), model timesteps (N,)) float32 of a freshly built scheduler (the training script's
  noise_scheduler_copy): sigmas N..1 over N, statically shifted unless use_dynamic_shifting; its timesteps are
  N sigma, and the transformer is given timesteps / N."""
  n = config.num_train_timesteps
  sigmas = (np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)).astype(np.float32)
  if not config.use_dynamic_shifting:
    sigmas = static_shift(config.shift, sigmas).astype(np.float32)
  return sigmas, model_timestep((sigmas * np.float32(n)).astype(np.float32), n)


def check_weighting_scheme(scheme: str) -> str:
  if scheme not in WEIGHTING_SCHEMES:
    raise ValueError(f"weighting_scheme={scheme!r}: expected one of {list(WEIGHTING_SCHEMES)}")
  return scheme


def timestep_density(scheme: str, uniform_B, normal_B, logit_mean: float = 0.0, logit_std: float = 1.0,
                     mode_scale: float = 1.29):
  """diffusers.training_utils.compute_density_for_timestep_sampling as a transform of given draws (uniform in
  [0, 1), standard normal): logit_normal sigmoid(mean + std n); mode 1 - u - s (cos^2(pi u / 2) - 1 + u); every
  other scheme u itself."""
  check_weighting_scheme(scheme)
  if scheme == "logit_normal":
    return jax.nn.sigmoid(logit_mean + logit_std * normal_B)
  if scheme == "mode":
    return 1 - uniform_B - mode_scale * (jnp.cos(jnp.pi * uniform_B / 2) ** 2 - 1 + uniform_B)
  return uniform_B


def sample_density(rng, scheme: str, batch: int, **kwargs):
  """timestep_density on fresh draws from `rng` (deterministic given the key)."""
  k_uniform, k_normal = jax.random.split(rng)
  return timestep_density(scheme, jax.random.uniform(k_uniform, (batch,)), jax.random.normal(k_normal, (batch,)),
                          **kwargs)


def training_timesteps(u_B, sigmas_N, model_timesteps_N):
  """The training script's draw -> (sigma, model timestep), from the training_schedule tables: index floor(u N)
  (clipped to N - 1: a sigmoid that rounds to 1 in fp32 would index past the table, where torch raises)."""
  n = sigmas_N.shape[0]
  index_B = jnp.clip((u_B * n).astype(jnp.int32), 0, n - 1)
  return sigmas_N[index_B], model_timesteps_N[index_B]


def loss_weighting(scheme: str, sigma_B):
  """diffusers.training_utils.compute_loss_weighting_for_sd3: sigma_sqrt 1 / sigma^2, cosmap
  2 / (pi (1 - 2 sigma + 2 sigma^2)), otherwise 1."""
  check_weighting_scheme(scheme)
  if scheme == "sigma_sqrt":
    return sigma_B ** -2.0
  if scheme == "cosmap":
    return 2 / (math.pi * (1 - 2 * sigma_B + 2 * sigma_B ** 2))
  return jnp.ones_like(sigma_B)
