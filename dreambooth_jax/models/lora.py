"""LoRA (Hu et al. 2021) for our NNX UNet and CLIP text encoder, in the PEFT / kohya convention.

A targeted `nnx.Linear` is replaced in place by a `LoRALinear` that keeps the frozen `kernel`/`bias` under the same
names (so the base weights still load and save with the same keys) and adds two `LoRAParam` factors:
  y = x @ kernel + bias + (alpha / rank) * dropout(x) @ lora_down @ lora_up
  lora_down (in, rank): PEFT's kaiming-uniform (or normal(0, 1/rank)); lora_up (rank, out): zeros, so the model is
  unchanged at init.
Our layouts are the transposes of torch's: torch lora_A/lora_down (rank, in) = lora_down.T, lora_B/lora_up
(out, rank) = lora_up.T. `lora_factors` returns the torch layout that formats.kohya writes.

Training only the factors: `nnx.state(m, LoRAParam)` are the trainable params, `nnx.state(m, nnx.Not(LoRAParam))` the
frozen rest; `split_lora(m)` gives (graphdef, lora pure dict, base pure dict) for a pure-dict trainer and
`nnx.merge(graphdef, nnx.State(lora), nnx.State(base))` rebuilds the model.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes

from dreambooth_jax.models.clip_text import CLIPTextModel

# Module names (matched against the end of the dotted module path) of the standard SD LoRA targets.
UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")  # attn1/attn2 of the transformer blocks
UNET_FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
TEXT_MLP = ("fc1", "fc2")
INITS = ("kaiming", "gaussian")
ROLES = ("denoiser", "text")  # the kinds of component LoRA goes on (a family's Component.role)


class LoRAParam(nnx.Param):
  """The trainable LoRA factors; a Param subclass, so a plain `nnx.Param` filter includes them too."""


class LoRADropoutKey(nnx.Variable):
  """The PRNG key of one LoRALinear's dropout for the current call (set by set_dropout_key, never trained)."""


@dataclasses.dataclass(frozen=True)
class LoRASettings:
  rank: int = 4
  alpha: float | None = None  # None: alpha = rank (scale 1), as kohya's and PEFT's defaults
  dropout: float = 0.0  # > 0 needs set_dropout_key(module, key) before each training call
  init: str = "kaiming"  # "kaiming" (PEFT's default) or "gaussian" (normal, std 1/rank)
  unet_targets: tuple = UNET_ATTENTION
  text_targets: tuple = TEXT_ATTENTION
  train_text_encoder: bool = False  # also put LoRA on the text encoder

  def __post_init__(self):
    if not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"lora.rank = {self.rank!r}: must be a positive int")
    if self.alpha is not None and not self.alpha > 0:
      raise ValueError(f"lora.alpha = {self.alpha!r}: must be positive (or None for alpha = rank)")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"lora.dropout = {self.dropout!r}: must be in [0, 1)")
    if self.init not in INITS:
      raise ValueError(f"lora.init = {self.init!r}: expected one of {list(INITS)}")

  @property
  def scale(self) -> float:
    return (self.rank if self.alpha is None else self.alpha) / self.rank

  def targets(self, role: str) -> tuple:
    """The module-name suffixes to wrap in a component of this role (its family's Component.role)."""
    if role not in ROLES:
      raise ValueError(f"LoRA role {role!r}: expected one of {list(ROLES)}")
    return self.unet_targets if role == "denoiser" else self.text_targets


