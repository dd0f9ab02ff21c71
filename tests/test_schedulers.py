"""sampling/schedulers.py against diffusers' schedulers built with from_config on the same config.

Tables: timesteps equal exactly (integer ones, and DPM++'s rounded Karras ones); sigmas within a few float32
ulps (5e-7 relative), because torch's float32 sqrt on CPU is not always correctly rounded (numpy's is), which also
moves Euler's fractional Karras timesteps by < 2e-4 (6e-5 seen). Loops: a deterministic fake model (the same
function in torch and jax) through scale_model_input / step in a jitted fori_loop against diffusers' loop, 1e-5
relative (<= 6e-7 seen). Euler a's noise: diffusers' randn_tensor is replaced by a function returning our
per-step noise, so both add the same noise. Pipelines: our sampler against StableDiffusionPipeline with
`XScheduler.from_config(pipe.scheduler.config)`, max abs error on [0, 1] images <= 1e-4 (<= 4e-6 seen).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dreambooth_jax.sampling import sampler as sampling
from dreambooth_jax.sampling import schedulers, schedules

BASE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
            clip_sample=False, set_alpha_to_one=False, steps_offset=1)
KARRAS = {"ddim": (False,), "dpmpp_2m": (False, True), "euler": (False, True), "euler_a": (False,)}


def _diffusers_class(name):
  import diffusers  # noqa: PLC0415
  return {"ddim": diffusers.DDIMScheduler, "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
          "euler": diffusers.EulerDiscreteScheduler, "euler_a": diffusers.EulerAncestralDiscreteScheduler}[name]


def _reference(name, config, steps, karras):
  ref = _diffusers_class(name).from_config(config, **({"use_karras_sigmas": True} if karras else {}))
  ref.set_timesteps(steps)
  return ref


def _fake_model(xp, x, t):
  """A fixed linear map of x plus a function of t, written once for torch and jax (NCHW both)."""
  return 0.6 * x - 0.3 * xp.flip(x, (1,)) + 0.2 * xp.cos(t / 300.0)


TABLE_CASES = [(n, k, sp, steps) for n in schedulers.SCHEDULERS[1:] for k in KARRAS[n]
               for sp, steps in itertools.product(schedules.SPACINGS, (1, 4, 25))]


@pytest.mark.parametrize("name, karras, spacing, steps", TABLE_CASES)
def test_tables_equal_diffusers(name, karras, spacing, steps):
  config = dict(BASE, timestep_spacing=spacing)
  ref = _reference(name, config, steps, karras)
  plan = schedulers.make_plan(schedules.schedule_from_config(config), name, steps, karras=karras)
  ref_t = ref.timesteps.numpy().astype(np.float32)
  if name == "euler" and karras:
    np.testing.assert_allclose(np.asarray(plan.timesteps), ref_t, rtol=0, atol=2e-4)
  else:
    np.testing.assert_array_equal(np.asarray(plan.timesteps), ref_t)
  np.testing.assert_allclose(np.asarray(plan.sigmas), ref.sigmas.numpy(), rtol=5e-7, atol=0)
  np.testing.assert_allclose(schedulers.initial_noise_scale(plan), float(ref.init_noise_sigma), rtol=5e-7)


@pytest.mark.parametrize("extra", [{"interpolation_type": "log_linear"}, {"final_sigmas_type": "sigma_min"},
                                   {"beta_schedule": "squaredcos_cap_v2"}])
def test_other_config_fields_equal_diffusers(extra):
  config = dict(BASE, timestep_spacing="linspace", **extra)
  for name in ("dpmpp_2m", "euler"):
    ref = _reference(name, config, 20, False)
    plan = schedulers.make_plan(schedules.schedule_from_config(config), name, 20)
    np.testing.assert_array_equal(np.asarray(plan.timesteps), ref.timesteps.numpy().astype(np.float32))
    np.testing.assert_allclose(np.asarray(plan.sigmas), ref.sigmas.numpy(), rtol=1e-6, atol=0)


@jax.jit
def _our_loop(plan, x, noise_SBCHW):
  x = x * schedulers.initial_noise_scale(plan)

  def body(i, x_and_carry):
    x, carry = x_and_carry
    out = _fake_model(jnp, schedulers.scale_model_input(plan, i, x), plan.timesteps[i].astype(jnp.float32))
    return schedulers.step(plan, i, out, x, carry, noise_SBCHW[i] if schedulers.needs_noise(plan) else None)

  return jax.lax.fori_loop(0, plan.steps, body, (x, schedulers.initial_carry(plan, x)))[0]


def _diffusers_loop(ref, x, noise_SBCHW, eta, monkeypatch):
  """The pipeline's denoising loop with `ref` (StableDiffusionPipeline.__call__ without the UNet)."""
  from diffusers.schedulers import scheduling_euler_ancestral_discrete as euler_a  # noqa: PLC0415
  noises = iter(torch.from_numpy(noise_SBCHW))
  monkeypatch.setattr(euler_a, "randn_tensor", lambda *args, **kwargs: next(noises))
  x = torch.from_numpy(x) * ref.init_noise_sigma
  for i, t in enumerate(ref.timesteps):
    out = _fake_model(torch, ref.scale_model_input(x, t), t.to(torch.float32))
    kwargs = dict(eta=eta, variance_noise=torch.from_numpy(noise_SBCHW[i])) if eta else {}
    x = ref.step(out, t, x, **kwargs).prev_sample
  return x.numpy()


