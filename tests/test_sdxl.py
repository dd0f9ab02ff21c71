"""The SDXL family end to end against diffusers' StableDiffusionXLPipeline (PyTorch) on a tiny random-weight folder:
text conditioning (both encoders' penultimate states, the projected pooled vector, zeros for an empty negative
prompt), the whole DDIM sampler from given latents, training with real per-image time ids (and, in the LoRA run,
two subjects with a loss mask), export.

Tolerance: fp32; text 1e-4 relative to the output's scale, images 1e-4 absolute on [0, 1].
"""

import json
import pathlib

import jax
import numpy as np
import pytest
import torch

from test_models import assert_close
from test_train import fast_config, read_losses, step_records
from dreambooth_jax.io import diffusers_folder
from dreambooth_jax.sampling import sampler

PROMPTS = ["a photo of sks dog", "a dog on the beach"]


@pytest.fixture(scope="module")
def pipes(tiny_sdxl_dir):
  from diffusers import StableDiffusionXLPipeline
  ref = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
  ref.set_progress_bar_config(disable=True)
  return ref, diffusers_folder.load_pipeline(tiny_sdxl_dir)



def test_loads_as_the_sdxl_family(pipes):
  _, ours = pipes
  assert ours.family.NAME == "sdxl" and set(ours.modules) == {"unet", "vae", "text_encoder", "text_encoder_2"}
  assert ours.vae.config.scaling_factor == 0.13025
  assert ours.tokenizer_2.pad_token == "!"  # SDXL's second tokenizer pads with "!" (id 0), not EOS


def test_text_conditioning_matches_encode_prompt(pipes):
  ref, ours = pipes
  with torch.no_grad():
    embeds, negative, pooled, negative_pooled = ref.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                                  do_classifier_free_guidance=True)
  text = jax.jit(ours.family.encode_text)(ours.modules, ours.family.tokenize(ours.tokenizers, PROMPTS))
  assert_close(text["context"], embeds.numpy())
  assert_close(text["text_embeds"], pooled.numpy())
  # force_zeros_for_empty_prompt: no negative prompt -> zero unconditional embeddings
  assert float(negative.abs().max()) == 0.0 and float(negative_pooled.abs().max()) == 0.0
  assert ours.family.zero_unconditional(ours.configs, ["", ""])
  assert not ours.family.zero_unconditional(ours.configs, ["blurry", ""])


@pytest.mark.parametrize("negative", [None, "blurry"])
def test_guided_ddim_sampler_matches_diffusers(pipes, negative):
  from diffusers import DDIMScheduler
  ref, ours = pipes
  ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
  latents_NCHW = np.random.default_rng(0).standard_normal((2, 4, 16, 16)).astype(np.float32)
  expected = ref(PROMPTS, height=32, width=32, num_inference_steps=6, guidance_scale=5.0,
                 negative_prompt=None if negative is None else [negative] * 2,
                 latents=torch.from_numpy(latents_NCHW), output_type="np").images
  settings = sampler.SamplerSettings(steps=6, guidance=5.0, height=32, width=32)
  got = sampler.generate(ours, PROMPTS, [0, 1], settings=settings, negative_prompt=negative or "",
                         init_latents_BHWC=latents_NCHW.transpose(0, 2, 3, 1))
  err = np.abs(np.asarray(got) - expected).max()
  assert err <= 1e-4, f"max abs error {err:.3g}"


def test_vae_never_computes_in_fp16(tiny_sdxl_dir):
  import jax.numpy as jnp
  pipe = diffusers_folder.load_pipeline(tiny_sdxl_dir, dtype=jnp.float16)
  assert pipe.vae.dtype == jnp.float32 and pipe.unet.dtype == jnp.float16
  assert diffusers_folder.load_pipeline(tiny_sdxl_dir, dtype=jnp.bfloat16).vae.dtype == jnp.bfloat16


