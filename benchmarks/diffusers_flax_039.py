"""diffusers-flax 0.39 (the last diffusers with Flax models) on one model shape: its train step and its sampler,
for benchmarks/matrix.py. Runs ONLY in the venv that matrix.py builds (diffusers 0.39, flax linen); it imports
nothing from dreambooth_jax, reads the shape's config.json files and uses random weights.

  <venv>/bin/python benchmarks/diffusers_flax_039.py --shape=benchmarks/shapes/diffusers-test --what=train

Prints one JSON line. Train: jit(UNet forward + MSE + backward + clip_by_global_norm(1.0) + AdamW), state donated,
1 instance + 1 class example (batch 2), latents of resolution / the VAE's factor, text context (2, 77, cross dim),
fp32. Sampler: FlaxStableDiffusionPipeline._generate's body (fori_loop over FlaxDDIMScheduler steps, CFG as one
batch of 2B, VAE decode), jitted; the text context is random (its CLIP encoder is not built: transformers 5 has no
Flax models and the text encoder runs once per call, a small part of every shape here).
Their Flax UNet fixes GroupNorm at 32 groups (no norm_num_groups): configs with fewer groups run with 32.
SDXL-layout UNets (addition_embed_type "text_time") get added_cond_kwargs as FlaxStableDiffusionXLPipeline passes
them: random pooled text embeddings and the 6 time ids (original size, crop (0, 0), target size).
"""

import argparse
import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import optax
from diffusers import FlaxAutoencoderKL, FlaxDDIMScheduler, FlaxUNet2DConditionModel


def read(folder: pathlib.Path, component: str, name: str = "config.json") -> dict:
  return json.loads((folder / component / name).read_text())


def build(folder: pathlib.Path, seed: int):
  unet = FlaxUNet2DConditionModel.from_config(read(folder, "unet"))
  params = unet.init_weights(jax.random.key(seed))
  return unet, params


def added_conditioning(config, batch: int, resolution: int) -> dict | None:
  """SDXL's text_embeds (batch, pooled dim) and time_ids (batch, 6), as FlaxStableDiffusionXLPipeline's
  _get_add_time_ids; None for SD UNets."""
  if config.addition_embed_type != "text_time":
    return None
  pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
  time_ids = jnp.array([[resolution, resolution, 0, 0, resolution, resolution]] * batch, jnp.float32)
  return {"text_embeds": jax.random.normal(jax.random.key(4), (batch, pooled)), "time_ids": time_ids}


def train(folder: pathlib.Path, resolution: int, steps: int, warmup: int) -> dict:
  unet, params = build(folder, 0)
  config, vae_factor = unet.config, 2 ** (len(read(folder, "vae")["block_out_channels"]) - 1)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-6))
  opt_state = tx.init(params)
  size, batch = resolution // vae_factor, 2  # 1 instance + 1 class example
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  x_BCHW = jax.random.normal(k1, (batch, config.in_channels, size, size))
  ctx_BSD = jax.random.normal(k2, (batch, 77, config.cross_attention_dim))
  t_B = jax.random.randint(k3, (batch,), 0, 1000)
  added = added_conditioning(config, batch, resolution)

  def loss_fn(p):
    out = unet.apply({"params": p}, x_BCHW, t_B, ctx_BSD, added_cond_kwargs=added, train=True).sample
    return jnp.mean((out - x_BCHW) ** 2)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(p, s):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  t0 = time.perf_counter()
  compiled = step.lower(params, opt_state).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  for _ in range(warmup):
    params, opt_state, loss = compiled(params, opt_state)
  jax.block_until_ready(loss)
  t0 = time.perf_counter()
  for _ in range(steps):
    params, opt_state, loss = compiled(params, opt_state)
  jax.block_until_ready(loss)
  step_s = (time.perf_counter() - t0) / steps
  return {"step_time_s": step_s, "images_per_s": batch / step_s, "compile_s": compile_s,
          "gflops_per_step": (cost or {}).get("flops", 0.0) / 1e9}


