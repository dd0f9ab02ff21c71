"""Parity of our T5 v1.1 encoder (Flux's text_encoder_2) with transformers' T5EncoderModel (torch, fp32) on the same
random weights, loaded from the safetensors file transformers writes.

Tolerance as tests/test_models.py: fp32, max |ours - torch| <= 1e-4 * max(1, max |torch|).
"""

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from reference_models import TINY_T5, build_t5_tokenizer, to_numpy
from test_models import assert_close
from test_models_sdxl import perturb
from dreambooth_jax.io import diffusers_folder as weights
from dreambooth_jax.io import safetensors as safetensors_io, tokenizers
from dreambooth_jax.models.t5 import T5Config, T5EncoderModel, relative_position_buckets, t5_encoder_keys

@pytest.fixture(scope="module")
def t5_pair(tmp_path_factory):
  from transformers import T5Config as TorchConfig, T5EncoderModel as TorchT5
  torch.manual_seed(0)
  ref = perturb(TorchT5(TorchConfig(**TINY_T5)), 1)
  folder = tmp_path_factory.mktemp("t5") / "text_encoder_2"
  ref.save_pretrained(folder)
  config = T5Config.from_dict(weights.read_json(folder / "config.json"))
  state_dict = t5_encoder_keys(safetensors_io.load_file(folder / "model.safetensors"))
  ours = weights.load_module(lambda: T5EncoderModel(config, rngs=nnx.Rngs(0)), state_dict, where=str(folder))
  return ref, ours


def test_config_from_transformers():
  config = T5Config.from_dict(dict(TINY_T5, model_type="t5"))
  assert (config.dense_act_fn, config.is_gated_act, config.num_heads) == ("gelu_new", True, 4)
  with pytest.raises(ValueError, match="feed_forward_proj"):
    T5Config.from_dict(dict(TINY_T5, feed_forward_proj="gated-gelu-x"))


def test_relative_position_buckets_match_transformers():
  from transformers.models.t5.modeling_t5 import T5Attention
  for length, buckets, distance in ((40, 8, 16), (300, 32, 128)):
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    expected = T5Attention._relative_position_bucket(rel, True, buckets, distance).numpy()
    np.testing.assert_array_equal(relative_position_buckets(length, length, buckets, distance), expected)


def test_t5_encoder_matches_transformers(t5_pair):
  ref, ours = t5_pair
  ids_BT = np.random.default_rng(0).integers(0, TINY_T5["vocab_size"], (2, 40))
  with torch.no_grad():
    expected = ref(torch.from_numpy(ids_BT)).last_hidden_state
  got = jax.jit(lambda m, ids: m(ids))(ours, ids_BT)
  assert_close(got, to_numpy(expected))


def test_trained_t5_tokenizer_feeds_both_encoders(t5_pair, tmp_path):
  ref, ours = t5_pair
  from transformers import T5TokenizerFast
  build_t5_tokenizer().save_pretrained(tmp_path / "tokenizer_2")
  tokenizer = tokenizers.load_tokenizer(tmp_path / "tokenizer_2")  # tokenizer_class T5Tokenizer -> T5TokenizerFast
  assert isinstance(tokenizer, T5TokenizerFast) and tokenizer.model_max_length == 512
  ids_BT = tokenizer(["a photo of sks dog", "a zebra"], padding="max_length", max_length=32, truncation=True,
                     return_tensors="np").input_ids
  for row in ids_BT:  # words, one eos, then padding
    eos = list(row).index(1)
    assert 0 < eos < len(row) - 1 and (row[:eos] > 2).all() and (row[eos + 1:] == 0).all()
  assert ids_BT.max() < TINY_T5["vocab_size"]
  with torch.no_grad():
    expected = ref(torch.from_numpy(ids_BT)).last_hidden_state
  assert_close(ours(ids_BT), to_numpy(expected))


def test_tied_embedding_keys():
  shared = np.ones((3, 2), np.float32)
  assert set(t5_encoder_keys({"encoder.embed_tokens.weight": shared})) == {"shared.weight"}
  assert set(t5_encoder_keys({"shared.weight": shared, "encoder.embed_tokens.weight": shared})) == {"shared.weight"}
  with pytest.raises(ValueError, match="embed_tokens"):
    t5_encoder_keys({"shared.weight": shared, "encoder.embed_tokens.weight": 2 * shared})


def test_tokenizer_folders_are_read_by_their_class(tmp_path):
  import json
  import shutil
  folder = tmp_path / "tokenizer_2"
  build_t5_tokenizer().save_pretrained(folder)
  (folder / "tokenizer.json").unlink()
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):  # not the bundled CLIP BPE in its place
    tokenizers.load_tokenizer(folder)
  shutil.rmtree(folder)
  folder.mkdir()
  (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
  with pytest.raises(ValueError, match="LlamaTokenizer"):
    tokenizers.load_tokenizer(folder)
