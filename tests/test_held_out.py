"""Held-out records are never training records: a single data file gets a seeded held-out share (logged), or a
separate `data.eval_source`; a folder or Hub source keeps its own splits."""

import logging

import jax
import pytest

from helpers import tiny_config
from jaxalign import config_lib, parallel
from jaxalign.data import pipeline, synthetic
from jaxalign.tokenizer import load_tokenizer

N = 60


def numbered_pairs(path, n=N, tag="q"):
  """HH records whose texts are all different (the number is in each)."""
  return str(synthetic.write_jsonl(path, [
      {"chosen": f"\n\nHuman: {tag} question {i}?\n\nAssistant: a kind answer {i}.",
       "rejected": f"\n\nHuman: {tag} question {i}?\n\nAssistant: a rude answer {i}."} for i in range(n)]))


def load(config):
  tokenizer = load_tokenizer(pipeline.tokenizer_path(config, ""))
  data = pipeline.load(config, tokenizer, "pairs", parallel.make_mesh(devices=jax.devices()[:1]))
  return [p.prompt + p.chosen for p in data.train.records], [p.prompt + p.chosen for p in data.held_out.records]


def test_a_single_file_holds_out_a_seeded_share_never_trained_on(tmp_path, cache_dir, caplog):
  source = numbered_pairs(tmp_path / "pairs.jsonl.gz")
  config = tiny_config(cache_dir, "dpo", **{"data.source": source, "data.subsets": "", "data.eval_pairs": 1000})
  with caplog.at_level(logging.INFO, logger="jaxalign"):
    train, held_out = load(config)
  assert len(held_out) == round(N * config.data.eval_share) and len(train) == N - len(held_out)
  assert not set(train) & set(held_out) and len(set(train) | set(held_out)) == N
  assert f"its held-out records are {len(held_out)} of its {N} usable records" in caplog.text
  assert "seeded with seed 0" in caplog.text
  assert load(config) == (train, held_out)  # the same for every run with that seed
  config.seed = 1
  assert load(config)[1] != held_out


def test_eval_source_is_the_held_out_file(tmp_path, cache_dir):
  source, other = numbered_pairs(tmp_path / "train.jsonl"), numbered_pairs(tmp_path / "test.jsonl", 20, "t")
  config = tiny_config(cache_dir, "dpo", **{"data.source": source, "data.subsets": "", "data.eval_pairs": 1000,
                                            "data.eval_source": other})
  train, held_out = load(config)
  assert len(train) == N and len(held_out) == 20 and all(" t question" in text for text in held_out)
  config.data.eval_source = source
  with pytest.raises(config_lib.ConfigError, match="config.data.eval_source"):
    config_lib.validate(config)


def test_a_folder_keeps_its_splits(cache_dir):
  config = tiny_config(cache_dir, "dpo")  # synthetic: a folder with train and test files, as the quickstart's
  train, held_out = load(config)
  assert len(train) == config.data.synthetic_pairs and len(held_out) == config.data.eval_pairs
