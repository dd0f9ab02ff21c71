"""Sharding and multi-host: mesh construction, logical-axis rules, the train step on 8 fake CPU devices over
data x fsdp meshes against 1 device, and two jax.distributed processes on 127.0.0.1 training, saving and restoring."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dreambooth_jax import sharding
from test_train import step_records
from xla_flags import fake_devices

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS = str(ROOT / "tests")


def test_make_mesh_sizes_and_errors():
  devices = jax.devices()[:1]
  mesh = sharding.make_mesh(-1, 1, devices=devices)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1}
  with pytest.raises(ValueError, match="data=2 x fsdp=1 != 1 devices"):
    sharding.make_mesh(2, 1, devices=devices)
  with pytest.raises(ValueError, match="does not divide"):
    sharding.make_mesh(-1, 3, devices=jax.devices()[:1] * 2)


def test_logical_rules_shard_big_axes_over_fsdp():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1] * 4).reshape(1, 4), ("data", "fsdp"))
  tree = {"conv": {"kernel": np.zeros((3, 3, 8, 16))}, "proj": {"kernel": np.zeros((8, 12)), "bias": np.zeros((12,))},
          "lora": {"lora_up": np.zeros((4, 6))}, "token": {"embedding": np.zeros((100, 8))}, "step": np.zeros(())}
  specs = jax.tree.map(lambda s: s.spec, sharding.tree_shardings(tree, mesh))
  assert specs == {"conv": {"kernel": P(None, None, None, "fsdp")}, "proj": {"kernel": P(None, "fsdp"),
                   "bias": P(None)}, "lora": {"lora_up": P(None, None)},  # 6 is not divisible by 4: replicated
                   "token": {"embedding": P("fsdp", None)}, "step": P()}


MESH_STEPS = r"""
import json, shutil, sys, tempfile, pathlib
import jax, numpy as np
sys.path.insert(0, {tests!r})
from test_train import fast_config
from dreambooth_jax import sharding
from dreambooth_jax.training import run, run_state
tmp = pathlib.Path(tempfile.mkdtemp())
# Photos as the class images (prior preservation on, no sampler compile): the test is about the train step.
shutil.copytree(pathlib.Path({tests!r}).parent / "dreambooth_jax" / "assets" / "dog", tmp / "class")
config = fast_config("train_batch_size=4", f"class_data_dir={{tmp / 'class'}}")
out = {{}}
for data, fsdp in {meshes}:
  devices = jax.devices()[:data * fsdp]
  job = run.setup(config, tmp / f"{{data}}x{{fsdp}}", mesh=sharding.make_mesh(data, fsdp, devices=devices))
  state, losses = job.state, []
  for _ in range(3):
    state, metrics = job.step_fn(state, job.data.next_batch(), job.rng, job.frozen)
    losses.append(float(metrics["loss"]))
  leaves = jax.tree.leaves(state["params"])
  specs = sorted({{str(l.sharding.spec) for l in leaves}})
  out[f"{{data}}x{{fsdp}}"] = [losses, [float(np.abs(np.asarray(p)).sum()) for p in leaves], specs]
print(json.dumps(out))
"""


# Slow: the default suite proves data x fsdp = 2x4 against 1 device, at the same tolerances, in
# test_small_batch_on_8_devices_default_mesh_equals_1_device (its default mesh is 2x4).
@pytest.mark.slow
@pytest.mark.parametrize("meshes", [
    [(1, 1), (2, 4)],  # batch over data and parameters over fsdp at once, 4 examples per data shard
    [(1, 1), (8, 1), (1, 8)],  # each axis alone over all 8 devices
], ids=["2x4", "8x1-1x8"])
def test_three_steps_on_8_devices_equal_1_device(meshes):
  """3 train steps on 8 fake CPU devices (data x fsdp = 2x4, 8x1 and 1x8) equal the 1-device run.
  Tolerance: losses rtol 1e-5; parameter |.| sums rtol 1e-5 + atol 1e-5 (reduction order differs between
  shardings, and Adam normalises near-zero gradients, which amplifies that rounding noise)."""
  env = dict(os.environ, XLA_FLAGS=fake_devices(8), JAX_PLATFORMS="cpu")
  script = MESH_STEPS.format(tests=TESTS, meshes=meshes)
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=900, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  ref_losses, ref_sums, _ = out["1x1"]
  assert ref_losses[2] != ref_losses[0]
  for mesh, (losses, sums, specs) in out.items():
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=mesh)
    np.testing.assert_allclose(sums, ref_sums, rtol=1e-5, atol=1e-5, err_msg=mesh)
    if mesh.endswith("x4") or mesh.endswith("x8"):
      assert any("fsdp" in s for s in specs), (mesh, specs)  # parameters really are sharded over fsdp


PROCESS = r"""
import json, sys, pathlib
sys.path.insert(0, {tests!r})
from dreambooth_jax import distributed
distributed.initialize()
import jax, numpy as np
from test_train import fast_config
from dreambooth_jax import sharding
from dreambooth_jax.training import checkpoint
from dreambooth_jax.training import run, run_state
workdir = pathlib.Path({workdir!r})
config = fast_config("train_batch_size=4", "max_train_steps=3", "checkpointing_steps=3", "validation_steps=0",
                     "export_at_end=False", "mesh_data=1", "mesh_fsdp=4", "with_prior_preservation=False",
                     "compilation_cache_dir=")  # off: the processes compile at once (no shared cache)
