"""The DreamBooth benchmark protocol (Ruiz et al. 2023, Sec. 4.1 / Table 1) end to end.

  python -m dreambooth_jax.eval.protocol --dataset=PATH/dreambooth-dataset --config=configs/dog.py --out=runs/protocol \
      --dino_model=PATH --clip_model=PATH [--subjects=dog,cat] [--images_per_prompt=4] [--workdirs=dog:runs/dog]

For every subject folder of the dataset (its class from prompts_and_classes.txt): train "a sks <class>" with the
given config (prior preservation on "a <class>", class images shared per class), or take an existing workdir;
generate images_per_prompt images for each of the 25 prompts (object or live-subject list); evaluate DINO, CLIP-I,
CLIP-T; then write OUT/table.md and OUT/table.json laid out like Table 1, with the "real images" row (DINO and
CLIP-I between distinct real photos of each subject). Table 3's columns too when asked: PRES (--pres_images=N images
of the bare class prompt "a <class>" from each fine-tuned model, DINO against the real photos) and DIV
(--lpips_model); run it once with and once without prior preservation (--method names the row). Resumable: a
subject with OUT/<subject>/metrics.json is not redone, an interrupted training resumes from its checkpoint, and
generated images already on disk are kept.
"""

import dataclasses
import json
import pathlib
import re

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from dreambooth_jax import cli

LIVE_CLASSES = ("cat", "dog")  # the paper's live subjects (pets) use the live-subject prompt list
PROMPT_LINE = re.compile(r"^'(?P<template>.*)'\.format\(unique_token, class_token\),?$")


class ProtocolError(ValueError):
  """Bad dataset layout; the message names the file and line."""


