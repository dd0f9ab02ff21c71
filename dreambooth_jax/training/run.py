"""The run: config -> model -> compiled steps (memory checked) -> class images -> data -> steps -> checkpoints ->
export. Resumes from the latest checkpoint in WORKDIR/checkpoints; SIGTERM checkpoints and exits 143.

One train step is compiled ahead of time per shape in use (the square resolution, or each aspect-ratio bucket the
instance images fall into), all before step 1, each logged and written to metrics.jsonl as
{"event": "compile", "what": "train_step", "bucket": [H, W], "seconds": s}; nothing compiles during training.
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

from dreambooth_jax import config_files, distributed, sharding, xla_cache
from dreambooth_jax.data import batches, buckets as buckets_lib, class_images, concepts as concepts_lib
from dreambooth_jax.families import Pipeline
from dreambooth_jax.io import export
from dreambooth_jax.sampling import sampler
from dreambooth_jax.training import (checkpoint, in_training_eval, metrics as metrics_lib, optim, plan as plan_lib,
                                     run_state, step as step_lib, val_loss as val_loss_lib)


def write_config(config, workdir: pathlib.Path):
  saved = workdir / "config.json"
  resolved = json.loads(config.to_json_best_effort())
  if saved.is_file():  # settings added since it was written compare as their defaults
    previous = json.loads(run_state.with_defaults(json.loads(saved.read_text()), saved).to_json_best_effort())
    changed = {k: (previous.get(k), v) for k, v in resolved.items() if previous.get(k) != v}
    if changed:
      logging.warning("config differs from the one this workdir was started with: %s", changed)
  if jax.process_index() == 0:
    saved.write_text(json.dumps(resolved, indent=2, sort_keys=True))


def validation_size(config, data: batches.TrainData) -> tuple[int, int]:
  """Validation images are drawn at the bucket holding the most instance images (the square resolution unbucketed;
  the larger bucket on a tie)."""
  if not data.bucketed:
    return (config.resolution, config.resolution)
  return max(data.buckets, key=lambda b: (data.sets["instance"].buckets.count(b), b[0] * b[1], b))


def validation_images(pipe, graphdefs, params, frozen, config, mesh, size, prompt=None) -> np.ndarray:
  """num_validation_images of `prompt` (default: the top-level validation_prompt)."""
  view = run_state.trained_view(pipe, graphdefs, params, frozen)
  prompts = [prompt or config.validation_prompt] * config.num_validation_images
  return in_training_eval.sample(view, prompts, config, mesh, size=size)


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
  step_fn: object  # compiled train step (of the largest bucket)
  step_fns: dict  # {(H, W): compiled train step} for every shape in use
  compile_records: list  # the metrics.jsonl compile events
  rng: jax.Array
  mgr: object
  flops_per_step: float | None


@dataclasses.dataclass
class CompiledStep:
  fn: object  # the ahead-of-time compiled train_step(state, batch, rng, frozen) of the largest bucket
  fns: dict  # {(H, W): compiled step} per bucket
  seconds: dict  # {(H, W): compile seconds}
  tx: object
  state_shardings: dict
  frozen_shardings: dict
  abstract_state: dict
  memory: plan_lib.MemoryPlan
  flops: float | None
  compile_seconds: float  # all buckets together

  def records(self) -> list[dict]:
    return [{"event": "compile", "what": "train_step", "bucket": list(b), "seconds": s}
            for b, s in self.seconds.items()]


def compile_step(config, pipe, graphdefs, params, frozen, mesh, buckets=None) -> CompiledStep:
  """Shards by the logical rules, compiles the step ahead of time (state donated) for each (H, W) in `buckets`
  (default: the square resolution) and plans the memory of the largest. Works on concrete or abstract
  (ShapeDtypeStruct) params alike."""
  buckets = [tuple(b) for b in (buckets or [(config.resolution, config.resolution)])]
  tx, lr_schedules = optim.make_optimizer(config, tuple(params), denoiser=pipe.family.DENOISER)
  abstract_state = jax.eval_shape(lambda p: step_lib.init_train_state(p, tx, config.use_ema), params)
  state_shardings = sharding.tree_shardings(abstract_state, mesh)
  frozen_shardings = sharding.tree_shardings(frozen, mesh)
  accumulation = step_lib.accumulation_for(config.accumulation_loop, mesh.devices.flat[0].platform)
  step_fn = step_lib.make_train_step(pipe.family, graphdefs, tx, lr_schedules, step_lib.loss_settings(config),
                                     step_lib.ema_settings(config), accumulation)
  state_in = checkpoint.abstract_like(abstract_state, state_shardings)
  frozen_in = checkpoint.abstract_like(frozen, frozen_shardings)
  fns, seconds = {}, {}
  for bucket in buckets:
    batch = batches.batch_spec(config, pipe, mesh, bucket)
    t0 = time.perf_counter()
    lowered = jax.jit(step_fn, in_shardings=(state_shardings, jax.tree.map(lambda b: b.sharding, batch), None,
                                             frozen_shardings),
                      out_shardings=(state_shardings, None), donate_argnums=0).lower(
                          state_in, batch, jax.random.key(config.seed), frozen_in)
    traced = time.perf_counter() - t0
    fns[bucket] = lowered.compile()  # from the persistent cache when it holds this step
    seconds[bucket] = time.perf_counter() - t0
    logging.info("train step %s compiled in %.1fs (%.1fs tracing, %.1fs XLA)", buckets_lib.name(bucket),
                 seconds[bucket], traced, seconds[bucket] - traced)
  biggest = buckets_lib.largest(buckets)
  compiled = fns[biggest]
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = plan_lib.memory_plan(config, compiled, mesh, state_in, state_shardings, frozen_in, frozen_shardings,
                                batches.batch_spec(config, pipe, mesh, biggest))
  return CompiledStep(fn=compiled, fns=fns, seconds=seconds, tx=tx, state_shardings=state_shardings,
                      frozen_shardings=frozen_shardings, abstract_state=abstract_state, memory=memory,
                      flops=(cost or {}).get("flops"), compile_seconds=sum(seconds.values()))


def dry_run(config, mesh=None) -> CompiledStep:
  """Compiles the step on an abstract model (no weights, no class images) and reports its memory. With buckets,
  the largest bucket of the whole set is planned (no image is read)."""
  config_files.check_known(config)
  run_state.resolve_defaults(config)
  buckets_lib.check_settings(config)
  xla_cache.enable(config)
  mesh = mesh or make_mesh(config)
  pipe = plan_lib.abstract_model(config, dtype=run_state.compute_dtype(config),
                                 param_dtype=run_state.param_dtype(config),
                                 unet_kwargs=run_state.denoiser_kwargs(config))
  buckets_lib.check_settings(config, pipe.size_multiple())
  choices = buckets_lib.choices(config)
  bucket = buckets_lib.largest(choices) if choices else None
  step = compile_step(config, pipe, *run_state.trainable_state(pipe, config), mesh,
                      buckets=[bucket] if bucket else None)
  if bucket:
    print(f"planned at the largest bucket {buckets_lib.name(bucket)} (HxW) of {len(choices)}")
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


def setup(config, workdir: pathlib.Path, mesh=None, concepts: list[concepts_lib.Concept] | None = None) -> Job:
  """Model, compiled step (refused if it cannot fit), class images, data, sharded state (restored if a
  checkpoint exists). concepts: config.concepts as the caller resolved them (concepts.resolve), else resolved
  here."""
  in_training_eval.check_config(config)
  mesh = mesh or make_mesh(config)
  logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.devices.size, jax.process_count())
  buckets_lib.check_settings(config)
  # read before the model loads (bad data is refused first); their buckets are the shapes to compile
  concepts = concepts_lib.resolve(config) if concepts is None else concepts
  instance = batches.load_instance_images(config, concepts)
  pipe = run_state.load_model(config)
  buckets_lib.check_settings(config, pipe.size_multiple())
  graphdefs, params, frozen = run_state.trainable_state(pipe, config)
  step = compile_step(config, pipe, graphdefs, params, frozen, mesh, batches.used_buckets(config, instance))
  plan_lib.check_fits(step.memory, config)  # before any class image is generated or step is run
  if batches.uses_class_images(config):
    class_dir = pathlib.Path(config.class_data_dir or workdir / "class_images")
    settings = sampler.SamplerSettings(steps=config.class_generation_steps, guidance=config.class_guidance,
                                       height=config.resolution, width=config.resolution,
                                       scheduler=config.sample_scheduler, karras=config.sample_karras,
                                       loop=config.sample_loop or None)
    if concepts:  # each concept's folder (WORKDIR/class_images/<name> by default), cached and resumable the same way
      for folder, prompt, count, users in concepts_lib.class_sets(config, concepts, workdir):
        if instance.buckets:  # per bucket its users' instance images are in
          users_buckets = [b for b, c in zip(instance.buckets, instance.concepts) if c in users]
          class_images.ensure_bucketed_class_images(
              pipe, folder, prompt, count, instance_buckets=users_buckets, seed=config.seed, settings=settings,
              batch_size=config.sample_batch_size, mesh=mesh)
        else:
          class_images.ensure_class_images(pipe, folder, prompt, count, seed=config.seed, settings=settings,
                                           batch_size=config.sample_batch_size, mesh=mesh)
    elif instance.buckets:
      class_images.ensure_bucketed_class_images(
          pipe, class_dir, config.class_prompt, config.num_class_images, instance_buckets=instance.buckets,
          seed=config.seed, settings=settings, batch_size=config.sample_batch_size, mesh=mesh)
    else:
      class_images.ensure_class_images(pipe, class_dir, config.class_prompt, config.num_class_images,
                                       seed=config.seed, settings=settings, batch_size=config.sample_batch_size,
                                       mesh=mesh)
  data = batches.TrainData(config, pipe, mesh, workdir, instance=instance, concepts=concepts)
  if batches.caches_text(config) and run_state.lora_settings(config):
    # the step reads cached embeddings, and the LoRA export writes factors only: keep the text encoders' outputs
    # for the prompts sampled later and free them (Flux's T5-XXL: 4.7B parameters). A full fine-tune's export
    # writes the whole pipeline, text encoders included, so it keeps them.
    pipe = sampler.free_text_encoders(pipe, in_training_eval.sampling_prompts(config))
  frozen = jax.device_put(frozen, step.frozen_shardings)

  mgr = checkpoint.manager(workdir, config.checkpoints_total_limit,
                           best_metric=config.eval_metric if config.get("eval_steps") else None)
  resumed = checkpoint.restore_latest_good(mgr, checkpoint.abstract_like(step.abstract_state, step.state_shardings))
  if resumed is not None:
    restored, state, side = resumed
    data.set_state(side["data"])
    logging.info("resumed from step %d", restored)
  else:
    state = jax.jit(lambda p: step_lib.init_train_state(p, step.tx, config.use_ema),
                    out_shardings=step.state_shardings)(params)
  del params
  # the trained copy lives in `state` (and, for LoRA, its base in `frozen`): free the original
  pipe.modules[pipe.family.DENOISER] = None
  return Job(pipe=pipe, mesh=mesh, data=data, graphdefs=graphdefs, state=state, state_shardings=step.state_shardings,
             frozen=frozen, step_fn=step.fn, step_fns=step.fns, compile_records=step.records(),
             rng=jax.random.key(config.seed), mgr=mgr, flops_per_step=step.flops)


def train(config, workdir: pathlib.Path) -> Job:
  """Runs (or resumes) the job; returns it with its final (device) state."""
  config_files.check_known(config)  # before any work
  distributed.initialize()
  workdir.mkdir(parents=True, exist_ok=True)
  run_state.resolve_defaults(config)
  buckets_lib.check_settings(config)  # refused by name before anything is written
  concepts = concepts_lib.resolve(config)
  concepts_lib.check_folders(concepts)
  xla_cache.enable(config)
  write_config(config, workdir)
  primary = jax.process_index() == 0
  job = setup(config, workdir, concepts=concepts)
  pipe, mesh, data, graphdefs, state, mgr = job.pipe, job.mesh, job.data, job.graphdefs, job.state, job.mgr
  flops = job.flops_per_step
  start = int(jax.device_get(state["step"]))
  writer = metrics_lib.MetricsWriter(workdir, total_steps=config.max_train_steps, initial_step=start,
                                     enabled=primary)
  for record in job.compile_records:
    writer.event(record)
  preemption = Preemption(mgr)
  evaluator = None
  if config.get("eval_steps"):
    evaluator = in_training_eval.Evaluator(config, workdir, data.sets["instance"].references(), primary=primary)
  val_loss = None
  if config.validation_loss and config.validation_steps:
    val_loss = val_loss_lib.ValidationLoss(config, data, pipe.family, graphdefs, step_lib.loss_settings(config),
                                           mesh)
  pending = None  # (step, device metrics, dispatch time, bucket) of the last dispatched step, read one step late
  images_per_step = data.global_batch_size * config.gradient_accumulation_steps

  def flush(pending):
    step_done, device_metrics, dispatched, bucket = pending
    values = dict(device_metrics)
    values["step_time"] = time.perf_counter() - dispatched
    values["images_per_s"] = images_per_step / max(values["step_time"], 1e-9)
    if flops:
      values["flops_per_step"] = flops
    values = writer.write(step_done, metrics_lib.concept_losses(values, data.concept_names), bucket=bucket)
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
      state, step_metrics = job.step_fns[data.bucket](state, batch, job.rng, job.frozen)
      if pending is not None:
        flush(pending)
      done = step + 1
      pending = (done, step_metrics, dispatched, data.bucket)
      evaluate_now = evaluator is not None and done % config.eval_steps == 0
      preempted = preemption.requested(done)
      must_save = (done % config.checkpointing_steps == 0 or done == config.max_train_steps or preempted
                   or evaluate_now)
      if must_save:
        flush(pending)  # never checkpoint a state whose loss was not finite
        pending = None
        eval_metrics = None
        if evaluate_now:  # the evaluated step is checkpointed with its metrics (Orbax keeps the best)
          eval_metrics = evaluator(run_state.trained_view(pipe, graphdefs, run_state.used_params(state), job.frozen),
                                   done, mesh)
          for name, value in eval_metrics.items():
            writer.scalar(f"eval/{name}", value, done)
        checkpoint.save(mgr, done, state, {"data": data_state, "step": done}, metrics=eval_metrics)
      validate = config.validation_steps and done % config.validation_steps == 0
      if validate and val_loss is not None:
        if pending is not None:  # the step's record first
          flush(pending)
          pending = None
        writer.record(done, val_loss(run_state.used_params(state), job.frozen))
      # the top-level prompt's grid step_NNNNNN.png, and one step_NNNNNN_<name>.png per concept with its own
      grids = {"": config.validation_prompt} | {f"_{c.name}": c.validation_prompt for c in concepts}
      for suffix, prompt in grids.items():
        if not (validate and prompt):
          continue
        grid = metrics_lib.image_grid(validation_images(pipe, graphdefs, run_state.used_params(state), job.frozen,
                                                        config, mesh, validation_size(config, data), prompt))
        if primary:
          (workdir / "validation").mkdir(exist_ok=True)
          from PIL import Image  # noqa: PLC0415
          Image.fromarray(grid).save(workdir / "validation" / f"step_{done:06d}{suffix}.png")
          writer.image("validation" + suffix.replace("_", "/", 1), grid, done)
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
    params = sharding.to_host(run_state.used_params(state))
    bases = sharding.to_host({k: v for k, v in job.frozen.items() if k.endswith("_base")})
    if primary:
      view = run_state.trained_view(pipe, graphdefs, params, bases)
      if run_state.lora_settings(config):
        export.export_lora(view, config, workdir / "export" / "pytorch_lora_weights.safetensors", "lora_diffusers")
      else:
        export.export_diffusers(view, workdir / "export", dtype=config.export_dtype or None)
  return dataclasses.replace(job, state=state)