job = run.train(config, workdir)
params = sharding.to_host(job.state["params"])
step, state, side = checkpoint.restore(job.mgr, None, checkpoint.abstract_like(job.state, job.state_shardings))
restored = sharding.to_host(state["params"])
same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)))
cross = any(not leaf.is_fully_addressable for leaf in jax.tree.leaves(job.state["params"]))
print(json.dumps({{"process": jax.process_index(), "count": jax.process_count(), "devices": jax.device_count(),
                  "cross_process_params": cross,
                  "restored_step": int(sharding.to_host(state["step"])), "restored_equal": same,
                  "sums": [float(np.abs(p).sum()) for p in jax.tree.leaves(params)]}}))
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_save_restore_and_agree(tmp_path):
  """Two jax.distributed processes (2 CPU devices each, mesh data=1 x fsdp=4: parameters and optimizer state sharded
  across both processes) train 3 steps, checkpoint, restore; both gather the same parameters, the restore is exact,
  and the losses equal a 1-process 4-device run (rtol 1e-5)."""
  base_env = dict(os.environ, XLA_FLAGS=fake_devices(2), JAX_PLATFORMS="cpu")
  base_env.pop("JAX_COMPILATION_CACHE_DIR", None)  # processes compiling at once: keep them off the shared cache
  port = free_port()
  envs = [dict(base_env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
          for i in range(2)]
  envs.append(dict(base_env, XLA_FLAGS=fake_devices(4)))  # the 1-process reference
  workdirs = ["two", "two", "one"]
  procs = []
  for i, (env, workdir) in enumerate(zip(envs, workdirs)):  # all three at once; logs to files, never a full pipe
    with open(tmp_path / f"out{i}.txt", "w") as out, open(tmp_path / f"err{i}.txt", "w") as err:
      procs.append(subprocess.Popen([sys.executable, "-c", PROCESS.format(tests=TESTS, workdir=str(tmp_path / workdir))],
                                    env=env, stdout=out, stderr=err, cwd=ROOT))
  results = []
  for i, p in enumerate(procs):
    p.wait(timeout=900)
    assert p.returncode == 0, (tmp_path / f"err{i}.txt").read_text()[-3000:]
    results.append(json.loads((tmp_path / f"out{i}.txt").read_text().strip().splitlines()[-1]))
  outs = results[:2]
  assert [o["process"] for o in outs] == [0, 1] and all(o["count"] == 2 and o["devices"] == 4 for o in outs)
  assert all(o["restored_step"] == 3 and o["restored_equal"] for o in outs)
  assert all(o["cross_process_params"] for o in outs)  # FSDP really spans the two processes
  assert outs[0]["sums"] == outs[1]["sums"]
  two = [r["loss"] for r in step_records(tmp_path / "two")]
  one = [r["loss"] for r in step_records(tmp_path / "one")]
  assert len(two) == 3
  np.testing.assert_allclose(two, one, rtol=1e-5)


SMALL_BATCH = r"""
import json, sys, tempfile, pathlib
import jax, numpy as np
sys.path.insert(0, {tests!r})
from test_train import fast_config
from dreambooth_jax import sharding
from dreambooth_jax.io import diffusers_folder
from dreambooth_jax.sampling import sampler
from dreambooth_jax.training import run
tmp = pathlib.Path(tempfile.mkdtemp())
# Global batch 2 (1 instance + 1 class example). The class images are generated on the 8-device mesh (sampling pads
# to 8 devices); the 1-device run reads those same images, so the two runs see the same batches.
config = fast_config("train_batch_size=1", "validation_steps=0")
out = {{}}
for name, mesh in [("8", None), ("1", sharding.make_mesh(1, 1, devices=jax.devices()[:1]))]:
  if name == "1":
    config = fast_config("train_batch_size=1", "validation_steps=0", f"class_data_dir={{tmp / '8' / 'class_images'}}")
  job = run.setup(config, tmp / name, mesh=mesh)
  state, losses = job.state, []
  for _ in range(3):
    state, metrics = job.step_fn(state, job.data.next_batch(), job.rng, job.frozen)
    losses.append(float(metrics["loss"]))
  leaves = jax.tree.leaves(state["params"])
  out[name] = {{"losses": losses, "mesh": dict(job.mesh.shape),
               "sums": [float(np.abs(np.asarray(p)).sum()) for p in leaves],
               "specs": sorted({{str(l.sharding.spec) for l in leaves}}),
               "class_images": len(list((tmp / name / "class_images").glob("class_*.png")))}}
try:
  run.make_mesh(fast_config("train_batch_size=1", "mesh_data=8"))
except ValueError as e:
  out["refused"] = str(e)
# Sampling: 5 prompts in batches of 3 (padded to the 8 devices) equal the unsharded images.
pipe = diffusers_folder.random_pipeline(seed=0)
settings = sampler.SamplerSettings(steps=2, guidance=3.0, height=32, width=32)
prompts = [f"a photo of dog {{i}}" for i in range(5)]
images = {{}}
for name, mesh in [("1", None), ("8", sharding.make_mesh())]:
  images[name] = np.concatenate([im for _, im in sampler.generate_all(pipe, prompts, seed=1, batch_size=3,
                                                                      settings=settings, mesh=mesh)])
diff = np.abs(images["1"].astype(int) - images["8"].astype(int))
out["sampling"] = {{"shape": list(images["8"].shape), "max_diff": int(diff.max()), "mean_diff": float(diff.mean())}}
print(json.dumps(out))
"""


def test_small_batch_on_8_devices_default_mesh_equals_1_device():
  """train_batch_size=1 with prior preservation (global batch 2) on 8 fake CPU devices: the default mesh is data=2 x
  fsdp=4 (the batch over data, the parameters sharded over fsdp), class images are generated on it, and 3 train
  steps on it equal the 1-device run's on the same class images. Tolerance as in
  test_three_steps_on_8_devices_equal_1_device: losses rtol 1e-5, parameter |.| sums rtol 1e-5 + atol 1e-5. An
  explicit mesh_data=8 is refused in one line; sampling on 8 devices gives the 1-device images (within one uint8
  level)."""
  env = dict(os.environ, XLA_FLAGS=fake_devices(8), JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", SMALL_BATCH.format(tests=TESTS)], env=env, capture_output=True,
                          text=True, timeout=900, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["8"]["mesh"] == {"data": 2, "fsdp": 4} and out["1"]["mesh"] == {"data": 1, "fsdp": 1}
  assert out["8"]["class_images"] == 4 and out["1"]["class_images"] == 0  # generated on the 8-device mesh only
  assert out["1"]["losses"][2] != out["1"]["losses"][0]
  np.testing.assert_allclose(out["8"]["losses"], out["1"]["losses"], rtol=1e-5)
  np.testing.assert_allclose(out["8"]["sums"], out["1"]["sums"], rtol=1e-5, atol=1e-5)
  assert any("fsdp" in s for s in out["8"]["specs"]), out["8"]["specs"]  # parameters really are sharded over fsdp
  refused = out["refused"]
  assert "\n" not in refused and all(k in refused for k in ("mesh_data=8", "mesh_fsdp=1", "train_batch_size=1"))
  assert out["sampling"]["shape"] == [5, 32, 32, 3] and out["sampling"]["max_diff"] <= 1, out["sampling"]


def test_default_data_size():
  assert [sharding.default_data_size(8, b) for b in (1, 2, 4, 6, 8, 16)] == [1, 2, 4, 2, 8, 8]
