"""The identifier checker/suggester on the bundled CLIP tokenizer."""

import json
import subprocess
import sys

import pytest

from dreambooth_jax.eval import identifier
from dreambooth_jax.io import tokenizers as tokenizer


@pytest.fixture(scope="module")
def tok():
  return tokenizer.load_tokenizer()


@pytest.fixture(scope="module")
def vocab():
  return json.loads((tokenizer.BUNDLED_TOKENIZER / "vocab.json").read_text())


def test_sks_is_one_rare_token(tok, vocab):
  result = identifier.analyze(tok, "sks")
  assert result["tokens"] == ["sks</w>"]
  assert result["ids"] == [vocab["sks</w>"]] and result["ids"][0] > 40000  # far beyond the frequent words
  assert result["warnings"] == []


def test_dog_is_a_common_word(tok):
  result = identifier.analyze(tok, "dog")
  assert result["tokens"] == ["dog</w>"]
  assert len(result["warnings"]) == 1 and "common word" in result["warnings"][0]
  # Raising the threshold past sks's rank flags it too: the warning follows the rank, not a word list.
  assert identifier.analyze(tok, "sks", common_rank=49000)["warnings"]


def test_multi_token_candidate_warns(tok):
  result = identifier.analyze(tok, "qwzxvk")
  assert len(result["tokens"]) > 1
  assert any("tokens" in w and "single token" in w for w in result["warnings"])
  with pytest.raises(ValueError, match="empty"):
    identifier.analyze(tok, "  ")


def test_suggestions_follow_the_rule_and_the_seed(tok, vocab):
  words = identifier.suggest(tok, 8, seed=0)
  assert len(set(words)) == 8
  for word in words:
    assert word.isalpha() and word.islower() and len(word) <= 3
    assert 5000 <= vocab[word + "</w>"] < 10000
    assert tok.tokenize(word) == [word + "</w>"]
    assert identifier.analyze(tok, word)["warnings"] == []  # what we suggest passes our own check
  assert identifier.suggest(tok, 8, seed=0) == words
  assert identifier.suggest(tok, 8, seed=1) != words
  with pytest.raises(ValueError, match="only"):
    identifier.suggest(tok, 5, min_rank=5000, max_rank=5010, max_letters=1)


def test_cli():
  run = lambda *args: subprocess.run([sys.executable, "-m", "dreambooth_jax.eval.identifier", *args],
                                     capture_output=True, text=True, timeout=60)
  out = run("sks", "dog", "--suggest=2")
  assert out.returncode == 0, out.stderr
  assert "'sks' -> 1 token(s): sks</w>" in out.stdout
  assert "warning: 'dog' is a common word" in out.stdout
  assert len(out.stdout.split("seed 0):\n")[1].strip().splitlines()) == 2
  assert run().returncode != 0  # nothing to do: usage error