def read_prompts_and_classes(path) -> tuple[dict[str, str], dict[str, list[str]]]:
  """({subject: class}, {"object": templates, "live": templates}) from the dataset's prompts_and_classes.txt.
  Templates take .format(unique_token, class_token)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ProtocolError(f"{path}: missing (the dataset's prompts_and_classes.txt)")
  classes, prompts, section = {}, {"object": [], "live": []}, None
  for number, raw in enumerate(path.read_text().splitlines(), start=1):
    line = raw.strip()
    if not line or line in ("Classes", "Prompts", "prompt_list = [", "]", "subject_name,class"):
      continue
    if line == "Object Prompts":
      section = "object"
    elif line == "Live Subject Prompts":
      section = "live"
    elif section is None:
      if line.count(",") != 1:
        raise ProtocolError(f"{path}:{number}: expected 'subject_name,class', got {raw!r}")
      subject, cls = (part.strip() for part in line.split(","))
      classes[subject] = cls
    else:
      match = PROMPT_LINE.match(line)
      if not match:
        raise ProtocolError(f"{path}:{number}: expected a line like \"'a {{0}} {{1}} in the snow'.format("
                            f"unique_token, class_token),\", got {raw!r}")
      prompts[section].append(match["template"])
  for kind, templates in prompts.items():
    if not templates:
      raise ProtocolError(f"{path}: no {kind} prompts found")
  if not classes:
    raise ProtocolError(f"{path}: no subject classes found")
  return classes, prompts


def subject_prompts(subject_class: str, templates: dict, token: str, limit: int = 0) -> list[str]:
  kind = "live" if subject_class in LIVE_CLASSES else "object"
  prompts = [t.format(token, subject_class) for t in templates[kind]]
  return prompts[:limit] if limit else prompts


def generate_prompts(view, prompts: list[str], out: pathlib.Path, *, images_per_prompt: int, seed: int,
                     settings, batch_size: int, mesh=None) -> pathlib.Path:
  """images_per_prompt images per prompt into out/ with index.json (the sampler's layout); images already there
  (same index) are kept, so an interrupted generation resumes."""
  from dreambooth_jax.data import class_images  # noqa: PLC0415
  from dreambooth_jax.sampling import sampler as sampling  # noqa: PLC0415

  out.mkdir(parents=True, exist_ok=True)
  entries = [{"file": f"{i:05d}.png", "prompt": p, "index": i}
             for i, p in enumerate(p for p in prompts for _ in range(images_per_prompt))]
  todo = [e for e in entries if not (out / e["file"]).is_file()]
  if todo:
    for indices, images in sampling.generate_all(view, [e["prompt"] for e in todo], indices=[e["index"] for e in todo],
                                                 seed=seed, batch_size=batch_size, settings=settings, mesh=mesh):
      for i, image in zip(indices, images):
        class_images.write_png(image, out / entries[i]["file"])
  (out / "index.json").write_text(json.dumps({"settings": {**dataclasses.asdict(settings), "seed": seed},
                                              "images": entries}, indent=2))
  return out


def subject_config(base, dataset: pathlib.Path, subject: str, subject_class: str, token: str, out: pathlib.Path):
  config = base.copy_and_resolve_references()
  with config.unlocked():
    config.instance_data_dir = str(dataset / subject)
    config.instance_prompt = f"a {token} {subject_class}"
    config.class_prompt = f"a {subject_class}"
    config.class_data_dir = str(out / "class_images" / subject_class.replace(" ", "_"))
    config.validation_prompt = f"a {token} {subject_class} in the snow"
  return config


OPTIONAL_COLUMNS = {"pres": "PRES", "div": "DIV"}  # Table 3's, shown when measured


def table_markdown(rows: list[dict]) -> str:
  """Table 1's columns, and PRES / DIV (Table 3) when they were measured."""
  extra = [key for key in OPTIONAL_COLUMNS if any(key in r for r in rows)]
  lines = ["| Method | DINO | CLIP-I | CLIP-T |" + "".join(f" {OPTIONAL_COLUMNS[k]} |" for k in extra)
           + " subjects | images |", "|---|---|---|---|" + "---|" * len(extra) + "---|---|"]
  fmt = lambda v: "N/A" if v is None else f"{v:.3f}"
  for r in rows:
    lines.append(f"| {r['method']} | {fmt(r['dino'])} | {fmt(r['clip_i'])} | {fmt(r.get('clip_t'))} |"
                 + "".join(f" {fmt(r.get(k))} |" for k in extra) + f" {r['subjects']} | {r['images']} |")
  return "\n".join(lines) + "\n"


def run(base_config, dataset, out, *, dino_model, clip_model, token: str = "sks", subjects=None,
        images_per_prompt: int = 4, prompts_limit: int = 0, workdirs: dict | None = None, method: str = "dreambooth_jax",
        sample_steps: int = 50, guidance: float = 7.5, batch_size: int = 8, lpips_model=None,
        lpips_net: str = "alex", pres_images: int = 0) -> dict:
  from dreambooth_jax import evaluate  # noqa: PLC0415 (heavy imports only when the protocol runs)
  from dreambooth_jax.sampling import sampler as sampling  # noqa: PLC0415
  from dreambooth_jax.training import checkpoint, run as run_lib, run_state  # noqa: PLC0415

  dataset, out = pathlib.Path(dataset), pathlib.Path(out)
  classes, templates = read_prompts_and_classes(dataset / "prompts_and_classes.txt")
  subjects = list(subjects) if subjects else sorted(p.name for p in dataset.iterdir() if p.is_dir())
  unknown = [s for s in subjects if s not in classes]
  if unknown:
    raise ProtocolError(f"subjects {unknown} are not listed in {dataset / 'prompts_and_classes.txt'}")
  missing = [s for s in subjects if not (dataset / s).is_dir()]
  if missing:
    raise ProtocolError(f"{dataset}: no folder for subject(s) {missing}")
  if not subjects:
    raise ProtocolError(f"{dataset}: no subject folders")
  encoders = evaluate.load_encoders(dino_model, clip_model, lpips_model=lpips_model, lpips_net=lpips_net)
  results, real = {}, {}
  for subject in subjects:
    sub_out = out / subject
    real[subject] = evaluate.real_vs_real(dataset / subject, encoders)
    done = sub_out / "metrics.json"
    if done.is_file():
      logging.info("%s: done before, keeping %s", subject, done)
      results[subject] = json.loads(done.read_text())
      continue
    config = subject_config(base_config, dataset, subject, classes[subject], token, out)
    workdir = pathlib.Path((workdirs or {}).get(subject) or sub_out / "run")
    if subject not in (workdirs or {}) and checkpoint.manager(workdir, None).latest_step() != config.max_train_steps:
      run_lib.train(config, workdir)  # resumes from its checkpoint if interrupted
    _, view, step = run_state.load_run(workdir, None)
    prompts = subject_prompts(classes[subject], templates, token, prompts_limit)
    settings = sampling.SamplerSettings(steps=sample_steps, guidance=guidance, height=config.resolution,
                                        width=config.resolution, scheduler=config.get("sample_scheduler", "ddim"),
                                        karras=config.get("sample_karras", False),
                                        loop=config.get("sample_loop") or None)
    generated = generate_prompts(view, prompts, sub_out / "generated", images_per_prompt=images_per_prompt,
                                 seed=config.seed, settings=settings, batch_size=batch_size)
    class_generated = None
    if pres_images:  # PRES: the fine-tuned model prompted with the bare class ("a dog")
      class_generated = generate_prompts(view, [config.class_prompt], sub_out / "class_generated",
                                         images_per_prompt=pres_images, seed=config.seed + 1, settings=settings,
                                         batch_size=batch_size)
    metrics = evaluate.evaluate(generated, dataset / subject, encoders=encoders, class_generated=class_generated)
    metrics.update(subject=subject, subject_class=classes[subject], workdir=str(workdir), step=step)
    done.write_text(json.dumps(metrics, indent=2))
    results[subject] = metrics

  mean = lambda key, rows: float(np.mean([r[key] for r in rows]))
  rows = [{"method": method, "dino": mean("dino", results.values()), "clip_i": mean("clip_i", results.values()),
           "clip_t": mean("clip_t", results.values()), "subjects": len(results),
           "images": sum(r["counts"]["generated_images"] for r in results.values())},
          {"method": "Real Images", "dino": mean("dino", real.values()), "clip_i": mean("clip_i", real.values()),
           "clip_t": None, "subjects": len(real), "images": sum(r["counts"]["real_images"] for r in real.values())}]
  for key, asked in (("div", encoders.lpips is not None), ("pres", pres_images > 0)):
    if asked:
      missing = [s for s, r in results.items() if key not in r]
      if missing:  # evaluated before the option was given
        raise ProtocolError(f"subjects {missing} were evaluated without {OPTIONAL_COLUMNS[key]}: delete their "
                            f"metrics.json under {out} to re-evaluate them (training and images are kept)")
      rows[0][key] = mean(key, results.values())
  table = {"rows": rows, "per_subject": results, "real_per_subject": real, "models": encoders.names,
           "protocol": {"token": token, "images_per_prompt": images_per_prompt, "sample_steps": sample_steps,
                        "guidance": guidance, "prompts_limit": prompts_limit, "pres_images": pres_images,
                        "scheduler": base_config.get("sample_scheduler", "ddim"),
                        "karras": base_config.get("sample_karras", False)}}
  out.mkdir(parents=True, exist_ok=True)
  (out / "table.json").write_text(json.dumps(table, indent=2))
  (out / "table.md").write_text("# DreamBooth protocol (Table 1 layout)\n\n" + table_markdown(rows))
  return table


@cli.main("protocol")
def main(argv):
  del argv
  f = flags.FLAGS
  workdirs = dict(item.split(":", 1) for item in f.workdirs) if f.workdirs else None
  table = run(f.config, f.dataset, f.out, dino_model=f.dino_model, clip_model=f.clip_model, token=f.token,
              subjects=f.subjects, images_per_prompt=f.images_per_prompt, prompts_limit=f.prompts_limit,
              workdirs=workdirs, sample_steps=f.sample_steps, guidance=f.guidance, batch_size=f.batch_size,
              lpips_model=f.lpips_model, lpips_net=f.lpips_net, pres_images=f.pres_images, method=f.method)
  print(table_markdown(table["rows"]))


def define_flags():
  from dreambooth_jax.eval import lpips  # noqa: PLC0415

  config_flags.DEFINE_config_file("config", "configs/dog.py", "Training config (the subject-specific keys are set "
                                  "per subject).", lock_config=False)
  flags.DEFINE_string("dataset", None, "The DreamBooth dataset folder (subject folders + prompts_and_classes.txt).",
                      required=True)
  flags.DEFINE_string("out", "runs/protocol", "Output folder.")
  flags.DEFINE_string("dino_model", "facebook/dino-vits16", "DINO ViT: transformers folder or hub id.")
  flags.DEFINE_string("clip_model", "openai/clip-vit-large-patch14", "CLIPModel: transformers folder or hub id.")
  flags.DEFINE_string("lpips_model", None, "LPIPS backbone weights (see dreambooth_jax.evaluate): adds a DIV column.")
  flags.DEFINE_enum("lpips_net", "alex", sorted(lpips.BACKBONES), "LPIPS backbone.")
  flags.DEFINE_integer("pres_images", 0, "Images of the bare class prompt per subject for PRES (0 = no PRES column).")
  flags.DEFINE_string("method", "dreambooth_jax", "The row's name in the table (e.g. 'w/ PPL', 'w/o PPL').")
  flags.DEFINE_string("token", "sks", "The rare identifier [V].")
  flags.DEFINE_list("subjects", None, "Subjects to run (default: every subject folder).")
  flags.DEFINE_list("workdirs", None, "subject:workdir pairs to evaluate instead of training.")
  flags.DEFINE_integer("images_per_prompt", 4, "Images per prompt (the paper: 4).")
  flags.DEFINE_integer("prompts_limit", 0, "Use only the first N prompts (0 = all 25).")
  flags.DEFINE_integer("sample_steps", 50, "DDIM steps.")
  flags.DEFINE_float("guidance", 7.5, "Classifier-free guidance scale.")
  flags.DEFINE_integer("batch_size", 8, "Images per sampler call.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
