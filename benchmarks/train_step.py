"""Train-step benchmark: our jitted DreamBooth step vs a diffusers-torch step (UNet forward + backward + AdamW) on
the same device and model config, in one run; optional scaling over 1/2/4/8 (fake CPU or real) devices.

  python benchmarks/train_step.py --model=tiny --resolution=64 --batch=2            # CPU, the bundled tiny model
  python benchmarks/train_step.py --model=sd15 --resolution=512 --batch=1 --prior   # GPU: SD 1.5 shape, 1 + 1
  python benchmarks/train_step.py --model=tiny --scaling=1,2,4,8                   # 8 fake CPU devices

Reports compile time, step time, images/s, achieved TFLOP/s and MFU (XLA's cost analysis of the compiled step /
step time / --peak_tflops), peak device memory where the device reports it, and torch's images/s and the ratio.
Weights are random (speed does not depend on their values); shapes come from the bundled configs.

Targets (issue #4, one H100, SD 1.5 at 512 px, bf16): >= 2x the diffusers-torch step; a 1000-step DreamBooth run
at batch 1 + 1 in <= 60 s after compile (step <= 60 ms); >= 150 images/s at large batch (>= 32 images per step).
On a GPU with --model=sd15 --resolution=512 the result carries a "targets" entry saying which apply and are met.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = {"tiny": "tiny", "sd15": str(ROOT / "dreambooth_jax" / "assets" / "sd-configs" / "sd15"),
          "sd21": str(ROOT / "dreambooth_jax" / "assets" / "sd-configs" / "sd21"),
          "sdxl": str(ROOT / "dreambooth_jax" / "assets" / "sdxl-configs"),
          "sdxl-tiny": str(ROOT / "benchmarks" / "shapes" / "sdxl-tiny"),
          "diffusers-test": str(ROOT / "benchmarks" / "shapes" / "diffusers-test"),
          "sd15-narrow": str(ROOT / "benchmarks" / "shapes" / "sd15-narrow"),
          "flux-tiny": str(ROOT / "benchmarks" / "shapes" / "flux-tiny"),
          "flux-dev": str(ROOT / "dreambooth_jax" / "assets" / "flux-configs" / "dev")}
FLUX_MODELS = ("flux-tiny", "flux-dev")


TARGETS = {  # name: (applies(args, result), value(result), bound, "min" | "max")
    "speedup_vs_torch": (lambda a, r: "torch" in r, lambda r: r["speedup_vs_torch"], 2.0, "min"),
    "step_ms_batch_1_plus_1": (lambda a, r: a.batch == 1 and a.prior, lambda r: 1e3 * r["ours"]["step_time_s"],
                               60.0, "max"),
    "images_per_s_large_batch": (lambda a, r: r["ours"]["global_batch"] >= 32, lambda r: r["ours"]["images_per_s"],
                                 150.0, "min"),
}


# SDXL LoRA at 1024 px, batch 1 (no prior preservation), on one H100/H200 (SimpleTuner: 0.61 s for SDXL LoKr)
SDXL_LORA_STEP_S = 0.30
# Flux.1-dev LoRA at 1024 px, batch 1, on one H100/H200 (issue #14): step time and peak device memory
FLUX_LORA_STEP_S = 1.5
FLUX_LORA_PEAK_GIB = 40.0


def check_targets(args, result) -> dict:
  """The targets that apply to this run, each with its value and whether it is met (GPU only): SD 1.5 at 512 px,
  SDXL LoRA at 1024 px."""
  if result["backend"] != "gpu":
    return {}
  if args.model == "flux-dev" and args.resolution == 1024 and args.lora and args.batch == 1:
    v, peak = result["ours"]["step_time_s"], (result["ours"]["peak_bytes"] or 0) / 2**30
    return {"flux_lora_step_s": {"value": v, "max": FLUX_LORA_STEP_S, "met": v <= FLUX_LORA_STEP_S},
            "flux_lora_peak_gib": {"value": peak, "max": FLUX_LORA_PEAK_GIB, "met": 0 < peak <= FLUX_LORA_PEAK_GIB}}
  if args.model == "sdxl" and args.resolution == 1024 and args.lora and args.batch == 1:
    v = result["ours"]["step_time_s"]
    return {"sdxl_lora_step_s": {"value": v, "max": SDXL_LORA_STEP_S, "met": v <= SDXL_LORA_STEP_S}}
  if args.model != "sd15" or args.resolution != 512:
    return {}
  out = {}
  for name, (applies, value, bound, kind) in TARGETS.items():
    if applies(args, result):
      v = value(result)
      out[name] = {"value": v, kind: bound, "met": v >= bound if kind == "min" else v <= bound}
  return out


def flux_folder(model: str) -> str:
  """A copy of the Flux shape folder whose T5 tokenizer is a tiny one trained here (tests/reference_models.py):
  the real spiece model is not bundled, and token ids change no timing."""
  sys.path.insert(0, str(ROOT / "tests"))
  import shutil  # noqa: PLC0415
  from reference_models import build_t5_tokenizer  # noqa: PLC0415
  folder = pathlib.Path(tempfile.mkdtemp()) / model
  shutil.copytree(MODELS[model], folder)
  max_length = json.loads((folder / "tokenizer_2" / "tokenizer_config.json").read_text())["model_max_length"]
  build_t5_tokenizer(model_max_length=max_length).save_pretrained(str(folder / "tokenizer_2"))
  return str(folder)


def make_config(args):
  """configs/tiny.py for SD-family shapes; for Flux configs/dog_flux.py (LoRA, bf16 base, remat full, flow
  matching as diffusers' script), so its settings are the benchmarked ones unless a flag overrides them."""
  from dreambooth_jax import config_files  # noqa: PLC0415
  flux = args.model in FLUX_MODELS
  if flux:
    c = config_files.load(ROOT / "configs" / "dog_flux.py", "1024" if args.resolution == 1024 else None)
    c.pretrained_model_name_or_path = flux_folder(args.model)
    c.class_generation_steps = 1
    c.max_sequence_length = 0  # the tokenizer's: 512 as FLUX.1-dev
  else:
    c = config_files.load(ROOT / "configs" / "tiny.py")
    c.pretrained_model_name_or_path = MODELS[args.model]
    c.class_generation_steps = 1
  c.random_init = True
  c.resolution, c.train_batch_size = args.resolution, args.batch
  c.with_prior_preservation = args.prior
  c.num_class_images = args.batch if args.prior else 0
  if args.mixed_precision is not None or not flux:
    c.mixed_precision = args.mixed_precision or "no"
  if args.remat is not None or not flux:
    c.remat = args.remat or "none"
  c.attention = args.attention
  c.optimizer_moments_bf16 = args.moments_bf16
  c.gradient_accumulation_steps = args.accum
  c.accumulation_loop = args.accumulation_loop
  c.validation_steps = 0
  c.export_at_end = False
  c.mesh_data, c.mesh_fsdp = args.data, args.fsdp
  if args.no_compile_cache:
    c.compilation_cache_dir = ""
  if args.param_dtype is not None:
    c.param_dtype = args.param_dtype
  if args.lora is not None:
    c.lora.enabled = args.lora > 0
    c.lora.rank = args.lora or c.lora.rank
  return c


def ours(args) -> dict:
  from dreambooth_jax import sharding
  from dreambooth_jax.training import run  # noqa: PLC0415
  config = make_config(args)
  devices = jax.devices()[:args.devices] if args.devices else None
  mesh = sharding.make_mesh(args.data, args.fsdp, devices=devices)
  job = run.setup(config, pathlib.Path(tempfile.mkdtemp()) / "run", mesh=mesh)
  state = job.state
  batches = [job.data.next_batch() for _ in range(2)]
  for i in range(args.warmup):
    state, metrics = job.step_fn(state, batches[i % 2], job.rng, job.frozen)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for i in range(args.steps):
    state, metrics = job.step_fn(state, batches[i % 2], job.rng, job.frozen)
  jax.block_until_ready(metrics)
  step_time = (time.perf_counter() - t0) / args.steps
  images = job.data.global_batch_size * args.accum
  flops = job.flops_per_step or 0.0
  stats = jax.local_devices()[0].memory_stats() or {}
  result = {"step_time_s": step_time, "images_per_s": images / step_time, "global_batch": images,
            "tflops_per_step_per_device": flops / 1e12, "achieved_tflops_per_device": flops / step_time / 1e12,
            "devices": int(mesh.devices.size), "peak_bytes": stats.get("peak_bytes_in_use"),
            "compile_s": sum(r["seconds"] for r in job.compile_records)}
  if args.peak_tflops:
    result["mfu"] = result["achieved_tflops_per_device"] / args.peak_tflops
  return result


def torch_remat(args) -> bool:
  """Gradient checkpointing for the torch step: any --remat but none (the flag's default, None, is none too)."""
  return args.remat not in (None, "none")


def torch_step(args) -> dict:
  """diffusers-torch's UNet (or, for Flux shapes, its transformer) forward + MSE + backward + clip + AdamW: a full
  fine-tune of the denoiser on random inputs of the step's shapes."""
  if args.model in FLUX_MODELS:
    return torch_flux_step(args)
  import torch  # noqa: PLC0415
  from diffusers import UNet2DConditionModel  # noqa: PLC0415
  from dreambooth_jax.io import diffusers_folder as weights  # noqa: PLC0415
  folder = weights.TINY_MODEL if args.model == "tiny" else pathlib.Path(MODELS[args.model])
  config = json.loads((folder / "unet" / "config.json").read_text())
  device = "cuda" if torch.cuda.is_available() else "cpu"
  unet = UNet2DConditionModel.from_config(config).to(device).train()
  text_dim = config["cross_attention_dim"]
  vae_factor = 2 ** (len(json.loads((folder / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
  if torch_remat(args):
    unet.enable_gradient_checkpointing()
  batch = args.batch * (2 if args.prior else 1)
  size = args.resolution // vae_factor
  x = torch.randn(batch, config["in_channels"], size, size, device=device)
  ctx = torch.randn(batch, 77, text_dim, device=device)
  t = torch.randint(0, 1000, (batch,), device=device)
  added = None
  if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text + 6 time ids
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    added = {"text_embeds": torch.randn(batch, pooled, device=device),
             "time_ids": torch.full((batch, 6), float(args.resolution), device=device)}
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16")

  def loss_fn():
    with autocast:
      return torch.nn.functional.mse_loss(unet(x, t, ctx, added_cond_kwargs=added).sample.float(), x)

  return time_torch_steps(args, unet, loss_fn, batch, device)


def torch_flux_step(args) -> dict:
  """FluxTransformer2DModel on packed latents (2 x 2 patches of the VAE's latents), T5 context of the tokenizer's
  length, pooled CLIP, image/text position ids and the distilled guidance input, as FluxPipeline calls it."""
  import torch  # noqa: PLC0415
  from diffusers import FluxTransformer2DModel  # noqa: PLC0415
  folder = pathlib.Path(MODELS[args.model])
  read = lambda *parts: json.loads(folder.joinpath(*parts).read_text())
  config = read("transformer", "config.json")
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = FluxTransformer2DModel.from_config(config).to(device).train()
  if torch_remat(args):
    model.enable_gradient_checkpointing()
  batch = args.batch * (2 if args.prior else 1)
  side = args.resolution // 2 ** (len(read("vae", "config.json")["block_out_channels"]) - 1) // 2  # packed side
  text_len = read("tokenizer_2", "tokenizer_config.json")["model_max_length"]
  x = torch.randn(batch, side * side, config["in_channels"], device=device)
  ctx = torch.randn(batch, text_len, config["joint_attention_dim"], device=device)
  pooled = torch.randn(batch, config["pooled_projection_dim"], device=device)
  rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
  img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float().to(device)
  txt_ids = torch.zeros(text_len, 3, device=device)
  sigma = torch.rand(batch, device=device)
  guidance = torch.full((batch,), 3.5, device=device) if config.get("guidance_embeds") else None
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16")

  def loss_fn():
    with autocast:
      out = model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=sigma,
                  img_ids=img_ids, txt_ids=txt_ids, guidance=guidance).sample
    return torch.nn.functional.mse_loss(out.float(), x)

  return time_torch_steps(args, model, loss_fn, batch, device)


def time_torch_steps(args, model, loss_fn, batch: int, device: str) -> dict:
  """--warmup then --steps timed steps of loss_fn's backward + clip_grad_norm(1.0) + AdamW(1e-6)."""
  import torch  # noqa: PLC0415
  opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

  def step():
    loss_fn().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)

  for _ in range(args.warmup):
    step()
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  sync()
  t0 = time.perf_counter()
  for _ in range(args.steps):
    step()
  sync()
  step_time = (time.perf_counter() - t0) / args.steps
  peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
  return {"step_time_s": step_time, "images_per_s": batch / step_time, "device": device, "peak_bytes": peak}


def scaling(args) -> list[dict]:
  rows = []
  for n in [int(v) for v in args.scaling.split(",")]:
    env = dict(os.environ)
    if jax.default_backend() == "cpu":
      env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={max(8, n)}".strip()
    cmd = [sys.executable, __file__, f"--model={args.model}", f"--resolution={args.resolution}",
           f"--batch={args.batch * n}", f"--steps={args.steps}", f"--warmup={args.warmup}", "--no_torch",
           f"--devices={n}", f"--data={n}", "--fsdp=1", f"--mixed_precision={args.mixed_precision or 'no'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])["ours"]
    rows.append({"devices": n, **result})
  return rows


def make_parser() -> argparse.ArgumentParser:
  """The flags (benchmarks/matrix.py builds its cells' arguments from these defaults)."""
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="tiny", choices=sorted(MODELS))
  p.add_argument("--resolution", type=int, default=64)
  p.add_argument("--batch", type=int, default=2, help="instance images per step (x2 with --prior)")
  p.add_argument("--prior", action="store_true")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--mixed_precision", default=None, choices=["no", "bf16"],
                 help="default: no (Flux: its config's, bf16)")
  p.add_argument("--remat", default=None, help="default: none (Flux: its config's, full)")
  p.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn", "chunked"])
  p.add_argument("--moments_bf16", action="store_true")
  p.add_argument("--lora", type=int, default=None, help="LoRA rank, 0: full fine-tune (default: the config's; "
                 "Flux: rank 4)")
  p.add_argument("--param_dtype", default=None, choices=["float32", "bfloat16"],
                 help="default: the config's (Flux: bfloat16, the frozen base)")
  p.add_argument("--accum", type=int, default=1, help="gradient_accumulation_steps (micro-batches of --batch each)")
  p.add_argument("--accumulation_loop", default="auto", choices=["auto", "scan", "unrolled"])
  p.add_argument("--data", type=int, default=-1)
  p.add_argument("--fsdp", type=int, default=1)
  p.add_argument("--devices", type=int, default=0)
  p.add_argument("--peak_tflops", type=float, default=0.0, help="device peak for MFU (H100 SXM bf16 dense: 989)")
  p.add_argument("--no_torch", action="store_true")
  p.add_argument("--no_compile_cache", action="store_true", help="compile afresh (compile_s is a real compile)")
  p.add_argument("--scaling", default="", help="e.g. 1,2,4,8: weak scaling, batch per device fixed")
  return p


def main():
  args = make_parser().parse_args()
  if args.model in FLUX_MODELS:
    args.no_torch = True  # Flux runs here are LoRA on a bf16 base; torch_flux_step is a full fine-tune (matrix.py)
  result = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(), "args": vars(args),
            "ours": ours(args)}
  if not args.no_torch:
    result["torch"] = torch_step(args)
    result["speedup_vs_torch"] = result["ours"]["images_per_s"] / result["torch"]["images_per_s"]
  if args.scaling:
    result["scaling"] = scaling(args)
  targets = check_targets(args, result)
  if targets:
    result["targets"] = targets
  print(json.dumps(result))


if __name__ == "__main__":
  main()
