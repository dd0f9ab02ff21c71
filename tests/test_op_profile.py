"""benchmarks/op_profile.py's pure parts: an optimized HLO module's instructions get their kind and our source line
(from the module's stack-frame tables), and traced events are summed by them. Nothing here traces."""

import pathlib
import sys

import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import op_profile  # noqa: E402


def conv_then_matmul(x_BHWC, w_HWIO, m_CD):
  y_BHWC = jax.lax.conv_general_dilated(x_BHWC, w_HWIO, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.tanh(y_BHWC).sum(axis=(1, 2)) @ m_CD


def test_parse_module_kinds_and_lines_and_summary():
  args = (jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4)), jnp.ones((4, 5)))
  text = jax.jit(conv_then_matmul).lower(*args).compile().as_text()
  ops = op_profile.parse_module(text)
  by_kind = {}
  for name, (kind, where, line) in ops.items():
    by_kind.setdefault(kind, []).append((name, where))
  assert by_kind["convolution"] and by_kind["matmul"], sorted(by_kind)
  source = conv_then_matmul.__code__.co_firstlineno
  conv_lines = {where for _, where in by_kind["convolution"]}
  assert f"test_op_profile.py:{source + 1} conv_then_matmul" in conv_lines, conv_lines
  matmul_lines = {where for _, where in by_kind["matmul"]}
  assert f"test_op_profile.py:{source + 3} conv_then_matmul" in matmul_lines, matmul_lines

  conv, matmul = by_kind["convolution"][0][0], by_kind["matmul"][0][0]
  events = [{"name": conv, "ts": 0.0, "dur": 3000.0}, {"name": matmul, "ts": 5000.0, "dur": 1000.0},
            {"name": "not-in-the-module", "ts": 6000.0, "dur": 1000.0}]
  out = op_profile.summarize(events, ops, calls=2, top=5)
  assert out["op_ms_per_call"] == 2.5 and out["no_op_running_ms_per_call"] == 1.0
  assert out["by_kind"] == [("convolution", 1.5, 60.0), ("matmul", 0.5, 20.0), ("(runtime)", 0.5, 20.0)]
