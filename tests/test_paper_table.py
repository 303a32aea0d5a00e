"""The paper's published rated responses reproduce its Table 1 and Table 2 exactly (arXiv 2509.09055).

Needs ../shared/data/paper-2509.09055 beside the repository; skipped with the reason when it is absent.
"""

import json
from pathlib import Path

import pytest

from jaxalign.metrics import format_gain, metrics_from_rated
from jaxalign.rated import load_rated_responses
from jaxalign.reports import write_reports

PAPER_RESPONSES = Path(__file__).resolve().parents[1].parent / "shared/data/paper-2509.09055/data/responses"

# Table 1 (HmR, HpR, CAS in %) and Table 2 (gains over the base model).
TABLE1 = {"base": (42.0, 22.0, 32.0), "sft": (48.0, 56.0, 52.0), "dpo": (36.0, 46.0, 41.0),
          "sft+dpo": (44.0, 66.0, 55.0)}
TABLE2 = {"sft": ("+14.29%", "+154.55%", "+62.50%"), "dpo": ("-14.29%", "+109.09%", "+28.13%"),
          "sft+dpo": ("+4.76%", "+200.00%", "+71.88%")}


@pytest.fixture(scope="module")
def paper_results():
  if not PAPER_RESPONSES.is_dir():
    pytest.skip(f"the paper's rated responses are not at {PAPER_RESPONSES} (../shared is not beside the repo)")
  return metrics_from_rated(load_rated_responses(PAPER_RESPONSES), n_bootstrap=200)


def test_tables_match_the_paper(paper_results):
  models = paper_results["models"]
  assert list(models) == list(TABLE1)
  for name, (hmr, hpr, cas) in TABLE1.items():
    metrics = models[name]["metrics"]
    assert (metrics["hmr"], metrics["hpr"], metrics["cas"]) == (hmr, hpr, cas), name
    assert (metrics["n_harmful"], metrics["n_helpful"]) == (50, 50), name
  for name, gains in TABLE2.items():
    assert tuple(format_gain(models[name]["gains"][k]) for k in ("hmr", "hpr", "cas")) == gains, name


def test_paper_reports(paper_results, tmp_path):
  write_reports(paper_results, tmp_path)
  saved = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
  assert {m: (v["metrics"]["hmr"], v["metrics"]["hpr"], v["metrics"]["cas"]) for m, v in saved["models"].items()
          } == TABLE1
  assert "| sft+dpo | +4.76% | +200.00% | +71.88% |" in (tmp_path / "results.md").read_text(encoding="utf-8")
  # The base model left some prompts unanswered (empty text the judge still scored).
  assert saved["models"]["base"]["metrics"]["empty_rate_harmful"] == 4.0
