"""Training prompts for the online methods: HH prompts (never one the evaluator may hold out), TRL's prompt-only and
conversational prompt formats with extra columns kept, the arithmetic task; every record used or counted by reason."""

import gzip
import json

import pytest

from jaxalign.data import arithmetic, hh, prompts
from jaxalign.data.synthetic import write_jsonl, write_synthetic_hh


def _accounted(report):
  return report.total == report.used + sum(report.skipped.values())


def test_hh_prompts_leave_out_every_prompt_the_evaluator_can_draw(tmp_path):
  write_synthetic_hh(tmp_path, n_train=60, n_test=20, seed=0)
  test_rows = [json.loads(line) for line in gzip.open(tmp_path / "harmless-base" / "test.jsonl.gz")]
  # One training conversation that is also a test one: it must not be trained on.
  leaked = tmp_path / "harmless-base" / "train.jsonl.gz"
  train_rows = [json.loads(line) for line in gzip.open(leaked)] + test_rows[:1]
  write_jsonl(leaked, train_rows)
  records, report = prompts.load_training_prompts(str(tmp_path))
  assert _accounted(report) and report.skipped[prompts.EVALUATION_PROMPT] >= 1
  held_out = prompts.evaluation_prompts(str(tmp_path))
  assert len(held_out) > 0
  for record in records:
    assert record.prompt.startswith("\n\nHuman:") and record.prompt.endswith("\n\nAssistant:")
    assert prompts._held_out_key(record.prompt) not in held_out
    assert record.columns == {"prompt_set": "harmful" if "harmless" in record.source else "helpful"}
  assert {r.columns["prompt_set"] for r in records} == {"harmful", "helpful"}
  texts = [r.prompt for r in records]
  assert len(set(texts)) == len(texts)  # duplicates kept once, the rest counted
  assert f"{leaked}#{len(train_rows) - 1}" in report.examples[prompts.EVALUATION_PROMPT]


def test_evaluation_prompt_keys_match_the_evaluators_prompts(tmp_path):
  write_synthetic_hh(tmp_path, n_train=4, n_test=10, seed=1)
  evaluator = prompts.paper_prompt_sets(str(tmp_path), n_harmful=prompts.ALL, n_helpful=3, keywords=())
  pairs, _ = hh.load_preference_pairs(str(tmp_path), split="test", subsets=["harmless-base"])
  # A training prompt (the conversation through its last "Assistant:") keys as the evaluator writes it.
  assert [prompts._held_out_key(p.prompt) for p in pairs] == evaluator["harmful"]


def test_prompt_only_and_conversational_records_keep_their_columns(tmp_path):
  path = tmp_path / "prompts.jsonl"
  lines = [
      {"prompt": "Tell me a joke.", "answer": 3, "topic": "fun"},
      {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "answer": 4},
      {"answer": 5},  # no prompt
      {"prompt": 7},  # not text
      {"prompt": [{"role": "robot", "content": "beep"}]},  # not messages
      {"prompt": "   "},  # empty
      {"prompt": []},  # no messages
      {"prompt": "Tell me a joke.", "answer": 9},  # a duplicate
  ]
  path.write_text("\n".join(json.dumps(line) for line in lines) + "\n{not json\n")
  records, report = prompts.load_training_prompts(str(path))
  assert [r.as_trl() for r in records] == [lines[0], lines[1]]
  assert records[1].prompt[1] == {"role": "user", "content": "Hi"} and records[0].index == 0
  assert _accounted(report) and report.total == 9
  assert dict(report.skipped) == {hh.MISSING_FIELD: 1, hh.NOT_A_STRING: 1, "not_messages": 1,
                                  prompts.EMPTY_PROMPT: 2, prompts.DUPLICATE_PROMPT: 1, hh.MALFORMED_LINE: 1}
  assert report.examples[hh.MISSING_FIELD] == [f"{path}#2"]


def test_bad_prompt_files_are_refused_naming_the_file(tmp_path):
  wrong = tmp_path / "wrong.jsonl"
  write_jsonl(wrong, [{"question": "What?"}])
  with pytest.raises(ValueError, match=f"{wrong}: records have fields \\['question'\\]; expected TRL's prompt-only"):
    prompts.load_training_prompts(str(wrong))
  unusable = tmp_path / "unusable.jsonl"
  write_jsonl(unusable, [{"prompt": ""}, {"prompt": None}])
  with pytest.raises(ValueError, match=f"{unusable}: no usable prompt among its 2 records"):
    prompts.load_training_prompts(str(unusable))


def test_arithmetic_prompts_carry_their_answers():
  options = {"seed": 2, "n_train": 30, "n_held_out": 10}
  train, report = prompts.load_training_prompts("arithmetic", arithmetic_options=options)
  held_out, _ = prompts.load_training_prompts("arithmetic", split="test", arithmetic_options=options)
  want_train, want_held_out = arithmetic.arithmetic_split(**options)
  assert [r.as_trl() for r in train] == want_train and [r.as_trl() for r in held_out] == want_held_out
  assert report.used == report.total == 30
