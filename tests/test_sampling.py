"""The jitted DDIM sampler against diffusers' StableDiffusionPipeline + DDIMScheduler on the same weights and
initial latents. Tolerance: fp32, max abs error on [0, 1] images <= 1e-4 (x max(1, scale))."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from dreambooth_jax.sampling import sampler as sampling
from dreambooth_jax.io import diffusers_folder as weights


@pytest.mark.parametrize("which, eta", [("sd1", 0.0), ("sd2", 0.0)])
def test_guided_ddim_matches_diffusers(which, eta, tiny_sd1_dir, tiny_sd2_dir):
  from diffusers import DDIMScheduler, StableDiffusionPipeline
  folder, kwargs = {"sd1": (tiny_sd1_dir, {}), "sd2": (tiny_sd2_dir, {"variant": "fp16"})}[which]
  ref = StableDiffusionPipeline.from_pretrained(folder, **kwargs)
  ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
  ref.set_progress_bar_config(disable=True)
  ours = weights.load_pipeline(folder)
  prompts = ["a photo of sks dog", "a dog on the beach"]
  latents_NCHW = np.random.default_rng(0).standard_normal((2, 4, 16, 16)).astype(np.float32)
  expected = ref(prompts, height=32, width=32, num_inference_steps=10, guidance_scale=7.5, eta=eta,
                 negative_prompt=["blurry", ""], latents=torch.from_numpy(latents_NCHW), output_type="np").images
  settings = sampling.SamplerSettings(steps=10, guidance=7.5, eta=eta, height=32, width=32)
  got = sampling.generate(ours, prompts, [0, 1], settings=settings, negative_prompt=["blurry", ""],
                          init_latents_BHWC=latents_NCHW.transpose(0, 2, 3, 1))
  err = np.abs(np.asarray(got) - expected).max()
  assert err <= 1e-4, f"max abs error {err:.3g}"


@pytest.mark.parametrize("which", ["sd1", "sdxl"])
def test_freed_text_encoders_sample_from_their_cache(which, tiny_sd1_dir, tiny_sdxl_dir):
  """A run that frees its text encoders (cached embeddings, LoRA) samples from the prompts it kept encoded: the
  same images as with the encoders (fp32, 1e-5: the encodings run in their own jit), guided, with a negative
  prompt (SD) and SDXL's zero unconditional text for an empty one; a prompt it did not keep is named."""
  pipe = weights.load_pipeline({"sd1": tiny_sd1_dir, "sdxl": tiny_sdxl_dir}[which])
  prompts, negative = ["a photo of sks dog", "a dog on the beach"], ["blurry", ""] if which == "sd1" else ""
  settings = sampling.SamplerSettings(steps=3, guidance=5.0, height=32, width=32)
  want = sampling.generate(pipe, prompts, [0, 1], settings=settings, negative_prompt=negative)
  freed = sampling.free_text_encoders(pipe, prompts + ["blurry", ""])
  assert all(freed.modules[name] is None for name in pipe.family.TEXT_ENCODERS)
  assert all(pipe.modules[name] is not None for name in pipe.family.TEXT_ENCODERS)  # a copy, not in place
  got = sampling.generate(freed, prompts, [0, 1], settings=settings, negative_prompt=negative)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  with pytest.raises(ValueError, match="'a cat'"):
    sampling.generate(freed, ["a cat"], [0], settings=settings)


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])
def test_loop_forms_give_the_same_images(scheduler, tiny_sd1_dir):
  """The sampler's loop forms (lax.fori_loop, unrolled, host-driven steps) give the same images: guided, with
  per-step noise (DDIM eta 0.5, Euler a) and a carry (Euler a). fp32, 1e-5 (XLA fuses each form differently)."""
  sd = weights.load_pipeline(tiny_sd1_dir)
  base = dict(steps=3, guidance=3.0, height=32, width=32, scheduler=scheduler, eta=0.5 if scheduler == "ddim" else 0.0)
  images = {loop: np.asarray(sampling.generate(sd, ["a", "b"], [0, 1], seed=2,
                                               settings=sampling.SamplerSettings(loop=loop, **base)))
            for loop in sampling.LOOPS}
  for loop in ("unrolled", "host"):
    np.testing.assert_allclose(images[loop], images["fori"], atol=1e-5, err_msg=loop)
  with pytest.raises(ValueError, match="'scan'"):
    sampling.SamplerSettings(loop="scan")


