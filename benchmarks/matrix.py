"""Issue #16's comparison matrix: our train step and sampler vs diffusers-torch and diffusers-flax 0.39, over a
matrix of model shapes (SD, SDXL and Flux layouts), in one run on whatever backend each library finds (here: the
CPU).

  python benchmarks/matrix.py                                        # every shape at 64 px
  python benchmarks/matrix.py --shapes=tiny --whats=train --impls=ours,diffusers-flax

diffusers-flax 0.39 (the last diffusers with Flax models) runs in its own venv, which this script creates on first
use (--flax_venv, pinned to FLAX_PINS with our jax version) and reuses after; the tests never install it. Every cell
(shape, implementation, train | sample) runs in its own process, the implementations of one shape back to back so
that a shared machine's load affects them alike; each prints one JSON line, and a markdown table closes the run.

Train step: 1 instance + 1 class example, fp32, full fine-tune (ours: benchmarks/train_step.py's ours(), the whole
DreamBooth step; diffusers-torch: its torch_step(); diffusers-flax: benchmarks/diffusers_flax_039.py). Sampler:
--sample_batch x --sample_steps, VAE decode included, the family's default guidance (SD, SDXL: DDIM with CFG 7.5;
Flux: flow-matching Euler with the distilled guidance input 3.5, no CFG) (ours: sampler.generate; torch:
benchmarks/sample.py's diffusers pipeline; flax: _generate's fori_loop, random text context). diffusers-flax has no
Flux: those cells are n/a. Targets (issue #16, every shape): our step <= 0.5x diffusers-flax's and <= 0.5x
diffusers-torch's (where they exist); our sampler >= 1.5x diffusers-torch's images/s.
"""

import argparse
import importlib.metadata
import json
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPES = {"tiny": ROOT / "dreambooth_jax" / "assets" / "tiny-sd",
          "diffusers-test": ROOT / "benchmarks" / "shapes" / "diffusers-test",
          "sd15-narrow": ROOT / "benchmarks" / "shapes" / "sd15-narrow",
          "sdxl-tiny": ROOT / "benchmarks" / "shapes" / "sdxl-tiny",
          "flux-tiny": ROOT / "benchmarks" / "shapes" / "flux-tiny"}
NOT_BUILT = {("flux-tiny", "diffusers-flax"): "diffusers-flax 0.39 has no Flux model"}  # (shape, impl): why n/a
IMPLS = ("ours", "diffusers-torch", "diffusers-flax")
WHATS = ("train", "sample")
FLAX_VENV = pathlib.Path.home() / ".cache" / "dreambooth_jax" / "bench-venvs" / "diffusers-flax-0.39"
FLAX_SCRIPT = ROOT / "benchmarks" / "diffusers_flax_039.py"
# A set found to import and run FlaxUNet2DConditionModel, FlaxAutoencoderKL and FlaxDDIMScheduler on jax 0.10.2
# (flax linen of 0.12.8; no transformers: the Flax CLIP is not built). jax/jaxlib follow ours: the same XLA.
FLAX_PINS = ("diffusers==0.39.0", "flax==0.12.8", "optax==0.2.8", "numpy==2.4.6")
STEP_RATIO_MAX = 0.5  # our step time / theirs (diffusers-flax and diffusers-torch)
SAMPLER_RATIO_MIN = 1.5  # our images/s / diffusers-torch's


# ------------------------------------------------------------------------------------------------ the venv

def flax_venv(venv: pathlib.Path) -> pathlib.Path:
  """The venv's python, created and installed when missing or not importing diffusers-flax 0.39."""
  python = venv / "bin" / "python"
  check = [str(python), "-c", "import diffusers, jax; from diffusers import FlaxUNet2DConditionModel; "
           "assert diffusers.__version__ == '0.39.0', diffusers.__version__; print(jax.__version__)"]
  jax_version = importlib.metadata.version("jax")
  if python.exists():
    out = subprocess.run(check, capture_output=True, text=True)
    if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [jax_version]:
      return python
  print(f"matrix: installing diffusers-flax 0.39 into {venv} (jax {jax_version})", file=sys.stderr, flush=True)
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  subprocess.run([str(python), "-m", "pip", "install", "-q", f"jax=={jax_version}", f"jaxlib=={jax_version}",
                  *FLAX_PINS], check=True)
  subprocess.run(check, check=True, capture_output=True)
  return python


# ------------------------------------------------------------------------------------ cells (run in workers)

def train_flags(args) -> list[str]:
  """benchmarks/train_step.py's flags of every train cell: 1 + 1, fp32 weights and compute, full fine-tune, no
  remat (the Flux config's LoRA on a bf16 base with remat is overridden: the same work as the torch step)."""
  return [f"--model={args.shape}", f"--resolution={args.resolution}", "--batch=1", "--prior",
          f"--steps={args.train_steps}", f"--warmup={args.warmup}", "--mixed_precision=no", "--remat=none",
          "--lora=0", "--param_dtype=float32"]


