"""Evaluation prompt sets: the paper's selection procedure (re-derived independently here) and prompt files."""

import json
import random

import pytest

from jaxalign.data import prompts
from jaxalign.data.synthetic import write_jsonl


def conversation(i, word, reply="Sure."):
  return f"\n\nHuman: Question {i} about {word}?\n\nAssistant: {reply}"


@pytest.fixture
def hh_folder(tmp_path):
  harmless = [{"chosen": conversation(i, w), "rejected": conversation(i, w, "No.")}
              for i, w in enumerate(["kill", "bread", "murder", "cats", "rape", "Kill", "killer", "soup"] * 4)]
  helpful = [{"chosen": conversation(i, "help", "First.\n\nAssistant: Second."), "rejected": conversation(i, "x")}
             for i in range(12)]
  write_jsonl(tmp_path / "harmless-base" / "test.jsonl.gz", harmless)
  write_jsonl(tmp_path / "helpful-base" / "test.jsonl.gz", helpful)
  return tmp_path, harmless, helpful


def test_selection_follows_the_paper_procedure(hh_folder):
  folder, harmless, helpful = hh_folder
  got = prompts.paper_prompt_sets(str(folder), n_harmful=5, n_helpful=4)
  # The paper's steps, spelled out: keyword filter (case-sensitive), one seeded stream, harmful then helpful.
  random.seed(100)
  rows = [r for r in harmless if any(k in r["chosen"] for k in ("kill", "murder", "rape"))]
  assert len(rows) == 16  # "Kill" does not match, "killer" does
  harmful_rows, helpful_rows = random.sample(rows, 5), random.sample(helpful, 4)
  assert got["harmful"] == [r["chosen"].rsplit("\n\nAssistant:", 1)[0].strip() for r in harmful_rows]
  assert got["helpful"] == [r["chosen"].rsplit("\n\nAssistant:", 1)[0].strip() for r in helpful_rows]
  assert got["harmful"][0].startswith("Human: Question")


def test_configurable_sizes_keywords_and_seed(hh_folder):
  folder, _, _ = hh_folder
  base = prompts.paper_prompt_sets(str(folder), n_harmful=3, n_helpful=0)
  assert base["helpful"] == [] and len(base["harmful"]) == 3
  assert prompts.paper_prompt_sets(str(folder), n_harmful=3, n_helpful=0, seed=1) != base
  soup = prompts.paper_prompt_sets(str(folder), n_harmful=4, n_helpful=0, keywords=("soup",))
  assert all("soup" in p for p in soup["harmful"])
  with pytest.raises(ValueError, match="cannot sample 5 harmful prompts from 4"):
    prompts.paper_prompt_sets(str(folder), n_harmful=5, n_helpful=0, keywords=("soup",))


def test_final_turn_styles():
  text = "\n\nHuman: Hi\n\nAssistant: Para one.\n\nPara two."
  assert prompts.prompt_without_final_turn(text) == "Human: Hi"
  # The paper's code only drops a last paragraph that starts with "Assistant:".
  assert prompts.prompt_without_final_turn(text, "paper") == "Human: Hi\n\nAssistant: Para one.\n\nPara two."
  assert prompts.prompt_without_final_turn("\n\nHuman: Hi\n\nAssistant: Yes.", "paper") == "Human: Hi"


def test_load_prompt_file(tmp_path):
  good = tmp_path / "good.json"
  good.write_text(json.dumps(["Human: a", "Human: b"]))
  assert prompts.load_prompt_file(good) == ["Human: a", "Human: b"]
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps(["Human: a", ""]))
  with pytest.raises(ValueError, match="bad.json: item 1 should be a non-empty prompt string"):
    prompts.load_prompt_file(bad)
  bad.write_text(json.dumps({"prompts": []}))
  with pytest.raises(ValueError, match="expected a JSON list"):
    prompts.load_prompt_file(bad)


def test_prompt_sets_of_any_size_subset_and_split(hh_folder):
  folder, harmless, helpful = hh_folder
  write_jsonl(folder / "helpful-base" / "train.jsonl.gz", helpful[:5])
  write_jsonl(folder / "harmless-base" / "train.jsonl.gz", harmless[:9])
  everything = prompts.paper_prompt_sets(str(folder), n_harmful=prompts.ALL, n_helpful=prompts.ALL)
  keyword_rows = [r for r in harmless if any(k in r["chosen"] for k in prompts.PAPER_KEYWORDS)]
  # Every candidate, in file order; nothing drawn.
  assert everything["harmful"] == [prompts.prompt_without_final_turn(r["chosen"]) for r in keyword_rows]
  assert len(everything["helpful"]) == len(helpful)
  # ALL for the harmful set draws nothing, so the helpful sample is the stream's first draw.
  rng = random.Random(prompts.PAPER_SEED)
  first_draw = [prompts.prompt_without_final_turn(r["chosen"]) for r in rng.sample(helpful, 3)]
  assert prompts.paper_prompt_sets(str(folder), n_harmful=-1, n_helpful=3)["helpful"] == first_draw
  # Another split, another subset as the helpful set, no keyword filter.
  other = prompts.paper_prompt_sets(str(folder), n_harmful=-1, n_helpful=-1, keywords=(), split="train",
                                    helpful_subset="harmless-base")
  assert len(other["harmful"]) == 9 and other["helpful"] == other["harmful"]
  with pytest.raises(ValueError, match="give a count from 0 to 5, or -1"):
    prompts.paper_prompt_sets(str(folder), n_harmful=0, n_helpful=6, split="train")


def test_prompt_files_in_json_lines(tmp_path):
  path = tmp_path / "prompts.jsonl"
  path.write_text('"Human: a"\n\n{"prompt": "Human: b", "id": 7}\n')
  assert prompts.load_prompt_file(path) == ["Human: a", "Human: b"]
  path.write_text('"Human: a"\n{"text": "Human: b"}\n')
  with pytest.raises(ValueError, match="line 2 should be a non-empty prompt string"):
    prompts.load_prompt_file(path)
