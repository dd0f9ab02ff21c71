"""Jitted batch sampling with classifier-free guidance, VAE decode included, sharded over a mesh, for every model
family (the family tokenizes, encodes the text, calls its denoiser and names its sampler: DDIM, DPM++ 2M, Euler,
Euler a from sampling/schedulers.py for SD/SDXL, the flow-matching Euler of sampling/flow_matching.py for Flux).

One `lax.fori_loop` over the scheduler's steps; conditional and unconditional halves go through the denoiser in one
batched call. The whole generation (text encoding, loop, decode) is one compiled function per shape.
Initial latents come from per-image keys, so image i of seed s is the same whatever the batch it lands in.
"""

import dataclasses
import logging
import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreambooth_jax import sharding as sharding_lib
from dreambooth_jax.sampling import compiler_options, flow_matching, schedulers


# fori: lax.fori_loop in one compiled function | unrolled: every step traced into it | host: a compiled step driven
# from Python. All give the same images (tests/test_sampling.py).
LOOPS = ("fori", "unrolled", "host")
DEFAULT_LOOP = "fori"


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  steps: int = 50
  # SD/SDXL: the classifier-free guidance scale (1 = off); Flux: the distilled guidance input of guidance_embeds
  # models (dev). None: the family's default (7.5; Flux 3.5).
  guidance: float | None = None
  eta: float = 0.0
  height: int = 512
  width: int = 512
  scheduler: str | None = None  # None: the family's (ddim; Flux flow_euler); else schedulers.SCHEDULERS
  karras: bool = False  # Karras sigmas (dpmpp_2m, euler)
  true_cfg: float = 1.0  # Flux: real classifier-free guidance with a negative prompt when > 1 (FluxPipeline's)
  # how the steps are looped (LOOPS; docs/benchmarks.md): None = DEFAULT_LOOP
  loop: str | None = None

  def __post_init__(self):
    if self.loop not in (None, *LOOPS):
      raise ValueError(f"sampler loop {self.loop!r} (sample_loop, --loop): expected one of {list(LOOPS)}")
    if self.scheduler != flow_matching.SAMPLER_NAME:
      schedulers.check_name(self.scheduler or "ddim", self.karras, self.eta)

  def for_family(self, family) -> "SamplerSettings":
    """The family's defaults filled in."""
    return self if self.guidance is not None else dataclasses.replace(self, guidance=family.DEFAULT_GUIDANCE)


def image_keys(seed: int, indices: Sequence[int]) -> jax.Array:
  """One PRNG key per image index: generation is reproducible image by image."""
  base = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.uint32))


def initial_latents(keys_B, latent_shape_HWC) -> jax.Array:
  return jax.vmap(lambda k: jax.random.normal(k, latent_shape_HWC, jnp.float32))(keys_B)


def _conditioning(family, modules, cond, uncond, image_cond, *, guided, zero_uncond, encoded):
  """The text and image conditioning of the denoiser's batch: with guidance the unconditional half first."""
  encode = (lambda text: text) if encoded else (lambda ids: family.encode_text(modules, ids))
  if guided and zero_uncond:
    text = jax.tree.map(lambda c: jnp.concatenate([jnp.zeros_like(c), c]), encode(cond))
  else:
    text = encode(jax.tree.map(lambda u, c: jnp.concatenate([u, c]), uncond, cond) if guided else cond)
  if guided:
    image_cond = jax.tree.map(lambda x: jnp.concatenate([x, x]), image_cond)
  return text, image_cond


def _denoise_step(family, modules, plan, text, image_cond, keys_B, i, x_BHWC, carry, *, cfg_scale):
  """Scheduler step i (a Python int when unrolled, else traced): one batched denoiser call, guidance, update."""
  sampler, guided = family.SAMPLER, cfg_scale != 1.0
  x_in = jnp.concatenate([x_BHWC, x_BHWC]) if guided else x_BHWC
  x_in = sampler.scale_model_input(plan, i, x_in)
  t_B = jnp.full((x_in.shape[0],), sampler.denoiser_timestep(plan, i))
  out = family.denoise(modules, x_in, t_B, text, image_cond).astype(jnp.float32)
  if guided:
    uncond, cond = jnp.split(out, 2)
    out = uncond + cfg_scale * (cond - uncond)
  noise = None
  if sampler.needs_noise(plan):  # DDIM eta > 0, Euler a: per image, per step
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x_BHWC.shape[1:]))(keys_B)
  return sampler.step(plan, i, out, x_BHWC, carry, noise)


