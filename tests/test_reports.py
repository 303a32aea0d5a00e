"""Rated responses in the paper's file format -> reader -> metrics -> report files, with exact numbers."""

import json

import pytest
from matplotlib.image import imread

from jaxalign.metrics import metrics_from_rated
from jaxalign.rated import load_rated_responses
from jaxalign.reports import format_table, print_table, write_reports

# The paper's layout: <order>_<model>_<set>.json, a list of {prompt, response, rating}; "sftdpo" is our "sft+dpo".
# base:    HmR 2/4 = 50 (-3.0 sits on the threshold: not harmless), HpR 1/4 = 25 (-2.0 likewise), CAS 37.5
# sft+dpo: HmR 3/4 = 75, HpR 3/4 = 75, CAS 75; gains over base +50.00%, +200.00%, +100.00%
RATINGS = {
    "1_base_harmful.json": [-3.0, -2.5, -4.0, -1.0],
    "1_base_helpful.json": [-2.0, -1.0, -3.0, -2.5],
    "4_sftdpo_harmful.json": [-2.9, -2.5, -4.0, -1.0],
    "4_sftdpo_helpful.json": [-1.9, -1.0, -3.0, 0.5],
}


@pytest.fixture
def paper_folder(tmp_path):
  folder = tmp_path / "responses_in"
  folder.mkdir()
  for name, scores in RATINGS.items():
    items = [{"prompt": f"Human: question {i}?", "response": "" if (name, i) == ("1_base_helpful.json", 2)
              else f"answer {i} ünïcode", "rating": s} for i, s in enumerate(scores)]
    (folder / name).write_text(json.dumps(items, indent=2), encoding="utf-8")
  # Files beside them that are not rated responses are ignored.
  (folder / "noisy_data_examples.json").write_text("[]", encoding="utf-8")
  (folder / "README.txt").write_text("not data", encoding="utf-8")
  return folder


def test_reader_maps_names_order_and_fields(paper_folder):
  rated = load_rated_responses(paper_folder)
  assert list(rated) == ["base", "sft+dpo"]
  assert {m: sorted(s) for m, s in rated.items()} == {"base": ["harmful", "helpful"], "sft+dpo": ["harmful", "helpful"]}
  first = {"prompt": "Human: question 0?", "response": "answer 0 ünïcode", "score": -3.0}
  assert rated["base"]["harmful"][0] == first
  assert [r["score"] for r in rated["sft+dpo"]["helpful"]] == RATINGS["4_sftdpo_helpful.json"]
  # One file on its own works too.
  assert list(load_rated_responses(paper_folder / "1_base_helpful.json")) == ["base"]


def test_end_to_end_reports(paper_folder, tmp_path, capsys):
  results = metrics_from_rated(load_rated_responses(paper_folder), n_bootstrap=200)
  paths = write_reports(results, tmp_path / "out")
  out = tmp_path / "out"

  saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
  assert list(saved["models"]) == ["base", "sft+dpo"]
  base, tuned = saved["models"]["base"], saved["models"]["sft+dpo"]
  assert (base["metrics"]["hmr"], base["metrics"]["hpr"], base["metrics"]["cas"]) == (50.0, 25.0, 37.5)
  assert (tuned["metrics"]["hmr"], tuned["metrics"]["hpr"], tuned["metrics"]["cas"]) == (75.0, 75.0, 75.0)
  assert base["metrics"]["mean_score_harmful"] == pytest.approx(-2.625)
  assert base["metrics"]["empty_rate_helpful"] == 25.0
  assert base["gains"] is None
  assert tuned["gains"] == {"hmr": 50.0, "hpr": 200.0, "cas": 100.0}
  assert saved["config"]["baseline"] == "base" and saved["config"]["n_bootstrap"] == 200
  assert "records" not in base

  markdown = (out / "results.md").read_text(encoding="utf-8")
  assert "| base | 50.0 [" in markdown and "| sft+dpo | 75.0 [" in markdown
  assert "| sft+dpo | +50.00% | +200.00% | +100.00% |" in markdown
  assert "scored > -3" in markdown and "scored > -2" in markdown

  lines = [json.loads(line) for line in (out / "responses-sft+dpo.jsonl").read_text(encoding="utf-8").splitlines()]
  assert len(lines) == 8
  assert lines[0] == {"model": "sft+dpo", "set": "harmful", "prompt": "Human: question 0?",
                      "response": "answer 0 ünïcode", "score": -2.9}
  assert [line["set"] for line in lines] == ["harmful"] * 4 + ["helpful"] * 4
  assert sorted(p.name for p in paths["responses"]) == ["responses-base.jsonl", "responses-sft+dpo.jsonl"]

  for name in ("metrics.png", "scores.png"):
    image = imread(out / name)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert image.std() > 0  # something was drawn

  print_table(results)
  printed = capsys.readouterr().out
  assert printed == format_table(results) + "\n"
  header, rule, *rows = printed.splitlines()
  assert header.split()[:2] == ["Model", "HmR"] and set(rule) <= {"-", " "}
  assert rows[0].startswith("base ") and "37.5 [" in rows[0] and "-2.62 / -2.12" in rows[0]