def sibling(name: str):
  """A benchmark module beside this one (train_step, sample), however this file was loaded."""
  if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
  return importlib.import_module(name)


def ours_train(args) -> dict:
  train_step = sibling("train_step")
  ns = train_step.make_parser().parse_args([*train_flags(args), "--no_compile_cache"])  # defaults for the rest
  return train_step.ours(ns)


def torch_threads(args):
  if args.torch_threads:  # on a loaded machine torch's OpenMP threads wait on each other; 1 thread avoids that
    import torch  # noqa: PLC0415
    torch.set_num_threads(args.torch_threads)


def torch_train(args) -> dict:
  train_step = sibling("train_step")
  torch_threads(args)
  return train_step.torch_step(train_step.make_parser().parse_args(train_flags(args)))


def shape_folder(shape: str) -> pathlib.Path:
  """The shape's config folder; for Flux a copy with a T5 tokenizer (benchmarks/train_step.py's flux_folder)."""
  train_step = sibling("train_step")
  return pathlib.Path(train_step.flux_folder(shape)) if shape in train_step.FLUX_MODELS else SHAPES[shape]


def ours_sample(args) -> dict:
  sample = sibling("sample")
  from dreambooth_jax.io import diffusers_folder as weights  # noqa: PLC0415
  from dreambooth_jax.sampling import sampler  # noqa: PLC0415
  pipe = weights.random_pipeline(shape_folder(args.shape))
  settings = sampler.SamplerSettings(steps=args.sample_steps, guidance=pipe.family.DEFAULT_GUIDANCE,
                                     height=args.resolution, width=args.resolution)
  images_per_s, first = sample.ours_images_per_s(pipe, ["a photo of sks dog"] * args.sample_batch, settings,
                                                 args.repeats)
  return {"images_per_s": images_per_s, "first_call_incl_compile_s": first,
          "loop": settings.loop or sampler.DEFAULT_LOOP, "guidance": settings.guidance}


def torch_sample(args) -> dict:
  sample = sibling("sample")
  from dreambooth_jax.io import diffusers_folder as weights  # noqa: PLC0415
  torch_threads(args)
  model_dir = pathlib.Path(tempfile.mkdtemp()) / args.shape
  pipe = weights.random_pipeline(shape_folder(args.shape))
  weights.save_pipeline(pipe, model_dir)
  guidance = pipe.family.DEFAULT_GUIDANCE  # as ours_sample
  images_per_s, device = sample.torch_images_per_s(str(model_dir), ["a photo of sks dog"] * args.sample_batch,
                                                   args.sample_steps, args.resolution, guidance, "float32",
                                                   args.repeats)
  return {"images_per_s": images_per_s, "device": device, "guidance": guidance}


WORKERS = {("ours", "train"): ours_train, ("diffusers-torch", "train"): torch_train,
           ("ours", "sample"): ours_sample, ("diffusers-torch", "sample"): torch_sample}


# ------------------------------------------------------------------------------------------------ the driver

def cell_command(args, flax_python, shape: str, impl: str, what: str) -> list[str]:
  common = [f"--resolution={args.resolution}", f"--repeats={args.repeats}"]
  if impl == "diffusers-flax":
    steps = args.train_steps if what == "train" else args.sample_steps
    return [str(flax_python), str(FLAX_SCRIPT), f"--shape={SHAPES[shape]}", f"--what={what}", f"--steps={steps}",
            f"--warmup={args.warmup}", f"--batch={args.sample_batch}", *common]
  return [sys.executable, __file__, f"--worker={impl}:{what}", f"--shapes={shape}", *common,
          f"--train_steps={args.train_steps}", f"--warmup={args.warmup}", f"--sample_batch={args.sample_batch}",
          f"--sample_steps={args.sample_steps}", f"--torch_threads={args.torch_threads}"]


def run_cell(args, flax_python, shape: str, impl: str, what: str) -> dict:
  row = {"shape": shape, "impl": impl, "what": what}
  if (shape, impl) in NOT_BUILT:
    return {**row, "status": "n/a", "why": NOT_BUILT[shape, impl]}
  t0 = time.perf_counter()
  try:
    out = subprocess.run(cell_command(args, flax_python, shape, impl, what), capture_output=True, text=True,
                         timeout=args.cell_timeout, cwd=ROOT)
  except subprocess.TimeoutExpired:
    return {**row, "status": "error", "error": f"over --cell_timeout={args.cell_timeout}s"}
  lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
  if out.returncode != 0 or not lines:
    tail = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {**row, "status": "error", "error": f"exit {out.returncode}: {tail}"}
  return {**row, "status": "ok", "wall_s": round(time.perf_counter() - t0, 1), **json.loads(lines[-1])}


