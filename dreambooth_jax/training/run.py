"""The run: config -> model -> compiled step (memory checked) -> class images -> data -> steps -> checkpoints ->
export. Resumes from the latest checkpoint in WORKDIR/checkpoints; SIGTERM checkpoints and exits 143.
"""

import dataclasses
import json
import pathlib
import signal
import sys
import time

import jax
import numpy as np
from absl import logging

from dreambooth_jax import distributed, sharding
from dreambooth_jax.data import batches, class_images
from dreambooth_jax.families import Pipeline
from dreambooth_jax.io import export
from dreambooth_jax.sampling import sampler
from dreambooth_jax.training import (checkpoint, in_training_eval, metrics as metrics_lib, optim, plan as plan_lib,
                                     run_state, step as step_lib)


def write_config(config, workdir: pathlib.Path):
  saved = workdir / "config.json"
  resolved = json.loads(config.to_json_best_effort())
  if saved.is_file():
    previous = json.loads(saved.read_text())
    changed = {k: (previous.get(k), v) for k, v in resolved.items() if previous.get(k) != v}
    if changed:
      logging.warning("config differs from the one this workdir was started with: %s", changed)
  if jax.process_index() == 0:
    saved.write_text(json.dumps(resolved, indent=2, sort_keys=True))


def validation_images(pipe, graphdefs, params, frozen, config, mesh) -> np.ndarray:
  view = run_state.trained_view(pipe, graphdefs, params, frozen)
  return in_training_eval.sample(view, [config.validation_prompt] * config.num_validation_images, config, mesh)


class Preemption:
  """SIGTERM (preemption) asks the loop to checkpoint and exit at the next step boundary.

  One process: our SIGTERM handler. Several: every process must agree on the step, or the checkpoint's
  collectives would hang, so the decision is jax's preemption sync point (through Orbax), which the distributed
  runtime's preemption notifier feeds."""

  def __init__(self, mgr):
    self.mgr, self.signalled = mgr, False
    if jax.process_count() == 1:
      signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: checkpointing at the end of this step, then exiting")
    self.signalled = True

  def requested(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.signalled
    return bool(self.mgr.reached_preemption(step))


@dataclasses.dataclass
class Job:
  """Everything a run needs between set-up and the loop."""

  pipe: Pipeline
  mesh: jax.sharding.Mesh
  data: batches.TrainData
  graphdefs: dict
  state: dict  # restored or freshly initialised, sharded
  state_shardings: dict
  frozen: dict
  step_fn: object  # compiled train step
  rng: jax.Array
  mgr: object
  flops_per_step: float | None


@dataclasses.dataclass
class CompiledStep:
  fn: object  # the ahead-of-time compiled train_step(state, batch, rng, frozen)
  tx: object
  state_shardings: dict
  frozen_shardings: dict
  abstract_state: dict
  memory: plan_lib.MemoryPlan
  flops: float | None
  compile_seconds: float


def flow_matching_settings(config) -> dict:
  """The flow-matching (Flux) loss keys of the config, by LossSettings' names."""
  keys = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "guidance_scale")
  return {k: config[k] for k in keys if k in config}


def compile_step(config, pipe, graphdefs, params, frozen, mesh) -> CompiledStep:
  """Shards by the logical rules, compiles the step ahead of time (state donated) and plans its memory. Works on
  concrete or abstract (ShapeDtypeStruct) params alike."""
  tx, lr_schedules = optim.make_optimizer(config, tuple(params), denoiser=pipe.family.DENOISER)
  abstract_state = jax.eval_shape(lambda p: step_lib.init_train_state(p, tx), params)
  state_shardings = sharding.tree_shardings(abstract_state, mesh)
  frozen_shardings = sharding.tree_shardings(frozen, mesh)
  settings = step_lib.LossSettings(
      prior_loss_weight=config.prior_loss_weight if config.with_prior_preservation else 0.0,
      snr_gamma=config.snr_gamma, snr_weighting=config.get("snr_weighting", "min_snr"),
      offset_noise=config.offset_noise, **flow_matching_settings(config))
  step_fn = step_lib.make_train_step(pipe.family, graphdefs, tx, lr_schedules, settings)
  batch = batches.batch_spec(config, pipe, mesh)
  state_in = checkpoint.abstract_like(abstract_state, state_shardings)
  frozen_in = checkpoint.abstract_like(frozen, frozen_shardings)
  t0 = time.perf_counter()
  compiled = jax.jit(step_fn, in_shardings=(state_shardings, jax.tree.map(lambda b: b.sharding, batch), None,
                                            frozen_shardings),
                     out_shardings=(state_shardings, None), donate_argnums=0).lower(
                         state_in, batch, jax.random.key(config.seed), frozen_in).compile()
  seconds = time.perf_counter() - t0
  logging.info("train step compiled in %.1fs", seconds)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = plan_lib.memory_plan(config, compiled, mesh, state_in, state_shardings, frozen_in, frozen_shardings, batch)
  return CompiledStep(fn=compiled, tx=tx, state_shardings=state_shardings, frozen_shardings=frozen_shardings,
                      abstract_state=abstract_state, memory=memory, flops=(cost or {}).get("flops"),
                      compile_seconds=seconds)


