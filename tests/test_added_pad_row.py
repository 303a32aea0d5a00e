"""A tokenizer with no pad token but EOS (GPT-2's) gets a new pad token, and the model a new embedding row for it:
started at the mean of the others, trained like them, exported with the larger vocabulary that transformers loads."""

import json
import os

import numpy as np
import pytest
from flax import nnx

from conftest import TINY_CORPUS
from jaxalign import trainer
from jaxalign.models import gpt2, hub
from jaxalign.tokenizer import NEW_PAD_TOKEN, load_tokenizer
from helpers import losses_by_step, tiny_config

END_OF_TEXT = "<|endoftext|>"


def gpt2_style_folder(out_dir: str) -> tuple[str, int]:
  """A tiny GPT-2 and a byte-level BPE whose only special token is <|endoftext|> (BOS = EOS = unk, no pad, no spare
  token: as GPT-2's), saved as a Hugging Face folder; and the tokenizer's length (= the model's vocab_size)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  bpe.train_from_iterator(TINY_CORPUS, trainer=trainers.BpeTrainer(
      vocab_size=320, special_tokens=[END_OF_TEXT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                                      unk_token=END_OF_TEXT)
  config = gpt2.GPT2Config(vocab_size=len(tokenizer), n_positions=160, n_embd=32, n_layer=2, n_head=4, dropout=0.0,
                           attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
  hub.save_pretrained(gpt2.GPT2LMHeadModel(config, rngs=nnx.Rngs(0)), out_dir)
  tokenizer.save_pretrained(out_dir)
  return out_dir, len(tokenizer)


@pytest.mark.slow
def test_the_added_pad_token_gets_a_mean_initialised_row_and_the_export_loads_in_transformers(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  folder, vocab = gpt2_style_folder(str(tmp_path / "gpt2"))
  tokenizer = load_tokenizer(folder)
  assert (tokenizer.pad_token, tokenizer.pad_token_id, len(tokenizer)) == (NEW_PAD_TOKEN, vocab, vocab + 1)

  grown = hub.from_pretrained(folder, vocab_size=len(tokenizer))
  original = hub.from_pretrained(folder)
  table, before = (np.asarray(m.wte.embedding.get_value())
                   for m in (grown, original))
  assert table.shape == (vocab + 1, 32) and grown.config.vocab_size == vocab + 1
  np.testing.assert_array_equal(table[:vocab], before)
  np.testing.assert_allclose(table[vocab], before.mean(axis=0), atol=1e-7)

  config = tiny_config(str(tmp_path / "cache"), "sft", **{"init_from": folder, "tokenizer": folder,
                                                           "training.max_steps": 3, "data.eval_pairs": 0})
  export = trainer.run(config, str(tmp_path / "sft"))
  assert all(np.isfinite(list(losses_by_step(str(tmp_path / "sft")).values())))
  assert json.load(open(os.path.join(export, hub.CONFIG_FILE)))["vocab_size"] == vocab + 1
  exported_tokenizer = load_tokenizer(export)
  assert (exported_tokenizer.pad_token, exported_tokenizer.pad_token_id) == (NEW_PAD_TOKEN, vocab)
  theirs = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
  ids = np.array([[5, 17, 40, 99, vocab, 6]])  # the pad id too: it has a row now
  with torch.no_grad():
    expected = theirs(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(hub.from_pretrained(export)(ids)), expected, atol=1e-4)
