"""Tokenizer loading (BOS / EOS / pad per tokenizer, the chat template's end-of-turn token), and a tiny offline
byte-level BPE for the quickstart and tests.

OPT's tokenizer is GPT-2's byte-level BPE with one twist: every encoded text starts with `</s>` (id 2), which
OPT uses as its beginning-of-sequence token. Padding is `<pad>` (id 1) and end-of-sequence is `</s>` (id 2).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from jaxalign.errors import MissingInput

log = logging.getLogger(__name__)

# OPT's special tokens and their ids, shared by the real tokenizer and the tiny one we train.
OPT_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
OPT_PAD_ID = 1
OPT_EOS_ID = 2
# The pad token added to tokenizers with none but EOS to pad with.
NEW_PAD_TOKEN = "<|pad|>"
_PROBE_ANSWER = "Fine, thanks."
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(name_or_path: str, *, revision: str | None = None):
  """Loads a tokenizer from a Hub id or a local folder and checks that it can pad and end sequences."""
  if os.path.isdir(name_or_path) and not any(os.path.exists(os.path.join(name_or_path, name))
                                             for name in _TOKENIZER_FILES):
    # transformers would build an empty tokenizer from a folder with a config.json only.
    raise MissingInput(f"{name_or_path!r} holds no tokenizer (none of {list(_TOKENIZER_FILES)}); set config.tokenizer "
                       "to the folder or Hub id of the model's tokenizer")
  try:
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
  except OSError as e:
    raise MissingInput(
        f"Could not load a tokenizer from {name_or_path!r}: expected a Hugging Face Hub id (needs network access) "
        f"or a folder holding tokenizer.json / tokenizer_config.json. ({(str(e).splitlines() or [''])[0]})"
    ) from e
  if tokenizer.eos_token_id is None:
    raise ValueError(f"Tokenizer {name_or_path!r} has no eos_token; responses need one to end.")
  ensure_pad_token(tokenizer)
  return tokenizer


def ensure_pad_token(tokenizer) -> None:
  """Gives a tokenizer whose pad token is missing or is EOS a pad token that is never EOS.

  EOS must stay a trained target: code that masks `ids == pad_id` (TRL's collators, transformers' sequence
  classifiers finding the last non-pad token) would otherwise drop or skip it (TRL issue #1623). In order: the unk
  token; an added token named like a pad ("<pad>", "<|padding|>", "<|finetune_right_pad_id|>", "<|fim_pad|>");
  another added token that the chat template does not use (SmolLM2's "<empty_output>", say), so the id has a row in
  the model's embedding; only then a new "<|pad|>" token (its id is the tokenizer's length, so the model needs one
  more embedding row).
  """
  eos = tokenizer.eos_token_id
  if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
    return
  reserved = {eos, tokenizer.bos_token_id, tokenizer.unk_token_id}
  template = tokenizer.chat_template or ""
  spare = [token.content for token_id, token in sorted(tokenizer.added_tokens_decoder.items())
           if token_id not in reserved and token.content not in template]
  named_pad = [content for content in spare if "pad" in content.lower()]
  if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != eos:
    tokenizer.pad_token = tokenizer.unk_token
  elif named_pad or spare:
    tokenizer.pad_token = (named_pad or spare)[-1]
  else:
    tokenizer.add_special_tokens({"pad_token": NEW_PAD_TOKEN})
    log.warning("tokenizer %r had no pad token distinct from EOS and no spare added token: added %s as id %d (the "
                "model needs %d embedding rows)", tokenizer.name_or_path, NEW_PAD_TOKEN, tokenizer.pad_token_id,
                len(tokenizer))
  log.info("tokenizer %r pads with %r (id %d), not EOS", tokenizer.name_or_path, tokenizer.pad_token,
           tokenizer.pad_token_id)


def embedding_rows(tokenizer) -> int:
  """The token rows a model needs at least for this tokenizer beyond what its checkpoint has: the tokenizer's length
  when `ensure_pad_token` added a new pad token (its row is then grown, see `hub.from_pretrained(vocab_size=)`),
  else 0 (the model's own vocabulary must hold every id: `check_vocabulary`)."""
  return len(tokenizer) if tokenizer.pad_token == NEW_PAD_TOKEN else 0


def check_vocabulary(tokenizer, vocab_size: int) -> None:
  """Raises when the tokenizer has ids the model cannot embed (e.g. a pad or chat token added to its vocabulary)."""
  if len(tokenizer) > vocab_size:
    raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has {len(tokenizer)} tokens (pad {tokenizer.pad_token!r} "
                     f"= id {tokenizer.pad_token_id}) but the model embeds only {vocab_size}: give the model more rows "
                     "(model.arch.vocab_size for a random init) or use a tokenizer whose ids fit")


def end_of_turn(tokenizer) -> str | None:
  """The special token that ends an assistant turn in the tokenizer's chat template (ChatML's "<|im_end|>", Llama
  3's "<|eot_id|>", EOS for many), or None when the template ends turns with no special token (or has no template).

  Found by rendering a probe conversation: the first special or added token the template writes after the
  assistant's words. Generation stops there, and rendered responses end with it.
  """
  if not tokenizer.chat_template:
    return None
  probe = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": _PROBE_ANSWER}]
  text = tokenizer.apply_chat_template(probe, tokenize=False)
  after = text[text.rfind(_PROBE_ANSWER) + len(_PROBE_ANSWER):]
  special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
  for token_id in tokenizer(after, add_special_tokens=False).input_ids:
    if token_id in special:
      return tokenizer.convert_ids_to_tokens(token_id)
  return None


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
