"""Orbax checkpoints of the train state plus the JSON side state (data iterators) in WORKDIR/checkpoints.

The train state (trainable params, optimizer state, step) is restored into the shardings of the running job, so
a checkpoint written on one mesh restores onto another. Multi-host: every process calls save/restore; Orbax
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
  saved = mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 side=ocp.args.JsonSave(side_state)), force=force, metrics=metrics)
  mgr.wait_until_finished()
  if saved:
    logging.info("saved checkpoint at step %d", step)
  return saved


def abstract_like(state: dict, shardings) -> dict:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def restore(mgr: ocp.CheckpointManager, step: int | None, abstract_state: dict) -> tuple[int, dict, dict]:
  """Restores `step` (latest when None) into abstract_state's shapes, dtypes and shardings."""
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{mgr.directory}: no checkpoint")
  restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                       side=ocp.args.JsonRestore()))
  return step, restored.state, restored.side