def settings_from_config(config, family=None) -> LoRASettings:
  """LoRASettings from a dict / ml_collections.ConfigDict (e.g. config.lora) and the model family (its
  LORA_ATTENTION / LORA_FEED_FORWARD denoiser targets; None: SD's):
    rank, alpha (None = rank), dropout, init, feed_forward (add ff.net.0.proj/ff.net.2 to the UNet targets),
    text_encoder (LoRA on q/k/v/out_proj of the text encoder), text_mlp (and fc1/fc2),
    or explicit unet_targets / text_targets lists (module-name suffixes) instead of the switches.
  """
  c = dict(config.to_dict() if hasattr(config, "to_dict") else config)
  known = {"enabled", "rank", "alpha", "dropout", "init", "feed_forward", "text_encoder", "text_mlp",
           "unet_targets", "text_targets"}
  unknown = sorted(set(c) - known)
  if unknown:
    raise ValueError(f"lora config: unknown keys {unknown} (known: {sorted(known)})")
  attention, feed_forward = ((family.LORA_ATTENTION, family.LORA_FEED_FORWARD) if family is not None
                             else (UNET_ATTENTION, UNET_FEED_FORWARD))
  unet = tuple(c.get("unet_targets") or attention + (feed_forward if c.get("feed_forward") else ()))
  text = tuple(c.get("text_targets") or TEXT_ATTENTION + (TEXT_MLP if c.get("text_mlp") else ()))
  alpha = c.get("alpha")
  return LoRASettings(rank=int(c.get("rank", 4)), alpha=None if alpha is None else float(alpha),
                      dropout=float(c.get("dropout", 0.0)), init=c.get("init", "kaiming"), unet_targets=unet,
                      text_targets=text, train_text_encoder=bool(c.get("text_encoder", False)))


# ------------------------------------------------------------------------------------------------- the layer

# The factors are float32 whatever the base weights are (PEFT's autocast_adapter_dtype): with a bf16 base (Flux,
# SDXL on one device) the frozen weights carry the memory saving, and the trained factors keep lr-sized updates.
FACTOR_DTYPE = jnp.float32


class LoRALinear(nnx.Module):
  """An nnx.Linear (same `kernel`/`bias`) plus a scaled low-rank update with float32 factors; computes in the base's
  dtype."""

  def __init__(self, base: nnx.Linear, rank: int, scale: float, *, rngs: nnx.Rngs, init: str = "kaiming",
               dropout: float = 0.0):
    self.in_features, self.out_features = base.in_features, base.out_features
    self.use_bias, self.dtype, self.param_dtype = base.use_bias, base.dtype, base.param_dtype
    self.precision = base.precision
    self.kernel = base.kernel
    self.bias = base.bias if base.use_bias else nnx.data(None)
    self.rank, self.scale, self.dropout = rank, float(scale), float(dropout)
    key = rngs.params()
    if init == "kaiming":  # torch kaiming_uniform_(a=sqrt(5)) on a (rank, in) weight: U(-1/sqrt(in), 1/sqrt(in))
      bound = 1.0 / np.sqrt(self.in_features)
      down = jax.random.uniform(key, (self.in_features, rank), FACTOR_DTYPE, -bound, bound)
    else:
      down = jax.random.normal(key, (self.in_features, rank), FACTOR_DTYPE) / rank
    self.lora_down = LoRAParam(down)
    self.lora_up = LoRAParam(jnp.zeros((rank, self.out_features), FACTOR_DTYPE))
    self.dropout_key = nnx.data(None)

  def __call__(self, x):
    kernel, bias = self.kernel[...], (self.bias[...] if self.bias is not None else None)
    down, up = self.lora_down[...], self.lora_up[...]
    x, kernel, bias, down, up = dtypes.promote_dtype((x, kernel, bias, down, up), dtype=self.dtype)
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    y = jax.lax.dot_general(x, kernel, dims, precision=self.precision)
    if bias is not None:
      y = y + bias
    if self.dropout and self.dropout_key is not None:
      keep = jax.random.bernoulli(self.dropout_key[...], 1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.dropout), jnp.zeros((), x.dtype))
    h = jax.lax.dot_general(x, down, dims, precision=self.precision)
    return y + jnp.asarray(self.scale, y.dtype) * jax.lax.dot_general(h, up, dims, precision=self.precision)


# ---------------------------------------------------------------------------------------------- module walks

def module_path(path: tuple) -> str:
  return ".".join(str(p) for p in path)


def _matches(path: str, targets) -> bool:
  return any(path == t or path.endswith("." + t) for t in targets)


def _find(module: nnx.Module, kind) -> list[tuple[tuple, Any]]:
  return [(path, node) for path, node in nnx.iter_graph(module) if isinstance(node, kind)]


def _set_child(module: nnx.Module, path: tuple, value):
  parent = module
  for p in path[:-1]:
    parent = parent[p] if isinstance(p, int) else getattr(parent, p)
  if isinstance(path[-1], int):
    parent[path[-1]] = value
  else:
    setattr(parent, path[-1], value)