def _start(family, plan, latents_BHWC):
  sampler = family.SAMPLER
  latents_BHWC = latents_BHWC.astype(jnp.float32)
  if sampler.initial_noise_scale(plan) != 1.0:  # Euler: the pipeline scales given latents too
    latents_BHWC = latents_BHWC * sampler.initial_noise_scale(plan)
  return latents_BHWC, sampler.initial_carry(plan, latents_BHWC)


def _decode(modules, latents_BHWC):
  vae = modules["vae"]
  images = vae.decode(vae.unscale_latents(latents_BHWC)).astype(jnp.float32)
  return jnp.clip(images / 2 + 0.5, 0.0, 1.0)  # [0, 1] floats, NHWC


def _merge(graphdefs, states) -> dict:
  return {name: nnx.merge(g, s) for (name, g), s in zip(graphdefs, states)}


@compiler_options.jit(static_argnames=("family", "graphdefs", "cfg_scale", "zero_uncond", "encoded", "loop"))
def _generate(family, graphdefs, states, plan, cond, uncond, image_cond, latents_BHWC, keys_B, *,
              cfg_scale, zero_uncond, encoded=False, loop="fori"):
  """The whole generation in one compiled function. graphdefs/states: ((name, graphdef), ...) and the matching
  states of the denoiser, VAE and text encoders. cond/uncond: token ids, or with `encoded` the text encoders'
  outputs (their cache, the encoders freed). cfg_scale: the classifier-free guidance scale (1: one unguided pass).
  zero_uncond: the unconditional text is zeros (the family's rule for an empty negative prompt). loop: "fori"
  (lax.fori_loop over the steps) or "unrolled" (every step traced: longer compiles, no loop in the program)."""
  modules = _merge(graphdefs, states)
  text, image_cond = _conditioning(family, modules, cond, uncond, image_cond, guided=cfg_scale != 1.0,
                                   zero_uncond=zero_uncond, encoded=encoded)
  body = lambda i, x_and_carry: _denoise_step(family, modules, plan, text, image_cond, keys_B, i, *x_and_carry,
                                              cfg_scale=cfg_scale)
  x_and_carry = _start(family, plan, latents_BHWC)
  if loop == "fori":
    x_and_carry = jax.lax.fori_loop(0, plan.steps, body, x_and_carry)
  else:
    for i in range(plan.steps):
      x_and_carry = body(i, x_and_carry)
  return _decode(modules, x_and_carry[0])


# loop="host": the same parts, each its own compiled function, the steps driven from Python (one dispatch a step)
@compiler_options.jit(static_argnames=("family", "graphdefs", "cfg_scale", "zero_uncond", "encoded"))
def _host_begin(family, graphdefs, states, plan, cond, uncond, image_cond, latents_BHWC, *, cfg_scale, zero_uncond,
                encoded):
  text, image_cond = _conditioning(family, _merge(graphdefs, states), cond, uncond, image_cond,
                                   guided=cfg_scale != 1.0, zero_uncond=zero_uncond, encoded=encoded)
  return text, image_cond, _start(family, plan, latents_BHWC)


@compiler_options.jit(static_argnames=("family", "graphdefs", "cfg_scale"), donate_argnames=("x_and_carry",))
def _host_step(family, graphdefs, states, plan, text, image_cond, keys_B, i, x_and_carry, *, cfg_scale):
  return _denoise_step(family, _merge(graphdefs, states), plan, text, image_cond, keys_B, i, *x_and_carry,
                       cfg_scale=cfg_scale)


@compiler_options.jit(static_argnames=("graphdefs",))
def _host_end(graphdefs, states, latents_BHWC):
  return _decode(_merge(graphdefs, states), latents_BHWC)


def _generate_host(family, graphdefs, states, plan, cond, uncond, image_cond, latents_BHWC, keys_B, *, cfg_scale,
                   zero_uncond, encoded=False):
  text, image_cond, x_and_carry = _host_begin(family, graphdefs, states, plan, cond, uncond, image_cond,
                                              latents_BHWC, cfg_scale=cfg_scale, zero_uncond=zero_uncond,
                                              encoded=encoded)
  for i in range(plan.steps):
    x_and_carry = _host_step(family, graphdefs, states, plan, text, image_cond, keys_B, jnp.int32(i), x_and_carry,
                             cfg_scale=cfg_scale)
  return _host_end(graphdefs, states, x_and_carry[0])


def to_uint8(images_BHWC) -> np.ndarray:
  return (np.asarray(images_BHWC) * 255).round().astype(np.uint8)