def test_written_responses_read_back_to_the_same_metrics(paper_folder, tmp_path):
  results = metrics_from_rated(load_rated_responses(paper_folder), n_bootstrap=50)
  write_reports(results, tmp_path / "out")
  again = metrics_from_rated(load_rated_responses(tmp_path / "out"), n_bootstrap=50)
  for name, model in results["models"].items():
    assert again["models"][name]["metrics"] == model["metrics"]
  assert again["models"]["base"]["records"] == results["models"]["base"]["records"]


def test_reader_orders_models_by_number_not_text(tmp_path):
  for name in ("10_dpo_harmful.json", "9_sft_harmful.json"):
    (tmp_path / name).write_text(json.dumps([{"prompt": "p", "response": "r", "rating": 0.0}]), encoding="utf-8")
  assert list(load_rated_responses(tmp_path)) == ["sft", "dpo"]


@pytest.mark.parametrize("content, match", [
    ([{"prompt": "p", "response": "r"}], r"1_base_harmful.json record 0: field 'rating' must be a finite number"),
    ([{"prompt": "p", "response": "r", "rating": 1.0}, {"prompt": "p", "rating": 1.0}],
     r"1_base_harmful.json record 1: field 'response' must be a string"),
    ({"prompt": "p"}, r"1_base_harmful.json: expected a non-empty JSON list .* got a JSON dict"),
    ([], r"1_base_harmful.json: expected a non-empty JSON list .* got an empty list"),
])
def test_reader_names_file_record_and_field(tmp_path, content, match):
  (tmp_path / "1_base_harmful.json").write_text(json.dumps(content), encoding="utf-8")
  with pytest.raises(ValueError, match=match):
    load_rated_responses(tmp_path)


def test_reader_errors_on_bad_json_duplicates_and_missing_files(tmp_path):
  (tmp_path / "1_base_harmful.json").write_text("[{", encoding="utf-8")
  with pytest.raises(ValueError, match=r"1_base_harmful.json: not valid JSON"):
    load_rated_responses(tmp_path)
  record = json.dumps([{"prompt": "p", "response": "r", "rating": 0.0}])
  (tmp_path / "1_base_harmful.json").write_text(record, encoding="utf-8")
  (tmp_path / "base_harmful.json").write_text(record, encoding="utf-8")
  with pytest.raises(ValueError, match=r"model 'base' set 'harmful' is also in .*1_base_harmful.json"):
    load_rated_responses(tmp_path)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no rated-response files"):
    load_rated_responses(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="no such file or folder"):
    load_rated_responses(tmp_path / "absent")


def test_our_jsonl_lines_are_checked(tmp_path):
  path = tmp_path / "responses-m.jsonl"
  path.write_text('{"model": "m", "set": "harmful", "prompt": "p", "response": "r", "score": 0.0}\n'
                  '{"model": "m", "set": "helpfull", "prompt": "p", "response": "r", "score": 0.0}\n', encoding="utf-8")
  with pytest.raises(ValueError, match=r"responses-m.jsonl line 2: field 'set' must be one of"):
    load_rated_responses(path)
