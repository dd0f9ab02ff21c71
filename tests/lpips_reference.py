"""The LPIPS reference for tests, in PyTorch: lpips 0.1.4's code, with torchvision's backbone definitions.

Why vendored: the lpips package imports torchvision, and PyPI's torchvision cannot load its operators beside the
CPU build of torch==2.13.0 that the test extra pins ("operator torchvision::nms does not exist"), so neither can be
a test dependency here. The functions and classes below are copied from lpips 0.1.4 (lpips/__init__.py, lpips.py,
pretrained_networks.py; BSD-2-Clause, Copyright (c) 2018 Richard Zhang, Phillip Isola, Alexei A. Efros, Eli
Shechtman, Oliver Wang), trimmed to the inference path and with `tv.alexnet(...).features` / `tv.vgg16(...)
.features` replaced by torchvision's own layer lists (torchvision/models/alexnet.py and vgg.py, cfg "D";
BSD-3-Clause). Where a working torchvision is importable, `torchvision_features` uses it instead.
"""

import pathlib
from collections import namedtuple

import safetensors.torch
import torch
from torch import nn

BUNDLED_LIN = pathlib.Path(__file__).resolve().parents[1] / "dreambooth_jax" / "assets" / "lpips"


def torchvision_features(net: str) -> nn.Sequential:
  try:
    from torchvision import models as tv  # noqa: PLC0415
    return (tv.alexnet(weights=None) if net == "alex" else tv.vgg16(weights=None)).features
  except Exception:  # noqa: BLE001 - torchvision absent or broken beside this torch build
    pass
  if net == "alex":  # torchvision.models.AlexNet.features
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )
  layers, in_channels = [], 3  # torchvision.models.vgg.make_layers(cfgs["D"], batch_norm=False)
  for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]:
    if v == "M":
      layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
    else:
      layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
      in_channels = v
  return nn.Sequential(*layers)


# ------------------------------------------------------------------------ lpips 0.1.4, inference path

def normalize_tensor(in_feat, eps=1e-10):
  norm_factor = torch.sqrt(torch.sum(in_feat**2, dim=1, keepdim=True))
  return in_feat / (norm_factor + eps)


def spatial_average(in_tens, keepdim=True):
  return in_tens.mean([2, 3], keepdim=keepdim)


class Trunk(nn.Module):
  """pretrained_networks.alexnet / vgg16: the feature Sequential cut into slices ending at the tapped ReLUs."""

  SLICES = {"alex": [(0, 2), (2, 5), (5, 8), (8, 10), (10, 12)],
            "vgg": [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]}

  def __init__(self, net):
    super().__init__()
    features = torchvision_features(net)
    self.N_slices = 5
    for k, (start, stop) in enumerate(self.SLICES[net], start=1):
      piece = nn.Sequential()
      for x in range(start, stop):
        piece.add_module(str(x), features[x])
      setattr(self, f"slice{k}", piece)
    for param in self.parameters():
      param.requires_grad = False

  def forward(self, X):
    outs, h = [], X
    for k in range(1, self.N_slices + 1):
      h = getattr(self, f"slice{k}")(h)
      outs.append(h)
    return namedtuple("Outputs", ["relu1", "relu2", "relu3", "relu4", "relu5"])(*outs)


class ScalingLayer(nn.Module):
  def __init__(self):
    super().__init__()
    self.register_buffer("shift", torch.Tensor([-.030, -.088, -.188])[None, :, None, None])
    self.register_buffer("scale", torch.Tensor([.458, .448, .450])[None, :, None, None])

  def forward(self, inp):
    return (inp - self.shift) / self.scale


class NetLinLayer(nn.Module):
  """A single linear layer which does a 1x1 conv."""

  def __init__(self, chn_in, chn_out=1, use_dropout=False):
    super().__init__()
    layers = [nn.Dropout()] if use_dropout else []
    layers += [nn.Conv2d(chn_in, chn_out, 1, stride=1, padding=0, bias=False)]
    self.model = nn.Sequential(*layers)

  def forward(self, x):
    return self.model(x)


class LPIPS(nn.Module):
  """lpips.LPIPS(net=net, version="0.1", lpips=True, spatial=False, use_dropout=True), eval mode."""

  CHANNELS = {"alex": [64, 192, 384, 256, 256], "vgg": [64, 128, 256, 512, 512]}

  def __init__(self, net="alex"):
    super().__init__()
    self.scaling_layer = ScalingLayer()
    self.chns = self.CHANNELS[net]
    self.L = len(self.chns)
    self.net = Trunk(net)
    self.lins = nn.ModuleList([NetLinLayer(c, use_dropout=True) for c in self.chns])
    for k, lin in enumerate(self.lins):  # lpips registers them as lin0..lin4 too (state dict keys linK.model.1.weight)
      setattr(self, f"lin{k}", lin)
    self.eval()

  def forward(self, in0, in1, normalize=False):
    if normalize:
      in0, in1 = 2 * in0 - 1, 2 * in1 - 1
    in0_input, in1_input = self.scaling_layer(in0), self.scaling_layer(in1)
    outs0, outs1 = self.net.forward(in0_input), self.net.forward(in1_input)
    val = 0
    for kk in range(self.L):
      feats0, feats1 = normalize_tensor(outs0[kk]), normalize_tensor(outs1[kk])
      val = val + spatial_average(self.lins[kk]((feats0 - feats1) ** 2), keepdim=True)
    return val


def random_backbone_model(net: str, seed: int = 0) -> LPIPS:
  """Random backbone weights (ImageNet's are not available offline) with noticeable biases, and the real bundled
  v0.1 lin weights (non-negative, so distances are positive as with the published weights)."""
  torch.manual_seed(seed)
  model = LPIPS(net)
  lins = safetensors.torch.load_file(BUNDLED_LIN / f"v0.1_{net}.safetensors")
  with torch.no_grad():
    for k, lin in enumerate(model.lins):
      lin.model[1].weight.copy_(lins[f"lin{k}.model.1.weight"])
    for name, p in model.net.named_parameters():
      if name.endswith("bias"):  # torch's default bias init is tiny; make the biases matter
        p.copy_(0.1 * torch.randn(p.shape))
  return model