def sample(folder: pathlib.Path, resolution: int, batch: int, num_steps: int, guidance: float, repeats: int) -> dict:
  unet, unet_params = build(folder, 0)
  vae = FlaxAutoencoderKL.from_config(read(folder, "vae"))
  vae_params = vae.init_weights(jax.random.key(2))
  scheduler = FlaxDDIMScheduler.from_config(read(folder, "scheduler", "scheduler_config.json"))
  scheduler_params = scheduler.create_state()
  vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
  latents_shape = (batch, unet.config.in_channels, resolution // vae_factor, resolution // vae_factor)
  context_BSD = jax.random.normal(jax.random.key(3), (2 * batch, 77, unet.config.cross_attention_dim))
  added = added_conditioning(unet.config, 2 * batch, resolution)

  @jax.jit
  def generate(params, rng):  # FlaxStableDiffusion(XL)Pipeline._generate from the text embeddings on
    guidance_scale = jnp.array([guidance], dtype=jnp.float32)
    latents = jax.random.normal(rng, latents_shape, dtype=jnp.float32)

    def loop_body(step, args):
      latents, scheduler_state = args
      latents_input = jnp.concatenate([latents] * 2)
      t = jnp.array(scheduler_state.timesteps, dtype=jnp.int32)[step]
      timestep = jnp.broadcast_to(t, latents_input.shape[0])
      latents_input = scheduler.scale_model_input(scheduler_state, latents_input, t)
      noise_pred = unet.apply({"params": params["unet"]}, latents_input, timestep,
                              encoder_hidden_states=context_BSD, added_cond_kwargs=added).sample
      uncond, text = jnp.split(noise_pred, 2, axis=0)
      noise_pred = uncond + guidance_scale * (text - uncond)
      return scheduler.step(scheduler_state, noise_pred, t, latents).to_tuple()

    scheduler_state = scheduler.set_timesteps(params["scheduler"], num_inference_steps=num_steps,
                                              shape=latents.shape)
    latents = latents * params["scheduler"].init_noise_sigma
    latents, _ = jax.lax.fori_loop(0, num_steps, loop_body, (latents, scheduler_state))
    image = vae.apply({"params": params["vae"]}, latents / vae.config.scaling_factor, method=vae.decode).sample
    return (image / 2 + 0.5).clip(0, 1).transpose(0, 2, 3, 1)

  params = {"unet": unet_params, "vae": vae_params, "scheduler": scheduler_params}
  t0 = time.perf_counter()
  jax.block_until_ready(generate(params, jax.random.key(0)))
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for r in range(repeats):
    jax.block_until_ready(generate(params, jax.random.key(r + 1)))
  return {"images_per_s": batch * repeats / (time.perf_counter() - t0), "first_call_incl_compile_s": first,
          "vae_decode": True, "text_encoder": False}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--shape", required=True, help="a folder with unet/, vae/ and scheduler/ config files")
  p.add_argument("--what", required=True, choices=["train", "sample"])
  p.add_argument("--resolution", type=int, default=64)
  p.add_argument("--steps", type=int, default=10, help="train: timed steps; sample: denoising steps")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--batch", type=int, default=4, help="sample: images per call")
  p.add_argument("--guidance", type=float, default=7.5)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  folder = pathlib.Path(args.shape)
  if args.what == "train":
    result = train(folder, args.resolution, args.steps, args.warmup)
  else:
    result = sample(folder, args.resolution, args.batch, args.steps, args.guidance, args.repeats)
  import diffusers  # noqa: PLC0415
  print(json.dumps({"impl": "diffusers-flax", "what": args.what, "diffusers": diffusers.__version__,
                    "jax": jax.__version__, "device": str(jax.devices()[0].device_kind), **result}))


if __name__ == "__main__":
  main()
