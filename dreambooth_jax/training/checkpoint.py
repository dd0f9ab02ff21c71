"""Orbax checkpoints in WORKDIR/checkpoints: three items per step (four with use_ema),

  params     the trainable params (LoRA: the factors)
  opt_state  {"step", "opt_state"}: the optimizer state and the step counter
  side       JSON: the data iterators' state and the step
  ema        (use_ema) the moving average of the params, float32

restored into the shardings of the running job, so a checkpoint written on one mesh restores onto another. Export
and evaluation restore `params` alone (no optimizer is built). Multi-host: every process calls save/restore; Orbax
coordinates the writes.

Damaged checkpoints (data files truncated by a partial copy or a full disk): a run resumes from the newest checkpoint
that restores; newer ones that do not are set aside as CHECKPOINTS/<step>.damaged-<n> (renamed, never deleted;
Orbax only lists integer-named folders) and named in one warning. When none restores, nothing is renamed (a changed
config fails the same way for every step, and those checkpoints are not damaged) and the run stops naming them.
"""

import logging
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers


def manager(workdir: pathlib.Path, max_to_keep: int | None, best_metric: str | None = None) -> ocp.CheckpointManager:
  """Keeps the latest max_to_keep checkpoints; with best_metric also the one with the highest value of that metric
  among those saved with metrics (the in-training evaluation's), whatever its age."""
  if best_metric:
    policies = [checkpoint_managers.BestN(get_metric_fn=lambda metrics: metrics[best_metric], reverse=False, n=1,
                                          keep_checkpoints_without_metrics=False)]
    if max_to_keep:
      policies.append(checkpoint_managers.LatestN(max_to_keep))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies) if max_to_keep else None,
        create=True, enable_async_checkpointing=False)
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep or None, create=True,
                                           enable_async_checkpointing=False)
  return ocp.CheckpointManager(pathlib.Path(workdir).absolute() / "checkpoints", options=options)


def save(mgr: ocp.CheckpointManager, step: int, state: dict, side_state: dict, *, force: bool = True,
         metrics: dict | None = None) -> bool:
  """state: the train state {"step", "params", "opt_state", ["ema"]}."""
  items = dict(params=ocp.args.StandardSave(state["params"]),
               opt_state=ocp.args.StandardSave({"step": state["step"], "opt_state": state["opt_state"]}),
               side=ocp.args.JsonSave(side_state))
  if "ema" in state:
    items["ema"] = ocp.args.StandardSave(state["ema"])
  saved = mgr.save(step, args=ocp.args.Composite(**items), force=force, metrics=metrics)
  mgr.wait_until_finished()
  if saved:
    logging.info("saved checkpoint at step %d", step)
  return saved


def abstract_like(state: dict, shardings) -> dict:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def _step(mgr: ocp.CheckpointManager, step: int | None) -> int:
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{mgr.directory}: no checkpoint")
  return step


def restore(mgr: ocp.CheckpointManager, step: int | None, abstract_state: dict) -> tuple[int, dict, dict]:
  """(step, train state, side state) of `step` (latest when None), in abstract_state's shapes, dtypes and
  shardings."""
  step = _step(mgr, step)
  items = dict(params=ocp.args.StandardRestore(abstract_state["params"]),
               opt_state=ocp.args.StandardRestore({"step": abstract_state["step"],
                                                   "opt_state": abstract_state["opt_state"]}),
               side=ocp.args.JsonRestore())
  if "ema" in abstract_state:
    items["ema"] = ocp.args.StandardRestore(abstract_state["ema"])
  restored = mgr.restore(step, args=ocp.args.Composite(**items))
  state = {"step": restored.opt_state["step"], "params": restored.params,
           "opt_state": restored.opt_state["opt_state"]}
  if "ema" in abstract_state:
    state["ema"] = restored.ema
  return step, state, restored.side


def restore_params(mgr: ocp.CheckpointManager, step: int | None, abstract_params, item: str = "params"
                   ) -> tuple[int, dict]:
  """(step, trainable params) alone: no optimizer state is read or needs building. item="ema": their moving
  average (use_ema)."""
  step = _step(mgr, step)
  restored = mgr.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract_params)}))
  return step, restored[item]


class CheckpointError(RuntimeError):
  """No checkpoint in the folder can be restored; the message names each with its error."""


def _everywhere(ok: bool) -> bool:
  """True when `ok` holds on every process: all must agree which checkpoint they resume from, or collectives hang."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # noqa: PLC0415
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def set_aside(mgr: ocp.CheckpointManager, steps: list[int]) -> list[pathlib.Path]:
  """Renames step folders to <step>.damaged-<n> (process 0; the others wait), then reloads the manager so Orbax
  no longer lists them. Returns the new paths."""
  root = pathlib.Path(mgr.directory)
  targets = []
  for step in steps:
    n = 1
    while (root / f"{step}.damaged-{n}").exists():
      n += 1
    targets.append((root / str(step), root / f"{step}.damaged-{n}"))
  if jax.process_index() == 0:
    for source, target in targets:
      source.rename(target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    multihost_utils.sync_global_devices("dreambooth_jax: damaged checkpoints set aside")
  mgr.reload()
  return [target for _, target in targets]


def restore_latest_good(mgr: ocp.CheckpointManager, abstract_state: dict) -> tuple[int, dict, dict] | None:
  """restore() of the newest checkpoint that restores; None when there is none at all. Newer ones that fail are set
  aside (set_aside) and named in one warning; if every one fails, raises CheckpointError naming them."""
  failed = []
  for step in sorted(mgr.all_steps(), reverse=True):
    try:
      result, error = restore(mgr, step, abstract_state), None
    except Exception as e:  # noqa: BLE001 (Orbax and tensorstore raise many types for unreadable data)
      result, error = None, e
    if not _everywhere(error is None):
      failed.append((step, error or "fails on another process"))
      continue
    if failed:
      moved = set_aside(mgr, [s for s, _ in failed])
      logging.warning("checkpoint(s) %s cannot be restored (%s); set aside as %s; resuming from step %d",
                      [s for s, _ in failed], "; ".join(f"{s}: {_short(e)}" for s, e in failed),
                      [str(p) for p in moved], step)
    return result
  if failed:
    raise CheckpointError(
        f"no checkpoint in {mgr.directory} can be restored: "
        + "; ".join(f"step {s}: {_short(e)}" for s, e in failed)
        + " (a changed config cannot restore them; if they are damaged, move them away to start over)")
  return None


def _short(error) -> str:
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: {text[:300]}" if isinstance(error, BaseException) else text
