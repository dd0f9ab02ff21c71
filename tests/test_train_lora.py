"""LoRA DreamBooth end to end on the tiny config: only the factors are trained and checkpointed, prior
preservation and validation run, a resumed run repeats the same losses, and every export format loads."""

import copy
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from test_train import fast_config, read_losses, step_records

STEPS = 20


def lora_config(*overrides):
  config = fast_config(f"max_train_steps={STEPS}", "validation_steps=20", "learning_rate=1e-2", "use_ema=True",
                       "ema_decay=0.9", "validation_loss=True", *overrides)  # validation and exports use the EMA
  config.lora.enabled = True
  config.lora.rank = 4
  config.lora.alpha = 8.0
  return config


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  from dreambooth_jax.training import run
  workdir = tmp_path_factory.mktemp("lora") / "run"
  run.train(lora_config(), workdir)
  return workdir


def test_lora_run_trains_only_the_factors(lora_run):
  import orbax.checkpoint as ocp
  losses = read_losses(lora_run)
  assert sorted(losses) == list(range(1, STEPS + 1))
  assert np.mean([losses[s] for s in range(11, 21)]) < np.mean([losses[s] for s in range(1, 11)])
  assert all(np.isfinite(list(losses.values())))
  assert step_records(lora_run)[0]["prior_loss"] > 0
  assert (lora_run / "validation" / f"step_{STEPS:06d}.png").is_file()
  # The checkpoint holds the LoRA factors (and their Adam moments) only: a tiny fraction of the UNet.
  def item(name):  # params and opt_state are separate Orbax items (training/checkpoint.py)
    meta = ocp.StandardCheckpointer().metadata(lora_run / "checkpoints" / str(STEPS) / name)
    return meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
  params = item("params")
  names = {str(k) for path in _paths(params) for k in path[-1:]}
  assert names == {"lora_down", "lora_up"}, names
  opt_names = {str(k) for path in _paths(item("opt_state")) for k in path[-1:]}
  assert not opt_names & {"kernel", "bias", "embedding"}, opt_names  # no moments of base weights
  from dreambooth_jax.io import diffusers_folder as weights
  lora_count = sum(int(np.prod(m.shape)) for m in _leaves(params))
  unet_count = sum(v.size for v in weights.module_state_dict(weights.random_pipeline().unet).values())
  assert lora_count < 0.2 * unet_count, (lora_count, unet_count)


