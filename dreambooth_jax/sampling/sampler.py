"""Jitted batch sampling with classifier-free guidance, VAE decode included, sharded over a mesh; the scheduler
(DDIM, DPM++ 2M, Euler, Euler a) comes from sampling/schedulers.py.

One `lax.fori_loop` over the scheduler's steps; conditional and unconditional halves go through the UNet in one
batched call. The whole generation (text encoding, loop, decode) is one compiled function per shape.
Initial latents come from per-image keys, so image i of seed s is the same whatever the batch it lands in.
"""

import dataclasses
import functools
import logging
import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreambooth_jax import sharding as sharding_lib
from dreambooth_jax.sampling import schedulers
from dreambooth_jax.io.tokenizers import tokenize


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  steps: int = 50
  guidance: float = 7.5
  eta: float = 0.0
  height: int = 512
  width: int = 512
  scheduler: str = "ddim"  # one of schedulers.SCHEDULERS
  karras: bool = False  # Karras sigmas (dpmpp_2m, euler)

  def __post_init__(self):
    schedulers.check_name(self.scheduler, self.karras, self.eta)


def image_keys(seed: int, indices: Sequence[int]) -> jax.Array:
  """One PRNG key per image index: generation is reproducible image by image."""
  base = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.uint32))


def initial_latents(keys_B, latent_shape_HWC) -> jax.Array:
  return jax.vmap(lambda k: jax.random.normal(k, latent_shape_HWC, jnp.float32))(keys_B)


@functools.partial(jax.jit, static_argnames=("graphdefs", "settings", "vae_scale"))
def _generate(graphdefs, states, plan, cond_ids_BT, uncond_ids_BT, latents_BHWC, keys_B, *, settings, vae_scale):
  unet, vae, text_encoder = (nnx.merge(g, s) for g, s in zip(graphdefs, states))
  guided = settings.guidance != 1.0
  ids = jnp.concatenate([uncond_ids_BT, cond_ids_BT]) if guided else cond_ids_BT
  context_BSD, _ = text_encoder(ids)

  def step(i, x_and_carry):
    x_BHWC, carry = x_and_carry
    x_in = jnp.concatenate([x_BHWC, x_BHWC]) if guided else x_BHWC
    x_in = schedulers.scale_model_input(plan, i, x_in)
    out = unet(x_in, jnp.full((x_in.shape[0],), plan.timesteps[i]), context_BSD).astype(jnp.float32)
    if guided:
      uncond, cond = jnp.split(out, 2)
      out = uncond + settings.guidance * (cond - uncond)
    noise = None
    if schedulers.needs_noise(plan):  # DDIM eta > 0, Euler a: per image, per step
      noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x_BHWC.shape[1:]))(keys_B)
    return schedulers.step(plan, i, out, x_BHWC, carry, noise)

  latents_BHWC = latents_BHWC.astype(jnp.float32)
  if schedulers.initial_noise_scale(plan) != 1.0:  # Euler: the pipeline scales given latents too
    latents_BHWC = latents_BHWC * schedulers.initial_noise_scale(plan)
  latents_BHWC, _ = jax.lax.fori_loop(0, plan.steps, step,
                                      (latents_BHWC, schedulers.initial_carry(plan, latents_BHWC)))
  images = vae.decode(latents_BHWC / vae_scale).astype(jnp.float32)
  return jnp.clip(images / 2 + 0.5, 0.0, 1.0)  # [0, 1] floats, NHWC


def to_uint8(images_BHWC) -> np.ndarray:
  return (np.asarray(images_BHWC) * 255).round().astype(np.uint8)


