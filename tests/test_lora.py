"""LoRA on our NNX UNet / text encoder against diffusers-torch with the same LoRA loaded by pipe.load_lora_weights.

Tolerance: fp32, max |ours - torch| <= 1e-4 * max(1, max |torch|) (diffusers adds the low-rank branch at run time
as we do, so only float rounding differs).
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from reference_models import to_numpy
from dreambooth_jax.models import lora
from dreambooth_jax import families
from dreambooth_jax.io import diffusers_folder as weights
from dreambooth_jax.io import lora_files as kohya

TOL = 1e-4
RANK, ALPHA = 4, 8.0
SETTINGS = lora.LoRASettings(rank=RANK, alpha=ALPHA, unet_targets=lora.UNET_ATTENTION + lora.UNET_FEED_FORWARD,
                             text_targets=lora.TEXT_ATTENTION + lora.TEXT_MLP)


def assert_close(ours, ref, tol=TOL):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape
  scale = max(1.0, np.abs(ref).max())
  err = np.abs(ours - ref).max()
  assert err <= tol * scale, f"max abs error {err:.3g} > {tol} * {scale:.3g}"


def inputs():
  rng = np.random.default_rng(0)
  return dict(x=rng.standard_normal((2, 8, 8, 4)).astype(np.float32), t=np.array([10, 900], np.int32),
              context=rng.standard_normal((2, 77, 32)).astype(np.float32),
              ids=rng.integers(0, 49408, (2, 77)).astype(np.int32))


def ours_out(unet, text_encoder, io) -> dict:
  return {"unet": np.asarray(unet(io["x"], io["t"], io["context"])),
          "text_encoder": np.asarray(text_encoder(io["ids"])[0])}


def torch_out(pipe, io) -> dict:
  with torch.no_grad():
    unet = pipe.unet(torch.from_numpy(io["x"].transpose(0, 3, 1, 2)), torch.from_numpy(io["t"]),
                     torch.from_numpy(io["context"])).sample
    text = pipe.text_encoder(torch.from_numpy(io["ids"].astype(np.int64))).last_hidden_state
  return {"unet": to_numpy(unet).transpose(0, 2, 3, 1), "text_encoder": to_numpy(text)}


def random_factors(module, rng) -> dict:
  return {path: (rng.normal(0, 0.2, (RANK, node.in_features)).astype(np.float32),
                 rng.normal(0, 0.2, (node.out_features, RANK)).astype(np.float32))
          for path, node in lora.lora_modules(module).items()}


@pytest.fixture(scope="module")
def case(tiny_sd1_dir):
  """(our pipeline with LoRA on UNet and text encoder, random factors, base outputs, torch pipeline)."""
  from diffusers import StableDiffusionPipeline

  sd = weights.load_pipeline(tiny_sd1_dir)
  io = inputs()
  base = ours_out(sd.unet, sd.text_encoder, io)
  unet_paths = lora.apply_lora(sd.unet, SETTINGS, rngs=nnx.Rngs(0))
  text_paths = lora.apply_lora(sd.text_encoder, SETTINGS, rngs=nnx.Rngs(1))
  # 4 transformer blocks (down 1, mid 1, up 2) x (2 x 4 attention + 2 ff); 2 CLIP layers x (4 + 2 mlp)
  assert len(unet_paths) == 4 * (8 + 2) and len(text_paths) == 2 * 6
  init_out = ours_out(sd.unet, sd.text_encoder, io)
  rng = np.random.default_rng(0)
  factors = {"unet": random_factors(sd.unet, rng), "text_encoder": random_factors(sd.text_encoder, rng)}
  pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1_dir, safety_checker=None, requires_safety_checker=False)
  return dict(sd=sd, io=io, base=base, init_out=init_out, factors=factors, pipe=pipe)


def with_factors(case):
  sd = case["sd"]
  lora.load_lora_factors(sd.unet, case["factors"]["unet"])
  lora.load_lora_factors(sd.text_encoder, case["factors"]["text_encoder"])
  return sd


def test_output_unchanged_at_init(case):
  for name in ("unet", "text_encoder"):
    np.testing.assert_array_equal(case["init_out"][name], case["base"][name], err_msg=name)


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_matches_diffusers_load_lora_weights(case, fmt, tmp_path):
  sd = with_factors(case)
  unet_f, text_f = lora.lora_factors(sd.unet), lora.lora_factors(sd.text_encoder)
  if fmt == "kohya":
    tensors, metadata = kohya.to_kohya({"unet": unet_f, "text_encoder": text_f}, ALPHA), {}
  else:
    tensors, metadata = kohya.to_diffusers_peft({"unet": unet_f, "text_encoder": text_f}, ALPHA)
  kohya.save_lora(tmp_path / "lora.safetensors", tensors, metadata)
  pipe = copy.deepcopy(case["pipe"])
  pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
  want, got = torch_out(pipe, case["io"]), ours_out(sd.unet, sd.text_encoder, case["io"])
  for name in ("unet", "text_encoder"):
    # the LoRA must change the output, or agreement proves nothing
    assert np.abs(got[name] - case["base"][name]).max() > 100 * TOL * np.abs(got[name]).max(), name
    assert_close(got[name], want[name])


def test_merge_equals_unmerged(case):
  sd = with_factors(case)
  want = ours_out(sd.unet, sd.text_encoder, case["io"])
  unet, text = lora.merge_lora(sd.unet), lora.merge_lora(sd.text_encoder)
  assert not lora.lora_modules(unet) and lora.lora_modules(sd.unet)  # a copy; the original keeps its LoRA
  assert not jax.tree.leaves(nnx.state(unet, lora.LoRAParam))
  got = ours_out(unet, text, case["io"])
  for name in want:
    assert_close(got[name], want[name])
  # The merged model saves with exactly the base keys.
  assert weights.module_state_dict(unet).keys() == weights.state_to_torch_dict(lora.base_state(sd.unet)).keys()


def test_factors_round_trip_and_errors(case):
  sd = with_factors(case)
  factors = case["factors"]["text_encoder"]
  got = lora.lora_factors(sd.text_encoder)
  assert got.keys() == factors.keys()
  for path in factors:
    for g, w in zip(got[path], factors[path]):
      np.testing.assert_array_equal(g, w, err_msg=path)
  # Pure-dict form (what the trainer holds) gives the same factors.
  _, pure, _ = lora.split_lora(sd.text_encoder)
  assert lora.lora_factors(pure).keys() == factors.keys()
  # kohya's text paths carry text_model.; a file alpha other than ours is folded into up.
  prefixed = {"text_model." + k: (d, u * 2.0) for k, (d, u) in factors.items()}
  lora.load_lora_factors(sd.text_encoder, prefixed, alpha=ALPHA / 2)
  for path in factors:
    np.testing.assert_allclose(lora.lora_factors(sd.text_encoder)[path][1], factors[path][1], rtol=1e-6)
  path = sorted(factors)[0]
  with pytest.raises(ValueError, match=r"missing \['encoder\.layers\.0\.mlp\.fc1'\].*unexpected \['nope'\]"):
    lora.load_lora_factors(sd.text_encoder, {**{k: v for k, v in factors.items() if k != path}, "nope": factors[path]})
  with pytest.raises(ValueError, match=rf"{path}.*down \(2, 32\).*expects down \(4, 32\)"):
    lora.load_lora_factors(sd.text_encoder, {**factors, path: (factors[path][0][:2], factors[path][1][:, :2])})
  with pytest.raises(ValueError, match="already applied"):
    lora.apply_lora(sd.text_encoder, SETTINGS, rngs=nnx.Rngs(0))


def test_gradients_only_for_lora_params(case):
  sd = with_factors(case)
  io = case["io"]
  graphdef, lora_params, rest = lora.split_lora(sd.unet)

  def loss(params):
    unet = nnx.merge(graphdef, nnx.State(params), nnx.State(rest))
    return jnp.mean(jnp.square(unet(io["x"], io["t"], io["context"])))

  grads = lora.lora_factors(jax.jit(jax.grad(loss))(lora_params))
  assert sorted(grads) == sorted(lora.lora_modules(sd.unet))
  for path, (g_down, g_up) in grads.items():
    assert np.abs(g_up).max() > 0 and np.abs(g_down).max() > 0, path
  # Trainable vs full parameter count (the LoRA memory claim: optimizer state only for the factors).
  n_lora = lora.count_params(nnx.state(sd.unet, lora.LoRAParam))
  n_base = lora.count_params(nnx.state(sd.unet, nnx.Not(lora.LoRAParam)))
  expected = sum(RANK * (n.in_features + n.out_features) for n in lora.lora_modules(sd.unet).values())
  assert n_lora == expected and n_lora < 0.1 * n_base


def test_gradients_at_init_reach_up_not_down(tiny_sd1_dir):
  """At init (up = 0) only the up factors get gradient, as in PEFT."""
  text_encoder, _ = weights.load_component(tiny_sd1_dir, families.get("sd"), "text_encoder")
  lora.apply_lora(text_encoder, lora.LoRASettings(rank=2), rngs=nnx.Rngs(0))
  graphdef, params, rest = lora.split_lora(text_encoder)
  ids = np.arange(77, dtype=np.int32)[None] % 300

  def loss(p):
    return jnp.sum(nnx.merge(graphdef, nnx.State(p), nnx.State(rest))(ids)[0] ** 2)

  for path, (g_down, g_up) in lora.lora_factors(jax.jit(jax.grad(loss))(params)).items():
    assert np.abs(g_up).max() > 0 and np.abs(g_down).max() == 0, path


def test_dropout_is_a_function_of_the_key(tiny_sd1_dir):
  text_encoder, _ = weights.load_component(tiny_sd1_dir, families.get("sd"), "text_encoder")
  lora.apply_lora(text_encoder, lora.LoRASettings(rank=2, dropout=0.5, init="gaussian"), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  lora.load_lora_factors(text_encoder, {path: (rng.normal(0, 0.5, (2, n.in_features)).astype(np.float32),
                                               rng.normal(0, 0.5, (n.out_features, 2)).astype(np.float32))
                                        for path, n in lora.lora_modules(text_encoder).items()})
  graphdef, params, rest = lora.split_lora(text_encoder)
  ids = rng.integers(0, 49408, (1, 77)).astype(np.int32)

  @jax.jit
  def run(key):
    model = nnx.merge(graphdef, nnx.State(params), nnx.State(rest))
    lora.set_dropout_key(model, key)
    return model(ids)[0]

  a, b, c = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
  no_dropout = np.asarray(text_encoder(ids)[0])  # no key set: dropout off (inference)
  assert np.abs(np.asarray(a) - no_dropout).max() > 1e-3


def test_settings_from_config(tiny_sd1_dir):
  import ml_collections

  s = lora.settings_from_config(ml_collections.ConfigDict(dict(rank=8, alpha=16, feed_forward=True, text_encoder=True)))
  assert s.scale == 2.0 and s.train_text_encoder and s.targets("denoiser")[-2:] == lora.UNET_FEED_FORWARD
  assert s.targets("text") == lora.TEXT_ATTENTION
  assert lora.settings_from_config({"rank": 4}).scale == 1.0
  with pytest.raises(ValueError, match=r"unknown keys \['ranks'\]"):
    lora.settings_from_config({"ranks": 4})
  with pytest.raises(ValueError, match=r"lora\.rank = 0"):
    lora.LoRASettings(rank=0)
  with pytest.raises(ValueError, match=r"lora\.dropout = 1\.5"):
    lora.LoRASettings(dropout=1.5)
  unet, _ = weights.load_component(tiny_sd1_dir, families.get("sd"), "unet")
  with pytest.raises(ValueError, match=r"denoiser: no nnx\.Linear matches the LoRA targets \['to_z'\]"):
    lora.apply_lora(unet, lora.LoRASettings(unet_targets=("to_z",)), rngs=nnx.Rngs(0))


def test_factors_are_float32_over_a_bf16_base():
  """bf16 base weights (the one-device Flux / SDXL set-up) keep float32 factors, as PEFT's autocast_adapter_dtype;
  the layer computes in the base's dtype and its output at init is the base's output."""
  base = nnx.Linear(16, 8, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  layer = lora.LoRALinear(base, 4, 1.0, rngs=nnx.Rngs(1))
  assert layer.kernel[...].dtype == jnp.bfloat16
  assert layer.lora_down[...].dtype == jnp.float32 and layer.lora_up[...].dtype == jnp.float32
  x = jnp.ones((2, 16), jnp.bfloat16)
  out = layer(x)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(base(x), np.float32))