def _paths(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _paths(v, prefix + (k,))
  else:
    yield prefix


def _leaves(tree):
  return [v for v in (tree.values() if isinstance(tree, dict) else [tree]) for v in
          (_leaves(v) if isinstance(v, dict) else [v])]


def test_lora_resume_repeats_the_losses(lora_run, tmp_path):
  from dreambooth_jax.training import run
  workdir = tmp_path / "run"
  shutil.copytree(lora_run, workdir)
  shutil.rmtree(workdir / "checkpoints" / str(STEPS))  # as if killed after step 10's checkpoint
  (workdir / "export").exists() and shutil.rmtree(workdir / "export")
  run.train(lora_config(), workdir)
  assert read_losses(workdir) == read_losses(lora_run)
  val = lambda w: [r for r in map(json.loads, (w / "metrics.jsonl").read_text().splitlines())
                   if "val/instance_loss" in r]  # the validation-loss records
  assert val(lora_run) == [{"step": STEPS, "val/instance_loss": val(lora_run)[0]["val/instance_loss"],
                            "val/prior_loss": val(lora_run)[0]["val/prior_loss"]}]
  assert val(workdir)[-1] == val(lora_run)[0]  # the same params (the EMA), the same validation loss
  import orbax.checkpoint as ocp
  read = lambda w, item: _leaves(ocp.StandardCheckpointer().restore(w / "checkpoints" / str(STEPS) / item))
  ema, params = read(workdir, "ema"), read(workdir, "params")
  assert len(ema) == len(params) and not all(np.array_equal(e, p) for e, p in zip(ema, params))  # averaged
  assert all(np.array_equal(a, b) for a, b in zip(ema, read(lora_run, "ema"), strict=True))  # resumed bitwise


def test_lora_exports_load_in_diffusers(lora_run, tmp_path):
  import torch
  from diffusers import StableDiffusionPipeline
  from dreambooth_jax.io import export as export_lib
  from dreambooth_jax.training import run_state
  from dreambooth_jax.models import lora
  from dreambooth_jax.io import diffusers_folder as weights

  config, view, step = run_state.load_run(lora_run, None)
  assert step == STEPS and lora.lora_modules(view.unet)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
  t = np.array([500], np.int32)
  context = rng.standard_normal((1, 77, view.unet.config.cross_attention_dim)).astype(np.float32)
  ours = np.asarray(view.unet(x, t, context))

  base_dir = tmp_path / "base"
  weights.save_pipeline(weights.random_pipeline(seed=0), base_dir)  # the run's base model (tiny, seed 0)
  base = StableDiffusionPipeline.from_pretrained(base_dir)

  def torch_unet(pipe):
    with torch.no_grad():
      out = pipe.unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t), torch.from_numpy(context))
    return out.sample.numpy().transpose(0, 2, 3, 1)

  base_out = torch_unet(base)
  assert np.abs(ours - base_out).max() > 1e-3  # the LoRA changed the model
  files = {"lora_diffusers": lora_run / "export" / "pytorch_lora_weights.safetensors"}
  for fmt in ("lora_kohya",):
    result = subprocess.run([sys.executable, "-m", "dreambooth_jax.export", f"--workdir={lora_run}",
                             f"--format={fmt}", f"--out={tmp_path / fmt}.safetensors"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    files[fmt] = tmp_path / f"{fmt}.safetensors"
  for fmt, path in files.items():  # tolerance: fp32, 1e-4 relative to the output's scale
    pipe = copy.deepcopy(base)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    got = torch_unet(pipe)
    assert np.abs(got - ours).max() <= 1e-4 * max(1.0, np.abs(ours).max()), fmt
    from dreambooth_jax.io import lora_files as kohya
    _, metadata = kohya.load_lora(path)
    assert metadata["modelspec.trigger_phrase"] == "a photo of sks dog" and metadata["ss_network_dim"] == "4"
    # sample --lora=FILE[:SCALE]: the file folded into the base weights equals diffusers' load_lora_weights (and
    # fuse_lora(lora_scale=SCALE))
    for scale in (1.0, 0.5):
      folded = weights.load_pipeline(base_dir)
      kohya.apply_lora_files(folded, [kohya.parse_lora_arg(f"{path}:{scale}")])
      fused = copy.deepcopy(base)
      fused.load_lora_weights(str(path.parent), weight_name=path.name)
      fused.fuse_lora(lora_scale=scale)
      np.testing.assert_allclose(np.asarray(folded.unet(x, t, context)), torch_unet(fused),
                                 atol=1e-4 * max(1.0, np.abs(ours).max()), err_msg=f"{fmt} at scale {scale}")
  # Merged full model, as a diffusers folder; without --merge_lora a clear refusal.
  out = tmp_path / "merged"
  with pytest.raises(ValueError, match="--merge_lora"):
    export_lib.export(view, config, out, "diffusers")
  export_lib.export(view, config, out, "diffusers", merge_lora=True)
  merged = StableDiffusionPipeline.from_pretrained(out)
  assert np.abs(torch_unet(merged) - ours).max() <= 1e-4 * max(1.0, np.abs(ours).max())
  # Single file with the LoRA merged: our importer reads it back (configs from the merged folder).
  single = export_lib.export(view, config, tmp_path / "model.safetensors", "single_file", merge_lora=True,
                         dtype="float32")
  from dreambooth_jax.io import load
  again = load.load_or_init_pipeline(single, single_file_config=str(out))
  np.testing.assert_allclose(np.asarray(again.unet(x, t, context)), ours, atol=1e-4 * max(1.0, np.abs(ours).max()))


def test_full_run_refuses_lora_export(tmp_path):
  from dreambooth_jax.io import export as export_lib
  from dreambooth_jax.io import diffusers_folder as weights
  config = lora_config()
  with pytest.raises(ValueError, match="trained the full model"):
    export_lib.export(weights.random_pipeline(), config, tmp_path / "x.safetensors", "lora_kohya")


def test_init_lora_continues_from_a_file_and_a_wrong_family_is_refused(lora_run, tiny_sdxl_dir, tmp_path):
  """config.init_lora starts the factors from a LoRA file: step 0 of the new run is the old run's model."""
  from dreambooth_jax.io import lora_files
  from dreambooth_jax.models import lora
  from dreambooth_jax.training import run_state
  path = lora_run / "export" / "pytorch_lora_weights.safetensors"
  config, view, _ = run_state.load_run(lora_run, None)
  with config.unlocked():
    config.init_lora = str(path)
  pipe = run_state.load_model(config)
  modules = run_state.trainable_modules(pipe, config)
  for name, module in modules.items():
    for key, (down, up) in lora.lora_factors(view.modules[name]).items():
      got_down, got_up = lora.lora_factors(module)[key]
      np.testing.assert_allclose(got_down, down, rtol=1e-6)
      np.testing.assert_allclose(got_up, up, rtol=1e-6)
  # An SD LoRA on an SDXL base is refused by name, nothing applied.
  from dreambooth_jax.io import diffusers_folder
  sdxl = diffusers_folder.load_pipeline(tiny_sdxl_dir)
  with pytest.raises(lora_files.LoraFormatError, match=r"pytorch_lora_weights\.safetensors.*(sd|SD)"):
    lora_files.apply_lora_files(sdxl, [(path, 1.0)])