def dry_run(config, mesh=None) -> CompiledStep:
  """Compiles the step on an abstract model (no weights, no class images) and reports its memory."""
  run_state.resolve_defaults(config)
  mesh = mesh or make_mesh(config)
  pipe = plan_lib.abstract_model(config, dtype=run_state.compute_dtype(config),
                                 param_dtype=run_state.param_dtype(config),
                                 unet_kwargs=run_state.denoiser_kwargs(config))
  step = compile_step(config, pipe, *run_state.trainable_state(pipe, config), mesh)
  print(step.memory.table())
  if jax.default_backend() == "cpu":
    print("note: planned with XLA's CPU compiler; GPU/TPU temporaries differ (flash attention, their own "
          "rematerialisation): plan on the target device for its figures")
  print(f"compile time {step.compile_seconds:.1f}s; {(step.flops or 0) / 1e12:.3f} TFLOP per step")
  return step


def make_mesh(config) -> jax.sharding.Mesh:
  """The config's mesh, fitted to the global batch (sharding.mesh_for_batch); refusals name train_batch_size."""
  return sharding.mesh_for_batch(config.mesh_data, config.mesh_fsdp, batches.global_batch_size(config),
                                 batch_name=batches.describe_batch(config))


def setup(config, workdir: pathlib.Path, mesh=None) -> Job:
  """Model, compiled step (refused if it cannot fit), class images, data, sharded state (restored if a
  checkpoint exists)."""
  in_training_eval.check_config(config)
  mesh = mesh or make_mesh(config)
  logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.devices.size, jax.process_count())
  pipe = run_state.load_model(config)
  graphdefs, params, frozen = run_state.trainable_state(pipe, config)
  step = compile_step(config, pipe, graphdefs, params, frozen, mesh)
  plan_lib.check_fits(step.memory, config)  # before any class image is generated or step is run
  if config.with_prior_preservation:
    class_dir = pathlib.Path(config.class_data_dir or workdir / "class_images")
    class_images.ensure_class_images(
        pipe, class_dir, config.class_prompt, config.num_class_images, seed=config.seed,
        settings=sampler.SamplerSettings(steps=config.class_generation_steps, guidance=config.class_guidance,
                                          height=config.resolution, width=config.resolution,
                                          scheduler=config.sample_scheduler, karras=config.sample_karras),
        batch_size=config.sample_batch_size, mesh=mesh)
  data = batches.TrainData(config, pipe, mesh, workdir)
  frozen = jax.device_put(frozen, step.frozen_shardings)

  mgr = checkpoint.manager(workdir, config.checkpoints_total_limit,
                           best_metric=config.eval_metric if config.get("eval_steps") else None)
  resumed = checkpoint.restore_latest_good(mgr, checkpoint.abstract_like(step.abstract_state, step.state_shardings))
  if resumed is not None:
    restored, state, side = resumed
    data.set_state(side["data"])
    logging.info("resumed from step %d", restored)
  else:
    state = jax.jit(lambda p: step_lib.init_train_state(p, step.tx), out_shardings=step.state_shardings)(params)
  del params
  pipe.modules[pipe.family.DENOISER] = None  # the trained copy lives in `state` (and, for LoRA, its base in `frozen`); free the original
  return Job(pipe=pipe, mesh=mesh, data=data, graphdefs=graphdefs, state=state, state_shardings=step.state_shardings,
             frozen=frozen, step_fn=step.fn, rng=jax.random.key(config.seed), mgr=mgr, flops_per_step=step.flops)