LOOP_CASES = [(n, p, k, sp, 0.0) for n in schedulers.SCHEDULERS for k in KARRAS[n]
              for p, sp in itertools.product(("epsilon", "v_prediction"), ("leading", "trailing"))
              ] + [("ddim", "epsilon", False, "linspace", 0.7), ("euler", "sample", False, "linspace", 0.0),
                   ("dpmpp_2m", "sample", True, "linspace", 0.0)]


@pytest.mark.parametrize("name, prediction, karras, spacing, eta", LOOP_CASES)
def test_loop_equals_diffusers(name, prediction, karras, spacing, eta, monkeypatch):
  steps = 5
  config = dict(BASE, prediction_type=prediction, timestep_spacing=spacing)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
  noise = rng.standard_normal((steps, 2, 4, 8, 8)).astype(np.float32)
  expected = _diffusers_loop(_reference(name, config, steps, karras), x, noise, eta, monkeypatch)
  plan = schedulers.make_plan(schedules.schedule_from_config(config), name, steps, karras=karras, eta=eta)
  got = np.asarray(_our_loop(plan, jnp.asarray(x), jnp.asarray(noise)))
  rel = np.abs(got - expected).max() / np.abs(expected).max()
  assert rel <= 1e-5, f"max relative error {rel:.3g}"


def test_names_refused_with_the_list():
  with pytest.raises(ValueError, match="supported: \\['ddim', 'dpmpp_2m', 'euler', 'euler_a'\\]"):
    sampling.SamplerSettings(scheduler="heun")
  with pytest.raises(ValueError, match="karras"):
    sampling.SamplerSettings(scheduler="euler_a", karras=True)
  schedule = schedules.schedule_from_config(BASE)
  with pytest.raises(ValueError, match="eta"):
    schedulers.make_plan(schedule, "euler", 4, eta=0.5)


# One compile each (~6 s idle): every scheduler once, both model kinds, both Karras tables.
PIPELINE_CASES = [("sd2", "dpmpp_2m", True), ("sd1", "euler", True), ("sd1", "euler_a", False)]
_PIPELINES = {}  # folder -> (diffusers pipeline, its original scheduler config, ours): loaded once per session


def _pipelines(folder, kwargs):
  if folder not in _PIPELINES:
    from diffusers import StableDiffusionPipeline  # noqa: PLC0415

    from dreambooth_jax.io import diffusers_folder as weights  # noqa: PLC0415
    ref = StableDiffusionPipeline.from_pretrained(folder, **kwargs)
    ref.set_progress_bar_config(disable=True)
    _PIPELINES[folder] = ref, ref.scheduler.config, weights.load_pipeline(folder)
  return _PIPELINES[folder]


@pytest.mark.parametrize("which, name, karras", PIPELINE_CASES)
def test_pipeline_matches_diffusers(which, name, karras, tiny_sd1_dir, tiny_sd2_dir, monkeypatch):
  """As test_sampling's DDIM parity (same tolerance); Euler a gets our per-image, per-step noise both ways.
  DDIM's pipeline parity is test_sampling's; the other prediction types and spacings are the loop tests'."""
  from diffusers.schedulers import scheduling_euler_ancestral_discrete as euler_a  # noqa: PLC0415
  folder, kwargs = {"sd1": (tiny_sd1_dir, {}), "sd2": (tiny_sd2_dir, {"variant": "fp16"})}[which]
  ref, config, ours = _pipelines(folder, kwargs)
  ref.scheduler = _diffusers_class(name).from_config(config, **({"use_karras_sigmas": True} if karras else {}))
  steps, seed = 4, 5
  keys_B = sampling.image_keys(seed, [0, 1])
  noise = [np.asarray(jax.vmap(lambda k, i=i: jax.random.normal(jax.random.fold_in(k, i), (16, 16, 4)))(keys_B))
           .transpose(0, 3, 1, 2) for i in range(steps)]  # the sampler's noise for step i, NCHW
  noises = iter(torch.from_numpy(n) for n in noise)
  monkeypatch.setattr(euler_a, "randn_tensor", lambda *args, **kw: next(noises))
  prompts = ["a photo of sks dog", "a dog on the beach"]
  latents_NCHW = np.random.default_rng(0).standard_normal((2, 4, 16, 16)).astype(np.float32)
  expected = ref(prompts, height=32, width=32, num_inference_steps=steps, guidance_scale=7.5,
                 negative_prompt=["blurry", ""], latents=torch.from_numpy(latents_NCHW), output_type="np").images
  settings = sampling.SamplerSettings(steps=steps, guidance=7.5, height=32, width=32, scheduler=name, karras=karras)
  got = sampling.generate(ours, prompts, [0, 1], seed=seed, settings=settings, negative_prompt=["blurry", ""],
                          init_latents_BHWC=latents_NCHW.transpose(0, 2, 3, 1))
  err = np.abs(np.asarray(got) - expected).max()
  assert err <= 1e-4, f"max abs error {err:.3g}"


def test_sample_cli_scheduler_flags(tiny_sd1_dir, tmp_path):
  import json  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  base = [sys.executable, "-m", "dreambooth_jax.sample", f"--model={tiny_sd1_dir}", "--prompt=a dog", "--steps=2",
          "--height=32", "--width=32"]
  result = subprocess.run(base + [f"--out={tmp_path / 'out'}", "--scheduler=euler", "--karras"],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  settings = json.loads((tmp_path / "out" / "index.json").read_text())["settings"]
  assert settings["scheduler"] == "euler" and settings["karras"] is True
  refused = subprocess.run(base + [f"--out={tmp_path / 'no'}", "--scheduler=euler_a", "--karras"],
                           capture_output=True, text=True, timeout=300)
  assert refused.returncode != 0 and "karras" in refused.stderr and not (tmp_path / "no").exists()
