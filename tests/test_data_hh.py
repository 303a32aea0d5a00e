"""HH loading and splitting: every skip reason, the turn-boundary fallback, the generic format, layouts, errors."""

import datasets
import pytest

from jaxalign.data import hh
from jaxalign.data.synthetic import write_jsonl

P = "\n\nHuman: How do I bake bread?\n\nAssistant:"
GOOD = {"chosen": P + " Mix flour and water.", "rejected": P + " No idea."}
# Chosen and rejected diverge in an earlier Assistant turn: the prompt falls back to the turn where they split.
EARLY = "\n\nHuman: Hi\n\nAssistant:"
DIVERGING = {"chosen": EARLY + " Hello!\n\nHuman: Bread?\n\nAssistant: Sure.",
             "rejected": EARLY + " Go away.\n\nHuman: Bread?\n\nAssistant: No."}

# One record per skip reason, named by the reason it must be counted under.
UNUSABLE = {
    hh.MISSING_FIELD: [{"rejected": P + " x"}, {"chosen": None, "rejected": P + " x"}],
    hh.NOT_A_STRING: [{"chosen": 5, "rejected": P + " x"}, {"chosen": P + " x", "rejected": ["a"]}],
    hh.NO_ASSISTANT_MARKER: [{"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hey"}],
    hh.NO_SHARED_PROMPT: [{"chosen": P + " a", "rejected": "\n\nHuman: Other?\n\nAssistant: b"}],
    hh.EMPTY_RESPONSE: [{"chosen": P + " ", "rejected": P + " x"}, {"chosen": P + " x", "rejected": P}],
    hh.IDENTICAL: [{"chosen": P + " same", "rejected": P + " same"}],
}


def test_split_uses_the_last_assistant_marker():
  prompt, chosen, rejected, fallback = hh.split_hh_record(GOOD)
  assert (prompt, chosen, rejected, fallback) == (P, " Mix flour and water.", " No idea.", False)


def test_diverging_pair_falls_back_to_the_shared_turn_boundary():
  prompt, chosen, rejected, fallback = hh.split_hh_record(DIVERGING)
  assert fallback and prompt == EARLY
  assert prompt + chosen == DIVERGING["chosen"] and prompt + rejected == DIVERGING["rejected"]


def test_every_skip_reason_is_counted_and_all_records_accounted_for(tmp_path):
  records = [GOOD, DIVERGING] + [r for rs in UNUSABLE.values() for r in rs]
  path = write_jsonl(tmp_path / "mixed.jsonl", records)
  pairs, report = hh.load_preference_pairs(str(path))
  assert [p.index for p in pairs] == [0, 1] and all(p.source == str(path) for p in pairs)
  assert dict(report.skipped) == {reason: len(rs) for reason, rs in UNUSABLE.items()}
  assert report.total == len(records) == report.used + sum(report.skipped.values())
  assert report.fallback == 1 and report.examples[hh.FALLBACK] == [f"{path}#1"]
  assert "2 used (1 with the turn-boundary prompt fallback)" in report.summary()


def test_generic_prompt_chosen_rejected_format(tmp_path):
  records = [{"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"},
             {"prompt": "Q", "chosen": " same", "rejected": " same"},
             {"prompt": 3, "chosen": " a", "rejected": " b"}]
  pairs, report = hh.load_preference_pairs(str(write_jsonl(tmp_path / "mine.jsonl.gz", records)))
  assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("Q: 2+2?", " 4", " 5")]
  assert dict(report.skipped) == {hh.IDENTICAL: 1, hh.NOT_A_STRING: 1}


def test_a_source_without_usable_records_is_an_error_naming_it(tmp_path):
  path = write_jsonl(tmp_path / "bad.jsonl", UNUSABLE[hh.IDENTICAL] * 3)
  with pytest.raises(ValueError, match=f"{path}: no usable preference pair among its 3 records"):
    hh.load_preference_pairs(str(path))


def test_unknown_fields_name_the_file(tmp_path):
  # Malformed lines, empty files, truncated .gz and invalid UTF-8: tests/test_reliability.py.
  path = write_jsonl(tmp_path / "odd.jsonl", [{"text": "hi"}])
  with pytest.raises(ValueError, match=r"odd.jsonl: records have fields \['text'\]"):
    hh.load_preference_pairs(str(path))


def test_repository_layout_folder_and_missing_files(tmp_path):
  write_jsonl(tmp_path / "harmless-base" / "test.jsonl.gz", [GOOD])
  write_jsonl(tmp_path / "helpful-base" / "test.jsonl", [GOOD, GOOD])
  pairs, report = hh.load_preference_pairs(str(tmp_path), split="test")
  assert report.used == 3 and pairs[0].source.endswith("harmless-base/test.jsonl.gz")
  pairs, _ = hh.load_preference_pairs(str(tmp_path), split="test", subsets=["helpful-base"])
  assert len(pairs) == 2
  with pytest.raises(FileNotFoundError, match="helpful-online/train.jsonl.gz"):
    hh.load_preference_pairs(str(tmp_path), split="train", subsets=["helpful-online"])
  with pytest.raises(FileNotFoundError, match="neither an existing file"):
    hh.load_preference_pairs(str(tmp_path / "nowhere"))


def test_a_folder_holding_split_files_directly(tmp_path):
  write_jsonl(tmp_path / "train.jsonl", [GOOD])
  pairs, _ = hh.load_preference_pairs(str(tmp_path))
  assert len(pairs) == 1


def test_hub_source_loads_each_default_subset(monkeypatch):
  calls = []

  def fake_load_dataset(path, data_dir=None, split=None):
    calls.append((path, data_dir, split))
    return datasets.Dataset.from_list([GOOD])

  monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
  pairs, report = hh.load_preference_pairs(hh.HH_HUB_ID)
  assert calls == [(hh.HH_HUB_ID, subset, "train") for subset in hh.HH_SUBSETS]
  assert report.used == 4 and pairs[1].source == "Anthropic/hh-rlhf:helpful-base/train"
