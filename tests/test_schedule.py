"""Noise schedules and DDIM against diffusers' DDPMScheduler/DDIMScheduler.

Tolerance: fp32, max abs error <= 1e-5 x max(1, max |reference|).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from dreambooth_jax.sampling import schedules as S

CONFIGS = [
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False,
         steps_offset=1),
    dict(beta_schedule="linear", clip_sample=True, steps_offset=0),
    dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing",
         clip_sample=False),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
         timestep_spacing="linspace", clip_sample=True, clip_sample_range=1.5),
]
TOL = 1e-5


@pytest.mark.parametrize("config", CONFIGS)
def test_betas_and_timesteps(config):
  ref = DDIMScheduler(**config)
  ours = S.schedule_from_config(dict(ref.config))
  np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(), atol=1e-6)
  for n in (1, 10, 25, 50, 999):
    ref.set_timesteps(n)
    np.testing.assert_array_equal(S.ddim_timesteps(ours, n), ref.timesteps.numpy(), err_msg=f"{n} steps")


@pytest.mark.parametrize("config", CONFIGS)
def test_add_noise_and_targets(config):
  ref = DDPMScheduler(**{k: v for k, v in config.items() if k not in ("set_alpha_to_one", "steps_offset")})
  ours = S.schedule_from_config(dict(ref.config))
  rng = np.random.default_rng(0)
  x0, noise = rng.standard_normal((2, 3, 8, 8), np.float32), rng.standard_normal((2, 3, 8, 8), np.float32)
  t = np.array([0, 999])
  expected = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
  np.testing.assert_allclose(np.asarray(S.add_noise(ours, x0, noise, t)), expected, atol=TOL)
  v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
  np.testing.assert_allclose(np.asarray(S.velocity(ours, x0, noise, t)), v, atol=TOL)
  target = np.asarray(S.training_target(ours, x0, noise, t))
  np.testing.assert_allclose(target, v if ref.config.prediction_type == "v_prediction" else noise, atol=TOL)
  # The prediction -> (x0, eps) inversion recovers both from a perfect prediction.
  x_t = S.add_noise(ours, x0, noise, t)
  x0_hat, eps_hat = S.predicted_x0_and_eps(ours, jnp.asarray(target), x_t, t)
  np.testing.assert_allclose(np.asarray(x0_hat), x0, atol=1e-3)  # amplified by 1/sqrt(alpha) at t=999
  np.testing.assert_allclose(np.asarray(eps_hat), noise, atol=1e-3)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_loop_matches_diffusers(config, eta):
  ref = DDIMScheduler(**config)
  ours = S.schedule_from_config(dict(ref.config))
  ref.set_timesteps(10)
  timesteps = S.ddim_timesteps(ours, 10)
  prev = S.ddim_prev_timesteps(ours, timesteps)
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
  fake_model = lambda x, t: np.tanh(np.asarray(x) * 0.7 + t / 500.0).astype(np.float32)
  step = jax.jit(lambda out, t, p, x, n: S.ddim_step(ours, out, t, p, x, eta=eta, noise=n))  # traced t, prev_t
  x_ref, x_ours = torch.from_numpy(x.copy()), jnp.asarray(x)
  for t, p in zip(timesteps, prev):
    noise = rng.standard_normal(x.shape).astype(np.float32)
    x_ref = ref.step(torch.from_numpy(fake_model(x_ref.numpy(), t)), int(t), x_ref, eta=eta,
                     variance_noise=torch.from_numpy(noise)).prev_sample
    x_ours = step(fake_model(x_ours, t), t, p, x_ours, noise)
  scale = max(1.0, np.abs(x_ref.numpy()).max())
  np.testing.assert_allclose(np.asarray(x_ours), x_ref.numpy(), atol=TOL * scale)


def test_min_snr_weights():
  from diffusers.training_utils import compute_snr
  for prediction in ("epsilon", "v_prediction"):
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction)
    ours = S.schedule_from_config(dict(ref.config))
    t = np.array([1, 10, 100, 500, 999])
    snr = compute_snr(ref, torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(np.asarray(S.snr(ours, t)), snr, rtol=1e-5)
    expected = np.minimum(snr, 5.0) / (snr + 1 if prediction == "v_prediction" else snr)  # train_dreambooth.py
    np.testing.assert_allclose(np.asarray(S.min_snr_loss_weight(ours, t, 5.0)), expected, rtol=1e-5)


def test_snr_weightings_by_hand():
  """Both v-prediction formulas against hand-computed values at snr = 9, 4.5 and 0.25 (gamma 5); epsilon is the
  same for both; an unknown name is refused by name."""
  alphas = np.array([0.9, 4.5 / 5.5, 0.2], np.float32)  # snr = a / (1 - a) = 9, 4.5, 0.25
  t = np.arange(3)
  for prediction, weighting, expected in [
      ("v_prediction", "min_snr", [5 / 10, 4.5 / 5.5, 0.25 / 1.25]),
      ("v_prediction", "snr_plus_one", [5 / 10, 5 / 5.5, 1.0]),
      ("epsilon", "min_snr", [5 / 9, 1.0, 1.0]), ("epsilon", "snr_plus_one", [5 / 9, 1.0, 1.0])]:
    schedule = dataclasses.replace(S.schedule_from_config({"prediction_type": prediction}),
                                   alphas_cumprod=jnp.asarray(alphas))
    np.testing.assert_allclose(np.asarray(S.min_snr_loss_weight(schedule, t, 5.0, weighting)), expected, rtol=1e-6,
                               err_msg=f"{prediction} {weighting}")
  with pytest.raises(ValueError, match="snr_weighting='paper'"):
    S.min_snr_loss_weight(schedule, t, 5.0, "paper")


@pytest.mark.parametrize("key, value", [("beta_schedule", "foo"), ("prediction_type", "x0"),
                                        ("timestep_spacing", "sideways"), ("thresholding", True),
                                        ("rescale_betas_zero_snr", True)])
def test_unsupported_config_names_key(key, value):
  with pytest.raises(ValueError, match=f"'{key}' = {value!r}"):
    S.schedule_from_config({key: value})


def test_pndm_config_from_sd_repos_reads():
  # SD 1.5's hub scheduler config is a PNDMScheduler config; the training fields are what matters.
  config = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
            "steps_offset": 1, "trained_betas": None, "clip_sample": False}
  ours = S.schedule_from_config(config)
  ref = DDIMScheduler.from_config(config)
  np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(), atol=1e-6)
  assert ours.prediction_type == "epsilon" and ours.final_alpha_cumprod == pytest.approx(float(ref.final_alpha_cumprod))
