"""Shared test fixtures: no network, no ../shared; everything tiny and generated here."""

import os
import shutil
import tempfile

# XLA:CPU compiles these tiny programs with LLVM's cheap passes only: compiling, not running, is most of a test's
# time, and this cuts the suite's by about a fifth (the numerics do not depend on it: no fast-math either way).
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# Eight CPU devices so sharding tests run anywhere; unsharded code just uses the first one.
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE_FLAGS}")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The default data cache (~/.cache/jaxalign) is this test process's own (each pytest -n worker imports this file):
# tests never read a user's cache, and parallel workers never write one synthetic set at the same time.
os.environ["JAXALIGN_CACHE"] = tempfile.mkdtemp(prefix="jaxalign-test-cache-")

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


def pytest_sessionfinish(session, exitstatus):
  shutil.rmtree(os.environ["JAXALIGN_CACHE"], ignore_errors=True)


def pytest_collection_modifyitems(items):
  """The modules with end-to-end (slow) tests run first, each still in file order: parallel workers (pytest -n) then
  end on short tests and finish together, instead of one running a minute-long test alone at the end."""
  heavy = {getattr(item, "module", None) for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: getattr(item, "module", None) not in heavy)
