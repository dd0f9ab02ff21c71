"""The Flux family through the seam: a diffusers Flux folder loads (and saves back), and the whole sampler from
given init latents equals diffusers' FluxPipeline on it."""

import json

import numpy as np
import pytest

from dreambooth_jax import families
from dreambooth_jax.io import diffusers_folder
from dreambooth_jax.sampling import flow_matching, sampler

PROMPT = "a photo of sks dog"
SIZE = 16  # pixels; the tiny VAE's factor is 2: an 8 x 8 latent, 4 x 4 = 16 packed tokens
TEXT_LENGTH = 12  # T5 max_sequence_length (FluxPipeline's default is 512; kept short here)


@pytest.fixture(scope="module")
def flux_pipe(tiny_flux_dir):
  pipe = diffusers_folder.load_pipeline(tiny_flux_dir)
  pipe.family.set_max_sequence_length(pipe.tokenizers, TEXT_LENGTH)
  return pipe


def test_loads_as_flux_family(flux_pipe):
  assert flux_pipe.family is families.get("flux")
  assert isinstance(flux_pipe.schedule, flow_matching.FlowMatchConfig) and flux_pipe.schedule.use_dynamic_shifting
  assert flux_pipe.size_multiple() == 4  # VAE factor 2 x the 2 x 2 packing
  with pytest.raises(ValueError, match="max_sequence_length=513"):
    flux_pipe.family.set_max_sequence_length(dict(flux_pipe.tokenizers), 513)


def test_save_keeps_t5_and_clip_key_spellings(flux_pipe, tmp_path):
  """T5 keys are written as transformers names them (no `text_model.` prefix), CLIP's under `text_model.`;
  the saved folder loads back in FluxPipeline and in ours."""
  import torch
  from diffusers import FluxPipeline
  from safetensors.numpy import load_file

  out = diffusers_folder.save_pipeline(flux_pipe, tmp_path / "saved")
  t5_keys = load_file(out / "text_encoder_2" / "model.safetensors")
  clip_keys = load_file(out / "text_encoder" / "model.safetensors")
  assert "shared.weight" in t5_keys and not any(k.startswith("text_model.") for k in t5_keys)
  assert all(k.startswith("text_model.") for k in clip_keys)
  FluxPipeline.from_pretrained(str(out), dtype=torch.float32)
  diffusers_folder.load_pipeline(out)


def _pack_nchw(latents_NCHW):
  import torch
  from diffusers import FluxPipeline
  n, c, h, w = latents_NCHW.shape
  return FluxPipeline._pack_latents(torch.from_numpy(latents_NCHW), n, c, h, w)


@pytest.mark.parametrize("true_cfg", [1.0, 2.0])
def test_sampler_matches_flux_pipeline(flux_pipe, tiny_flux_dir, true_cfg):
  """The whole sampler (T5 + CLIP encoding, shifted flow-matching Euler, distilled guidance, [true CFG with a
  negative prompt], shifted VAE decode) from the same NCHW init latents as FluxPipeline(latents=packed); fp32."""
  import torch
  from diffusers import FluxPipeline

  reference = FluxPipeline.from_pretrained(str(tiny_flux_dir), dtype=torch.float32)
  reference.set_progress_bar_config(disable=True)
  channels = flux_pipe.vae.config.latent_channels
  latent = SIZE // flux_pipe.family.latent_factor(flux_pipe.configs)
  init_NCHW = np.random.default_rng(0).standard_normal((1, channels, latent, latent)).astype(np.float32)
  negative = "a blurry photo" if true_cfg > 1 else None
  with torch.no_grad():
    want = reference(PROMPT, negative_prompt=negative, true_cfg_scale=true_cfg, height=SIZE, width=SIZE,
                     num_inference_steps=3, guidance_scale=3.5, latents=_pack_nchw(init_NCHW),
                     max_sequence_length=TEXT_LENGTH, output_type="np").images
  settings = sampler.SamplerSettings(steps=3, guidance=3.5, height=SIZE, width=SIZE, true_cfg=true_cfg)
  got = sampler.generate(flux_pipe, [PROMPT], [0], settings=settings, negative_prompt=negative or "",
                         init_latents_BHWC=init_NCHW.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-4)