def train(config, workdir: pathlib.Path) -> Job:
  """Runs (or resumes) the job; returns it with its final (device) state."""
  distributed.initialize()
  workdir.mkdir(parents=True, exist_ok=True)
  run_state.resolve_defaults(config)
  write_config(config, workdir)
  primary = jax.process_index() == 0
  job = setup(config, workdir)
  pipe, mesh, data, graphdefs, state, mgr = job.pipe, job.mesh, job.data, job.graphdefs, job.state, job.mgr
  flops = job.flops_per_step
  start = int(jax.device_get(state["step"]))
  writer = metrics_lib.MetricsWriter(workdir, total_steps=config.max_train_steps, initial_step=start,
                                     enabled=primary)
  preemption = Preemption(mgr)
  evaluator = None
  if config.get("eval_steps"):
    evaluator = in_training_eval.Evaluator(config, workdir, data.sets["instance"].paths, primary=primary)
  pending = None  # (step, device metrics, dispatch time) of the last dispatched step, read one step late
  images_per_step = data.global_batch_size * config.gradient_accumulation_steps

  def flush(pending):
    step_done, device_metrics, dispatched = pending
    values = dict(device_metrics)
    values["step_time"] = time.perf_counter() - dispatched
    values["images_per_s"] = images_per_step / max(values["step_time"], 1e-9)
    if flops:
      values["flops_per_step"] = flops
    values = writer.write(step_done, values)
    if not np.isfinite(values["loss"]):
      raise metrics_lib.NonFiniteLoss(
          f"non-finite loss ({values['loss']}) at step {step_done}; stopping. The last good checkpoint is step "
          f"{mgr.latest_step()} in {mgr.directory}; lower learning_rate, set max_grad_norm, or use "
          "mixed_precision='no', then run the same command again to resume from it")

  try:
    for step in range(start, config.max_train_steps):
      batch = data.next_batch()
      data_state = data.get_state()  # the iterators as they are after this step's batch
      dispatched = time.perf_counter()
      state, step_metrics = job.step_fn(state, batch, job.rng, job.frozen)
      if pending is not None:
        flush(pending)
      done = step + 1
      pending = (done, step_metrics, dispatched)
      evaluate_now = evaluator is not None and done % config.eval_steps == 0
      preempted = preemption.requested(done)
      must_save = (done % config.checkpointing_steps == 0 or done == config.max_train_steps or preempted
                   or evaluate_now)
      if must_save:
        flush(pending)  # never checkpoint a state whose loss was not finite
        pending = None
        eval_metrics = None
        if evaluate_now:  # the evaluated step is checkpointed with its metrics (Orbax keeps the best)
          eval_metrics = evaluator(run_state.trained_view(pipe, graphdefs, state["params"], job.frozen), done, mesh)
          for name, value in eval_metrics.items():
            writer.scalar(f"eval/{name}", value, done)
        checkpoint.save(mgr, done, state, {"data": data_state, "step": done}, metrics=eval_metrics)
      if config.validation_steps and config.validation_prompt and done % config.validation_steps == 0:
        grid = metrics_lib.image_grid(validation_images(pipe, graphdefs, state["params"], job.frozen, config, mesh))
        if primary:
          (workdir / "validation").mkdir(exist_ok=True)
          from PIL import Image  # noqa: PLC0415
          Image.fromarray(grid).save(workdir / "validation" / f"step_{done:06d}.png")
          writer.image("validation", grid, done)
      if preempted:
        logging.warning("preempted: checkpoint at step %d saved, exiting", done)
        writer.close()
        sys.exit(143)
    if pending is not None:
      flush(pending)
  finally:
    writer.close()

  if mgr.latest_step() != config.max_train_steps:
    checkpoint.save(mgr, config.max_train_steps, state, {"data": data.get_state(), "step": config.max_train_steps})
  if config.export_at_end:
    # Collectives on multi-host: every process gathers, process 0 writes.
    params = sharding.to_host(state["params"])
    bases = sharding.to_host({k: v for k, v in job.frozen.items() if k.endswith("_base")})
    if primary:
      view = run_state.trained_view(pipe, graphdefs, params, bases)
      if run_state.lora_settings(config):
        export.export_lora(view, config, workdir / "export" / "pytorch_lora_weights.safetensors", "lora_diffusers")
      else:
        export.export_diffusers(view, workdir / "export", dtype=config.export_dtype or None)
  return dataclasses.replace(job, state=state)


