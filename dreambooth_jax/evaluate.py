"""DreamBooth's subject-fidelity and prompt-fidelity metrics of a folder of generated images.

  python -m dreambooth_jax.evaluate --generated=DIR --real=DIR --prompts=FILE \
      --dino_model=PATH_OR_HUB_ID --clip_model=PATH_OR_HUB_ID --out=metrics.json [--class_generated=DIR] \
      [--lpips_model=FILE_OR_HUB_ID --lpips_net=alex|vgg]

--generated is grouped by prompt through DIR/index.json (as sample.py writes it: {"images": [{"file", "prompt"}]},
or a bare list of such entries), DIR/index.csv (columns file,prompt), or one subfolder per prompt (the prompt is
the subfolder's prompt.txt, else its name). --real holds the subject's photos. DINO and CLIP-I compare every
generated image with every real one; CLIP-T compares each image with its prompt; PRES (with --class_generated,
images of the bare class prompt) is DINO between those and the real photos. DIV (with --lpips_model, the LPIPS
backbone's ImageNet weights; see eval/lpips.py) is the mean LPIPS distance over pairs of images of one prompt.
Models: transformers folders (config.json + model.safetensors), e.g. facebook/dino-vits16 and
openai/clip-vit-large-patch14 downloaded beforehand, or hub ids when there is a network.
"""

import csv
import dataclasses
import json
import pathlib

import numpy as np
from absl import app, flags
from flax import nnx

from dreambooth_jax import cli

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

class InputError(ValueError):
  """Bad evaluation input; the message names the file, line or folder."""


# ----------------------------------------------------------------------------------------------- inputs

def read_prompts(path) -> list[str]:
  path = pathlib.Path(path)
  if not path.is_file():
    raise InputError(f"--prompts {path}: no such file")
  prompts = []
  for number, line in enumerate(path.read_text().splitlines(), start=1):
    prompt = line.strip()
    if not prompt:
      continue
    if "{" in prompt or "}" in prompt:
      raise InputError(f"{path}:{number}: prompt {prompt!r} has an unfilled placeholder or stray brace "
                       "(fill in the identifier/class, e.g. 'a {0} {1}' -> 'a sks dog')")
    prompts.append(prompt)
  if not prompts:
    raise InputError(f"{path}: no prompts in it")
  return prompts


def list_images(folder, what: str) -> list[pathlib.Path]:
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise InputError(f"{what} {folder}: no such folder")
  images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
  if not images:
    raise InputError(f"{what} {folder}: no images in it ({', '.join(IMAGE_SUFFIXES)})")
  return images


def index_entry(folder: pathlib.Path, index: pathlib.Path, number: int, file, prompt) -> tuple[pathlib.Path, str]:
  if not file or not isinstance(file, str) or not isinstance(prompt, str) or not prompt.strip():
    raise InputError(f"{index}: entry {number} needs a non-empty 'file' and 'prompt', got file={file!r} "
                     f"prompt={prompt!r}")
  path = folder / file
  if not path.is_file():
    raise InputError(f"{index}: entry {number}: image {path} does not exist")
  return path, prompt.strip()


def read_index(folder: pathlib.Path) -> list[tuple[pathlib.Path, str]] | None:
  index_json, index_csv = folder / "index.json", folder / "index.csv"
  if index_json.is_file():
    try:
      data = json.loads(index_json.read_text())
    except json.JSONDecodeError as e:
      raise InputError(f"{index_json}: invalid JSON ({e})") from None
    entries = data.get("images") if isinstance(data, dict) else data
    if not isinstance(entries, list):
      raise InputError(f"{index_json}: expected a list of {{'file', 'prompt'}} entries (or {{'images': [...]}})")
    entries = [e if isinstance(e, dict) else {} for e in entries]
    return [index_entry(folder, index_json, i, e.get("file"), e.get("prompt")) for i, e in enumerate(entries)]
  if index_csv.is_file():
    with open(index_csv, newline="") as f:
      reader = csv.DictReader(f)
      if not reader.fieldnames or not {"file", "prompt"} <= set(reader.fieldnames):
        raise InputError(f"{index_csv}: needs a header with columns file,prompt (got {reader.fieldnames})")
      return [index_entry(folder, index_csv, i, row["file"], row["prompt"]) for i, row in enumerate(reader, 1)]
  return None


