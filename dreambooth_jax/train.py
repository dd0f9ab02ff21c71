"""DreamBooth fine-tuning: config -> model -> class images -> data -> jitted steps -> checkpoints -> export.

  python -m dreambooth_jax.train --config=configs/dog.py [--config.learning_rate=2e-6] [--workdir=runs/dog]

Re-running the same command resumes from the latest checkpoint in WORKDIR/checkpoints.
"""

import dataclasses
import json
import logging as std_logging
import pathlib
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from dreambooth_jax import distributed, sharding
from dreambooth_jax.training import checkpoint
from dreambooth_jax.models import lora as lora_lib
from dreambooth_jax.training import metrics as metrics_lib
from dreambooth_jax.training import optim
from dreambooth_jax.data import class_images as prior
from dreambooth_jax.sampling import sampler as sampling
from dreambooth_jax.training import plan as plan_lib
from dreambooth_jax.data import batches as train_data
from dreambooth_jax.training import in_training_eval as train_eval
from dreambooth_jax.training import step as train_step_lib
from dreambooth_jax.io import diffusers_folder as weights



def compute_dtype(config):
  if config.mixed_precision not in ("no", "bf16"):
    raise ValueError(f"mixed_precision={config.mixed_precision!r} is not supported: use 'bf16' (bf16 compute with "
                     "fp32 master params; no loss scaling needed) or 'no' (fp32)")
  return jnp.bfloat16 if config.mixed_precision == "bf16" else jnp.float32


def param_dtype(config):
  name = config.get("param_dtype", "float32")
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"param_dtype={name!r}: use 'float32' (fp32 master params) or 'bfloat16' (half the memory "
                     "for params, gradients and optimizer state; less precise updates)")
  return jnp.dtype(name)


def unet_kwargs(config) -> dict:
  return {"remat": config.remat, "attention_impl": config.get("attention", "auto")}


def load_model(config):
  path = config.pretrained_model_name_or_path
  if config.random_init and path == "tiny":
    path = weights.TINY_MODEL
  return weights.load_or_init_pipeline(
      path, random_init=config.random_init, seed=config.seed, dtype=compute_dtype(config),
      param_dtype=param_dtype(config),
      variant=config.variant or None, unet_kwargs=unet_kwargs(config),
      single_file_config=config.get("single_file_config", "auto"))


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


def lora_settings(config) -> lora_lib.LoRASettings | None:
  """config.lora as LoRASettings, or None when LoRA is off."""
  if not config.get("lora") or not config.lora.get("enabled"):
    return None
  if config.train_text_encoder:
    raise ValueError("train_text_encoder=True with lora.enabled=True: the text encoder would be fully trained; set "
                     "lora.text_encoder=True instead to train LoRA factors on it")
  return lora_lib.settings_from_config(config.lora)


def trainable_modules(sd, config) -> dict:
  """The modules being trained; with config.lora they are LoRA-wrapped in place (factors initialised from seed)."""
  settings = lora_settings(config)
  modules = {"unet": sd.unet}
  if train_data.trains_text_encoder(config):
    modules["text_encoder"] = sd.text_encoder
  if settings:
    for i, (name, module) in enumerate(modules.items()):
      paths = lora_lib.apply_lora(module, settings, rngs=nnx.Rngs(config.seed + 1 + i), component=name)
      logging.info("LoRA rank %d on %d %s layers", settings.rank, len(paths), name)
  return modules


def trained_view(sd, graphdefs, params, frozen) -> weights.StableDiffusion:
  """sd with the components being trained rebuilt from `params` (LoRA factors merged with their base)."""
  modules = train_step_lib.merge_modules({n: graphdefs[n] for n in params}, params, frozen)
  return dataclasses.replace(sd, **modules)


def validation_images(sd, graphdefs, params, frozen, config, mesh) -> np.ndarray:
  view = trained_view(sd, graphdefs, params, frozen)
  return train_eval.sample(view, [config.validation_prompt] * config.num_validation_images, config, mesh)


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

  sd: weights.StableDiffusion
  mesh: jax.sharding.Mesh
  data: train_data.TrainData
  graphdefs: dict
  state: dict  # restored or freshly initialised, sharded
  state_shardings: dict
  frozen: dict
  step_fn: object  # compiled train step
  rng: jax.Array
  mgr: object
  flops_per_step: float | None


