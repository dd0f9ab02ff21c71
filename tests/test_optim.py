"""The optimizer: lr schedules as diffusers' get_scheduler, and bf16-moment Adam close to optax's fp32 Adam."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from dreambooth_jax.training import optim


def test_bf16_moments_adam_follows_fp32_adam():
  """Same updates as optax.adam within bf16 storage precision (relative 2e-2 over 20 steps), moments in bf16."""
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)}
  ours, ref = optim.scale_by_adam_bf16(0.9, 0.999, 1e-8), optax.scale_by_adam(0.9, 0.999, 1e-8)
  s_ours, s_ref = ours.init(params), ref.init(params)
  assert s_ours.mu["w"].dtype == jnp.bfloat16 and s_ours.nu["w"].dtype == jnp.bfloat16
  for _ in range(20):
    grads = {"w": jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)}
    u_ours, s_ours = ours.update(grads, s_ours)
    u_ref, s_ref = ref.update(grads, s_ref)
    np.testing.assert_allclose(u_ours["w"], u_ref["w"], rtol=2e-2, atol=2e-2)
  assert np.abs(np.asarray(u_ours["w"]) - np.asarray(u_ref["w"])).max() > 0  # really stored at lower precision


@pytest.mark.parametrize("kind,expected", [
    ("constant", [1.0, 1.0, 1.0, 1.0]),
    ("constant_with_warmup", [0.0, 0.5, 1.0, 1.0]),
    ("linear", [0.0, 0.5, 1.0, 0.5]),
])
def test_lr_schedules(kind, expected):
  schedule = optim.learning_rate_schedule(1.0, kind, warmup_steps=2, total_steps=4)
  np.testing.assert_allclose([float(schedule(s)) for s in range(4)], expected, atol=1e-6)


def test_unknown_scheduler_is_named():
  with pytest.raises(ValueError, match="'warmup_cosine'"):
    optim.learning_rate_schedule(1.0, "warmup_cosine", 0, 10)


def test_text_encoder_group_gets_its_own_lr():
  config = ml_collections.ConfigDict(dict(learning_rate=1.0, text_encoder_lr=0.5, lr_scheduler="constant",
                                          lr_warmup_steps=0, max_train_steps=10, adam_beta1=0.9, adam_beta2=0.999,
                                          adam_epsilon=1e-8, adam_weight_decay=0.0, max_grad_norm=0.0))
  tx, schedules = optim.make_optimizer(config, ("unet", "text_encoder"))
  assert float(schedules["unet"](0)) == 1.0 and float(schedules["text_encoder"](0)) == 0.5
  params = {"unet": {"w": jnp.ones(3)}, "text_encoder": {"w": jnp.ones(3)}}
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  np.testing.assert_allclose(updates["text_encoder"]["w"], 0.5 * updates["unet"]["w"], rtol=1e-6)


def test_stochastic_rounding_to_bf16_is_unbiased_between_neighbours():
  x = np.linspace(0.05, 0.0502, 16).astype(np.float32) * np.array([1, -1] * 8, np.float32)
  bits = x.view(np.uint32)
  toward_zero = (bits & np.uint32(0xFFFF0000)).view(np.float32)  # the two bf16 neighbours of x (x is not on
  away = ((bits & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(np.float32)  # the grid: checked below)
  assert np.all(toward_zero != x)
  keys = jax.random.split(jax.random.key(0), 4096)
  seeds = jax.vmap(lambda k: jax.random.bits(k, (), jnp.uint32))(keys)
  samples = np.asarray(jax.vmap(lambda s: optim.stochastic_round_to_bf16(jnp.asarray(x), s))(seeds).astype(
      jnp.float32))
  assert np.all((samples == toward_zero) | (samples == away))
  # Mean error: a standard error of at most step / (2 sqrt(4096)) = step / 128; allow 4 of them.
  step = np.abs(away - toward_zero)
  assert np.all(np.abs(samples.mean(0) - x) <= 4 * step / 128)


def test_bf16_params_keep_updates_smaller_than_their_precision():
  """lr-5e-6-sized updates on |w| ~ 0.05: round-to-nearest (optax.apply_updates) never moves a bf16 weight,
  stochastic rounding moves them by the fp32 amount on average; fp32 params: bitwise optax.apply_updates."""
  w = {"w": jnp.full((4096,), 0.05, jnp.bfloat16)}
  update = {"w": jnp.full((4096,), 5e-6, jnp.float32)}
  nearest, ours = w, w
  for step in range(100):
    nearest = optax.apply_updates(nearest, update)
    ours = optim.apply_updates(ours, update, jax.random.key(step))
  start = float(jnp.asarray(0.05, jnp.bfloat16))
  assert float(nearest["w"].astype(jnp.float32).mean()) == start
  drift = float(ours["w"].astype(jnp.float32).mean()) - start
  assert drift == pytest.approx(100 * 5e-6, rel=0.1)
  p32 = {"a": jnp.asarray(np.random.default_rng(0).standard_normal(64), jnp.float32)}
  u32 = {"a": jnp.asarray(np.random.default_rng(1).standard_normal(64) * 1e-6, jnp.float32)}
  np.testing.assert_array_equal(optim.apply_updates(p32, u32, jax.random.key(0))["a"],
                                 optax.apply_updates(p32, u32)["a"])
