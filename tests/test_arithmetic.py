"""The synthetic arithmetic task: deterministic from its seed, an exact checker, held-out problems never trained on,
and SFT pairs the HH loader reads with the answer as the response."""

import json
import os
import re

import pytest

from jaxalign.data import arithmetic, hh, pipeline


def test_split_is_deterministic_from_the_seed_and_disjoint():
  train, held_out = arithmetic.arithmetic_split(seed=3, n_train=300, n_held_out=100, max_operand=12)
  again = arithmetic.arithmetic_split(seed=3, n_train=300, n_held_out=100, max_operand=12)
  other = arithmetic.arithmetic_split(seed=4, n_train=300, n_held_out=100, max_operand=12)
  assert (train, held_out) == again and (train, held_out) != other
  assert len(train) == 300 and len(held_out) == 100
  prompts = [r["prompt"] for r in train]
  assert len(set(prompts)) == 300 and not set(prompts) & {r["prompt"] for r in held_out}
  assert {"+", "-", "*"} == {_problem(r["prompt"])[1] for r in train}


def _problem(prompt):
  a, op, b = re.search(r"What is (\d+) (.) (\d+)\?", prompt).groups()
  return int(a), op, int(b)


def test_records_are_trl_prompt_only_with_the_exact_answer():
  assert arithmetic.record(7, "-", 12) == {"prompt": "\n\nHuman: What is 7 - 12?\n\nAssistant:", "answer": -5}
  for r in arithmetic.arithmetic_split(seed=0, n_train=50, n_held_out=0)[0]:
    a, op, b = _problem(r["prompt"])
    assert r["answer"] == {"+": a + b, "-": a - b, "*": a * b}[op]


@pytest.mark.parametrize("completion,answer,correct", [
    (" Answer: 19", 19, True), ("Answer: 19\n", 19, True), (" Answer: -5", -5, True), (" Answer: 18", 19, False),
    (" Answer: 19.", 19, False), (" The answer is 19", 19, False), (" Answer: 190", 19, False),
    (" Answer: 19 Answer: 19", 19, False), ("", 0, False)])
def test_checker_is_exact(completion, answer, correct):
  assert arithmetic.is_correct(completion, answer) is correct
  assert arithmetic.is_correct(arithmetic.completion_text(answer), answer)


def test_parse_answer_reads_the_format_only():
  assert arithmetic.parse_answer(" Answer: 42") == 42
  assert arithmetic.parse_answer("42") is None


def test_sft_pairs_read_as_hh_with_the_answer_as_response():
  train, _ = arithmetic.arithmetic_split(seed=1, n_train=20, n_held_out=5)
  pairs, report = hh.pairs_from_records(arithmetic.sft_records(train), "arithmetic")
  assert report.used == 20
  for pair, r in zip(pairs, train):
    assert pair.prompt == r["prompt"] and arithmetic.is_correct(pair.chosen, r["answer"])
    assert arithmetic.parse_answer(pair.rejected) not in (None, r["answer"])


def test_bad_sizes_are_refused():
  with pytest.raises(ValueError, match="at most the 363 problems"):
    arithmetic.arithmetic_split(n_train=300, n_held_out=100, max_operand=10)
  with pytest.raises(ValueError, match="operations"):
    arithmetic.problems(operations=("/",))


def test_arithmetic_pairs_folder_for_the_sft_stage(tmp_path):
  """data.source "arithmetic" for a pair or SFT stage: the train and held-out problems' pairs, written once."""
  folder = pipeline.arithmetic_pairs_dir(str(tmp_path))
  pairs = {split: [json.loads(line) for line in open(os.path.join(folder, f"{split}.jsonl"))]
           for split in ("train", "test")}
  train, held_out = arithmetic.arithmetic_split()
  assert [len(pairs["train"]), len(pairs["test"])] == [len(train), len(held_out)]
  assert pairs["test"][0]["chosen"] == held_out[0]["prompt"] + arithmetic.completion_text(held_out[0]["answer"])
  prompt = lambda pair: pair["chosen"][:pair["chosen"].rfind(" Answer:")]
  assert not {prompt(p) for p in pairs["train"]} & {prompt(p) for p in pairs["test"]}
