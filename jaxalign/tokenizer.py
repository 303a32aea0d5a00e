"""Tokenizer loading with OPT's conventions, and a tiny offline byte-level BPE for the quickstart and tests.

OPT's tokenizer is GPT-2's byte-level BPE with one twist: every encoded text starts with `</s>` (id 2), which
OPT uses as its beginning-of-sequence token. Padding is `<pad>` (id 1) and end-of-sequence is `</s>` (id 2).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerFast

# OPT's special tokens and their ids, shared by the real tokenizer and the tiny one we train.
OPT_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
OPT_PAD_ID = 1
OPT_EOS_ID = 2


def load_tokenizer(name_or_path: str, *, revision: str | None = None):
  """Loads a tokenizer from a Hub id or a local folder and checks that it can pad and end sequences."""
  try:
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
  except OSError as e:
    raise OSError(
        f"Could not load a tokenizer from {name_or_path!r}: expected a Hugging Face Hub id (needs network access) "
        f"or a folder holding tokenizer.json / tokenizer_config.json. ({e})"
    ) from e
  if tokenizer.eos_token_id is None:
    raise ValueError(f"Tokenizer {name_or_path!r} has no eos_token; responses need one to end.")
  if tokenizer.pad_token_id is None:
    # GPT-style tokenizers without a pad token: pad with EOS (masked out everywhere anyway).
    tokenizer.pad_token = tokenizer.eos_token
  return tokenizer


def train_bpe_tokenizer(texts: Iterable[str], out_dir: str, *, vocab_size: int = 512) -> PreTrainedTokenizerFast:
  """Trains a byte-level BPE with OPT's special tokens and leading-`</s>` rule; saves it in Hub format to `out_dir`.

  The saved folder loads with `AutoTokenizer.from_pretrained(out_dir)` exactly like the real OPT tokenizer,
  so the offline quickstart and the tests exercise the same code paths as real runs.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=list(OPT_SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  bpe.train_from_iterator(texts, trainer=trainer)
  eos = OPT_SPECIAL_TOKENS[OPT_EOS_ID]
  bpe.post_processor = processors.TemplateProcessing(
      single=f"{eos} $A", pair=f"{eos} $A {eos} $B", special_tokens=[(eos, OPT_EOS_ID)]
  )
  tokenizer = PreTrainedTokenizerFast(
      tokenizer_object=bpe, bos_token=eos, eos_token=eos, unk_token=OPT_SPECIAL_TOKENS[3],
      pad_token=OPT_SPECIAL_TOKENS[OPT_PAD_ID],
  )
  os.makedirs(out_dir, exist_ok=True)
  tokenizer.save_pretrained(out_dir)
  return tokenizer
