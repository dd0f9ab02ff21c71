"""Where the time of our train step or sampler goes, op by op: a jax.profiler trace of a few calls on a benchmark
shape, each traced op joined with XLA's optimized HLO (dumped with --xla_dump_to) and summed by what the op does
and by the line of our code it came from (the HLO's stack frames).

  python benchmarks/op_profile.py --what=train --model=diffusers-test        # 1 + 1 examples, 64 px, fp32
  python benchmarks/op_profile.py --what=sample --model=sdxl-tiny --top=30

Kinds: "convolution" and "matmul" (an op, or a fusion around one), "reduction" (a fusion around a reduce), "copy"
(transposes and layout copies), "elementwise" (other fusions), else the HLO opcode. Built for XLA:CPU, whose thunk
executor names each traced op after its HLO instruction (a GPU's kernel events carry kernel names, which land in
"(runtime)"); op time can exceed wall time where two ops overlap. Figures and what they taught us:
docs/benchmarks.md, "Profile". (Not named profile.py: benchmarks/ is on sys.path when a script here
runs, and torch imports the standard library's `profile`.)
"""

import argparse
import collections
import glob
import gzip
import json
import os
import pathlib
import re
import sys
import tempfile
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import matrix  # noqa: E402
import train_step  # noqa: E402

NOT_OPS = ("ThunkExecutor", "$", "PjitFunction", "SlinkyThreadPool", "CommonPjRt")
INSTRUCTION = re.compile(r"\s*(?:ROOT )?%(\S+) = (\S+?)(?:\{[^}]*\})? ([\w-]+)\(")


def parse_module(text: str) -> dict:
  """{instruction name: (kind, 'file:line function' of its innermost stack frame, the line)} for one module."""
  tables = {name: {} for name in ("FileNames", "FunctionNames", "FileLocations", "StackFrames")}
  table, computations, current = None, {}, None
  for line in text.splitlines():
    if line in tables:
      table = tables[line]
      continue
    if table is not None and re.match(r"^\d+ ", line):
      key, value = line.split(" ", 1)
      table[int(key)] = value.strip('"')
      continue
    table = None
    header = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
    if header:
      current = computations.setdefault(header.group(1), [])
    elif current is not None and line.strip() not in ("", "}"):
      current.append(line)

  def field(entry: str, name: str) -> int:
    return int(re.search(rf"{name}=(\d+)", entry).group(1))

  def location(frame_id: int) -> str:
    loc = tables["FileLocations"].get(field(tables["StackFrames"][frame_id], "file_location_id"), "")
    if not loc:
      return "?"
    path = tables["FileNames"][field(loc, "file_name_id")]
    path = path.split("/dreambooth_jax/", 1)[-1] if "/dreambooth_jax/" in path else pathlib.Path(path).name
    return f"{path}:{field(loc, 'line')} {tables['FunctionNames'][field(loc, 'function_name_id')]}"

  def opcodes(name: str) -> collections.Counter:
    found = collections.Counter()
    for line in computations.get(name, []):
      m = INSTRUCTION.match(line)
      if m:
        found[m.group(3)] += 1
      for called in re.findall(r"calls=%([\w.-]+)", line):
        found.update(opcodes(called))
    return found

  out = {}
  for lines in computations.values():
    for line in lines:
      m = INSTRUCTION.match(line)
      if not m:
        continue
      opcode, inner = m.group(3), collections.Counter()
      for called in re.findall(r"calls=%([\w.-]+)", line):
        inner.update(opcodes(called))
      frame = re.search(r"stack_frame_id=(\d+)", line)
      out[m.group(1)] = (kind(opcode, inner), location(int(frame.group(1))) if frame else "?", line.strip())
  return out


def kind(opcode: str, inner: collections.Counter) -> str:
  if "convolution" in (opcode, *inner):
    return "convolution"
  if {"dot", "dot_general"} & {opcode, *inner}:
    return "matmul"
  if opcode in ("copy", "transpose") or (opcode == "fusion" and set(inner) <= {"transpose", "copy", "bitcast",
                                                                               "parameter"}):
    return "copy"
  if "reduce" in (opcode, *inner):
    return "reduction"
  return "elementwise" if opcode == "fusion" else opcode


def hlo_ops(dump: str) -> dict:
  """Every optimized module's instructions; a name in several modules keeps the largest module's."""
  modules = sorted((pathlib.Path(f).read_text() for f in glob.glob(f"{dump}/*after_optimizations.txt")), key=len)
  ops = {}
  for text in modules:
    ops.update(parse_module(text))
  return ops


def op_events(trace_dir: str) -> list:
  path = sorted(glob.glob(f"{trace_dir}/plugins/profile/*/perfetto_trace.json.gz"))[-1]
  events = json.load(gzip.open(path))
  events = events["traceEvents"] if isinstance(events, dict) else events
  return [e for e in events if e.get("ph") == "X" and not e["name"].startswith(NOT_OPS)]