def test_images_depend_on_index_not_batch(tiny_sd1_dir):
  sd = weights.load_pipeline(tiny_sd1_dir)
  settings = sampling.SamplerSettings(steps=3, guidance=3.0, height=32, width=32, eta=0.5)
  together = np.concatenate([im for _, im in sampling.generate_all(sd, ["a", "b", "c"], seed=3, batch_size=3,
                                                                    settings=settings)])
  alone = np.concatenate([im for _, im in sampling.generate_all(sd, ["a", "b", "c"], seed=3, batch_size=1,
                                                                 settings=settings)])
  np.testing.assert_array_equal(together, alone)


def test_a_split_reused_across_calls_sees_weights_updated_in_place(tiny_sd1_dir):
  """generate_all splits the modules once for all its batches: a reused split holds the modules' own Variables, so
  a weight updated in place between calls (as training does) reaches the next batch."""
  sd = weights.load_pipeline(tiny_sd1_dir)
  settings = sampling.SamplerSettings(steps=2, guidance=3.0, height=32, width=32)
  split = sampling.split_modules(sd)
  before = np.asarray(sampling.generate(sd, ["a"], [0], settings=settings, split=split))
  sd.denoiser.conv_out.bias[...] = sd.denoiser.conv_out.bias[...] + 0.5
  reused = np.asarray(sampling.generate(sd, ["a"], [0], settings=settings, split=split))
  fresh = np.asarray(sampling.generate(sd, ["a"], [0], settings=settings))
  assert np.abs(reused - before).max() > 1e-3
  np.testing.assert_array_equal(reused, fresh)


def test_sample_cli_writes_images_and_index(tiny_sd1_dir, tmp_path):
  np.save(tmp_path / "z.npy", np.zeros((2, 4, 16, 16), np.float32))
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "dreambooth_jax.sample", f"--model={tiny_sd1_dir}", "--prompt=a photo of sks dog",
         "--num_images=2", "--steps=2", "--height=32", "--width=32", f"--out={out}", "--negative_prompt=blurry",
         "--eta=0.3", f"--init_latents={tmp_path / 'z.npy'}"]
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  index = json.loads((out / "index.json").read_text())
  assert [e["file"] for e in index["images"]] == ["00000.png", "00001.png"]
  assert index["settings"]["negative_prompt"] == "blurry" and index["settings"]["eta"] == 0.3
  assert "images/s" in result.stdout
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("first prompt\n\nsecond prompt\n")
  result = subprocess.run([sys.executable, "-m", "dreambooth_jax.sample", f"--model={tiny_sd1_dir}",
                           f"--prompts_file={prompts}", "--steps=1", "--height=32", "--width=32",
                           f"--out={tmp_path / 'out2'}"], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  index = json.loads((tmp_path / "out2" / "index.json").read_text())
  assert [e["prompt"] for e in index["images"]] == ["first prompt", "second prompt"]


def test_sampler_programs_leave_convolutions_to_xla_on_cpu(monkeypatch):
  """On XLA:CPU the sampler's programs compile without YNNPACK's one-threaded convolutions (its matmul fusions
  stay), with the same results; an XLA that rejects the option compiles with its defaults instead of failing."""
  import jax
  import jax.numpy as jnp
  from dreambooth_jax.sampling import compiler_options

  def conv_and_matmul(x_BHWC, kernel_HWIO, a, b):
    y = jax.lax.conv_general_dilated(x_BHWC, kernel_HWIO, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.tanh(y), a @ b
  rng = np.random.default_rng(0)
  args = [jnp.asarray(rng.standard_normal(shape) / np.sqrt(fan_in), jnp.float32)  # outputs of order 1
          for shape, fan_in in [((2, 16, 16, 32), 1), ((3, 3, 32, 32), 288), ((64, 64), 1), ((64, 64), 64)]]

  def ynn_fusions(jitted):  # the op each YNNPACK fusion was made from
    text = jitted.lower(*args).compile().as_text()
    return sorted(line.split('op_name="')[1].split('"')[0].split("/")[-1] for line in text.splitlines()
                  if "__ynn_fusion" in line and " fusion(" in line)
  assert ynn_fusions(jax.jit(conv_and_matmul)) == ["conv_general_dilated", "dot_general"]
  options = compiler_options.sampler_options()
  assert options, "this jaxlib's XLA:CPU should take the sampler's options"
  assert ynn_fusions(jax.jit(conv_and_matmul, compiler_options=dict(options))) == ["dot_general"]
  for got, want in zip(compiler_options.jit()(conv_and_matmul)(*args), jax.jit(conv_and_matmul)(*args)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  compiler_options.sampler_options.cache_clear()
  monkeypatch.setattr(compiler_options, "CPU_SAMPLER_OPTIONS", {"xla_cpu_experimental_ynn_fusion_type": "NO_SUCH"})
  try:
    assert compiler_options.sampler_options() == ()
  finally:
    compiler_options.sampler_options.cache_clear()
