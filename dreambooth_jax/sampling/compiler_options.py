"""XLA compiler options for the sampler's programs, chosen per backend when they are first compiled.

XLA:CPU hands every convolution to YNNPACK by default, which runs it on one thread: on a 2-core VM a 3 x 3
convolution takes the same time with one core as with two (about 100 GFLOP/s), while XLA's own (Eigen)
convolution uses both (about 180 GFLOP/s). For the sampler, whose time is mostly forward convolutions, leaving
YNNPACK only its fused matmuls (attention) is 15-30% more images/s on every benchmark shape. The train step keeps
XLA's defaults: its backward convolutions ran no faster, or slower, with Eigen (docs/benchmarks.md, "One thread
per convolution"). Other backends: no options.
"""

import functools

import jax
import jax.numpy as jnp

# YNNPACK keeps its matmul fusions (LIBRARY_FUSION_TYPE_DOT: the attention's QK^T-softmax-PV in one fusion) and
# loses the individual convolutions (LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION, in XLA's default set).
CPU_SAMPLER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


@functools.cache
def sampler_options() -> tuple[tuple[str, str], ...]:
  """The options for this process's default backend, as sorted (name, value) pairs (hashable).

  Probed with a one-op compile: a jaxlib whose XLA no longer knows the option compiles with its defaults."""
  if jax.default_backend() != "cpu":
    return ()
  try:
    jax.jit(jnp.negative, compiler_options=CPU_SAMPLER_OPTIONS).lower(jnp.float32(0)).compile()
  except Exception:  # noqa: BLE001 - any rejection of the option means: XLA's defaults
    return ()
  return tuple(sorted(CPU_SAMPLER_OPTIONS.items()))


def jit(**jit_kwargs):
  """jax.jit(fn, **jit_kwargs) compiled with sampler_options(), looked up at the first call (when the backend is
  known, after jax.distributed has started), not at import."""
  def wrap(fn):
    compiled = {}

    @functools.wraps(fn)
    def call(*args, **kwargs):
      options = sampler_options()
      if options not in compiled:
        compiled[options] = jax.jit(fn, compiler_options=dict(options) or None, **jit_kwargs)
      return compiled[options](*args, **kwargs)
    return call
  return wrap