def trainable_state(sd, config) -> tuple[dict, dict, dict]:
  """(graphdefs, trainable params, frozen params) as pure dicts. With LoRA only the factors are trained (and in
  the optimizer state and checkpoints); the base weights join the frozen ones."""
  params, frozen = {}, {"vae": train_step_lib.pure_params(sd.vae), "schedule": sd.schedule}
  for name, module in trainable_modules(sd, config).items():
    params[name], base = train_step_lib.split_trainable(module)
    if base is not None:
      frozen[f"{name}_base"] = base
  if "text_encoder" not in params and not train_data.caches_text(config):
    frozen["text_encoder"] = train_step_lib.pure_params(sd.text_encoder)
  graphdefs = {name: nnx.split(m)[0] for name, m in
               {"unet": sd.unet, "vae": sd.vae, "text_encoder": sd.text_encoder}.items()}
  return graphdefs, params, frozen


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


def compile_step(config, sd, graphdefs, params, frozen, mesh) -> CompiledStep:
  """Shards by the logical rules, compiles the step ahead of time (state donated) and plans its memory. Works on
  concrete or abstract (ShapeDtypeStruct) params alike."""
  tx, lr_schedules = optim.make_optimizer(config, tuple(params))
  abstract_state = jax.eval_shape(lambda p: train_step_lib.init_train_state(p, tx), params)
  state_shardings = sharding.tree_shardings(abstract_state, mesh)
  frozen_shardings = sharding.tree_shardings(frozen, mesh)
  settings = train_step_lib.LossSettings(
      prior_loss_weight=config.prior_loss_weight if config.with_prior_preservation else 0.0,
      snr_gamma=config.snr_gamma, offset_noise=config.offset_noise,
      vae_scaling_factor=sd.vae.config.scaling_factor, vae_shift_factor=sd.vae.config.shift_factor)
  step_fn = train_step_lib.make_train_step(graphdefs, tx, lr_schedules, settings)
  batch = plan_lib.batch_spec(config, sd, mesh)
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
  mesh = mesh or sharding.make_mesh(data=config.mesh_data, fsdp=config.mesh_fsdp)
  sd = plan_lib.abstract_model(config, dtype=compute_dtype(config), param_dtype=param_dtype(config),
                               unet_kwargs=unet_kwargs(config))
  step = compile_step(config, sd, *trainable_state(sd, config), mesh)
  print(step.memory.table())
  if jax.default_backend() == "cpu":
    print("note: planned with XLA's CPU compiler; GPU/TPU temporaries differ (flash attention, their own "
          "rematerialisation): plan on the target device for its figures")
  print(f"compile time {step.compile_seconds:.1f}s; {(step.flops or 0) / 1e12:.3f} TFLOP per step")
  return step


def setup(config, workdir: pathlib.Path, mesh=None) -> Job:
  """Model, compiled step (refused if it cannot fit), class images, data, sharded state (restored if a
  checkpoint exists)."""
  train_eval.check_config(config)
  mesh = mesh or sharding.make_mesh(data=config.mesh_data, fsdp=config.mesh_fsdp)
  logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.devices.size, jax.process_count())
  sd = load_model(config)
  graphdefs, params, frozen = trainable_state(sd, config)
  step = compile_step(config, sd, graphdefs, params, frozen, mesh)
  plan_lib.check_fits(step.memory, config)  # before any class image is generated or step is run
  if config.with_prior_preservation:
    class_dir = pathlib.Path(config.class_data_dir or workdir / "class_images")
    prior.ensure_class_images(
        sd, class_dir, config.class_prompt, config.num_class_images, seed=config.seed,
        settings=sampling.SamplerSettings(steps=config.class_generation_steps, guidance=config.class_guidance,
                                          height=config.resolution, width=config.resolution,
                                          scheduler=config.get("sample_scheduler", "ddim"),
                                          karras=config.get("sample_karras", False)),
        batch_size=config.sample_batch_size, mesh=mesh)
  data = train_data.TrainData(config, sd, mesh, workdir)
  frozen = jax.device_put(frozen, step.frozen_shardings)

  mgr = checkpoint.manager(workdir, config.checkpoints_total_limit,
                           best_metric=config.eval_metric if config.get("eval_steps") else None)
  if mgr.latest_step() is not None:
    restored, state, side = checkpoint.restore(mgr, None, checkpoint.abstract_like(step.abstract_state,
                                                                                   step.state_shardings))
    data.set_state(side["data"])
    logging.info("resumed from step %d", restored)
  else:
    state = jax.jit(lambda p: train_step_lib.init_train_state(p, step.tx), out_shardings=step.state_shardings)(params)
  del params
  sd.unet = None  # the trained copy lives in `state` (and, for LoRA, its base in `frozen`); free the original
  return Job(sd=sd, mesh=mesh, data=data, graphdefs=graphdefs, state=state, state_shardings=step.state_shardings,
             frozen=frozen, step_fn=step.fn, rng=jax.random.key(config.seed), mgr=mgr, flops_per_step=step.flops)


