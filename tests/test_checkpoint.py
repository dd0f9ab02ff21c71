"""checkpoint.restore_latest_good on a small state (no model): damaged newer checkpoints are set aside and the
newest good one restores; with none restorable, CheckpointError names them and nothing is renamed."""

import jax
import jax.numpy as jnp
import pytest

from dreambooth_jax.training import checkpoint


def state(value):
  return {"step": jnp.int32(value), "params": {"w": jnp.full((64, 64), value, jnp.float32)},
          "opt_state": {"m": jnp.full((64,), value, jnp.float32)}}


def truncate(step_dir):
  files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d" and p.stat().st_size]
  assert files
  for p in files:
    p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])


def abstract():
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state(0))


def test_damaged_latest_is_set_aside(tmp_path, caplog):
  mgr = checkpoint.manager(tmp_path, None)
  for step in (1, 2, 3):
    checkpoint.save(mgr, step, state(step), {"step": step})
  truncate(tmp_path / "checkpoints" / "3")
  truncate(tmp_path / "checkpoints" / "2")
  step, restored, side = checkpoint.restore_latest_good(mgr, abstract())
  assert step == 1 and side == {"step": 1} and float(restored["params"]["w"][0, 0]) == 1.0
  assert mgr.all_steps() == [1] and mgr.latest_step() == 1
  names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  assert "3.damaged-1" in names and "2.damaged-1" in names
  warnings = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
  assert len(warnings) == 1 and "[3, 2]" in warnings[0]
  checkpoint.save(mgr, 3, state(3), {"step": 3})  # the run goes on and writes step 3 afresh
  truncate(tmp_path / "checkpoints" / "3")
  checkpoint.restore_latest_good(mgr, abstract())
  assert "3.damaged-2" in {p.name for p in (tmp_path / "checkpoints").iterdir()}


def test_none_restorable_stops_naming_them(tmp_path):
  mgr = checkpoint.manager(tmp_path, None)
  checkpoint.save(mgr, 5, state(5), {"step": 5})
  truncate(tmp_path / "checkpoints" / "5")
  with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint in .* can be restored: step 5: "):
    checkpoint.restore_latest_good(mgr, abstract())
  assert (tmp_path / "checkpoints" / "5").is_dir()  # not renamed: it may be a config change, not damage
  assert checkpoint.restore_latest_good(checkpoint.manager(tmp_path / "empty", None), abstract()) is None