def lora_modules(module: nnx.Module) -> dict[str, LoRALinear]:
  return {module_path(path): node for path, node in _find(module, LoRALinear)}


def role_of(module: nnx.Module) -> str:
  return "text" if isinstance(module, CLIPTextModel) else "denoiser"


def apply_lora(module: nnx.Module, settings: LoRASettings, *, rngs: nnx.Rngs, role: str | None = None,
               component: str | None = None) -> list[str]:
  """Wraps every nnx.Linear whose path ends in one of the role's targets; returns the wrapped paths.
  component: the name used in messages (default: the role)."""
  role = role or role_of(module)
  component = component or role
  targets = settings.targets(role)
  if lora_modules(module):
    raise ValueError(f"{component}: LoRA is already applied")
  found = [(path, node) for path, node in _find(module, nnx.Linear) if _matches(module_path(path), targets)]
  if not found:
    raise ValueError(f"{component}: no nnx.Linear matches the LoRA targets {list(targets)}")
  for path, linear in sorted(found, key=lambda item: module_path(item[0])):
    _set_child(module, path, LoRALinear(linear, settings.rank, settings.scale, rngs=rngs, init=settings.init,
                                        dropout=settings.dropout))
  return sorted(module_path(path) for path, _ in found)


def set_dropout_key(module: nnx.Module, key):
  """Gives each LoRALinear its own dropout key (fold_in(key, i)) for the next call; None turns dropout off.
  The trainer calls it on the model it merges inside the loss, with the step's key, so dropout is reproducible."""
  for i, (_, node) in enumerate(sorted(lora_modules(module).items())):
    node.dropout_key = nnx.data(None) if key is None else LoRADropoutKey(jax.random.fold_in(key, i))


# -------------------------------------------------------------------------------------- params and factors

def split_lora(module: nnx.Module):
  """(graphdef, LoRA factors as a pure dict, everything else as a pure dict); nnx.merge(graphdef,
  nnx.State(lora), nnx.State(rest)) rebuilds the module."""
  graphdef, lora, rest = nnx.split(module, LoRAParam, ...)
  return graphdef, nnx.to_pure_dict(lora), nnx.to_pure_dict(rest)


def base_state(module: nnx.Module) -> nnx.State:
  """The base weights of a LoRA-wrapped module (the same paths as the module without LoRA)."""
  return nnx.state(module, nnx.All(nnx.Param, nnx.Not(LoRAParam)))


def _walk(tree, prefix=()):
  """(path, leaf dict) for every node of a nested pure dict / State that holds lora_down and lora_up."""
  items = tree.items() if hasattr(tree, "items") else ()
  keys = {k for k, _ in items}
  if {"lora_down", "lora_up"} <= keys:
    yield prefix, tree
    return
  for k, v in (tree.items() if hasattr(tree, "items") else ()):
    if hasattr(v, "items"):
      yield from _walk(v, prefix + (k,))


def _array(x) -> np.ndarray:
  x = x.get_value() if isinstance(x, nnx.Variable) else x
  return np.asarray(jax.device_get(x))


