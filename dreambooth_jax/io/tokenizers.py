"""The CLIP BPE tokenizer (transformers' CLIPTokenizer, the one piece of transformers used at run time)."""

import pathlib

import numpy as np

BUNDLED_TOKENIZER = pathlib.Path(__file__).resolve().parents[1] / "assets" / "clip-tokenizer"


def load_tokenizer(folder=BUNDLED_TOKENIZER, max_length: int = 77):
  """Reads a tokenizer folder (vocab.json + merges.txt, or tokenizer.json) as saved by diffusers/transformers."""
  from transformers import CLIPTokenizer  # noqa: PLC0415 (slow import, only where needed)

  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f"{folder}: tokenizer folder missing")
  if (folder / "vocab.json").is_file() and not (folder / "tokenizer_config.json").is_file():
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
  return CLIPTokenizer.from_pretrained(str(folder))


def tokenize(tokenizer, prompts: list[str]) -> np.ndarray:
  """Token ids (B, model_max_length) int32, padded and truncated as diffusers' pipelines do."""
  ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                  return_tensors="np").input_ids
  return ids.astype(np.int32)
