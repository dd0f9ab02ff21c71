"""Cold vs warm persistent compilation cache: time from process start to the first train step (the tiny default),
and to the end of a --dry_run (SD 1.5 shapes: compile of the 512 px step on abstract weights). Each run is a fresh
process and workdir; "cold" starts from an empty cache folder, "warm" reuses it.

  python benchmarks/compile_cache.py --what=tiny [--repeat=2]
  python benchmarks/compile_cache.py --what=sd15_dry_run

The tiny runs read class images generated beforehand (their own sampler compile would otherwise be in "cold" and
not in "warm"). Prints one JSON line per run.
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
flags.DEFINE_enum("what", "tiny", ["tiny", "sd15_dry_run"], "Which command to time.")
flags.DEFINE_integer("repeat", 1, "Warm runs after the cold one.")
FLAGS = flags.FLAGS


def first_step_seconds(command, env, workdir: pathlib.Path, timeout=1200) -> float:
  """Seconds from the process start to metrics.jsonl's first step record; the run is then stopped."""
  t0 = time.perf_counter()
  with open(workdir.parent / f"{workdir.name}.log", "w") as log:
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=log)
    metrics = workdir / "metrics.jsonl"
    while time.perf_counter() - t0 < timeout:
      if proc.poll() is not None and not metrics.is_file():
        raise RuntimeError(f"run ended (status {proc.returncode}) before its first step; see {log.name}")
      if metrics.is_file() and any('"step"' in line for line in metrics.read_text().splitlines()):
        seconds = time.perf_counter() - t0
        proc.kill()
        proc.wait()
        return seconds
      time.sleep(0.05)
  proc.kill()
  raise TimeoutError(command)


def main(argv):
  del argv
  root = pathlib.Path(tempfile.mkdtemp(prefix="compile-cache-bench-"))
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  cache = root / "xla"
  base = [sys.executable, "-m", "dreambooth_jax.train"]
  if FLAGS.what == "tiny":
    tiny = [*base, f"--config={ROOT / 'configs' / 'tiny.py'}", f"--config.class_data_dir={root / 'class'}",
            "--config.validation_steps=0", "--config.export_at_end=False"]
    # class images first, with the cache off (not part of either measurement)
    subprocess.run([*tiny, f"--workdir={root / 'prep'}", "--config.max_train_steps=1",
                    "--config.compilation_cache_dir="], env=env, check=True, capture_output=True)
    for i in range(1 + FLAGS.repeat):
      workdir = root / f"run{i}"
      seconds = first_step_seconds([*tiny, f"--workdir={workdir}", f"--config.compilation_cache_dir={cache}"], env,
                                   workdir)
      print(json.dumps({"what": "tiny: start -> first step", "cache": "cold" if i == 0 else "warm",
                        "seconds": round(seconds, 1)}), flush=True)
  else:
    for i in range(1 + FLAGS.repeat):
      t0 = time.perf_counter()
      subprocess.run([*base, f"--config={ROOT / 'configs' / 'dog.py'}", "--dry_run",
                      f"--config.compilation_cache_dir={cache}"], env=env, check=True, capture_output=True)
      print(json.dumps({"what": "sd15 512 px dry run: start -> compiled + planned",
                        "cache": "cold" if i == 0 else "warm", "seconds": round(time.perf_counter() - t0, 1)}),
            flush=True)


if __name__ == "__main__":
  app.run(main)
