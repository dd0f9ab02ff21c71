"""LPIPS v0.1 (Zhang et al., CVPR 2018) in Flax NNX: the perceptual distance behind DreamBooth's DIV metric.

LPIPS(x0, x1) = sum over the backbone's tapped layers l of mean_hw( w_l . (f0_l - f1_l)^2 ), where f_l are the
backbone's ReLU activations, each unit-normalised over channels, and w_l the "lin" 1x1 convolutions calibrated on
human judgements. Inputs are RGB images in [-1, 1] at their own size (no resize), shifted and scaled per channel
first, exactly as the lpips package (0.1.4) computes it.

Weights: the backbone's ImageNet weights (torchvision's AlexNet or VGG16 `features`, 2.5M / 15M parameters, not
bundled) and the lin weights (bundled in assets/lpips, BSD-2). Accepted backbone files (safetensors only):
  * a torchvision/timm classifier state dict (`features.N.weight`; the heads are ignored): the hub's
    timm/vgg16.tv_in1k is torchvision's VGG16 (net="vgg"); for AlexNet, where torchvision is installed:
      safetensors.torch.save_model(torchvision.models.alexnet(weights="DEFAULT"), "alexnet.safetensors")
  * an lpips.LPIPS state dict (`net.sliceK.N.weight` + `linK.model.1.weight`), which carries its own lin weights:
      safetensors.torch.save_model(lpips.LPIPS(net="alex"), "lpips_alex.safetensors")
"""

import dataclasses
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreambooth_jax.io import safetensors as safetensors_io
from dreambooth_jax.models.layers import Layers
from dreambooth_jax.io.safetensors import CheckpointError
from dreambooth_jax.io.diffusers_folder import load_module

BUNDLED_LIN = pathlib.Path(__file__).resolve().parent.parent / "assets" / "lpips"
# lpips.ScalingLayer: ImageNet statistics expressed for inputs in [-1, 1].
SHIFT_C = np.array([-.030, -.088, -.188], np.float32)
SCALE_C = np.array([.458, .448, .450], np.float32)
NORM_EPS = 1e-10  # lpips.normalize_tensor


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A torchvision `features` Sequential: ("conv", out, kernel, stride, padding) | ("relu",) | ("pool", k, stride).

  taps: the Sequential indices whose outputs LPIPS compares (the ends of lpips' slice1..slice5).
  """
  layers: tuple
  taps: tuple


def vgg16_layers() -> tuple:
  """torchvision's VGG16 (configuration "D") feature stack: 3x3 convs with padding 1, 2x2 max pools."""
  layers = []
  for width in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
    layers += [("pool", 2, 2)] if width == "M" else [("conv", width, 3, 1, 1), ("relu",)]
  return tuple(layers)


BACKBONES = {
    "alex": Backbone(layers=(("conv", 64, 11, 4, 2), ("relu",), ("pool", 3, 2),
                             ("conv", 192, 5, 1, 2), ("relu",), ("pool", 3, 2),
                             ("conv", 384, 3, 1, 1), ("relu",), ("conv", 256, 3, 1, 1), ("relu",),
                             ("conv", 256, 3, 1, 1), ("relu",)),
                     taps=(1, 4, 7, 9, 11)),
    "vgg": Backbone(layers=vgg16_layers(), taps=(3, 8, 15, 22, 29)),
}


def backbone(net: str) -> Backbone:
  if net not in BACKBONES:
    raise ValueError(f"LPIPS: net={net!r} is not supported (supported: {sorted(BACKBONES)})")
  return BACKBONES[net]


class LPIPS(nnx.Module):
  """features: the backbone convolutions keyed by their torchvision index; lins: one 1x1 conv per tap."""

  def __init__(self, net: str = "alex", *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.net = net
    layers = Layers(rngs, dtype)
    convs, channels, tap_channels = {}, 3, []
    for index, layer in enumerate(backbone(net).layers):
      if layer[0] == "conv":
        _, out, kernel, stride, padding = layer
        convs[str(index)] = layers.conv(channels, out, kernel=kernel, stride=stride, padding=padding)
        channels = out
      if index in backbone(net).taps:
        tap_channels.append(channels)
    self.features = nnx.Dict(convs)
    self.lins = nnx.List([nnx.Conv(c, 1, kernel_size=(1, 1), use_bias=False, dtype=dtype, rngs=rngs)
                          for c in tap_channels])

  def tapped_features(self, images_BHWC) -> list:
    """The unit-normalised activations at each tap, for images in [-1, 1]."""
    x = (images_BHWC - SHIFT_C) / SCALE_C
    taps = []
    for index, layer in enumerate(backbone(self.net).layers):
      if layer[0] == "conv":
        x = self.features[str(index)](x)
      elif layer[0] == "relu":
        x = jax.nn.relu(x)
      else:  # torch MaxPool2d without padding, floor mode
        _, kernel, stride = layer
        x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, kernel, kernel, 1), (1, stride, stride, 1), "VALID")
      if index in backbone(self.net).taps:
        x32 = x.astype(jnp.float32)
        taps.append(x32 / (jnp.sqrt(jnp.sum(x32 ** 2, axis=-1, keepdims=True)) + NORM_EPS))
    return taps

  def distance(self, taps0: list, taps1: list):
    """(B,) LPIPS distances between two batches of tapped features."""
    total_B = 0.0
    for lin, f0_BHWC, f1_BHWC in zip(self.lins, taps0, taps1):
      total_B = total_B + jnp.mean(lin((f0_BHWC - f1_BHWC) ** 2), axis=(1, 2, 3))
    return total_B

  def __call__(self, images0_BHWC, images1_BHWC):
    return self.distance(self.tapped_features(images0_BHWC), self.tapped_features(images1_BHWC))