def generate(sd, prompts: Sequence[str], indices: Sequence[int], *, seed: int = 0,
             settings: SamplerSettings = SamplerSettings(), negative_prompt: str | Sequence[str] = "",
             init_latents_BHWC: np.ndarray | None = None, mesh=None, unet=None) -> np.ndarray:
  """Images ([0, 1] float32, NHWC) for one batch of prompts; image k uses the key of indices[k].

  With a mesh the batch is split over all its devices (it must divide the device count's multiple; callers
  pad). `unet` overrides sd.unet (e.g. the model being trained).
  """
  unet = sd.unet if unet is None else unet
  batch = len(prompts)
  if isinstance(negative_prompt, str):
    negative_prompt = [negative_prompt] * batch
  factor = 2 ** (len(sd.vae.config.block_out_channels) - 1)
  multiple = factor * 2 ** (len(unet.config.block_out_channels) - 1)
  if settings.height % multiple or settings.width % multiple:
    raise ValueError(f"height and width must be multiples of {multiple} for this model, got "
                     f"{settings.height}x{settings.width}")
  lh, lw = settings.height // factor, settings.width // factor
  keys_B = image_keys(seed, indices)
  if init_latents_BHWC is None:
    latents = initial_latents(keys_B, (lh, lw, sd.vae.config.latent_channels))
  else:
    latents = jnp.asarray(init_latents_BHWC, jnp.float32)
    if latents.shape != (batch, lh, lw, sd.vae.config.latent_channels):
      raise ValueError(f"init latents have shape {tuple(latents.shape)} (NHWC), expected "
                       f"{(batch, lh, lw, sd.vae.config.latent_channels)} for {settings.height}x{settings.width}")
  cond = tokenize(sd.tokenizer, prompts)
  uncond = tokenize(sd.tokenizer, negative_prompt)
  sharding = None if mesh is None else sharding_lib.batch_sharding(mesh)
  if sharding is not None:  # every process holds the same full batch; each places the shards of its devices
    cond, uncond, latents, key_data = (
        jax.make_array_from_callback(x.shape, sharding, lambda index, x=x: x[index])
        for x in (np.asarray(cond), np.asarray(uncond), np.asarray(latents), np.asarray(jax.random.key_data(keys_B))))
    keys_B = jax.random.wrap_key_data(key_data)
  graphdefs, states = zip(*(nnx.split(m) for m in (unet, sd.vae, sd.text_encoder)))
  plan = schedulers.make_plan(sd.schedule, settings.scheduler, settings.steps, karras=settings.karras, eta=settings.eta)
  return _generate(tuple(graphdefs), tuple(states), plan, cond, uncond, latents, keys_B,
                   settings=settings, vae_scale=sd.vae.config.scaling_factor)


def generate_all(sd, prompts: Sequence[str], *, seed: int = 0, batch_size: int = 4, first_index: int = 0,
                 indices: Sequence[int] | None = None, settings: SamplerSettings = SamplerSettings(),
                 negative_prompt: str = "", init_latents_BHWC: np.ndarray | None = None, mesh=None,
                 unet=None) -> Iterator[tuple[list[int], np.ndarray]]:
  """Yields (indices, uint8 images) batch by batch, padding the last batch so every batch has one shape
  (one compile). Logs compile time (first batch) and throughput."""
  indices = list(range(first_index, first_index + len(prompts))) if indices is None else list(indices)
  devices = 1 if mesh is None else mesh.devices.size
  batch_size = -(-batch_size // devices) * devices
  for start in range(0, len(prompts), batch_size):
    idx = indices[start:start + batch_size]
    chunk = list(prompts[start:start + batch_size])
    pad = batch_size - len(chunk)
    latents = None
    if init_latents_BHWC is not None:
      latents = np.asarray(init_latents_BHWC[start:start + batch_size])
      latents = np.concatenate([latents, np.repeat(latents[-1:], pad, 0)]) if pad else latents
    t0 = time.perf_counter()
    images = generate(sd, chunk + chunk[-1:] * pad, idx + idx[-1:] * pad, seed=seed, settings=settings,
                      negative_prompt=negative_prompt, init_latents_BHWC=latents, mesh=mesh, unet=unet)
    if not images.is_fully_addressable:  # multi-host: every process gets the whole batch
      from jax.experimental import multihost_utils  # noqa: PLC0415
      images = multihost_utils.process_allgather(images, tiled=True)
    images = to_uint8(jax.device_get(images))[:len(chunk)]
    seconds = time.perf_counter() - t0
    logging.info("generated %d images in %.2fs (%.2f images/s%s)", len(chunk), seconds, len(chunk) / seconds,
                 ", includes compile" if start == 0 else "")
    yield idx, images
