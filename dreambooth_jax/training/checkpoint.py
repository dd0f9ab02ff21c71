"""Orbax checkpoints in WORKDIR/checkpoints: three items per step,

  params     the trainable params (LoRA: the factors)
  opt_state  {"step", "opt_state"}: the optimizer state and the step counter
  side       JSON: the data iterators' state and the step

restored into the shardings of the running job, so a checkpoint written on one mesh restores onto another. Export
and evaluation restore `params` alone (no optimizer is built). Multi-host: every process calls save/restore; Orbax
coordinates the writes.
"""

import logging
import pathlib

import jax
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
  """state: the train state {"step", "params", "opt_state"}."""
  saved = mgr.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(state["params"]),
      opt_state=ocp.args.StandardSave({"step": state["step"], "opt_state": state["opt_state"]}),
      side=ocp.args.JsonSave(side_state)), force=force, metrics=metrics)
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
  restored = mgr.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_state["params"]),
      opt_state=ocp.args.StandardRestore({"step": abstract_state["step"],
                                          "opt_state": abstract_state["opt_state"]}),
      side=ocp.args.JsonRestore()))
  state = {"step": restored.opt_state["step"], "params": restored.params,
           "opt_state": restored.opt_state["opt_state"]}
  return step, state, restored.side


def restore_params(mgr: ocp.CheckpointManager, step: int | None, abstract_params) -> tuple[int, dict]:
  """(step, trainable params) alone: no optimizer state is read or needs building."""
  step = _step(mgr, step)
  restored = mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
  return step, restored.params