@nnx.jit
def pairwise_distances(model: LPIPS, images_NHWC, pairs_P2):
  """LPIPS between images[pairs[p, 0]] and images[pairs[p, 1]] for every p; each image's features computed once."""
  taps = model.tapped_features(images_NHWC)
  one_pair = lambda pair: model.distance([t[pair[0]][None] for t in taps], [t[pair[1]][None] for t in taps])[0]
  return jax.lax.map(one_pair, pairs_P2)  # one pair at a time: 512-px VGG features are ~64 MB per image


# ----------------------------------------------------------------------------------------------- weights

LPIPS_TRUNK_KEY = re.compile(r"net\.slice\d+\.(\d+)\.(weight|bias)")
LPIPS_LIN_KEY = re.compile(r"lins?\.?(\d+)\.model\.\d+\.weight")  # lpips registers linK and lins.K
CLASSIFIER_PREFIXES = ("classifier.", "head.", "pre_logits.", "fc.")


def lin_state_dict(tensors: dict, where: str) -> dict:
  out = {}
  for key, value in tensors.items():
    match = LPIPS_LIN_KEY.fullmatch(key)
    if match:
      out[f"lins.{match.group(1)}.weight"] = value
  if not out:
    raise CheckpointError(f"{where}: no LPIPS lin weights (keys like 'lin0.model.1.weight') in it")
  return out


def trunk_state_dict(tensors: dict, net: str, where: str) -> dict:
  """`features.N.*` for the convolutions LPIPS uses, from either accepted spelling (see the module docstring)."""
  used = {str(i) for i, layer in enumerate(backbone(net).layers) if layer[0] == "conv"}
  out, unexpected = {}, []
  for key, value in tensors.items():
    match = LPIPS_TRUNK_KEY.fullmatch(key)
    if match:
      key = f"features.{match.group(1)}.{match.group(2)}"
    if key.startswith("features."):  # only convolutions carry tensors in torchvision's AlexNet/VGG16 stacks
      if key.split(".")[1] in used:
        out[key] = value
      else:
        unexpected.append(key)  # e.g. a batch-norm VGG: not this architecture
    elif LPIPS_LIN_KEY.fullmatch(key) or key.startswith(("scaling_layer.", *CLASSIFIER_PREFIXES)):
      continue
    else:
      unexpected.append(key)
  if unexpected:
    raise CheckpointError(f"{where}: not a torchvision/timm {net} backbone or an lpips state dict; unexpected keys "
                          f"{sorted(unexpected)[:10]}")
  return out


