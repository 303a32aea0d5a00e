"""Pair scoring and data.pair_filter end to end on synthetic data, with one of our (two-head) reward models as the
judge: the scores are the judge's, record by record; the counts add up; drop and swap act on exactly the pairs
the judge inverts; a training run reads exactly the pairs the filter keeps."""

import dataclasses
import json
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
from flax import nnx

from configs import score_pairs as score_pairs_config
from jaxalign import config_lib, judges, pair_scores, trainer
from jaxalign.data import hh, pair_filter, pipeline, tokenize
from jaxalign.models import opt, reward
from jaxalign.tokenizer import load_tokenizer
from helpers import REPO, tiny_config

SUBSETS = "harmless-base,helpful-base"


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
  """The tiny trainer config's synthetic data scored by a random two-head reward model over its tokenizer."""
  root = tmp_path_factory.mktemp("pair-scores")
  train_config = tiny_config(str(root / "cache"), "reward")
  source = pipeline.data_source(train_config)
  tokenizer_dir = pipeline.tokenizer_path(train_config, str(root))
  judge_dir = str(root / "judge")
  arch = opt.preset("opt-125m", **train_config.model.arch.to_dict())
  reward.save_pretrained(reward.RewardModel(arch, ("harmless", "helpful"), rngs=nnx.Rngs(3)), judge_dir)
  load_tokenizer(tokenizer_dir).save_pretrained(judge_dir)

  c = score_pairs_config.get_config()
  c.judge, c.judge_batch_size = judge_dir, 32
  c.data.source, c.data.subsets, c.data.cache_dir = source, SUBSETS, str(root / "cache")
  c.report.worst = 5
  workdir = root / "scored"
  report = pair_scores.run(c, str(workdir))
  rows = [json.loads(line) for line in open(workdir / "scored-train.jsonl")]
  pairs, _ = hh.load_preference_pairs(source, split="train", subsets=SUBSETS.split(","))
  return dict(root=root, config=c, train_config=train_config, workdir=workdir, report=report, rows=rows,
              pairs=pairs, judge_dir=judge_dir, source=source)


def test_every_pair_gets_the_judges_scores(scored):
  rows, pairs = scored["rows"], scored["pairs"]
  assert [(r["prompt"], r["chosen"], r["rejected"], r["source"], r["index"]) for r in rows] == [
      (p.prompt, p.chosen, p.rejected, p.source, p.index) for p in pairs]
  judge = judges.load_judge(scored["judge_dir"])
  for kind, head in (("harmful", "harmless"), ("helpful", "helpful")):
    index = [i for i, p in enumerate(pairs) if pair_scores.pair_kind(p) == kind]
    assert index, kind
    for side in ("chosen", "rejected"):
      want = judge.for_head(head).score([pairs[i].prompt for i in index], [getattr(pairs[i], side) for i in index])
      np.testing.assert_allclose([rows[i][f"{side}_score"] for i in index], want, atol=1e-5)
  margins = np.array([r["margin"] for r in rows])
  np.testing.assert_allclose(margins, [r["chosen_score"] - r["rejected_score"] for r in rows], atol=1e-6)

  report = scored["report"]
  assert report["pairs"] == len(pairs) == sum(report["by_kind"].values())
  for row in report["inverted"]:
    assert row["pairs"] == np.count_nonzero(margins < -row["margin"]) == row["harmful_pairs"] + row["helpful_pairs"]
  assert 0 < report["inverted"][0]["pairs"] < len(pairs)  # a random judge inverts some pairs, not all
  assert [w["margin"] for w in report["worst"]] == sorted(margins)[:5]
  assert report["records"]["used"] == len(pairs)
  workdir = scored["workdir"]
  assert "Pairs the judge thinks inverted" in (workdir / "pair_report.md").read_text()
  assert matplotlib.image.imread(workdir / "margins.png").shape[0] > 100


def test_scores_are_cached_by_fingerprint(scored, monkeypatch, tmp_path):
  def no_judge(*args, **kwargs):
    raise AssertionError("the judge should not be loaded: the scores are cached")

  monkeypatch.setattr(judges, "load_set_judges", no_judge)
  again = pair_scores.run(scored["config"], str(tmp_path))
  assert again["cache"] == scored["report"]["cache"]
  assert (tmp_path / "scored-train.jsonl").read_text() == (scored["workdir"] / "scored-train.jsonl").read_text()
  # Other data is another fingerprint.
  assert pair_scores.fingerprint(scored["pairs"][1:], scored["judge_dir"], {}, {}) != pair_scores.fingerprint(
      scored["pairs"], scored["judge_dir"], {}, {})


