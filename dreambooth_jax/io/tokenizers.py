"""Tokenizers (transformers' CLIPTokenizer, and T5TokenizerFast for T5 encoders: the one piece of transformers used at
run time)."""

import dataclasses
import json
import pathlib

import numpy as np

BUNDLED_TOKENIZER = pathlib.Path(__file__).resolve().parents[1] / "assets" / "clip-tokenizer"


SETTINGS = ("pad_token", "bos_token", "eos_token", "unk_token")
CLIP_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
T5_CLASSES = ("T5Tokenizer", "T5TokenizerFast")  # Flux's tokenizer_2; loaded as T5TokenizerFast (tokenizer.json)


def load_tokenizer(folder=BUNDLED_TOKENIZER, max_length: int = 77, settings_file=None):
  """Reads a tokenizer folder (vocab.json + merges.txt, or tokenizer.json) as saved by diffusers/transformers.

  A folder with only a tokenizer_config.json (bundled model configs: the vocabulary is the same CLIP BPE for
  every family) gets the bundled vocabulary with that file's settings, e.g. SDXL's second tokenizer and SD 2.x
  pad with "!". settings_file: such a file kept elsewhere (the sd-configs layout keeps it beside the folder)."""
  from transformers import CLIPTokenizer  # noqa: PLC0415 (slow import, only where needed)

  folder = pathlib.Path(folder)
  tokenizer_class = tokenizer_class_of(folder)
  if tokenizer_class in T5_CLASSES:
    if not (folder / "tokenizer.json").is_file():
      raise FileNotFoundError(f"{folder}: a {tokenizer_class} folder without tokenizer.json (nothing is bundled for "
                              "T5: copy the model's tokenizer_2/ folder, tokenizer.json included)")
    from transformers import T5TokenizerFast  # noqa: PLC0415
    return T5TokenizerFast.from_pretrained(str(folder))
  has_vocab = (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file()
  if not has_vocab:
    settings_file = settings_file or folder / "tokenizer_config.json"
    settings = json.loads(pathlib.Path(settings_file).read_text()) if pathlib.Path(settings_file).is_file() else {}
    kwargs = {k: settings[k] for k in SETTINGS if k in settings}
    return CLIPTokenizer(str(BUNDLED_TOKENIZER / "vocab.json"), str(BUNDLED_TOKENIZER / "merges.txt"),
                         model_max_length=settings.get("model_max_length", max_length), **kwargs)
  if (folder / "vocab.json").is_file() and not (folder / "tokenizer_config.json").is_file():
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
  return CLIPTokenizer.from_pretrained(str(folder))


def tokenizer_class_of(folder: pathlib.Path) -> str:
  """The folder's tokenizer_config.json `tokenizer_class` (CLIPTokenizer when absent, as in old SD folders); a class
  that is neither CLIP nor T5 is an error naming the file, never a CLIP tokenizer reading someone else's vocabulary."""
  config_file = folder / "tokenizer_config.json"
  name = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
  name = name or "CLIPTokenizer"
  if name not in CLIP_CLASSES + T5_CLASSES:
    raise ValueError(f"{config_file}: tokenizer_class {name!r} is not supported (supported: "
                     f"{list(CLIP_CLASSES + T5_CLASSES)})")
  return name


@dataclasses.dataclass
class TokenizerSettings:
  """A T5 tokenizer folder's settings without its vocabulary (bundled Flux configs: the memory plan needs only the
  prompt length; nothing is bundled for T5's vocabulary). Tokenizing with it is an error naming the folder."""

  folder: pathlib.Path
  model_max_length: int

  def __call__(self, *args, **kwargs):
    raise FileNotFoundError(f"{self.folder}: settings only, no tokenizer.json (bundled configs); load the model's "
                            "own folder (its tokenizer_2/) to tokenize")


def load_config_tokenizer(folder: pathlib.Path, name: str = "tokenizer"):
  """The folder's tokenizer; for bundled configs the CLIP BPE with the folder's settings (SD 2.x and SDXL's second
  tokenizer pad with "!"), kept as <name>/tokenizer_config.json or, for SD, <name>_config.json beside it; a T5
  folder without tokenizer.json (bundled Flux configs) its TokenizerSettings."""
  config_file = folder / name / "tokenizer_config.json"
  if (tokenizer_class_of(folder / name) in T5_CLASSES and not (folder / name / "tokenizer.json").is_file()):
    return TokenizerSettings(folder / name, int(json.loads(config_file.read_text())["model_max_length"]))
  return load_tokenizer(folder / name, settings_file=folder / f"{name}_config.json"
                                   if (folder / f"{name}_config.json").is_file() else None)


def tokenize(tokenizer, prompts: list[str]) -> np.ndarray:
  """Token ids (B, model_max_length) int32, padded and truncated as diffusers' pipelines do."""
  ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                  return_tensors="np").input_ids
  return ids.astype(np.int32)