def train(config, workdir: pathlib.Path) -> Job:
  """Runs (or resumes) the job; returns it with its final (device) state."""
  distributed.initialize()
  workdir.mkdir(parents=True, exist_ok=True)
  write_config(config, workdir)
  primary = jax.process_index() == 0
  job = setup(config, workdir)
  sd, mesh, data, graphdefs, state, mgr = job.sd, job.mesh, job.data, job.graphdefs, job.state, job.mgr
  flops = job.flops_per_step
  start = int(jax.device_get(state["step"]))
  writer = metrics_lib.MetricsWriter(workdir, total_steps=config.max_train_steps, initial_step=start,
                                     enabled=primary)
  preemption = Preemption(mgr)
  evaluator = None
  if config.get("eval_steps"):
    evaluator = train_eval.Evaluator(config, workdir, data.sets["instance"].paths, primary=primary)
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
      raise FloatingPointError(f"non-finite loss ({values['loss']}) at step {step_done}; stopping. The last good "
                               f"checkpoint is step {mgr.latest_step()} in {mgr.directory}")

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
          eval_metrics = evaluator(trained_view(sd, graphdefs, state["params"], job.frozen), done, mesh)
          for name, value in eval_metrics.items():
            writer.scalar(f"eval/{name}", value, done)
        checkpoint.save(mgr, done, state, {"data": data_state, "step": done}, metrics=eval_metrics)
      if config.validation_steps and config.validation_prompt and done % config.validation_steps == 0:
        grid = metrics_lib.image_grid(validation_images(sd, graphdefs, state["params"], job.frozen, config, mesh))
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
      from dreambooth_jax import export  # noqa: PLC0415
      view = trained_view(sd, graphdefs, params, bases)
      if lora_settings(config):
        export.export_lora(view, config, workdir / "export" / "pytorch_lora_weights.safetensors", "lora_diffusers")
      else:
        export.export_diffusers(view, workdir / "export", dtype=config.export_dtype or None)
  return dataclasses.replace(job, state=state)


def quiet_library_logs():
  """Orbax logs every save/restore step at INFO; keep its warnings, drop the rest from the console."""
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname.replace("\\", "/"))


def main(argv):
  del argv
  quiet_library_logs()
  config = flags.FLAGS.config
  if flags.FLAGS.dry_run:
    distributed.initialize()
    step = dry_run(config)
    if not step.memory.fits():
      plan_lib.check_fits(step.memory, config)  # raises with the levers to pull
    return
  workdir = flags.FLAGS.workdir or f"runs/{pathlib.Path(config_flags.get_config_filename(flags.FLAGS['config'])).stem}"
  train(config, pathlib.Path(workdir))


def define_flags():
  config_flags.DEFINE_config_file("config", None, "Python config file (configs/*.py).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run folder (default: runs/<config name>).")
  flags.DEFINE_bool("dry_run", False, "Compile the step on an abstract model, print per-device memory, and exit "
                    "(non-zero when it cannot fit the device).")


if __name__ == "__main__":
  define_flags()
  app.run(main)
