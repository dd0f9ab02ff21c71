"""Equalities of one train step that must hold whatever the implementation, each against test_golden_step's pinned
epsilon step on the same fixed batch: cached latents = uncached; gradient accumulation 2 x (1 + 1) = one batch of
2 + 2 (lax.scan or unrolled); remat = no remat. (A file of its own: with test_golden_step's four, eight distinct
compiles, too long for one worker.)
Tolerance: test_golden_step.RTOL, 1e-5 relative.
"""

import numpy as np
import pytest

from test_golden_step import GOLDEN, RTOL, make_config, run_step, values


def test_cached_latents_equal_uncached():
  uncached = run_step(make_config(("cache_latents", False)), cached=False)
  np.testing.assert_allclose(values(*uncached), GOLDEN["epsilon"], rtol=RTOL)


@pytest.mark.parametrize("loop", ["scan", "unrolled"])
def test_accumulation_two_micro_batches_equals_one_batch(loop):
  # Each example keeps its global slot (its noise key) however the batch is split into micro-batches, and each
  # micro-batch holds one instance and one class example: the averaged micro-batch losses and gradients equal
  # the whole batch's, looped by lax.scan or unrolled.
  config = make_config(("accumulation_loop", loop))
  np.testing.assert_allclose(values(*run_step(config, accum=2)), GOLDEN["epsilon"], rtol=RTOL)


def test_remat_equals_no_remat():
  np.testing.assert_allclose(values(*run_step(make_config(("remat", "full")))), GOLDEN["epsilon"], rtol=RTOL)