def test_training_batches_carry_each_images_time_ids(tiny_sdxl_dir, tmp_path):
  from dreambooth_jax import sharding
  from dreambooth_jax.data import batches
  config = fast_config(f"pretrained_model_name_or_path={tiny_sdxl_dir}", "random_init=False",
                       "with_prior_preservation=False", "train_batch_size=5", "random_flip=True")
  pipe = diffusers_folder.load_pipeline(tiny_sdxl_dir)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  data = batches.TrainData(config, pipe, mesh, tmp_path)
  batch = data.next_batch()
  assert set(batch) == set(batches.batch_schema(config, pipe)) >= {"time_ids", "context", "text_embeds"}
  time_ids = np.asarray(batch["time_ids"])[0]
  images = data.sets["instance"]
  # original (h, w) of each photo as decoded, crop top-left, target (32, 32)
  sizes = {tuple(s) for s in images.original_sizes}
  assert {tuple(row[:2].astype(int)) for row in time_ids} <= sizes and len(sizes) >= 1
  assert (time_ids[:, 4:] == 32).all()
  for row in time_ids:  # centre crops: the crop offset is half the resized overhang on the long side
    h, w = row[:2]
    resized = (max(32, round(h * 32 / min(h, w))), max(32, round(w * 32 / min(h, w))))
    assert tuple(row[2:4].astype(int)) == ((resized[0] - 32) // 2, (resized[1] - 32) // 2)


@pytest.fixture(scope="module")
def sdxl_run(tiny_sdxl_dir, tmp_path_factory):
  from dreambooth_jax.training import run
  workdir = tmp_path_factory.mktemp("sdxl") / "run"
  config = fast_config(f"pretrained_model_name_or_path={tiny_sdxl_dir}", "random_init=False", "max_train_steps=12",
                       "checkpointing_steps=6", "validation_steps=12", "num_class_images=2",
                       "sample_batch_size=2", "learning_rate=1e-3")
  run.train(config, workdir)
  return workdir


def test_sdxl_dreambooth_run_trains_and_exports_a_diffusers_folder(sdxl_run, tiny_sdxl_dir):
  from diffusers import DDIMScheduler, StableDiffusionXLPipeline
  losses = read_losses(sdxl_run)
  assert sorted(losses) == list(range(1, 13)) and all(np.isfinite(list(losses.values())))
  assert len(list((sdxl_run / "class_images").glob("class_*.png"))) == 2
  export = sdxl_run / "export"
  assert json.loads((export / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
  ref = StableDiffusionXLPipeline.from_pretrained(export)
  ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
  ref.set_progress_bar_config(disable=True)
  latents = np.random.default_rng(1).standard_normal((1, 4, 16, 16)).astype(np.float32)
  expected = ref(PROMPTS[:1], height=32, width=32, num_inference_steps=3, guidance_scale=4.0,
                 latents=torch.from_numpy(latents), output_type="np").images
  ours = diffusers_folder.load_pipeline(export)
  got = sampler.generate(ours, PROMPTS[:1], [0], settings=sampler.SamplerSettings(steps=3, guidance=4.0, height=32,
                                                                                   width=32),
                         init_latents_BHWC=latents.transpose(0, 2, 3, 1))
  assert np.abs(np.asarray(got) - expected).max() <= 1e-4
  # the trained UNet differs from the base one; the frozen parts are the base's
  base = diffusers_folder.load_pipeline(tiny_sdxl_dir)
  trained, original = (diffusers_folder.module_state_dict(p.unet) for p in (ours, base))
  assert any(not np.array_equal(trained[k], original[k]) for k in trained)
  for name in ("vae", "text_encoder", "text_encoder_2"):
    a, b = (diffusers_folder.module_state_dict(p.modules[name]) for p in (ours, base))
    assert all(np.array_equal(a[k], b[k]) for k in a), name


def test_sdxl_lora_run_exports_files_diffusers_loads(tiny_sdxl_dir, tmp_path):
  """LoRA on the SDXL UNet attention and both text encoders, on two subjects (config.concepts) with a loss mask on
  one photo: only the factors train, each subject's loss is logged, and the batches carry the masks with the time
  ids; the PEFT file written at the end and a kohya file (SGM names) load in StableDiffusionXLPipeline and give our
  sampler's images."""
  from PIL import Image
  from diffusers import DDIMScheduler, StableDiffusionXLPipeline
  from test_concepts import two_subjects
  from dreambooth_jax.data import batches
  from dreambooth_jax.models import lora
  from dreambooth_jax.training import run, run_state
  workdir = tmp_path / "run"
  config = fast_config(f"pretrained_model_name_or_path={tiny_sdxl_dir}", "random_init=False", "max_train_steps=4",
                       "checkpointing_steps=4", "validation_steps=0", "with_prior_preservation=False",
                       "learning_rate=5e-2", "masked_loss=True")
  config.concepts = two_subjects(tmp_path)
  mask = np.zeros((40, 40), np.uint8)  # the toy's first photo (40 x 40): its top half counts
  mask[:20] = 255
  Image.fromarray(mask).save(pathlib.Path(config.concepts[1]["instance_data_dir"]) / "00_mask.png")
  config.lora.enabled = True
  config.lora.text_encoder = True  # LoRA on both text encoders too (lora_te1_/lora_te2_, text_encoder_2.)
  run.train(config, workdir)
  _, view, _ = run_state.load_run(workdir, None)
  records = [r for r in step_records(workdir) if "loss" in r]
  assert len(records) == 4, records
  for name in ("dog", "zwx toy"):  # logged at the steps the subject is in (None at the others), and finite
    losses = [r[f"instance_loss/{name}"] for r in records if r[f"instance_loss/{name}"] is not None]
    assert losses and np.isfinite(losses).all(), (name, records)
  assert {"mask", "time_ids"} <= set(batches.batch_schema(config, view))
  assert lora.lora_modules(view.unet) and all(lora.lora_modules(view.modules[n]) for n in view.family.TEXT_ENCODERS)
  from dreambooth_jax.io import export as export_lib
  kohya = export_lib.export(view, config, tmp_path / "kohya.safetensors", "lora_kohya")
  from safetensors.numpy import load_file
  names = load_file(kohya)
  assert any(k.startswith("lora_unet_input_blocks_") for k in names)  # SGM names, as kohya's SDXL files
  assert any(k.startswith("lora_te1_") for k in names) and any(k.startswith("lora_te2_") for k in names)
  latents = np.random.default_rng(2).standard_normal((1, 4, 16, 16)).astype(np.float32)
  got = sampler.generate(view, PROMPTS[:1], [0], settings=sampler.SamplerSettings(steps=3, guidance=4.0, height=32,
                                                                                  width=32),
                         init_latents_BHWC=latents.transpose(0, 2, 3, 1))
  for path in (workdir / "export" / "pytorch_lora_weights.safetensors", kohya):
    ref = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    ref.load_lora_weights(str(path))
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    expected = ref(PROMPTS[:1], height=32, width=32, num_inference_steps=3, guidance_scale=4.0,
                   latents=torch.from_numpy(latents), output_type="np").images
    assert np.abs(np.asarray(got) - expected).max() <= 1e-4, path.name
  base = diffusers_folder.load_pipeline(tiny_sdxl_dir)
  untouched = sampler.generate(base, PROMPTS[:1], [0], settings=sampler.SamplerSettings(steps=3, guidance=4.0,
                                                                                        height=32, width=32),
                               init_latents_BHWC=latents.transpose(0, 2, 3, 1))
  assert np.abs(np.asarray(untouched) - expected).max() > 1e-3  # the LoRA changed the images


def test_sdxl_single_file_round_trip(pipes, tiny_sdxl_dir, tmp_path):
  """Our SGM-layout single file of an SDXL pipeline loads back (family detected from its keys) exactly."""
  from dreambooth_jax.io import single_file
  _, ours = pipes
  path = single_file.export_single_file(ours, tmp_path / "sdxl.safetensors", dtype="fp32")
  back = single_file.load_single_file_pipeline(path, config=str(tiny_sdxl_dir))
  assert back.family.NAME == "sdxl"
  for name in ours.family.COMPONENTS:
    want, got = (diffusers_folder.module_state_dict(p.modules[name]) for p in (ours, back))
    assert want.keys() == got.keys(), name
    assert all(np.array_equal(want[k], got[k]) for k in want), name


def test_a_folder_missing_a_component_is_named(tiny_sdxl_dir, tmp_path):
  import shutil
  from dreambooth_jax.io.safetensors import CheckpointError
  broken = tmp_path / "model"
  shutil.copytree(tiny_sdxl_dir, broken)
  shutil.rmtree(broken / "text_encoder_2")
  with pytest.raises(CheckpointError, match=r"sdxl component folder text_encoder_2/ is missing"):
    diffusers_folder.load_pipeline(broken)


def test_resolution_zero_is_the_models_default(tiny_sdxl_dir):
  from dreambooth_jax import config_files
  from dreambooth_jax.training import run_state
  config = config_files.load(pathlib.Path(__file__).resolve().parents[1] / "configs" / "dog_sdxl.py", "lora")
  config.pretrained_model_name_or_path = str(tiny_sdxl_dir)
  assert config.resolution == 0
  assert run_state.resolve_defaults(config).resolution == 8 * 2  # tiny: sample_size 8 x the VAE's factor 2
  config.pretrained_model_name_or_path = "stabilityai/stable-diffusion-xl-base-1.0"  # offline: bundled configs
  config.resolution = 0
  assert run_state.resolve_defaults(config).resolution == 1024
