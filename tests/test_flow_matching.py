"""sampling/flow_matching.py against diffusers: FlowMatchEulerDiscreteScheduler driven as FluxPipeline drives it
(schedules exactly equal, Euler steps to fp32 rounding), and the timestep sampling / loss weighting of
train_dreambooth_lora_flux (diffusers.training_utils) on the same random draws."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dreambooth_jax.sampling import flow_matching as fm

# FLUX.1-dev's scheduler config (resolution-dependent shift) and FLUX.1-schnell's (none).
DEV = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
           base_image_seq_len=256, max_image_seq_len=4096)
SCHNELL = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
SHIFTED = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
LINEAR = dict(DEV, time_shift_type="linear")


def diffusers_schedule(config: dict, steps: int, image_seq_len: int):
  """FluxPipeline's step 5: linspace sigmas, mu from the token count, retrieve_timesteps."""
  from diffusers import FlowMatchEulerDiscreteScheduler
  from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
  scheduler = FlowMatchEulerDiscreteScheduler(**config)
  sigmas = np.linspace(1.0, 1 / steps, steps)
  mu = calculate_shift(image_seq_len, scheduler.config.get("base_image_seq_len", 256),
                       scheduler.config.get("max_image_seq_len", 4096), scheduler.config.get("base_shift", 0.5),
                       scheduler.config.get("max_shift", 1.15))
  retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=mu)
  return scheduler


@pytest.mark.parametrize("config", [DEV, SCHNELL, SHIFTED, LINEAR], ids=["dev", "schnell", "shift3", "linear"])
@pytest.mark.parametrize("steps,image_seq_len", [(4, 1024), (7, 4096 + 512), (1, 64)])
def test_schedule_and_steps_match_flux_pipeline(config, steps, image_seq_len):
  ref = diffusers_schedule(config, steps, image_seq_len)
  sigmas, timesteps = fm.sampling_schedule(fm.FlowMatchConfig.from_dict(config), steps, image_seq_len)
  np.testing.assert_array_equal(sigmas, ref.sigmas.numpy())
  np.testing.assert_array_equal(timesteps, ref.timesteps.numpy())
  rng = np.random.default_rng(steps)
  x = rng.standard_normal((1, 6, 8)).astype(np.float32)
  x_ref = torch.from_numpy(x.copy())
  for i, t in enumerate(ref.timesteps):
    v = rng.standard_normal(x.shape).astype(np.float32)
    x_ref = ref.step(torch.from_numpy(v), t, x_ref).prev_sample
    x = fm.euler_step(jnp.asarray(x), jnp.asarray(v), sigmas[i], sigmas[i + 1])
    np.testing.assert_allclose(np.asarray(x), x_ref.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.float32(fm.model_timestep(timesteps[i])), np.float32(t.numpy() / 1000))


def test_calculate_shift_matches_diffusers():
  from diffusers.pipelines.flux.pipeline_flux import calculate_shift
  for n in (16, 256, 1024, 4096, 9000):
    assert fm.calculate_shift(n, 256, 4096, 0.5, 1.15) == calculate_shift(n, 256, 4096, 0.5, 1.15)


def test_config_refuses_what_flux_pipeline_does_not_sample_with():
  with pytest.raises(ValueError, match="use_karras_sigmas"):
    fm.FlowMatchConfig.from_dict(dict(DEV, use_karras_sigmas=True))
  with pytest.raises(ValueError, match="time_shift_type"):
    fm.FlowMatchConfig.from_dict(dict(DEV, time_shift_type="cubic"))
  assert fm.FlowMatchConfig.from_dict(dict(DEV, base_shift=None)).base_shift == 0.5


# ----------------------------------------------------------------------------------------------- training

@pytest.mark.parametrize("config", [DEV, SHIFTED], ids=["dynamic", "static-shift"])
def test_training_schedule_matches_a_fresh_scheduler(config):
  from diffusers import FlowMatchEulerDiscreteScheduler
  ref = FlowMatchEulerDiscreteScheduler(**config)
  sigmas, model_timesteps = fm.training_schedule(fm.FlowMatchConfig.from_dict(config))
  np.testing.assert_array_equal(sigmas, ref.sigmas.numpy())
  np.testing.assert_array_equal(model_timesteps, (ref.timesteps / 1000).numpy())


@pytest.mark.parametrize("scheme", fm.WEIGHTING_SCHEMES)
def test_density_timesteps_and_weighting_match_the_training_script(scheme):
  from diffusers import FlowMatchEulerDiscreteScheduler
  from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
  batch, kwargs = 64, dict(logit_mean=0.3, logit_std=1.2, mode_scale=1.29)
  u_ref = compute_density_for_timestep_sampling(scheme, batch, generator=torch.Generator().manual_seed(0), **kwargs)
  # the same draws: torch.rand / torch.normal(mean, std) from the same generator state
  uniform = torch.rand(batch, generator=torch.Generator().manual_seed(0)).numpy()
  mean, std = kwargs["logit_mean"], kwargs["logit_std"]
  normal = ((torch.normal(mean, std, (batch,), generator=torch.Generator().manual_seed(0)) - mean) / std).numpy()
  u = fm.timestep_density(scheme, jnp.asarray(uniform), jnp.asarray(normal), **kwargs)
  np.testing.assert_allclose(np.asarray(u), u_ref.numpy(), rtol=0, atol=1e-6)

  # the script: indices = (u * N).long(); timesteps = scheduler.timesteps[indices]; sigmas via get_sigmas
  ref = FlowMatchEulerDiscreteScheduler(**DEV)
  timesteps_ref = ref.timesteps[(u_ref * 1000).long()]
  sigmas_ref = torch.stack([ref.sigmas[(ref.timesteps == t).nonzero().item()] for t in timesteps_ref])
  tables = fm.training_schedule(fm.FlowMatchConfig(**DEV))
  sigma, t_model = jax.jit(fm.training_timesteps)(jnp.asarray(u_ref.numpy()), *tables)
  np.testing.assert_array_equal(np.asarray(sigma), sigmas_ref.numpy())
  np.testing.assert_array_equal(np.asarray(t_model), (timesteps_ref / 1000).numpy())
  np.testing.assert_allclose(np.asarray(fm.loss_weighting(scheme, sigma)),
                             compute_loss_weighting_for_sd3(scheme, sigmas_ref).numpy(), rtol=1e-6)


def test_sample_density_is_seeded_and_in_range():
  a = fm.sample_density(jax.random.key(3), "logit_normal", 8)
  np.testing.assert_array_equal(a, fm.sample_density(jax.random.key(3), "logit_normal", 8))
  assert ((0 < np.asarray(a)) & (np.asarray(a) < 1)).all()
  with pytest.raises(ValueError, match="weighting_scheme"):
    fm.loss_weighting("sqrt", jnp.ones(2))
  assert math.isclose(float(fm.loss_weighting("cosmap", jnp.asarray(0.5))), 4 / math.pi, rel_tol=1e-6)


def test_noise_schedule_reader_refuses_a_flow_matching_config():
  from dreambooth_jax.sampling import schedules
  with pytest.raises(ValueError, match="flow-matching"):
    schedules.schedule_from_config(dict(DEV, _class_name="FlowMatchEulerDiscreteScheduler"))
