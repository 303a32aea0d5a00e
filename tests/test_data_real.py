"""Optional checks on the real HH harmless-base test file and OPT tokenizer in ../shared (skipped when absent)."""

from pathlib import Path

import pytest

from jaxalign.data import hh, prompts, tokenize
from jaxalign.tokenizer import load_tokenizer

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
HH_TEST = SHARED / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
OPT_TOKENIZER = SHARED / "tokenizers" / "opt" / "hf"
PAPER_HARMFUL = SHARED / "paper-2509.09055" / "data" / "prompts" / "harmful_prompts.json"

pytestmark = pytest.mark.skipif(not (HH_TEST.is_file() and OPT_TOKENIZER.is_dir() and PAPER_HARMFUL.is_file()),
                                reason=f"real HH data not found under {SHARED} (optional ../shared checks)")


@pytest.fixture(scope="module")
def loaded():
  return hh.load_preference_pairs(str(HH_TEST), split="test")


def test_every_record_is_accounted_for(loaded):
  pairs, report = loaded
  assert report.total == 2312 == report.used + sum(report.skipped.values())
  # Four pairs have an empty chosen response ("…\n\nAssistant: " and nothing after it).
  assert dict(report.skipped) == {hh.EMPTY_RESPONSE: 4}
  # The rejected text leaves the chosen prompt early in 4 pairs; #1950 shares the prompt (its rejected response
  # merely runs on into more turns), which makes the "5 of 2,312" of a marker-by-marker comparison.
  fallback = [int(where.rsplit("#", 1)[1]) for where in report.examples[hh.FALLBACK]]
  assert report.fallback == 4 and fallback == [1254, 1688, 1952, 2036]
  for pair in pairs:
    assert pair.prompt.endswith(hh.ASSISTANT)


def test_boundary_holds_for_every_pair_with_the_opt_tokenizer(loaded):
  pairs, _ = loaded
  tokenizer = load_tokenizer(str(OPT_TOKENIZER))
  tokenized = tokenize.tokenize_pairs(pairs, tokenizer, max_length=None, max_prompt_length=None)
  for side in ("chosen", "rejected"):
    full = tokenizer([p.prompt + getattr(p, side) for p in pairs]).input_ids
    responses = getattr(tokenized, f"{side}_ids")
    mismatched = [i for i, ids in enumerate(full)
                  if tokenized.prompt_ids[i].tolist() + responses[i][:-1].tolist() != ids]
    assert not mismatched, f"{side}: {len(mismatched)} pairs, e.g. {mismatched[:5]}"


def test_paper_harmful_prompts_are_reproduced():
  published = prompts.load_prompt_file(PAPER_HARMFUL)
  by_turn = prompts.paper_prompt_sets(str(HH_TEST.parents[1]), n_helpful=0)["harmful"]
  # The two that differ end in a multi-paragraph Assistant reply, which the paper's code kept in the prompt.
  assert [i for i, (a, b) in enumerate(zip(by_turn, published)) if a != b] == [5, 25]
  assert prompts.paper_prompt_sets(str(HH_TEST.parents[1]), n_helpful=0, style="paper")["harmful"] == published
