"""One GroupNorm + SiLU call, ours (models/layers.py GroupNorm: shifted one-pass statistics) vs nnx.GroupNorm's
two-pass and one-pass variance, forward and gradient, jitted, fp32, on the backend jax finds. Shapes: (batch, height, width, channels), 32 groups; inputs with mean 3 and std 1.

  python benchmarks/group_norm.py
  python benchmarks/group_norm.py --shapes=8,32,32,64
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attention import best_ms
from dreambooth_jax.models.layers import GroupNorm

SHAPES = "8,32,32,64;8,16,16,64;2,32,32,32;8,8,8,128"


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shapes", default=SHAPES, help="';'-separated N,H,W,C")
  p.add_argument("--repeats", type=int, default=30)
  args = p.parse_args()
  for shape in args.shapes.split(";"):
    N, H, W, C = (int(n) for n in shape.split(","))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((N, H, W, C)) + 3.0, jnp.float32)
    norms = {"ours": GroupNorm(C, num_groups=32, rngs=nnx.Rngs(0)),
             "nnx two-pass": nnx.GroupNorm(C, num_groups=32, use_fast_variance=False, rngs=nnx.Rngs(0)),
             "nnx one-pass": nnx.GroupNorm(C, num_groups=32, use_fast_variance=True, rngs=nnx.Rngs(0))}
    reference = norms["nnx two-pass"](x)
    for name, norm in norms.items():
      graphdef, params = nnx.split(norm)
      apply = lambda params, x, g=graphdef: jax.nn.silu(nnx.merge(g, params)(x))
      forward = jax.jit(apply)
      grad = jax.jit(jax.grad(lambda params, x: jnp.sum(apply(params, x) ** 2), argnums=(0, 1)))
      err = float(jnp.abs(nnx.merge(graphdef, params)(x) - reference).max())
      print(f"{shape:>12} {name:>12}: forward {best_ms(forward, params, x, repeats=args.repeats):7.3f} ms  "
            f"gradient {best_ms(grad, params, x, repeats=args.repeats):7.3f} ms  max diff vs two-pass {err:.1e}",
            flush=True)


if __name__ == "__main__":
  main()
