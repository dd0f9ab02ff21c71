"""Flux DreamBooth-LoRA through the trainer: the flow-matching objective as train_dreambooth_lora_flux computes it,
and a LoRA run on the tiny Flux folder (prior preservation with Flux-sampled class images, cached T5/CLIP
embeddings) that trains."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreambooth_jax import families
from dreambooth_jax.io import diffusers_folder
from dreambooth_jax.training import step as step_lib
from test_train import fast_config, read_losses

TEXT_LENGTH = 12


def flux_config(tiny_flux_dir, *overrides):
  config = fast_config(f"pretrained_model_name_or_path={tiny_flux_dir}", "random_init=False", "resolution=16",
                       "max_train_steps=6", "checkpointing_steps=6", "validation_steps=6", "num_class_images=2",
                       "sample_batch_size=2", "learning_rate=5e-2", f"max_sequence_length={TEXT_LENGTH}",
                       "sample_scheduler=flow_euler", "class_guidance=3.5", "validation_guidance=3.5",
                       "num_validation_images=1", *overrides)
  config.lora.enabled = True
  return config


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "logit_normal", "mode"])
def test_training_inputs_are_the_flux_scripts(scheme):
  """x_t = (1 - s) x0 + s noise, target noise - x0, s and the model timestep from the script's tables at index
  floor(u N) with u the scheme's density, its loss weight, guidance 3.5 for guidance_embeds models."""
  from dreambooth_jax.sampling import flow_matching
  flux = families.get("flux")
  schedule = flow_matching.FlowMatchConfig(shift=3.0)
  settings = step_lib.LossSettings(weighting_scheme=scheme, logit_mean=0.2, logit_std=1.3, mode_scale=1.29)
  x0, noise = (jax.random.normal(jax.random.key(i), (3, 4, 4, 16)) for i in (1, 2))
  keys = jax.random.split(jax.random.key(3), 3)

  class Transformer:
    class config:
      guidance_embeds = True

  got = flux.training_inputs({"transformer": Transformer}, schedule, x0, noise, keys, settings)
  u = jnp.stack([flow_matching.sample_density(k, scheme, 1, logit_mean=0.2, logit_std=1.3)[0] for k in keys])
  sigmas, timesteps = flow_matching.training_schedule(schedule)
  index = np.minimum((np.asarray(u) * 1000).astype(int), 999)
  sigma = sigmas[index]
  np.testing.assert_allclose(got.t_B, timesteps[index])
  np.testing.assert_allclose(got.x_t, (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise,
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(got.target, noise - x0)
  want_weight = sigma ** -2.0 if scheme == "sigma_sqrt" else np.ones(3)
  np.testing.assert_allclose(got.weight_B, want_weight, rtol=1e-6)
  np.testing.assert_array_equal(got.image["guidance"], [3.5] * 3)
  with pytest.raises(ValueError, match="snr_gamma"):
    flux.training_inputs({"transformer": Transformer}, schedule, x0, noise, keys,
                         step_lib.LossSettings(snr_gamma=5.0))
  with pytest.raises(ValueError, match="weighting_scheme='mode'"):
    families.get("sd").training_inputs({}, None, x0, noise, keys, step_lib.LossSettings(weighting_scheme="mode"))


@pytest.fixture(scope="module")
def flux_run(tiny_flux_dir, tmp_path_factory):
  from dreambooth_jax.training import run
  workdir = tmp_path_factory.mktemp("flux") / "run"
  job = run.train(flux_config(tiny_flux_dir, "weighting_scheme=logit_normal"), workdir)
  # text embeddings cached, LoRA: T5 and CLIP freed after set-up; validation sampled from the kept prompts
  assert job.pipe.modules["text_encoder_2"] is None and job.pipe.modules["text_encoder"] is None
  return workdir


def test_flux_lora_run_trains(flux_run, tiny_flux_dir):
  """Finite losses every step, class images sampled by the Flux sampler, LoRA on the attention projections of both
  streams and the single blocks, and the factors moved from their init (lora_up starts at zero)."""
  from dreambooth_jax.models import lora
  from dreambooth_jax.training import run_state
  losses = read_losses(flux_run)
  assert sorted(losses) == list(range(1, 7)) and all(np.isfinite(list(losses.values())))
  assert len(list((flux_run / "class_images").glob("class_*.png"))) == 2
  assert (flux_run / "validation" / "step_000006.png").is_file()
  _, view, _ = run_state.load_run(flux_run, None)
  wrapped = sorted(lora.lora_modules(view.denoiser))
  assert "transformer_blocks.0.attn.add_q_proj" in wrapped and "transformer_blocks.1.attn.to_add_out" in wrapped
  assert "single_transformer_blocks.1.attn.to_v" in wrapped and "transformer_blocks.0.attn.to_out.0" in wrapped
  assert not any(".ff" in name or "proj_mlp" in name for name in wrapped)
  ups = [np.asarray(m.lora_up[...]) for m in lora.lora_modules(view.denoiser).values()]
  assert all(np.abs(u).max() > 0 for u in ups)


def _flux_images(pipe_or_view, latents_NCHW, steps=2):
  from dreambooth_jax.sampling import sampler
  settings = sampler.SamplerSettings(steps=steps, height=16, width=16)
  return np.asarray(sampler.generate(pipe_or_view, ["a photo of sks dog"], [0], settings=settings,
                                     init_latents_BHWC=latents_NCHW.transpose(0, 2, 3, 1)))


def _reference_images(tiny_flux_dir, lora_file, latents_NCHW, steps=2):
  import torch
  from diffusers import FluxPipeline
  ref = FluxPipeline.from_pretrained(str(tiny_flux_dir), dtype=torch.float32)
  ref.set_progress_bar_config(disable=True)
  if lora_file is not None:
    ref.load_lora_weights(str(lora_file))
  n, c, h, w = latents_NCHW.shape
  packed = FluxPipeline._pack_latents(torch.from_numpy(latents_NCHW), n, c, h, w)
  with torch.no_grad():
    return ref("a photo of sks dog", height=16, width=16, num_inference_steps=steps, guidance_scale=3.5,
               latents=packed, max_sequence_length=TEXT_LENGTH, output_type="np").images


def test_flux_lora_file_loads_in_flux_pipeline(flux_run, tiny_flux_dir):
  """The PEFT file written at the end (transformer.<module>.lora_A/B) loads in FluxPipeline.load_lora_weights and
  gives our sampler's images with the trained LoRA (fp32, 2e-4); and the LoRA changed them."""
  from dreambooth_jax.training import run_state
  _, view, _ = run_state.load_run(flux_run, None)
  latents = np.random.default_rng(2).standard_normal((1, 16, 8, 8)).astype(np.float32)
  got = _flux_images(view, latents)
  lora_file = flux_run / "export" / "pytorch_lora_weights.safetensors"
  from safetensors.numpy import load_file
  assert "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight" in load_file(lora_file)
  np.testing.assert_allclose(got, _reference_images(tiny_flux_dir, lora_file, latents), atol=2e-4)
  base = _reference_images(tiny_flux_dir, None, latents)
  assert np.abs(got - base).max() > 1e-3


def test_flux_kohya_and_peft_files_load_everywhere(flux_run, tiny_flux_dir, tmp_path):
  """The kohya file (fused BFL names) loads in FluxPipeline.load_lora_weights with the same images; both files,
  read back by our sampler (--lora) on the base model, give the trained run's images; both continue a run
  (init_lora) with the trained factors."""
  from safetensors.numpy import load_file
  from dreambooth_jax.io import export as export_lib, lora_files
  from dreambooth_jax.models import lora
  from dreambooth_jax.training import run_state
  config, view, _ = run_state.load_run(flux_run, None)
  kohya = export_lib.export(view, config, tmp_path / "kohya.safetensors", "lora_kohya")
  names = load_file(kohya)
  assert {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "lora_unet_double_blocks_1_txt_attn_proj.alpha",
          "lora_unet_single_blocks_1_linear1.lora_up.weight"} <= set(names)
  latents = np.random.default_rng(3).standard_normal((1, 16, 8, 8)).astype(np.float32)
  got = _flux_images(view, latents)
  # diffusers' kohya converter hard-codes FLUX.1's widths for single_blocks_N_linear1 (3072 x 3 + 12288 rows), so
  # FluxPipeline reads the tiny model's double-block modules only: compare on that part of the file
  double = {k: v for k, v in names.items() if k.startswith("lora_unet_double_blocks_")}
  double_file = lora_files.save_lora(tmp_path / "double.safetensors", double)
  base = diffusers_folder.load_pipeline(tiny_flux_dir)
  base.family.set_max_sequence_length(base.tokenizers, TEXT_LENGTH)
  lora_files.apply_lora_files(base, [(double_file, 1.0)])
  with_double = _flux_images(base, latents)
  np.testing.assert_allclose(with_double, _reference_images(tiny_flux_dir, double_file, latents), atol=2e-4)
  assert np.abs(with_double - _reference_images(tiny_flux_dir, None, latents)).max() > 1e-3
  peft = flux_run / "export" / "pytorch_lora_weights.safetensors"
  trained = lora.lora_factors(view.denoiser)
  for path in (peft, kohya):
    base = diffusers_folder.load_pipeline(tiny_flux_dir)
    base.family.set_max_sequence_length(base.tokenizers, TEXT_LENGTH)
    lora_files.apply_lora_files(base, [(path, 1.0)])
    np.testing.assert_allclose(_flux_images(base, latents), got, atol=2e-5, err_msg=path.name)
    resumed = flux_config(tiny_flux_dir, f"init_lora={path}")
    modules = run_state.trainable_modules(run_state.load_model(resumed), resumed)
    for name, (down, up) in lora.lora_factors(modules["transformer"]).items():
      np.testing.assert_allclose(up @ down, trained[name][1] @ trained[name][0], atol=1e-6,
                                 err_msg=f"{path.name} {name}")


def test_dense_kohya_flux_lora_reads_as_diffusers_reads_it(tiny_flux_dir, tmp_path):
  """A kohya file as kohya's trainer writes it (one dense LoRA on each fused qkv) gives our sampler the images
  FluxPipeline.load_lora_weights gives; a dense linear1 splits into q, k, v, proj_mlp LoRAs whose updates stack
  back to the file's."""
  from dreambooth_jax.io import lora_files
  rng = np.random.default_rng(4)
  dim = 32  # the tiny transformer's 2 heads x 16
  tensors = {}
  for name, out in (("double_blocks_0_img_attn_qkv", 3 * dim), ("double_blocks_1_txt_attn_qkv", 3 * dim),
                    ("single_blocks_1_linear2", dim), ("single_blocks_0_linear1", 7 * dim)):
    width = 5 * dim if name.endswith("linear2") else dim
    tensors[f"lora_unet_{name}.lora_down.weight"] = (0.3 * rng.standard_normal((4, width))).astype(np.float32)
    tensors[f"lora_unet_{name}.lora_up.weight"] = (0.3 * rng.standard_normal((out, 4))).astype(np.float32)
    tensors[f"lora_unet_{name}.alpha"] = np.asarray(2.0, np.float32)
  from dreambooth_jax.io import flux_lora_keys
  linear1 = {k: v for k, v in tensors.items() if "linear1" in k}
  tensors = {k: v for k, v in tensors.items() if "linear1" not in k}  # diffusers reads it at FLUX.1's width only
  parts, alpha = flux_lora_keys.from_kohya_flux(linear1, {"num_attention_heads": 2, "attention_head_dim": 16})
  order = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
  stacked = np.concatenate([parts["transformer"][f"single_transformer_blocks.0.{p}"][1] for p in order])
  np.testing.assert_array_equal(stacked, linear1["lora_unet_single_blocks_0_linear1.lora_up.weight"])
  assert alpha == 2.0 and all(d is linear1["lora_unet_single_blocks_0_linear1.lora_down.weight"] or
                              np.array_equal(d, linear1["lora_unet_single_blocks_0_linear1.lora_down.weight"])
                              for d, _ in parts["transformer"].values())
  path = lora_files.save_lora(tmp_path / "dense.safetensors", tensors)
  latents = rng.standard_normal((1, 16, 8, 8)).astype(np.float32)
  pipe = diffusers_folder.load_pipeline(tiny_flux_dir)
  pipe.family.set_max_sequence_length(pipe.tokenizers, TEXT_LENGTH)
  before = _flux_images(pipe, latents)
  lora_files.apply_lora_files(pipe, [(path, 1.0)])
  got = _flux_images(pipe, latents)
  np.testing.assert_allclose(got, _reference_images(tiny_flux_dir, path, latents), atol=2e-4)
  assert np.abs(got - before).max() > 1e-3


def test_flux_merged_export_is_a_folder_flux_pipeline_loads(flux_run, tmp_path):
  """`export --merge_lora` of the Flux LoRA run: a diffusers folder FluxPipeline loads, giving the run's images."""
  import torch
  from diffusers import FluxPipeline
  from dreambooth_jax.io import export as export_lib
  from dreambooth_jax.training import run_state
  config, view, _ = run_state.load_run(flux_run, None)
  out = export_lib.export(view, config, tmp_path / "merged", "diffusers", merge_lora=True)
  latents = np.random.default_rng(5).standard_normal((1, 16, 8, 8)).astype(np.float32)
  got = _flux_images(view, latents)
  ref = FluxPipeline.from_pretrained(str(out), dtype=torch.float32)
  ref.set_progress_bar_config(disable=True)
  packed = FluxPipeline._pack_latents(torch.from_numpy(latents), 1, 16, 8, 8)
  with torch.no_grad():
    want = ref("a photo of sks dog", height=16, width=16, num_inference_steps=2, guidance_scale=3.5, latents=packed,
               max_sequence_length=TEXT_LENGTH, output_type="np").images
  np.testing.assert_allclose(got, want, atol=2e-4)