def idle_us(events: list) -> float:
  """Time inside the traced span with no op running (dispatch, loop control, waiting; includes the host's gaps
  between calls)."""
  spans, idle, end = sorted((e["ts"], e["ts"] + e["dur"]) for e in events), 0.0, None
  for start, stop in spans:
    if end is not None and start > end:
      idle += start - end
    end = stop if end is None else max(end, stop)
  return idle


def summarize(events: list, ops: dict, calls: int, top: int) -> dict:
  by_kind, by_line, by_op = collections.Counter(), collections.Counter(), collections.Counter()
  for e in events:
    k, where, _ = ops.get(e["name"], ("(runtime)", "?", ""))
    by_kind[k] += e["dur"]
    by_line[f"{k:11s} {where}"] += e["dur"]
    by_op[e["name"]] += e["dur"]
  total = sum(by_kind.values())
  per_call = lambda us: round(us / 1e3 / calls, 2)
  return {"op_ms_per_call": per_call(total), "no_op_running_ms_per_call": per_call(idle_us(events)),
          "by_kind": [(k, per_call(v), round(100 * v / total, 1)) for k, v in by_kind.most_common()],
          "by_line": [(k, per_call(v)) for k, v in by_line.most_common(top)],
          "by_op": [(per_call(v), ops.get(n, ("", "", n))[2][:200]) for n, v in by_op.most_common(top)]}


def train_call(args):
  """The whole DreamBooth step as matrix.py's train cells run it (1 + 1 examples, fp32 full fine-tune, no remat)."""
  cell = argparse.Namespace(shape=args.model, resolution=args.resolution, train_steps=1, warmup=0)
  flags = train_step.make_parser().parse_args([*matrix.train_flags(cell), "--no_compile_cache"])
  from dreambooth_jax import sharding  # noqa: PLC0415
  from dreambooth_jax.training import run  # noqa: PLC0415
  job = run.setup(train_step.make_config(flags), pathlib.Path(tempfile.mkdtemp()) / "run",
                  mesh=sharding.make_mesh(flags.data, flags.fsdp))
  state, batch = [job.state], job.data.next_batch()

  def call():
    state[0], metrics = job.step_fn(state[0], batch, job.rng, job.frozen)
    return metrics
  return call


def sample_call(args):
  """matrix.py's sampler cell: DDIM (Flux: its Euler), CFG, --batch images of --steps steps, VAE decode."""
  from dreambooth_jax.io import diffusers_folder as weights  # noqa: PLC0415
  from dreambooth_jax.sampling import sampler  # noqa: PLC0415
  pipe = weights.random_pipeline(matrix.shape_folder(args.model))
  settings = sampler.SamplerSettings(steps=args.steps, guidance=pipe.family.DEFAULT_GUIDANCE,
                                     height=args.resolution, width=args.resolution)
  prompts, indices = ["a photo of sks dog"] * args.batch, list(range(args.batch))
  return lambda: sampler.generate(pipe, prompts, indices, settings=settings)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--what", default="train", choices=["train", "sample"])
  p.add_argument("--model", default="diffusers-test", choices=sorted(matrix.SHAPES))
  p.add_argument("--resolution", type=int, default=64)
  p.add_argument("--batch", type=int, default=4, help="sampler images per call")
  p.add_argument("--steps", type=int, default=20, help="sampler steps")
  p.add_argument("--calls", type=int, default=5, help="traced calls (after 3 untraced ones)")
  p.add_argument("--top", type=int, default=15, help="rows of the per-line and per-op tables")
  p.add_argument("--json", action="store_true", help="one JSON line instead of tables")
  args = p.parse_args()
  dump = tempfile.mkdtemp(prefix="xla-dump-")  # read when the backend starts, i.e. at the first jax call below
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump} --xla_dump_hlo_as_text".strip()
  call = (train_call if args.what == "train" else sample_call)(args)
  for _ in range(3):
    jax.block_until_ready(call())
  t0 = time.perf_counter()
  for _ in range(args.calls):
    jax.block_until_ready(call())
  wall_ms = (time.perf_counter() - t0) / args.calls * 1e3
  trace_dir = tempfile.mkdtemp(prefix="trace-")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(args.calls):
      jax.block_until_ready(call())
  result = {"what": args.what, "model": args.model, "wall_ms_per_call_untraced": round(wall_ms, 2),
            **summarize(op_events(trace_dir), hlo_ops(dump), args.calls, args.top)}
  if args.json:
    print(json.dumps(result))
    return
  print(f"{args.what} {args.model}: {result['wall_ms_per_call_untraced']} ms per call untraced; "
        f"op time {result['op_ms_per_call']} ms per call (traced), no op running "
        f"{result['no_op_running_ms_per_call']} ms per call")
  for title, rows in (("kind", result["by_kind"]), ("kind, our line", result["by_line"]), ("op", result["by_op"])):
    print(f"\nms per call by {title}:")
    for row in rows:
      print("  " + "  ".join(str(v) for v in row))


if __name__ == "__main__":
  main()
