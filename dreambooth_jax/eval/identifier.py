"""Checks or proposes the rare-token identifier of a DreamBooth subject ("a photo of sks dog").

  python -m dreambooth_jax.eval.identifier sks          # how CLIP's tokenizer splits it, with warnings
  python -m dreambooth_jax.eval.identifier --suggest=5  # five rare single-token identifiers (seedable)

The paper wants an identifier that is one token with a weak prior: several tokens spread the subject over pieces
the model already knows, and a frequent word ("dog") must first be unlearned. BPE vocabularies number merged tokens
in merge order, so a token's id is its frequency rank (low id = frequent). Suggestions follow the paper: short
whole-word tokens from the rank range 5000-10000, taken in a seeded order.
"""

import sys

import numpy as np
from absl import app, flags

flags.DEFINE_integer("suggest", 0, "Propose this many rare single-token identifiers.")
flags.DEFINE_integer("seed", 0, "Seed of the order suggestions are drawn in.")
flags.DEFINE_integer("min_rank", 5000, "Suggestions: lowest vocab rank (id) considered.")
flags.DEFINE_integer("max_rank", 10000, "Suggestions: highest vocab rank (id), exclusive.")
flags.DEFINE_integer("max_letters", 3, "Suggestions: longest identifier, in letters.")
flags.DEFINE_integer("common_rank", 5000, "Warn when the candidate is a whole-word token ranked below this.")

END_OF_WORD = "</w>"


def analyze(tok, candidate: str, common_rank: int = 5000) -> dict:
  """{"tokens": [...], "ids": [...], "warnings": [...]} for one identifier candidate."""
  candidate = candidate.strip()
  if not candidate:
    raise ValueError("the identifier candidate is empty")
  tokens = tok.tokenize(candidate)
  ids = tok.convert_tokens_to_ids(tokens)
  warnings = []
  if len(tokens) > 1:
    warnings.append(f"{candidate!r} is {len(tokens)} tokens {tokens}: the subject would be bound to several "
                    "pieces that already mean something; prefer an identifier that is a single token")
  elif tokens[0].endswith(END_OF_WORD) and ids[0] < common_rank:
    warnings.append(f"{candidate!r} is a common word (whole-word token of rank {ids[0]} < {common_rank}, low rank "
                    "= frequent): its strong prior has to be unlearned; prefer a rare token (--suggest)")
  if candidate.lower() != candidate:
    warnings.append(f"CLIP's tokenizer lowercases: {candidate!r} reads as {candidate.lower()!r}")
  return {"candidate": candidate, "tokens": tokens, "ids": [int(i) for i in ids], "warnings": warnings}


def suggest(tok, count: int, *, seed: int = 0, min_rank: int = 5000, max_rank: int = 10000,
            max_letters: int = 3) -> list[str]:
  """`count` rare identifiers: lowercase alphabetic whole-word tokens of <= max_letters letters whose rank lies
  in [min_rank, max_rank), in an order fixed by `seed`; each re-checked to tokenize to exactly itself."""
  vocab = tok.get_vocab()
  candidates = sorted((i, t[:-len(END_OF_WORD)]) for t, i in vocab.items()
                      if min_rank <= i < max_rank and t.endswith(END_OF_WORD)
                      and 0 < len(t) - len(END_OF_WORD) <= max_letters
                      and t[:-len(END_OF_WORD)].isascii() and t[:-len(END_OF_WORD)].isalpha()
                      and t[:-len(END_OF_WORD)].islower())
  order = np.random.default_rng(seed).permutation(len(candidates))
  chosen = []
  for k in order:
    _, word = candidates[k]
    if tok.tokenize(word) == [word + END_OF_WORD]:
      chosen.append(word)
    if len(chosen) == count:
      break
  if len(chosen) < count:
    raise ValueError(f"only {len(chosen)} tokens fit (ranks [{min_rank}, {max_rank}), <= {max_letters} letters); "
                     f"{count} were asked for")
  return chosen


def main(argv):
  from dreambooth_jax.io import tokenizers as tokenizer  # noqa: PLC0415

  f = flags.FLAGS
  candidates = argv[1:]
  if not candidates and f.suggest <= 0:
    raise app.UsageError("give an identifier to check (e.g. `sks`) and/or --suggest=N")
  tok = tokenizer.load_tokenizer()
  try:
    for candidate in candidates:
      result = analyze(tok, candidate, f.common_rank)
      pieces = ", ".join(f"{t} (id {i})" for t, i in zip(result["tokens"], result["ids"]))
      print(f"{result['candidate']!r} -> {len(result['tokens'])} token(s): {pieces}")
      for warning in result["warnings"]:
        print(f"  warning: {warning}")
      if not result["warnings"]:
        print("  ok: a single, rare token")
    if f.suggest > 0:
      words = suggest(tok, f.suggest, seed=f.seed, min_rank=f.min_rank, max_rank=f.max_rank,
                      max_letters=f.max_letters)
      vocab = tok.get_vocab()
      print(f"rare single-token identifiers (ranks [{f.min_rank}, {f.max_rank}), seed {f.seed}):")
      for word in words:
        print(f"  {word}  (id {vocab[word + END_OF_WORD]})")
  except ValueError as e:
    sys.exit(f"identifier: error: {e}")


if __name__ == "__main__":
  app.run(main)