def test_flux_samples_with_t5_freed(flux_pipe):
  """Flux's text encoders (T5 and CLIP) freed, their outputs kept for the prompts: the same images with distilled
  guidance and true CFG with a negative prompt (fp32, 1e-5)."""
  settings = sampler.SamplerSettings(steps=2, guidance=3.5, height=SIZE, width=SIZE, true_cfg=2.0)
  want = sampler.generate(flux_pipe, [PROMPT], [0], settings=settings, negative_prompt="a blurry photo")
  freed = sampler.free_text_encoders(flux_pipe, [PROMPT, "a blurry photo"])
  assert freed.modules["text_encoder_2"] is None and freed.modules["text_encoder"] is None
  got = sampler.generate(freed, [PROMPT], [0], settings=settings, negative_prompt="a blurry photo")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_flux_refuses_other_samplers_and_schnell_guidance(flux_pipe):
  with pytest.raises(ValueError, match="flow_euler"):
    sampler.generate(flux_pipe, [PROMPT], [0], settings=sampler.SamplerSettings(steps=1, height=SIZE, width=SIZE,
                                                                                 scheduler="euler"))
  schnell = dict(flux_pipe.configs, transformer={**flux_pipe.configs["transformer"], "guidance_embeds": False})
  with pytest.raises(ValueError, match="no guidance input"):
    flux_pipe.family.sampling_image_conditioning(schnell, sampler.SamplerSettings(guidance=5.0), 1)
  assert flux_pipe.family.sampling_image_conditioning(
      schnell, sampler.SamplerSettings().for_family(flux_pipe.family), 1) == {}


def test_sample_cli_takes_flux_folders(flux_pipe, tiny_flux_dir, tmp_path):
  """`python -m dreambooth_jax.sample` on a Flux folder with NCHW --init_latents gives the library's image."""
  import subprocess
  import sys

  from PIL import Image

  init_NCHW = np.random.default_rng(1).standard_normal((1, 16, SIZE // 2, SIZE // 2)).astype(np.float32)
  np.save(tmp_path / "z.npy", init_NCHW)
  out = tmp_path / "out"
  result = subprocess.run([sys.executable, "-m", "dreambooth_jax.sample", f"--model={tiny_flux_dir}",
                           f"--prompt={PROMPT}", "--steps=2", f"--height={SIZE}", f"--width={SIZE}", f"--out={out}",
                           f"--max_sequence_length={TEXT_LENGTH}", f"--init_latents={tmp_path / 'z.npy'}"],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  settings = sampler.SamplerSettings(steps=2, height=SIZE, width=SIZE)
  want = sampler.to_uint8(sampler.generate(flux_pipe, [PROMPT], [0], settings=settings,
                                           init_latents_BHWC=init_NCHW.transpose(0, 2, 3, 1)))[0]
  np.testing.assert_array_equal(np.asarray(Image.open(out / "00000.png")), want)
  assert json.loads((out / "index.json").read_text())["settings"]["max_sequence_length"] == TEXT_LENGTH


@pytest.mark.slow  # ~75 s on 2 busy cores: FLUX.1 and T5-XXL built abstractly, twice
def test_bundled_flux_configs_build_the_real_models_abstractly():
  """FLUX.1-dev / schnell configs ship for offline plans: the hub ids resolve to them, the transformer built from
  them abstractly is the 11.9B model, T5's prompt length is 512 and its vocabulary is (honestly) absent."""
  import jax
  from flax import nnx

  from dreambooth_jax.training import plan
  # schnell lacks dev's guidance embedder (256 x 3072 + 3072 x 3072 weights and biases = 10,229,760)
  for hub_id, guidance, shifting, params in (("black-forest-labs/FLUX.1-dev", True, True, 11_901_408_320),
                                             ("black-forest-labs/FLUX.1-schnell", False, False, 11_891_178_560)):
    folder = plan.known_hub_configs(hub_id)
    pipe = diffusers_folder.random_pipeline(folder, abstract=True)
    assert pipe.family is families.get("flux") and pipe.denoiser.config.guidance_embeds is guidance
    assert pipe.schedule.use_dynamic_shifting is shifting
    count = sum(x.size for x in jax.tree.leaves(nnx.state(pipe.denoiser, nnx.Param)))
    assert count == params
    assert pipe.tokenizers["tokenizer_2"].model_max_length == 512 and pipe.size_multiple() == 16
    assert pipe.family.default_resolution(pipe.configs) == 1024
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
      pipe.family.tokenize(pipe.tokenizers, ["a dog"])
