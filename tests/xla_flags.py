"""The XLA flags the test suite compiles under, and the helpers that add and remove them (one home for both)."""

import os
import re
import subprocess
import sys

# Compile-time flags for the suite's programs (tests/conftest.py adds them to XLA_FLAGS; subprocesses inherit them).
# They change how XLA:CPU generates code, not the program: the HLO passes, fusion decisions and library calls
# (YNNPACK, Eigen) stay the same, and only the last bits of some results round differently.
#  - LLVM at -O0 instead of -O2;
#  - elementwise and reduction fusions through XLA's older IR emitter, not its MLIR fusion emitters, in one codegen
#    part: the MLIR emitters cost more to compile at -O0. At XLA's default -O2 it is the other way round (the
#    diffusers-test train step compiles in 26 s with the older emitter, 14 s without, and runs as fast), so the
#    product keeps XLA's defaults.
# test_golden_step.py (4 compiles, one process, cold cache): 151 CPU-seconds at XLA's defaults, 106 at -O0 (one
# hour); 86 at -O0 and 53 with all three (another hour). The whole suite on 2 cores: 28.2 CPU-minutes at -O0
# alone, 22.9 with all three.
SUITE = {"xla_backend_optimization_level": "0", "xla_cpu_use_fusion_emitters": "false",
         "xla_cpu_parallel_codegen_split_count": "1"}


def with_suite_flags(flags: str) -> str:
  """flags plus each suite flag it does not already set (a value of your own is kept: tests run under it)."""
  return " ".join([*flags.split(), *(f"--{k}={v}" for k, v in SUITE.items() if k not in flags)])


def known_to_xla(flags: str) -> str:
  """flags without the suite flags this jaxlib's XLA does not know (XLA aborts on an unknown flag): a code generation
  flag that a later XLA drops costs the suite compile time, not every test. A CPU client start (about 1 s) per try."""
  for _ in range(len(SUITE) + 1):
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices('cpu')"], capture_output=True, text=True,
                           env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"))
    unknown = re.search(r"Unknown flags? in XLA_FLAGS: (--[\w]+)", probe.stderr)
    if probe.returncode == 0 or unknown is None or unknown.group(1)[2:] not in SUITE:
      return flags
    flags = " ".join(f for f in flags.split() if not f.startswith(unknown.group(1)))
  return flags


def without_suite_flags(flags: str) -> str:
  """flags without the suite's: what the product compiles under (XLA's defaults)."""
  return " ".join(f for f in flags.split() if not any(k in f for k in SUITE))


def fake_devices(n: int) -> str:
  """XLA_FLAGS for a subprocess with n CPU devices, keeping the suite's flags (every comparison in the suite runs
  under the same flags)."""
  return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