def lora_factors(module_or_params) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{torch module path: (down (rank, in), up (out, rank))} (numpy, torch layout) of a LoRA module, of
  nnx.state(module, LoRAParam), or of its pure dict. Text-encoder paths come without `text_model.`."""
  tree = module_or_params
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree, LoRAParam)
  out = {}
  for path, leaf in _walk(tree):
    down, up = _array(leaf["lora_down"]), _array(leaf["lora_up"])
    out[module_path(path)] = (down.T, up.T)
  if not out:
    raise ValueError("no LoRA factors found (was apply_lora called?)")
  return out


def lora_scale(module: nnx.Module) -> float:
  scales = {node.scale for node in lora_modules(module).values()}
  if len(scales) != 1:
    raise ValueError(f"expected one LoRA scale over the model, found {sorted(scales)}")
  return scales.pop()


def load_lora_factors(module: nnx.Module, factors: dict, *, alpha: float | None = None):
  """Sets the factors of every LoRALinear from {torch path: (down (rank, in), up (out, rank))}, strictly.

  Paths may carry `text_model.` (formats.kohya returns them so). With `alpha`, the file's scale alpha/rank is
  honoured by folding alpha/rank / (the module's scale) into up, so the added weight is the file's.
  """
  modules = lora_modules(module)
  if not modules:
    raise ValueError("load_lora_factors: the module has no LoRA layers (call apply_lora first)")
  given = {}
  for path, pair in factors.items():
    key = path.removeprefix("text_model.") if path.removeprefix("text_model.") in modules else path
    given[key] = pair
  missing, unexpected = sorted(set(modules) - set(given)), sorted(set(given) - set(modules))
  if missing or unexpected:
    raise ValueError(f"LoRA factors do not match the model's LoRA layers: missing {missing[:10]}"
                     f"{' ...' if len(missing) > 10 else ''}; unexpected {unexpected[:10]}"
                     f"{' ...' if len(unexpected) > 10 else ''}")
  for path, node in modules.items():
    down, up = (np.asarray(a, np.float32) for a in given[path])
    want_down, want_up = (node.rank, node.in_features), (node.out_features, node.rank)
    if down.shape != want_down or up.shape != want_up:
      raise ValueError(f"LoRA factors of {path!r}: down {down.shape} / up {up.shape}, the model expects "
                       f"down {want_down} / up {want_up} (rank {node.rank})")
    if alpha is not None:
      up = up * np.float32(alpha / node.rank / node.scale)
    node.lora_down.set_value(jnp.asarray(down.T, FACTOR_DTYPE))
    node.lora_up.set_value(jnp.asarray(up.T, FACTOR_DTYPE))


def with_lora_params(module: nnx.Module, lora_params) -> nnx.Module:
  """Puts a LoRA pure dict / State (the trainer's params) into a LoRA module, in place; returns it."""
  nnx.update(module, lora_params if isinstance(lora_params, nnx.State) else nnx.State(lora_params))
  return module


def merge_lora(module: nnx.Module, *, inplace: bool = False) -> nnx.Module:
  """A plain model (no LoRALinear, no LoRA params): each kernel += scale * down @ up, in fp32 then cast back.
  Without inplace the input is left untouched (its arrays are shared, not copied)."""
  if not inplace:
    module = nnx.merge(*nnx.split(module))
  for path_str, node in sorted(lora_modules(module).items()):
    kernel = node.kernel.get_value()
    delta = node.lora_down.get_value().astype(jnp.float32) @ node.lora_up.get_value().astype(jnp.float32)
    merged = (kernel.astype(jnp.float32) + node.scale * delta).astype(kernel.dtype)
    plain = nnx.eval_shape(lambda n=node: nnx.Linear(n.in_features, n.out_features, use_bias=n.use_bias,
                                                     dtype=n.dtype, param_dtype=n.param_dtype,
                                                     precision=n.precision, rngs=nnx.Rngs(0)))
    plain.kernel = nnx.Param(merged)
    if node.use_bias:
      plain.bias = nnx.Param(node.bias.get_value())
    path = tuple(int(p) if p.isdigit() else p for p in path_str.split("."))
    _set_child(module, path, plain)
  return module


def linear_shapes(module: nnx.Module) -> dict[str, tuple[int, int]]:
  """{torch module path: weight shape (out, in)} of every nnx.Linear (the places a LoRA file may target)."""
  return {module_path(path): (node.out_features, node.in_features) for path, node in _find(module, nnx.Linear)}


def add_lora_weights(module: nnx.Module, factors: dict, *, alpha: float, scale: float = 1.0):
  """Folds a LoRA file's factors into the plain weights, in place: kernel += scale * alpha / rank * (up @ down).T
  per module (torch layout factors: down (rank, in), up (out, rank)); paths may carry `text_model.`."""
  linears = {module_path(path): node for path, node in _find(module, nnx.Linear)}
  for path, (down, up) in factors.items():
    node = linears.get(path) or linears.get(path.removeprefix("text_model.")) or linears.get(f"text_model.{path}")
    if node is None:
      raise ValueError(f"LoRA module {path!r}: no such linear layer in the model")
    down, up = np.asarray(down, np.float32), np.asarray(up, np.float32)
    delta = np.float32(scale * alpha / down.shape[0]) * (up @ down).T  # (in, out), our kernel layout
    kernel = node.kernel.get_value()
    node.kernel.set_value((kernel.astype(jnp.float32) + delta).astype(kernel.dtype))


def count_params(module_or_state) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(module_or_state))