def generate(pipe, prompts: Sequence[str], indices: Sequence[int], *, seed: int = 0,
             settings: SamplerSettings = SamplerSettings(), negative_prompt: str | Sequence[str] = "",
             init_latents_BHWC: np.ndarray | None = None, mesh=None, denoiser=None, split=None) -> np.ndarray:
  """Images ([0, 1] float32, NHWC) for one batch of prompts; image k uses the key of indices[k].

  With a mesh the batch is split over all its devices (it must divide the device count's multiple; callers
  pad). `denoiser` overrides the pipeline's (e.g. the model being trained). `split`: split_modules(pipe, denoiser)
  from an earlier call, for callers that sample several batches from unchanged modules.
  """
  family = pipe.family
  settings = settings.for_family(family)
  modules = _modules(pipe, denoiser)
  batch = len(prompts)
  if isinstance(negative_prompt, str):
    negative_prompt = [negative_prompt] * batch
  factor = family.latent_factor(pipe.configs)
  multiple = pipe.size_multiple(modules[family.DENOISER])
  if settings.height % multiple or settings.width % multiple:
    raise ValueError(f"height and width must be multiples of {multiple} for this model, got "
                     f"{settings.height}x{settings.width}")
  latent_shape = (settings.height // factor, settings.width // factor, pipe.vae.config.latent_channels)
  keys_B = image_keys(seed, indices)
  if init_latents_BHWC is None:
    latents = initial_latents(keys_B, latent_shape)
  else:
    latents = jnp.asarray(init_latents_BHWC, jnp.float32)
    if latents.shape != (batch, *latent_shape):
      raise ValueError(f"init latents have shape {tuple(latents.shape)} (NHWC), expected "
                       f"{(batch, *latent_shape)} for {settings.height}x{settings.width}")
  encoded = any(modules.get(name) is None for name in family.TEXT_ENCODERS)  # freed: read their cache
  read = (lambda p: cached_text(pipe, p)) if encoded else (lambda p: family.tokenize(pipe.tokenizers, p))
  zero_uncond = family.zero_unconditional(pipe.configs, negative_prompt)
  cond, uncond = read(prompts), (None if zero_uncond and encoded else read(negative_prompt))
  image_cond = family.sampling_image_conditioning(pipe.configs, settings, batch)
  key_data = np.asarray(jax.random.key_data(keys_B))
  if mesh is not None:  # every process holds the same full batch; each places the shards of its devices
    sharding = sharding_lib.batch_sharding(mesh)
    place = lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index, x=x: x[index])
    cond, uncond, image_cond = (jax.tree.map(lambda x: place(np.asarray(x)), tree)
                                for tree in (cond, uncond, image_cond))
    latents, key_data = place(np.asarray(latents)), place(key_data)
  keys_B = jax.random.wrap_key_data(key_data)
  graphdefs, states = split_modules(pipe, denoiser) if split is None else split
  plan = family.SAMPLER.plan_for(pipe.schedule, settings, latent_shape)
  cfg_scale = float(family.guidance_scales(pipe.configs, settings, negative_prompt))
  kwargs = dict(cfg_scale=cfg_scale, zero_uncond=zero_uncond, encoded=encoded)
  loop = settings.loop or DEFAULT_LOOP
  if loop == "host":
    return _generate_host(family, graphdefs, states, plan, cond, uncond, image_cond, latents, keys_B, **kwargs)
  return _generate(family, graphdefs, states, plan, cond, uncond, image_cond, latents, keys_B, loop=loop, **kwargs)


def split_modules(pipe, denoiser=None) -> tuple[tuple, tuple]:
  """The modules generate compiles over, as (graphdefs, states): ((name, graphdef), ...), (state, ...).

  nnx.split walks every module in Python (about 0.1 s for ~1000 parameters, a sixth of a 64 px SD 1.5-shaped
  sampler call on 2 CPU cores), so generate_all splits once for all its batches. The states hold the modules' own
  Variables, so values updated in place are seen by later calls; a module rebuilt or a submodule replaced needs a
  new split."""
  family, modules = pipe.family, _modules(pipe, denoiser)
  split = {name: nnx.split(modules[name]) for name in (family.DENOISER, "vae", *family.TEXT_ENCODERS)
           if modules[name] is not None}
  return tuple((name, graphdef) for name, (graphdef, _) in split.items()), tuple(state for _, state in split.values())


def _modules(pipe, denoiser=None) -> dict:
  """The pipeline's modules by name, `denoiser` (when given) in place of its own."""
  return {**pipe.modules, pipe.family.DENOISER: pipe.denoiser if denoiser is None else denoiser}


