"""Masked loss (masked_loss=True, kohya's): the mask's sources (NAME_mask.png, alpha, none), mask files never taken
as photos, the mask following its image's crop and flip down to the latent grid (uncached, cached and bucketed), and
the loss: an all-ones mask is bitwise no mask; any mask gives kohya's mean((prediction - target)^2 * mask), with the
latent mask equal to torch's area interpolation of the pixel mask (tolerance 1e-6 for both)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dreambooth_jax.data import images as data
import test_golden_step as golden
from test_golden_step import CLASS, INSTANCE, make_config, pixels
from test_train import fast_config

MARK = (slice(0, 8), slice(32, 40))  # a marked 8 x 8 block of a 32 x 48 (H x W) image: the centre crop's top right


@pytest.fixture(scope="module")
def sd_pipe():
  """The tiny SD pipeline, loaded once (random init is slow eagerly): the configs below all use it."""
  from dreambooth_jax.training import run_state
  return run_state.load_model(make_config())


def marked_folder(folder, how="file"):
  """One 32 x 48 photo, red in the marked block; its mask (a NAME_mask.png, or its alpha) is 1 there, else 0."""
  folder.mkdir(parents=True, exist_ok=True)
  marker = np.zeros((32, 48), np.uint8)
  marker[MARK] = 255
  rgb = np.stack([marker, np.zeros_like(marker), np.zeros_like(marker)], -1)
  if how == "alpha":
    Image.fromarray(np.concatenate([rgb, marker[..., None]], -1), "RGBA").save(folder / "a.png")
  else:
    Image.fromarray(rgb).save(folder / "a.png")
    Image.fromarray(marker).convert("RGB").save(folder / "a_mask.png")  # any mode: read as grayscale
  return folder


def test_mask_sources(tmp_path):
  from_file = data.load_subject_images(marked_folder(tmp_path / "file"), 32, "x", masks=True)
  from_alpha = data.load_subject_images(marked_folder(tmp_path / "alpha", "alpha"), 32, "x", masks=True)
  expected = np.zeros((32, 48), np.uint8)
  expected[MARK] = 255
  np.testing.assert_array_equal(from_file.masks[0], expected)
  np.testing.assert_array_equal(from_alpha.masks[0], expected)
  # the alpha'd photo is still composited on white for the pixels
  assert from_alpha.images[0][20, 0].tolist() == [255, 255, 255]
  plain = tmp_path / "plain"
  plain.mkdir()
  Image.new("RGB", (40, 32), (1, 2, 3)).save(plain / "b.jpg")
  assert data.load_subject_images(plain, 32, "x", masks=True).masks == [None]  # all ones
  assert data.load_subject_images(plain, 32, "x").masks is None  # masked_loss off


def test_mask_files_are_never_photos(tmp_path, caplog):
  folder = marked_folder(tmp_path)
  Image.new("L", (32, 32), 7).save(folder / "lonely_mask.png")  # no photo named `lonely`: a photo itself
  with caplog.at_level(logging.INFO):
    for masks in (False, True):
      names = [p.name for p in data.load_subject_images(folder, 32, "x", masks=masks).paths]
      assert names == ["a.png", "lonely_mask.png"]
  assert "a_mask.png" in caplog.text and "masked_loss is off" in caplog.text


def test_mismatched_mask_is_refused_by_name(tmp_path):
  folder = marked_folder(tmp_path)
  Image.new("L", (48, 30), 255).save(folder / "a_mask.png")
  with pytest.raises(data.BadImagesError, match=r"a\.png: .*a_mask\.png is 48x30, the image 48x32"):
    data.load_subject_images(folder, 32, "x", masks=True)


def expected_cell(flip):
  return (0, 0) if flip else (0, 3)  # the block's latent cell (f = 8) in the 32 x 32 centre crop, flipped or not


@pytest.mark.parametrize("bucketed", [False, True])
def test_mask_follows_random_crop_and_flip(tmp_path, bucketed):
  from dreambooth_jax.data import buckets
  images = data.load_subject_images(marked_folder(tmp_path), 32, "x", masks=True,
                                    buckets=[(32, 32)] if bucketed else None)
  if bucketed:
    it = (b for _, b in buckets.BucketIterator(images, 4, 1, seed=0, center_crop=False, random_flip=True))
  else:
    it = data.SubjectIterator(images, 4, seed=0, center_crop=False, random_flip=True, process_index=0,
                              process_count=1)
  crops, flips = set(), set()
  for _ in range(3):
    batch = next(it)
    red = batch["pixels_BHWC"][..., 0] > 0
    np.testing.assert_array_equal(batch["mask_BHW"], red.astype(np.float32))  # the same pixels, crop and flip
    crops.update(map(tuple, batch["crop_top_left_B2"]))
    flips.update(batch["flip_B"].tolist())
  assert len(crops) > 2 and flips == {False, True}


def train_data(pipe, instance_dir, workdir, *overrides):
  import pathlib
  from dreambooth_jax import sharding
  from dreambooth_jax.data import batches
  root = pathlib.Path(__file__).resolve().parents[1]
  config = fast_config(f"instance_data_dir={instance_dir}", f"class_data_dir={root / 'dreambooth_jax/assets/dog'}",
                       "masked_loss=True", "random_flip=True", "train_batch_size=2", *overrides)
  return batches.TrainData(config, pipe, sharding.make_mesh(devices=jax.devices()[:1]), workdir)


@pytest.mark.parametrize("cached", [True, False])
def test_batches_carry_the_latent_mask(sd_pipe, tmp_path, cached):
  folder = marked_folder(tmp_path)
  Image.new("RGB", (32, 32), (9, 9, 9)).save(folder / "b.png")  # no mask: all ones
  data_ = train_data(sd_pipe, folder, tmp_path, f"cache_latents={cached}")
  assert data_.schema["mask"] == ((4, 4, 1), jnp.float32)
  assert (data_.latents is not None) == cached
  seen = set()
  for _ in range(4):
    examples = data_._step_examples()[0]
    batch = data_._local_micro_batch(0, examples)
    instance = examples["instance"]
    for k, (index, flip) in enumerate(zip(instance["index_B"], instance["flip_B"])):
      expected = np.ones((4, 4, 1), np.float32)
      if index == 0:  # a.png: 1 in the block's cell only
        expected[:] = 0
        expected[(*expected_cell(flip), 0)] = 1
      np.testing.assert_array_equal(batch["mask"][k], expected)
      seen.add((int(index), bool(flip)))
    np.testing.assert_array_equal(batch["mask"][2:], 1.0)  # class examples: all ones
  assert {(0, False), (0, True)} <= seen


def test_latent_mask_is_torchs_area_interpolation():
  torch = pytest.importorskip("torch")
  mask = np.random.default_rng(0).integers(0, 256, (32, 48)).astype(np.float32) / 255
  ref = torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None], size=(4, 6), mode="area")
  np.testing.assert_allclose(data.latent_mask(mask, 8)[..., 0], ref[0, 0].numpy(), rtol=0, atol=1e-6)
  with pytest.raises(ValueError, match="30x48 pixels does not divide into 8x8"):
    data.latent_mask(mask[:30], 8)


class Recording:
  """The family, recording the prediction and the target of an (eager) example_losses call."""

  def __init__(self, family):
    self.family, self.seen = family, {}

  def __getattr__(self, name):
    return getattr(self.family, name)

  def training_inputs(self, *args):
    self.seen["inputs"] = self.family.training_inputs(*args)
    return self.seen["inputs"]

  def denoise(self, *args):
    self.seen["prediction"] = self.family.denoise(*args)
    return self.seen["prediction"]


@pytest.mark.parametrize("family_name", ["sd", pytest.param("flux", marks=pytest.mark.slow)])
def test_masked_loss_is_kohyas_formula(family_name, request):
  """A half mask keeps the left half's loss only (half its mean: no renormalisation); a random mask gives
  mean((prediction - target)^2 * mask) in numpy on the same prediction and target. Flux: its prediction is unpacked
  to the latent grid (B, h, w, C) before the loss, so the mask lines up there as for SD."""
  from dreambooth_jax.training import run_state, step as step_lib
  if family_name == "flux":
    from test_flux_train import flux_config
    config = flux_config(request.getfixturevalue("tiny_flux_dir"), "resolution=32", "masked_loss=True")
    pipe = run_state.load_model(config)
  else:
    config, pipe = make_config(("masked_loss", True)), request.getfixturevalue("sd_pipe")
  family = Recording(pipe.family)
  side = config.resolution // pipe.family.latent_factor(pipe.configs)  # tiny SD: 4 x 4, tiny Flux: 16 x 16
  half = np.zeros((side, side, 1), np.float32)
  half[:, :side // 2] = 1.0
  random = np.random.default_rng(1).uniform(0, 1, (side, side, 1)).astype(np.float32)
  micro = {"pixels": pixels(2, 0), "slot": np.arange(2, dtype=np.int32), "prior": np.zeros(2, np.float32),
           "mask": np.stack([half, random]),
           **{k: np.asarray(v) for k, v in pipe.family.tokenize(pipe.tokenizers, [INSTANCE, CLASS]).items()}}
  got = step_lib.example_losses(family, pipe.modules, pipe.schedule, micro, jax.random.key(0),
                                step_lib.loss_settings(config))
  squared = np.square(np.asarray(family.seen["prediction"], np.float64) - np.asarray(family.seen["inputs"].target))
  assert squared.shape[:3] == (2, side, side)
  expected = np.array([0.5 * squared[0, :, :side // 2].mean(), (squared[1] * random).mean()])
  weight_B = family.seen["inputs"].weight_B
  expected = expected if weight_B is None else expected * np.asarray(weight_B)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert abs(got[0] - squared[0].mean()) > 1e-3 * squared[0].mean()  # the mask matters


def one_step(pipe, config, mask=None):
  """test_golden_step's fixed cached batch (2 instance + 2 class examples) through the trainer's compiled step:
  (metrics, params before, params after)."""
  from dreambooth_jax import sharding
  from dreambooth_jax.training import run, run_state, step as step_lib
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  graphdefs, params, frozen = run_state.trainable_state(pipe, config)
  step = run.compile_step(config, pipe, graphdefs, params, frozen, mesh)
  pix = np.concatenate([pixels(2, 0), pixels(2, 1)])
  mean, std = jax.jit(lambda m, x: m.encode(x))(pipe.vae, pix)
  ids = pipe.family.tokenize(pipe.tokenizers, [INSTANCE, INSTANCE, CLASS, CLASS])["ids"]
  batch = {"latent_mean": np.asarray(mean), "latent_std": np.asarray(std), "prior": np.array([0, 0, 1, 1], np.float32),
           "slot": np.arange(4, dtype=np.int32), "context": np.asarray(pipe.text_encoder(ids)[0])}
  if mask is not None:
    batch["mask"] = mask
  batch = {k: v[None] for k, v in batch.items()}
  params = jax.tree.map(np.asarray, params)  # the step donates the state: keep a copy of the old values
  state = jax.jit(lambda p: step_lib.init_train_state(p, step.tx), out_shardings=step.state_shardings)(params)
  new_state, metrics = step.fn(state, batch, jax.random.key(config.seed), jax.device_put(frozen,
                                                                                       step.frozen_shardings))
  return {k: float(v) for k, v in metrics.items()}, params, jax.tree.map(np.asarray, new_state["params"])


ONES = np.ones((4, 4, 4, 1), np.float32)  # the all-ones masks of images without masks, on the 4 x 4 latent grid


def test_all_ones_mask_is_no_mask(sd_pipe):
  """Golden: masked_loss=True with all-ones masks gives test_golden_step's pinned no-mask step (losses, gradient
  norm, update norm) at its tolerance; the bitwise comparison, two compiles, is the slow test below."""
  metrics, old, new = one_step(sd_pipe, make_config(("masked_loss", True)), ONES)
  update_norm = np.sqrt(sum(float(np.sum(np.square(np.asarray(n, np.float64) - o)))
                            for n, o in zip(jax.tree.leaves(new), jax.tree.leaves(old))))
  np.testing.assert_allclose(golden.values(metrics, update_norm), golden.GOLDEN["epsilon"], rtol=golden.RTOL)


@pytest.mark.slow
def test_all_ones_mask_is_no_mask_bitwise(sd_pipe):
  """The same step with masked_loss off: metrics bitwise equal, params to 1 ulp. XLA:CPU compiles the two programs
  (one has a mask input) with conv_out's bias gradient summed in another order: 1 ulp in 1 of its 4 elements, every
  other parameter bitwise equal (an optimization_barrier before the mask does not change that)."""
  plain_metrics, _, plain = one_step(sd_pipe, make_config())
  metrics, _, masked = one_step(sd_pipe, make_config(("masked_loss", True)), ONES)
  assert metrics == plain_metrics
  jax.tree.map(lambda a, b: np.testing.assert_array_max_ulp(a, b, maxulp=1), masked, plain)
  unequal = [x.size for x, y in zip(jax.tree.leaves(masked), jax.tree.leaves(plain)) if not np.array_equal(x, y)]
  assert sum(unequal) <= 4
