"""benchmarks/matrix.py's pure parts: the table's targets over the implementations a shape has, the n/a cells, and
the train cells' settings (the same fp32 full fine-tune for every shape). Nothing here runs a cell."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import matrix  # noqa: E402
import train_step  # noqa: E402


def _rows(shape, steps_s, images_per_s):
  """Rows as run_cell returns them: a float is an ok cell, "n/a" a cell not built, "error" a failed one."""
  rows = []
  for what, values, key in (("train", steps_s, "step_time_s"), ("sample", images_per_s, "images_per_s")):
    for impl, value in zip(matrix.IMPLS, values):
      row = {"shape": shape, "impl": impl, "what": what}
      rows.append({**row, "status": "ok", key: value} if isinstance(value, float) else {**row, "status": value})
  return rows


def test_table_judges_flux_on_torch_alone_and_a_failed_cell_as_na():
  rows = (_rows("flux-tiny", [0.01, 0.05, "n/a"], [2.0, 1.0, "n/a"])
          + _rows("sdxl-tiny", [0.01, 0.05, "error"], [2.0, 1.0, 4.0]))
  lines = matrix.table(rows).splitlines()
  assert lines[2] == "| flux-tiny | 10.0 / 50.0 / n/a | 0.20x | n/a | yes | 2.00 / 1.00 / n/a | 2.00x | n/a | yes |"
  # flax's train cell failed: the step target cannot be judged; the sampler target is torch's alone
  assert lines[3] == ("| sdxl-tiny | 10.0 / 50.0 / n/a | 0.20x | n/a | n/a | 2.00 / 1.00 / 4.00 | 2.00x | 0.50x "
                      "| yes |")


def test_flux_has_no_diffusers_flax_cell_and_every_other_shape_has_one():
  row = matrix.run_cell(None, None, "flux-tiny", "diffusers-flax", "sample")
  assert row["status"] == "n/a" and "no Flux" in row["why"]
  assert [s for s in matrix.SHAPES if (s, "diffusers-flax") in matrix.NOT_BUILT] == ["flux-tiny"]
  assert set(matrix.SHAPES) <= set(train_step.MODELS) | {"tiny"}


def test_train_cells_are_fp32_full_fine_tunes_with_prior_on_every_shape():
  args = lambda shape: type("Args", (), dict(shape=shape, resolution=64, train_steps=1, warmup=0))()
  for shape in matrix.SHAPES:
    c = train_step.make_config(train_step.make_parser().parse_args(matrix.train_flags(args(shape))))
    assert (c.mixed_precision, c.param_dtype, c.remat, c.lora.enabled) == ("no", "float32", "none", False), shape
    assert (c.with_prior_preservation, c.train_batch_size, c.resolution) == (True, 1, 64), shape
    assert not train_step.torch_remat(train_step.make_parser().parse_args(matrix.train_flags(args(shape)))), shape