def fmt(value, spec: str) -> str:
  return "n/a" if value is None else format(value, spec)


def times(value) -> str:
  return fmt(value, ".2f") + ("" if value is None else "x")


def verdict(ratios: list, met) -> str:
  """'yes' | 'no' for a target over the ratios that apply (None: a cell that failed or was not run), else 'n/a'."""
  return "n/a" if not ratios or None in ratios else ("yes" if all(met(r) for r in ratios) else "no")


def table(rows: list[dict]) -> str:
  """One line per shape: step ms and sampler images/s per implementation, our/their ratios, the targets (judged
  on the implementations that exist for the shape: n/a cells drop out, failed ones make the verdict n/a)."""
  cell = {(r["shape"], r["impl"], r["what"]): r for r in rows if r.get("status") == "ok"}
  exists = lambda s, i: (s, i) not in NOT_BUILT
  step = lambda s, i: 1e3 * cell[s, i, "train"]["step_time_s"] if (s, i, "train") in cell else None
  ips = lambda s, i: cell[s, i, "sample"]["images_per_s"] if (s, i, "sample") in cell else None
  ratio = lambda a, b: a / b if a is not None and b is not None else None
  lines = ["| shape | step ms: ours / torch / flax | ours÷torch | ours÷flax | step target | "
           "sampler img/s: ours / torch / flax | ours÷torch | ours÷flax | sampler target |",
           "|---|---|---|---|---|---|---|---|---|"]
  for shape in dict.fromkeys(r["shape"] for r in rows):
    ms = [step(shape, i) for i in IMPLS]
    sampled = [ips(shape, i) for i in IMPLS]
    st, sf = ratio(ms[0], ms[1]), ratio(ms[0], ms[2])
    step_ok = verdict([r for r, i in ((st, IMPLS[1]), (sf, IMPLS[2])) if exists(shape, i)],
                      lambda r: r <= STEP_RATIO_MAX)
    pt, pf = ratio(sampled[0], sampled[1]), ratio(sampled[0], sampled[2])
    sample_ok = verdict([pt] if exists(shape, IMPLS[1]) else [], lambda r: r >= SAMPLER_RATIO_MIN)
    lines.append(f"| {shape} | {' / '.join(fmt(v, '.1f') for v in ms)} | {times(st)} | {times(sf)} | {step_ok} | "
                 f"{' / '.join(fmt(v, '.2f') for v in sampled)} | {times(pt)} | {times(pf)} | {sample_ok} |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
  p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {IMPLS}")
  p.add_argument("--whats", default=",".join(WHATS), help=f"comma list of {WHATS}")
  p.add_argument("--resolution", type=int, default=64, help="image size in px (latents: / the VAE's factor)")
  p.add_argument("--train_steps", type=int, default=5, help="timed train steps per cell")
  p.add_argument("--warmup", type=int, default=2, help="untimed train steps after the compile")
  p.add_argument("--sample_batch", type=int, default=4)
  p.add_argument("--sample_steps", type=int, default=20)
  p.add_argument("--repeats", type=int, default=2, help="timed sampler calls per cell")
  p.add_argument("--torch_threads", type=int, default=0, help="torch.set_num_threads for its cells (0: torch's)")
  p.add_argument("--cell_timeout", type=int, default=900, help="seconds before a cell is reported as an error")
  p.add_argument("--flax_venv", type=pathlib.Path, default=FLAX_VENV, help="created on first use, then reused")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # impl:what, one cell in this process
  args = p.parse_args()
  if args.worker:
    impl, what = args.worker.split(":")
    args.shape = args.shapes
    print(json.dumps({"impl": impl, "what": what, **WORKERS[impl, what](args)}), flush=True)
    return
  shapes, impls, whats = args.shapes.split(","), args.impls.split(","), args.whats.split(",")
  for name, values, known in (("--shapes", shapes, SHAPES), ("--impls", impls, IMPLS), ("--whats", whats, WHATS)):
    unknown = [v for v in values if v not in known]
    if unknown:
      p.error(f"{name}: unknown {unknown}; choose from {sorted(known)}")
  flax_python = flax_venv(args.flax_venv) if "diffusers-flax" in impls else None
  rows = []
  for shape in shapes:
    for what in whats:
      for impl in impls:
        rows.append(run_cell(args, flax_python, shape, impl, what))
        print(json.dumps(rows[-1]), flush=True)
  print("\n" + table(rows))


if __name__ == "__main__":
  main()