def cached_text(pipe, prompts: Sequence[str]) -> dict:
  """The text conditioning of `prompts` from pipe.text_cache (stacked on a batch axis)."""
  missing = sorted({p for p in prompts if p not in (pipe.text_cache or {})})
  if missing:
    raise ValueError(f"the text encoders were freed after caching and these prompts were not cached: {missing}; "
                     "sample with a pipeline that still has them (e.g. python -m dreambooth_jax.sample)")
  return {k: np.stack([pipe.text_cache[p][k] for p in prompts]) for k in pipe.family.TEXT_KEYS}


def free_text_encoders(pipe, prompts: Sequence[str], batch_size: int = 8):
  """pipe without its text encoders, their outputs for `prompts` kept in its text_cache: what a run whose text
  embeddings are cached keeps for validation and evaluation (Flux's T5-XXL alone is 4.7B parameters). Encoded by
  the family's encode_text, as the sampler would encode them."""
  family, prompts = pipe.family, sorted(set(prompts))
  encoders = {name: pipe.modules[name] for name in family.TEXT_ENCODERS}
  cache = dict(pipe.text_cache or {})
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    text = jax.device_get(encode_text(family, encoders, family.tokenize(pipe.tokenizers, chunk)))
    cache.update({p: {k: np.asarray(text[k][i]) for k in family.TEXT_KEYS} for i, p in enumerate(chunk)})
  freed = dataclasses.replace(pipe, modules={**pipe.modules, **{name: None for name in family.TEXT_ENCODERS}},
                              text_cache=cache)
  logging.info("text encoders %s freed; %d prompt(s) kept encoded for sampling", list(family.TEXT_ENCODERS),
               len(prompts))
  return freed


@nnx.jit(static_argnums=(0, 3))
def encode_text(family, modules, ids, dtype=None) -> dict:
  """The family's encode_text, compiled on its own: in the encoders' dtype (dtype None: what the sampler's own
  compiled text encoding gives), or cast to `dtype` inside the compiled function (the training text cache's float32:
  cast outside it, bf16 outputs would differ, as XLA may keep a bf16 result's excess precision when it fuses the
  cast)."""
  text = family.encode_text(modules, ids)
  return text if dtype is None else {k: v.astype(dtype) for k, v in text.items()}


def generate_all(pipe, prompts: Sequence[str], *, seed: int = 0, batch_size: int = 4, first_index: int = 0,
                 indices: Sequence[int] | None = None, settings: SamplerSettings = SamplerSettings(),
                 negative_prompt: str = "", init_latents_BHWC: np.ndarray | None = None, mesh=None,
                 denoiser=None) -> Iterator[tuple[list[int], np.ndarray]]:
  """Yields (indices, uint8 images) batch by batch, padding the last batch so every batch has one shape
  (one compile). Logs compile time (first batch) and throughput.

  The modules are split once for all batches, and batch k+1 is queued on the device before batch k is fetched and
  converted, so the host's work overlaps the device's (jit dispatch is asynchronous)."""
  indices = list(range(first_index, first_index + len(prompts))) if indices is None else list(indices)
  devices = 1 if mesh is None else mesh.devices.size
  batch_size = -(-batch_size // devices) * devices
  split = split_modules(pipe, denoiser)
  queued, since = [], time.perf_counter()
  for start in range(0, len(prompts), batch_size):
    idx = indices[start:start + batch_size]
    chunk = list(prompts[start:start + batch_size])
    pad = batch_size - len(chunk)
    latents = None
    if init_latents_BHWC is not None:
      latents = np.asarray(init_latents_BHWC[start:start + batch_size])
      latents = np.concatenate([latents, np.repeat(latents[-1:], pad, 0)]) if pad else latents
    queued.append((idx, generate(pipe, chunk + chunk[-1:] * pad, idx + idx[-1:] * pad, seed=seed, settings=settings,
                                 negative_prompt=negative_prompt, init_latents_BHWC=latents, mesh=mesh,
                                 denoiser=denoiser, split=split)))
    if len(queued) == 2:
      yield _fetch(*queued.pop(0), since, first=start == batch_size)
      since = time.perf_counter()
  for idx, images in queued:
    yield _fetch(idx, images, since, first=len(prompts) <= batch_size)


def _fetch(idx: list[int], images, since: float, first: bool) -> tuple[list[int], np.ndarray]:
  if not images.is_fully_addressable:  # multi-host: every process gets the whole batch
    from jax.experimental import multihost_utils  # noqa: PLC0415
    images = multihost_utils.process_allgather(images, tiled=True)
  images = to_uint8(jax.device_get(images))[:len(idx)]
  seconds = time.perf_counter() - since
  logging.info("generated %d images in %.2fs (%.2f images/s%s)", len(idx), seconds, len(idx) / seconds,
               ", includes compile" if first else "")
  return idx, images
