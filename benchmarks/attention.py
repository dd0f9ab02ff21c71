"""One attention call, jax.nn.dot_product_attention's XLA path vs ours (models/layers.py xla_attention), forward and
gradient, jitted, fp32, on the backend jax finds. Shapes: (batch, queries, keys, heads, head dim).

  python benchmarks/attention.py            # the shapes of docs/benchmarks.md's "Attention layout" table
  python benchmarks/attention.py --shapes=2,768,768,2,16
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from dreambooth_jax.models.layers import xla_attention

SHAPES = "2,768,768,2,16;8,64,77,8,4;8,256,256,8,8;8,1024,1024,1,32"


def best_ms(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return min(times) * 1000


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shapes", default=SHAPES, help="';'-separated B,T,S,N,H")
  p.add_argument("--repeats", type=int, default=10)
  args = p.parse_args()
  impls = {"jax.nn": jax.nn.dot_product_attention, "ours": xla_attention}
  for shape in args.shapes.split(";"):
    B, T, S, N, H = (int(n) for n in shape.split(","))
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((B, t, N, H)), jnp.float32) for t in (T, S, S))
    reference = impls["jax.nn"](q, k, v)
    for name, attend in impls.items():
      forward = jax.jit(attend)
      grad = jax.jit(jax.grad(lambda q, k, v, f=attend: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2)))
      err = float(jnp.abs(forward(q, k, v) - reference).max())
      print(f"{shape:>18} {name:>6}: forward {best_ms(forward, q, k, v, repeats=args.repeats):8.2f} ms  "
            f"gradient {best_ms(grad, q, k, v, repeats=args.repeats):8.2f} ms  max diff vs jax.nn {err:.1e}")


if __name__ == "__main__":
  main()