def group_generated(folder) -> list[tuple[pathlib.Path, str]]:
  """(image, prompt) pairs of the generated folder, from its index file or per-prompt subfolders."""
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise InputError(f"--generated {folder}: no such folder")
  pairs = read_index(folder)
  if pairs is None:
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir())
    if not subfolders:
      raise InputError(f"--generated {folder}: no index.json, index.csv or per-prompt subfolders; cannot tell "
                       "which prompt each image belongs to")
    pairs = []
    for sub in subfolders:
      prompt_txt = sub / "prompt.txt"
      prompt = prompt_txt.read_text().strip() if prompt_txt.is_file() else sub.name
      if not prompt:
        raise InputError(f"{prompt_txt}: empty")
      pairs += [(p, prompt) for p in list_images(sub, "--generated subfolder")]
  if not pairs:
    raise InputError(f"--generated {folder}: the index lists no images")
  return pairs


def assign_prompts(pairs, prompts: list[str] | None, prompts_file=None) -> tuple[list[str], np.ndarray]:
  """(the prompts, in file order or first appearance; the prompt index of each image)."""
  if prompts is None:
    prompts = list(dict.fromkeys(prompt for _, prompt in pairs))
  position = {p: i for i, p in enumerate(prompts)}
  for path, prompt in pairs:
    if prompt not in position:
      raise InputError(f"{path}: its prompt {prompt!r} is not in --prompts {prompts_file}")
  of_image = np.array([position[prompt] for _, prompt in pairs], np.int64)
  missing = [p for i, p in enumerate(prompts) if not np.any(of_image == i)]
  if missing:
    raise InputError(f"--prompts {prompts_file}: no generated images for prompt(s) {missing}")
  return prompts, of_image


# ----------------------------------------------------------------------------------------------- embeddings

@nnx.jit
def image_embeds(model, pixels_BHWC):
  return model.image_embeds(pixels_BHWC)


def embed_images(model, paths, spec, batch_size: int) -> np.ndarray:
  """Embeddings (N, D); the last batch is zero-padded to batch_size so one compiled shape serves every call."""
  from dreambooth_jax.eval import preprocess  # noqa: PLC0415

  out = []
  for start in range(0, len(paths), batch_size):
    pixels = preprocess.load_batch(paths[start:start + batch_size], spec)
    padded = np.concatenate([pixels, np.zeros((batch_size - len(pixels), *pixels.shape[1:]), pixels.dtype)])
    out.append(np.asarray(image_embeds(model, padded))[:len(pixels)])
  return np.concatenate(out)


