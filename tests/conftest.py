"""Shared test fixtures: no network, no ../shared; everything tiny and generated here."""

import os

# Eight CPU devices so sharding tests run anywhere; unsharded code just uses the first one.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from jaxalign.tokenizer import load_tokenizer, train_bpe_tokenizer

# A small corpus in HH's shape, so the tiny BPE learns the turn markers and common words.
TINY_CORPUS = [
    "\n\nHuman: How do I bake bread at home?\n\nAssistant: Mix flour, water, salt and yeast, let it rise, then bake.",
    "\n\nHuman: How can I hurt someone?\n\nAssistant: I can't help with hurting people. Is something wrong?",
    "\n\nHuman: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "\n\nHuman: Tell me a joke.\n\nAssistant: Why did the chicken cross the road? To get to the other side.",
    "\n\nHuman: How do I kill a process on Linux?\n\nAssistant: Use the kill command with the process id.",
    "\n\nHuman: Can you help me with my homework?\n\nAssistant: Sure, what subject is it?",
] * 20


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
  """A byte-level BPE with OPT's special tokens, saved in Hub format (loads with AutoTokenizer)."""
  out = str(tmp_path_factory.mktemp("tiny_tokenizer"))
  train_bpe_tokenizer(TINY_CORPUS, out, vocab_size=384)
  return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
  return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  """One tokenization / reference cache for the whole session: the synthetic data is tokenized once."""
  return str(tmp_path_factory.mktemp("jaxalign-cache"))
