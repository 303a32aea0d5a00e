"""The tokenizers: the tiny offline one has OPT's semantics; a stage takes its starting model's own unless one is
named."""

import json

import pytest
from flax import nnx

from helpers import TINY, tiny_config
from jaxalign import config_lib, trainer
from jaxalign.data import pipeline
from jaxalign.models import hub, opt
from jaxalign.tokenizer import OPT_EOS_ID, OPT_PAD_ID, load_tokenizer


def test_tiny_tokenizer_has_opt_semantics(tiny_tokenizer):
  ids = tiny_tokenizer("Hello world").input_ids
  assert ids[0] == OPT_EOS_ID  # OPT starts every text with </s>
  assert tiny_tokenizer.pad_token_id == OPT_PAD_ID
  assert tiny_tokenizer.eos_token_id == OPT_EOS_ID
  assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == "Hello world"


# ------------------------------------------------------------------------ the tokenizer follows the starting model

def a_finished_workdir(root, tokenizer_dir):
  """A training workdir whose exported model/ folder holds a tiny OPT and its own tokenizer (384 ids)."""
  model = opt.OPTForCausalLM(TINY.replace(vocab_size=384, max_position_embeddings=160), rngs=nnx.Rngs(0))
  hub.save_pretrained(model, str(root / "model"))
  load_tokenizer(tokenizer_dir).save_pretrained(str(root / "model"))
  return root


def test_the_tokenizer_follows_init_from_unless_one_is_named(tmp_path, tiny_tokenizer_dir, cache_dir):
  workdir = a_finished_workdir(tmp_path / "sft", tiny_tokenizer_dir)
  config = tiny_config(cache_dir, "sft", init_from=str(workdir), tokenizer="")
  assert pipeline.tokenizer_path(config, "") == str(workdir / "model")  # a workdir: its exported folder's
  config.init_from = str(workdir / "model")
  assert pipeline.tokenizer_path(config, "") == str(workdir / "model")  # a Hugging Face folder: its own
  config.init_from = "EleutherAI/pythia-410m"
  assert pipeline.tokenizer_path(config, "") == "EleutherAI/pythia-410m"  # a Hub id: the id's own
  config.tokenizer = tiny_tokenizer_dir
  assert pipeline.tokenizer_path(config, "") == tiny_tokenizer_dir  # named by the user: that one
  config.init_from, config.tokenizer = "", ""
  with pytest.raises(config_lib.ConfigError, match="config.tokenizer .* random init"):
    config_lib.validate(config)  # a random init has no model whose tokenizer to take


def test_training_from_a_workdir_uses_and_exports_its_tokenizer(tmp_path, tiny_tokenizer_dir, cache_dir):
  workdir = a_finished_workdir(tmp_path / "sft", tiny_tokenizer_dir)
  config = tiny_config(cache_dir, "sft", init_from=str(workdir), tokenizer="", **{"training.max_steps": 2})
  export = trainer.train(config, str(tmp_path / "next"))
  vocab = lambda folder: json.load(open(f"{folder}/tokenizer.json"))["model"]["vocab"]
  assert vocab(export) == vocab(workdir / "model")
  # A tokenizer with more ids than the model embeds is still refused before any data is tokenized.
  config = tiny_config(cache_dir, "sft", init_from=str(workdir), tokenizer="synthetic")
  with pytest.raises(config_lib.ConfigError, match="config.tokenizer = 'synthetic' has 1024 token ids"):
    trainer.train(config, str(tmp_path / "mismatch"))