def clip_tokenizer(folder: pathlib.Path):
  from dreambooth_jax.io import tokenizers as tokenizer  # noqa: PLC0415

  has_own = (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()
  return tokenizer.load_tokenizer(folder if has_own else tokenizer.BUNDLED_TOKENIZER)


def embed_texts(model, tok, prompts: list[str]) -> np.ndarray:
  config = model.config.text
  if len(tok) > config.vocab_size:
    raise InputError(f"CLIP model: its text vocabulary has {config.vocab_size} entries, the tokenizer {len(tok)}")
  length = min(tok.model_max_length, config.max_position_embeddings)
  ids = tok(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="np").input_ids
  return np.asarray(model.text_embeds(ids.astype(np.int32)))


# ----------------------------------------------------------------------------------------------- metrics

@dataclasses.dataclass
class Encoders:
  """The loaded DINO and CLIP models with their preprocessing (load once, evaluate many folders)."""
  dino: object
  dino_spec: object
  clip: object
  clip_spec: object
  clip_tokenizer: object
  names: dict
  lpips: object = None  # for DIV; None: DIV is not computed


def load_encoders(dino_model, clip_model, dino_preprocess: str = "model", lpips_model=None,
                  lpips_net: str = "alex", lpips_lin=None) -> Encoders:
  from dreambooth_jax.eval import encoders, lpips, preprocess  # noqa: PLC0415

  dino, dino_dir = encoders.load_dino(dino_model)
  dino_spec = (preprocess.DINO_EVAL_SPEC if dino_preprocess == "dino_eval"
               else preprocess.spec_for_folder(dino_dir, preprocess.DINO_SPEC))
  clip, clip_dir = encoders.load_clip(clip_model)
  clip_spec = preprocess.spec_for_folder(clip_dir, preprocess.CLIP_SPEC)
  names = {"dino": str(dino_model), "clip": str(clip_model), "dino_preprocess": dino_preprocess}
  lpips_model_ = None
  if lpips_model:
    lpips_model_ = lpips.load_lpips(lpips_model, lpips_net, lpips_lin)
    names.update(lpips=str(lpips_model), lpips_net=lpips_net, lpips_lin=str(lpips_lin or "bundled v0.1"))
  return Encoders(dino, dino_spec, clip, clip_spec, clip_tokenizer(clip_dir), names, lpips_model_)


def real_vs_real(real, enc: Encoders, batch_size: int = 16) -> dict:
  """The paper's "real images" row: DINO and CLIP-I between distinct real photos of the subject."""
  from dreambooth_jax.eval import metrics  # noqa: PLC0415

  paths = list_images(real, "--real")
  if len(paths) < 2:
    raise InputError(f"{real}: real-vs-real needs at least 2 images, found {len(paths)}")
  return {"dino": metrics.mean_cosine_distinct_pairs(embed_images(enc.dino, paths, enc.dino_spec, batch_size), "DINO"),
          "clip_i": metrics.mean_cosine_distinct_pairs(embed_images(enc.clip, paths, enc.clip_spec, batch_size),
                                                       "CLIP-I"),
          "counts": {"real_images": len(paths)}}


def diversity(model, images, prompts: list[str], of_image: np.ndarray, per_prompt: dict) -> tuple[float, int]:
  """DIV: (mean LPIPS over all pairs of images of one prompt, number of pairs); per-prompt values into per_prompt.

  images: files or uint8 HWC arrays; of_image[i] indexes prompts."""
  from dreambooth_jax.eval import lpips, metrics  # noqa: PLC0415

  means, pairs = [], []
  for i, prompt in enumerate(prompts):
    group = [images[k] for k in np.flatnonzero(of_image == i)]
    if len(group) >= 2:
      try:
        mean, count = lpips.mean_pairwise_distance(model, group, f"DIV, prompt {prompt!r}")
      except ValueError as e:
        raise InputError(str(e)) from None
      per_prompt[prompt]["div"] = mean
      means.append(mean)
      pairs.append(count)
  if not pairs:
    raise InputError("DIV: every prompt has a single generated image; pairwise LPIPS needs 2 or more per prompt")
  return metrics.div(means, pairs), int(sum(pairs))


def evaluate(generated, real, *, dino_model=None, clip_model=None, prompts_file=None, class_generated=None,
             batch_size: int = 16, dino_preprocess: str = "model", encoders: Encoders | None = None,
             lpips_model=None, lpips_net: str = "alex", lpips_lin=None) -> dict:
  from dreambooth_jax.eval import metrics  # noqa: PLC0415

  prompts = read_prompts(prompts_file) if prompts_file else None
  pairs = group_generated(generated)
  prompts, of_image = assign_prompts(pairs, prompts, prompts_file)
  gen_paths = [p for p, _ in pairs]
  real_paths = list_images(real, "--real")
  class_paths = list_images(class_generated, "--class_generated") if class_generated else None

  enc = encoders or load_encoders(dino_model, clip_model, dino_preprocess, lpips_model, lpips_net, lpips_lin)
  dino, dino_spec, clip, clip_spec = enc.dino, enc.dino_spec, enc.clip, enc.clip_spec
  dino_gen, dino_real = (embed_images(dino, paths, dino_spec, batch_size) for paths in (gen_paths, real_paths))
  clip_gen, clip_real = (embed_images(clip, paths, clip_spec, batch_size) for paths in (gen_paths, real_paths))
  text = embed_texts(clip, enc.clip_tokenizer, prompts)

  clip_t, clip_t_per_prompt = metrics.clip_t(text, clip_gen, of_image)
  per_prompt = {}
  for i, prompt in enumerate(prompts):
    mask = of_image == i
    per_prompt[prompt] = {"images": int(mask.sum()), "dino": metrics.dino(dino_gen[mask], dino_real),
                          "clip_i": metrics.clip_i(clip_gen[mask], clip_real), "clip_t": float(clip_t_per_prompt[i])}
  counts = {"generated_images": len(gen_paths), "real_images": len(real_paths), "prompts": len(prompts)}
  results = {
      "dino": metrics.dino(dino_gen, dino_real), "clip_i": metrics.clip_i(clip_gen, clip_real), "clip_t": clip_t,
      "counts": counts, "per_prompt": per_prompt,
      "models": enc.names,
  }
  if class_paths is not None:
    results["pres"] = metrics.pres(dino_real, embed_images(dino, class_paths, dino_spec, batch_size))
    counts["class_generated_images"] = len(class_paths)
  if enc.lpips is not None:
    results["div"], counts["div_pairs"] = diversity(enc.lpips, gen_paths, prompts, of_image, per_prompt)
  return results


def report(results: dict) -> str:
  c = results["counts"]
  lines = [f"DINO    {results['dino']:.4f}  ({c['generated_images']} generated x {c['real_images']} real images)",
           f"CLIP-I  {results['clip_i']:.4f}  ({c['generated_images']} generated x {c['real_images']} real images)",
           f"CLIP-T  {results['clip_t']:.4f}  ({c['generated_images']} images, {c['prompts']} prompts)"]
  if "pres" in results:
    lines.append(f"PRES    {results['pres']:.4f}  ({c['class_generated_images']} class images x "
                 f"{c['real_images']} real images; lower = better prior preservation)")
  if "div" in results:
    lines.append(f"DIV     {results['div']:.4f}  ({c['div_pairs']} pairs of images of one prompt; higher = more "
                 "diverse)")
  return "\n".join(lines)


@cli.main("evaluate")
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  for name in ("generated", "real"):
    if not getattr(f, name):
      raise app.UsageError(f"--{name} is required")
  results = evaluate(f.generated, f.real, dino_model=f.dino_model, clip_model=f.clip_model,
                     prompts_file=f.prompts, class_generated=f.class_generated, batch_size=f.batch_size,
                     dino_preprocess=f.dino_preprocess, lpips_model=f.lpips_model, lpips_net=f.lpips_net,
                     lpips_lin=f.lpips_lin)
  print(report(results))
  if f.out:
    out = pathlib.Path(f.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


def define_flags():
  from dreambooth_jax.eval import lpips  # noqa: PLC0415

  flags.DEFINE_string("generated", None, "Folder of generated images (with index.json/index.csv or per-prompt "
                      "subfolders).")
  flags.DEFINE_string("real", None, "Folder of the real subject images.")
  flags.DEFINE_string("prompts", None, "Optional text file, one prompt per line: the prompts the generated images "
                      "must cover (each image's prompt must be one of them, and each needs images).")
  flags.DEFINE_string("dino_model", "facebook/dino-vits16", "DINO ViT: transformers folder or hub id.")
  flags.DEFINE_string("clip_model", "openai/clip-vit-large-patch14", "CLIPModel: transformers folder or hub id.")
  flags.DEFINE_string("class_generated", None, "Optional folder of images generated for the bare class prompt "
                      "(for PRES).")
  flags.DEFINE_string("lpips_model", None, "LPIPS backbone weights for DIV: a .safetensors file, a folder with "
                      "model.safetensors or a hub id; torchvision/timm `features.N.*` keys (e.g. timm/vgg16.tv_in1k "
                      "with --lpips_net=vgg) or an lpips.LPIPS state dict. Unset: no DIV.")
  flags.DEFINE_enum("lpips_net", "alex", sorted(lpips.BACKBONES), "LPIPS backbone (lpips' default: alex).")
  flags.DEFINE_string("lpips_lin", None, "LPIPS lin weights (default: those in --lpips_model, else the bundled "
                      "v0.1 weights of the lpips package).")
  flags.DEFINE_string("out", None, "Optional JSON file to write the results to.")
  flags.DEFINE_integer("batch_size", 16, "Images per encoder call.")
  flags.DEFINE_enum("dino_preprocess", "model", ["model", "dino_eval"],
                    "model: the DINO folder's preprocessor_config.json (dino-vits16: 224x224 bilinear); dino_eval: "
                    "resize 256 bicubic + center crop 224 (the DINO repository's evaluation transform).")


if __name__ == "__main__":
  define_flags()
  app.run(main)