def read_tensors(name_or_path, where: str) -> tuple[dict, str]:
  """A .safetensors file, a folder with model.safetensors, or a hub id (needs a network)."""
  from dreambooth_jax.eval.encoders import read_weights, resolve_folder  # noqa: PLC0415

  path = pathlib.Path(str(name_or_path)).expanduser()
  if path.is_file():
    if path.suffix in safetensors_io.PICKLE_SUFFIXES:
      safetensors_io.refuse_pickle(path)
    return safetensors_io.load_file(path), str(path)
  folder = resolve_folder(name_or_path, where)
  return read_weights(folder), str(folder)


def load_lpips(backbone_weights, net: str = "alex", lin_weights=None, *, dtype=jnp.float32) -> LPIPS:
  """LPIPS with the given backbone weights; lin weights from the backbone file if it has them, else lin_weights,
  else the bundled v0.1 ones."""
  backbone(net)
  tensors, source = read_tensors(backbone_weights, f"LPIPS {net} backbone")
  state = trunk_state_dict(tensors, net, source)
  if lin_weights is not None:
    lin_source = str(lin_weights)
    state.update(lin_state_dict(read_tensors(lin_weights, "LPIPS lin weights")[0], lin_source))
  elif any(LPIPS_LIN_KEY.fullmatch(k) for k in tensors):
    state.update(lin_state_dict(tensors, source))
    lin_source = source
  else:
    lin_source = str(BUNDLED_LIN / f"v0.1_{net}.safetensors")
    state.update(lin_state_dict(safetensors_io.load_file(lin_source), lin_source))
  check_scaling(tensors, source)
  return load_module(lambda: LPIPS(net, rngs=nnx.Rngs(0), dtype=dtype), state,
                     where=f"LPIPS {net} ({source}; lin weights {lin_source})",
                     built_from=f"the {net} backbone (net={net!r})")


def check_scaling(tensors: dict, where: str):
  """An lpips state dict carries its input scaling as buffers; ours is the v0.1 constant: they must agree."""
  for name, expected in (("scaling_layer.shift", SHIFT_C), ("scaling_layer.scale", SCALE_C)):
    if name in tensors and not np.allclose(np.asarray(tensors[name], np.float32).reshape(-1), expected):
      raise CheckpointError(f"{where}: {name} = {np.asarray(tensors[name]).reshape(-1)} differs from LPIPS v0.1's "
                            f"{expected}")


def load_image(path) -> np.ndarray:
  """An image file as float32 HWC in [-1, 1] at its own size (lpips.im2tensor: x / 127.5 - 1)."""
  from dreambooth_jax.eval import preprocess  # noqa: PLC0415

  return np.asarray(preprocess.open_image(path), np.float32) / 127.5 - 1.0


def mean_pairwise_distance(model: LPIPS, images, where: str) -> tuple[float, int]:
  """(mean LPIPS over the N(N-1)/2 unordered pairs, number of pairs) of image files or uint8 HWC arrays; the images
  must share one size."""
  files = [str(im) for im in images if isinstance(im, (str, pathlib.Path))]
  images = [load_image(im) if isinstance(im, (str, pathlib.Path)) else np.asarray(im, np.float32) / 127.5 - 1.0
            for im in images]
  sizes = sorted({im.shape for im in images})
  if len(sizes) > 1:
    raise ValueError(f"{where}: LPIPS compares images of one size, got sizes {sizes}"
                     + (f" among {files}" if files else ""))
  if len(images) < 2:
    raise ValueError(f"{where}: pairwise LPIPS needs at least 2 images, got {len(images)}")
  pairs_P2 = np.array([(i, j) for i in range(len(images)) for j in range(i + 1, len(images))], np.int32)
  distances_P = np.asarray(pairwise_distances(model, np.stack(images), pairs_P2))
  return float(distances_P.mean()), len(pairs_P2)
