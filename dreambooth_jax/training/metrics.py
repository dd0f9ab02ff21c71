"""Training metrics: TensorBoard, WORKDIR/metrics.jsonl (one JSON object per step, with its "bucket" [H, W], and
with config.concepts `instance_loss/<name>` and `prior_loss/<name>` per concept, null when the step had no example
of it; one per validation loss; event records such as {"event": "compile", ...}) and a console progress bar.

Values arrive as device arrays and are read one step late (after the next step is dispatched) so the host never
waits for the device in the loop.
"""

import json
import math
import pathlib
import re

import jax
import numpy as np
from tqdm import tqdm


class NonFiniteLoss(FloatingPointError):
  """The loss became NaN or infinite: the run stops, naming the step and the last good checkpoint. A user-facing
  end (the levers are the config's learning rate, max_grad_norm and precision), so the CLI prints one line."""


def concept_losses(values: dict, names: list[str]) -> dict:
  """The step's per-concept sums and counts (step.CONCEPT_METRICS, (C,) arrays) replaced by instance_loss/<name> and
  prior_loss/<name>: the mean over the step's examples of that concept and kind, None when it had none."""
  from dreambooth_jax.training.step import CONCEPT_METRICS  # noqa: PLC0415 (step is jax-heavy; keep this light)
  if not names:
    return values
  host = {k: np.asarray(jax.device_get(values[k]), np.float64) for k in CONCEPT_METRICS}
  out = {k: v for k, v in values.items() if k not in CONCEPT_METRICS}
  for kind in ("instance", "prior"):
    sums, counts = host[f"concept_{kind}_sum"], host[f"concept_{kind}_count"]
    for name, total, count in zip(names, sums, counts):
      out[f"{kind}_loss/{name}"] = float(total / count) if count > 0 else None
  return out


def tensorboard_tag(name: str) -> str:
  """A tensorboard tag for `name`: concept names may hold spaces ("10_sks dog"), which tensorboard warns about at
  every write and rewrites; they are written as "_" (metrics.jsonl keeps the names as they are)."""
  return re.sub(r"[^\w./-]", "_", name)


class MetricsWriter:
  def __init__(self, workdir: pathlib.Path, *, total_steps: int, initial_step: int, enabled: bool = True):
    self.enabled = enabled
    self.jsonl = open(workdir / "metrics.jsonl", "a") if enabled else None
    self.tensorboard = None
    if enabled:
      from tensorboardX import SummaryWriter  # noqa: PLC0415
      self.tensorboard = SummaryWriter(str(workdir / "tensorboard"))
    self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", disable=not enabled,
                    dynamic_ncols=True)

  def write(self, step: int, scalars: dict, bucket=None):
    """One step record: the scalars, and the step's (H, W) when given."""
    scalars = {k: None if v is None else float(v) for k, v in jax.device_get(scalars).items()}
    if self.enabled:
      shape = {} if bucket is None else {"bucket": [int(x) for x in bucket]}
      self.jsonl.write(json.dumps({"step": step, **scalars, **shape}) + "\n")
      self.jsonl.flush()
      for k, v in scalars.items():
        if v is not None and math.isfinite(v):
          self.tensorboard.add_scalar(tensorboard_tag(f"train/{k}"), v, step)
      self.bar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.4f}", refresh=False)
      self.bar.update(step - self.bar.n)
    return scalars

  def record(self, step: int, scalars: dict):
    """A record of its own in metrics.jsonl (no "loss": e.g. the validation loss) and tensorboard, tags as named."""
    if self.enabled:
      self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
      self.jsonl.flush()
      for k, v in scalars.items():
        self.tensorboard.add_scalar(tensorboard_tag(k), v, step)

  def event(self, record: dict):
    """A record that is not a step (e.g. a compile), as it is."""
    if self.enabled:
      self.jsonl.write(json.dumps(record) + "\n")
      self.jsonl.flush()

  def image(self, name: str, image_HWC: np.ndarray, step: int):
    if self.enabled:
      self.tensorboard.add_image(tensorboard_tag(name), image_HWC, step, dataformats="HWC")

  def scalar(self, tag: str, value: float, step: int):
    if self.enabled:
      self.tensorboard.add_scalar(tag, value, step)

  def close(self):
    if self.enabled:
      self.bar.close()
      self.jsonl.close()
      self.tensorboard.close()


def image_grid(images_BHWC: np.ndarray, columns: int | None = None) -> np.ndarray:
  n, h, w, c = images_BHWC.shape
  columns = columns or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / columns))
  grid = np.zeros((rows * h, columns * w, c), images_BHWC.dtype)
  for i, image in enumerate(images_BHWC):
    r, col = divmod(i, columns)
    grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
  return grid