def test_skip_counts_are_plain_json():
  skips = hh.SkipReport(total=4, used=2)
  skips.note(hh.IDENTICAL, "a.jsonl", 1)
  skips.note(hh.EMPTY_RESPONSE, "a.jsonl", 3)
  assert json.loads(json.dumps(pair_scores.skip_counts(skips))) == {
      "total": 4, "used": 2, "fallback": 0, "skipped": {"identical": 1, "empty_response": 1},
      "examples": {"identical": ["a.jsonl#1"], "empty_response": ["a.jsonl#3"]}}


def test_drop_and_swap_record_by_record(scored):
  pairs, rows = scored["pairs"], scored["rows"]
  margins = pair_filter.load_margins(scored["workdir"] / "scored-train.jsonl")
  threshold = 0.25 * float(np.median(np.abs([r["margin"] for r in rows])))
  inverted = [r["margin"] < -threshold for r in rows]

  report = hh.SkipReport(total=len(pairs), used=len(pairs))
  kept, counts = pair_filter.apply_pair_filter(pairs, margins, "drop", threshold, report)
  assert kept == [p for p, bad in zip(pairs, inverted) if not bad]
  assert counts == {"pairs": len(pairs), "kept": len(kept), "dropped": sum(inverted), "swapped": 0}
  assert report.skipped[pair_filter.JUDGE_INVERTED] == sum(inverted)
  assert report.total == report.used + sum(report.skipped.values()) and report.used == len(kept)

  swapped, counts = pair_filter.apply_pair_filter(pairs, margins, "swap", threshold)
  assert counts["swapped"] == sum(inverted) and counts["kept"] == len(pairs)
  for pair, out, bad in zip(pairs, swapped, inverted):
    assert out == (dataclasses.replace(pair, chosen=pair.rejected, rejected=pair.chosen) if bad else pair)
  assert pair_filter.apply_pair_filter(pairs, margins, "keep", threshold)[0] == pairs

  extra = hh.PreferencePair("\n\nHuman: new?\n\nAssistant:", " a", " b", "elsewhere", 7)
  with pytest.raises(ValueError, match="elsewhere#7: no score in"):
    pair_filter.apply_pair_filter([extra], margins, "drop", 0.0)


@pytest.mark.slow
def test_a_training_run_reads_exactly_the_kept_pairs(scored, monkeypatch, tmp_path):
  rows = scored["rows"]
  scores_file = str(scored["workdir"] / "scored-train.jsonl")
  config = tiny_config(scored["train_config"].data.cache_dir, "reward", **{
      "reward.heads": ("harmless", "helpful"), "data.pair_filter": "swap", "data.pair_scores": scores_file,
      "training.max_steps": 1, "data.eval_pairs": 0, "checkpoint.every_steps": 0, "export.enabled": False})
  seen = []
  real = tokenize.tokenize_pairs

  def spy(pairs, *args, **kwargs):
    seen.append(list(pairs))
    return real(pairs, *args, **kwargs)

  monkeypatch.setattr(tokenize, "tokenize_pairs", spy)
  trainer.run(config, str(tmp_path / "run"))
  expected = [dataclasses.replace(p, chosen=p.rejected, rejected=p.chosen) if r["margin"] < 0 else p
              for p, r in zip(scored["pairs"], rows)]
  assert seen == [expected]
  # The held-out split is not filtered: its pairs are the data's own.
  tokenizer = load_tokenizer(pipeline.tokenizer_path(config, str(tmp_path)))
  held_out, _ = pipeline._load(config, tokenizer, config.data.eval_split, "pairs")
  assert held_out == hh.load_preference_pairs(scored["source"], split="test", subsets=SUBSETS.split(","))[0]

  config.data.pair_scores = str(tmp_path / "missing.jsonl")
  with pytest.raises(config_lib.ConfigError, match="config.data.pair_scores"):
    config_lib.validate(config)
  config.data.pair_filter = "sometimes"
  with pytest.raises(config_lib.ConfigError, match="config.data.pair_filter"):
    config_lib.validate(config)


def test_loading_pairs_imports_no_judge_model_or_plotting():
  """The data floor (pipeline, pair filter) stands alone: scoring pairs needs judges, filtering them does not."""
  code = ("import sys, jaxalign.data.pipeline; print(sorted(m for m in sys.modules if m.startswith(("
          "'matplotlib', 'jaxalign.judges', 'jaxalign.models', 'jaxalign.pair_scores', 'jaxalign.curves'))))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
  assert out.stdout.strip() == "[]"
