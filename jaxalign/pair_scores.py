"""Scoring preference pairs with a judge, and cleaning training data with those scores.

`python evaluate.py --config configs/score_pairs.py --workdir runs/pairs` (`run`) scores the chosen and rejected
response of every pair of a data source (any `data.source` train.py reads) with a judge (the DeBERTa judge or one
of our reward models; a two-head reward model judges harmlessness pairs with its harmless head and the rest with
its helpful head), and writes into the workdir
  scored-<split>.jsonl   every pair with its scores: {"prompt", "chosen", "rejected", "chosen_score",
                         "rejected_score", "margin", "source", "index"}; a generic preference file train.py reads
                         (`data.source`), and the scores `data.pair_filter` uses (`data.pair_scores`);
  pair_report.json/.md   the margin distribution's summary, how many pairs the judge thinks inverted at several
                         margins, and the worst pairs;
  margins.png            the margin distribution.
The scores are cached by fingerprint (the pairs' text, the judge's files and heads) in <cache>/pair-scores, so a
rerun or another split's report reuses them.

Margin = score(chosen) - score(rejected): negative means the judge prefers the rejected response. train.py's
`data.pair_filter` reads the scored-<split>.jsonl to drop or swap the pairs the judge thinks inverted
(`data/pair_filter.py`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxalign import judges, jsonl, workdirs
from jaxalign.config_lib import parse_named
from jaxalign.data import hh, pipeline
from jaxalign.data.pair_filter import pair_key

log = logging.getLogger(__name__)

REPORT_MARGINS = (0.0, 0.5, 1.0, 2.0, 4.0)
_CACHE_VERSION = 2  # 2: reward-model judges stop at their max_position_embeddings


def pair_kind(pair: hh.PreferencePair) -> str:
  """Which prompt set's judge scores a pair: "harmful" for pairs from harmlessness data, else "helpful"."""
  return "harmful" if "harmless" in pair.source else "helpful"


def score_pairs(pairs: Sequence[hh.PreferencePair], judge_of: Mapping[str, judges.Judge]) -> np.ndarray:
  """[len(pairs), 2] fp32 (chosen score, rejected score) per pair, each pair scored by its kind's judge; raises
  naming the first pair whose score is not finite."""
  scores = np.zeros((len(pairs), 2), np.float32)
  for kind in ("harmful", "helpful"):
    index = [i for i, p in enumerate(pairs) if pair_kind(p) == kind]
    if index:
      prompts = [pairs[i].prompt for i in index]
      for side, field in enumerate(("chosen", "rejected")):
        scores[index, side] = judge_of[kind].score(prompts, [getattr(pairs[i], field) for i in index])
  bad = np.flatnonzero(~np.isfinite(scores).all(axis=1))
  if bad.size:
    pair = pairs[bad[0]]
    raise ValueError(f"{pair.source}#{pair.index}: the judge's score is not finite ({scores[bad[0]].tolist()}), and "
                     f"{bad.size} pairs in all; check the judge (its length limit, its dtype)")
  return scores


def scored_records(pairs: Sequence[hh.PreferencePair], scores: np.ndarray) -> list[dict[str, Any]]:
  """The rows of a scored-pairs file."""
  return [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "chosen_score": float(c),
           "rejected_score": float(r), "margin": float(c) - float(r), "source": p.source, "index": p.index}
          for p, (c, r) in zip(pairs, scores)]


# ------------------------------------------------------------------------------------------------------ report

def pair_report(records: Sequence[Mapping], *, margins: Sequence[float] = REPORT_MARGINS,
                worst: int = 20) -> dict[str, Any]:
  """The margin distribution's summary, the pairs inverted at each margin (overall and per kind), the worst pairs."""
  values = np.array([r["margin"] for r in records], np.float64)
  kinds = np.array(["harmful" if "harmless" in r["source"] else "helpful" for r in records])
  inverted = []
  for m in margins:
    row = {"margin": float(m), "pairs": int(np.count_nonzero(values < -m))}
    row["percent"] = 100.0 * row["pairs"] / values.size
    for kind in ("harmful", "helpful"):
      row[f"{kind}_pairs"] = int(np.count_nonzero((values < -m) & (kinds == kind)))
    inverted.append(row)
  order = np.argsort(values, kind="stable")[:worst]
  return {"pairs": int(values.size), "by_kind": {k: int(np.count_nonzero(kinds == k)) for k in ("harmful", "helpful")},
          "margin": {"mean": float(values.mean()), "median": float(np.median(values)),
                     "p05": float(np.percentile(values, 5)), "p95": float(np.percentile(values, 95))},
          "inverted": inverted,
          "worst": [{key: records[i][key] for key in ("source", "index", "margin", "chosen_score", "rejected_score",
                                                      "prompt", "chosen", "rejected")} for i in order]}


def _clip(text: str, limit: int = 300, keep_end: bool = False) -> str:
  text = text.strip().replace("\n", " ⏎ ").replace("|", "\\|")
  if len(text) <= limit:
    return text
  return "…" + text[-limit:] if keep_end else text[:limit] + "…"


def render_report(report: Mapping[str, Any], judge: str, data: str) -> str:
  """pair_report.md."""
  m = report["margin"]
  lines = ["# Preference pairs scored by a judge", "",
           f"Data: `{data}`, {report['pairs']} pairs ({report['by_kind']['harmful']} harmlessness, "
           f"{report['by_kind']['helpful']} helpfulness). Judge: `{judge}`. Margin = score(chosen) - score(rejected); "
           "below 0 the judge prefers the rejected response.", "",
           f"Margin: mean {m['mean']:.3f}, median {m['median']:.3f}, 5th-95th percentile [{m['p05']:.3f}, "
           f"{m['p95']:.3f}].", "", "## Pairs the judge thinks inverted", "",
           "| margin below | pairs | % | harmlessness pairs | helpfulness pairs |", "|---:|---:|---:|---:|---:|"]
  lines += [f"| {-r['margin'] + 0.0:g} | {r['pairs']} | {r['percent']:.1f} | {r['harmful_pairs']} | "
            f"{r['helpful_pairs']} |" for r in report["inverted"]]
  lines += ["", "`data.pair_filter=drop` with `data.pair_filter_margin=M` drops the pairs below -M; `swap` exchanges "
            "their chosen and rejected.", "", f"## The {len(report['worst'])} worst pairs", "",
            "| pair | margin | prompt (end) | chosen | rejected |", "|:---|---:|:---|:---|:---|"]
  lines += [f"| {w['source']}#{w['index']} | {w['margin']:.2f} | {_clip(w['prompt'], 200, keep_end=True)} | "
            f"{_clip(w['chosen'])} | {_clip(w['rejected'])} |" for w in report["worst"]]
  lines += ["", "![Margin distribution](margins.png)", ""]
  return "\n".join(lines)


def plot_margins(records: Sequence[Mapping], margins: Sequence[float], path: str | os.PathLike) -> None:
  """Histogram of the margins per kind of pair, with the inversion margins as dashed lines."""
  values = np.array([r["margin"] for r in records], np.float64)
  kinds = np.array(["harmful" if "harmless" in r["source"] else "helpful" for r in records])
  fig = Figure(figsize=(9.0, 4.8), layout="constrained")
  ax = fig.add_subplot()
  bins = np.linspace(values.min(), values.max(), 61) if np.ptp(values) > 0 else 10
  for kind, label in (("harmful", "harmlessness pairs"), ("helpful", "helpfulness pairs")):
    if np.any(kinds == kind):
      ax.hist(values[kinds == kind], bins=bins, alpha=0.6, label=f"{label} ({np.count_nonzero(kinds == kind)})")
  lo, hi = min(values.min(), 0.0), max(values.max(), 0.0)
  pad = 0.05 * (hi - lo or 1.0)
  ax.set_xlim(lo - pad, hi + pad)  # the data's range: a margin line far out would squeeze the histogram
  for i, m in enumerate(margins):
    label = f"-{m:g}: {np.count_nonzero(values < -m)} pairs below" if m else \
        f"0: {np.count_nonzero(values < 0)} pairs inverted"
    if -m >= lo - pad:
      ax.axvline(-m, color="red", linestyle="--", linewidth=1.0, alpha=1.0 - 0.15 * i, label=label)
    else:
      ax.plot([], [], " ", label=f"{label} (left of the plot)")
  ax.set_xlabel("margin = judge score(chosen) - score(rejected)")
  ax.set_ylabel("pairs")
  ax.set_title(f"Judge margins of {values.size} preference pairs (left of 0: the judge prefers the rejected)")
  ax.legend(fontsize=8)
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=120)


# -------------------------------------------------------------------------------------------------- the command

def _judge_fingerprint(model_dir: str) -> list:
  """The judge's identity for the cache: its folder's files with their sizes and modification times."""
  root = Path(model_dir)
  files = sorted(root.rglob("*")) if root.is_dir() else []
  return [str(root.resolve())] + [(str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns)
                                  for f in files if f.is_file()]


def fingerprint(pairs: Sequence[hh.PreferencePair], judge_dir: str, heads: Mapping[str, str], settings: Any) -> str:
  """The cache key of a scoring: the pairs' text, the judge's files, the heads per kind and scoring settings."""
  digest = hashlib.blake2b(digest_size=16)
  digest.update(json.dumps([_CACHE_VERSION, _judge_fingerprint(judge_dir), sorted(heads.items()), settings]).encode())
  for pair in pairs:
    digest.update(pair_key(pair.prompt, pair.chosen, pair.rejected).encode())
  return digest.hexdigest()


def skip_counts(skips: hh.SkipReport) -> dict[str, Any]:
  """A SkipReport as plain JSON: records read, used, with the prompt fallback, skipped by reason, examples."""
  return {"total": skips.total, "used": skips.used, "fallback": skips.fallback, "skipped": dict(skips.skipped),
          "examples": dict(skips.examples)}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Scores every pair of the configured data (cached), writes scored-<split>.jsonl and the report into `workdir`,
  and returns the report."""
  data = config.data
  subsets = [s.strip() for s in data.subsets.split(",") if s.strip()] or None
  source = pipeline.data_source(config)
  pairs, skips = hh.load_preference_pairs(source, split=data.split, subsets=subsets)
  judge_dir = workdirs.resolve_init_path(config.judge)
  heads = parse_named(config.judge_heads, "judge_heads")
  settings = {"dtype": config.model_dtype}
  cache = Path(pipeline.cache_dir(config)) / "pair-scores"
  cached = cache / f"{fingerprint(pairs, judge_dir, heads, settings)}.jsonl"
  if cached.is_file():
    log.info("pair scores loaded from cache %s", cached)
    records = [row for _, row in jsonl.read(cached)]
  else:
    judge_of = judges.load_set_judges(judge_dir, ("harmful", "helpful"), heads, batch_size=config.judge_batch_size,
                                      dtype=config.model_dtype)
    records = scored_records(pairs, score_pairs(pairs, judge_of))
    jsonl.write(records, cached)
    log.info("pair scores cached in %s", cached)
  out = Path(workdir)
  out.mkdir(parents=True, exist_ok=True)
  scored = out / f"scored-{data.split}.jsonl"
  shutil.copyfile(cached, scored)
  report = pair_report(records, margins=tuple(config.report.margins), worst=config.report.worst)
  report.update(data=source, split=data.split, judge=config.judge, scored_pairs=str(scored), cache=str(cached),
                records=skip_counts(skips))
  (out / "pair_report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
  (out / "pair_report.md").write_text(render_report(report, config.judge, source), encoding="utf-8")
  plot_margins(records, tuple(config.report.margins), out / "margins.png")
  for row in report["inverted"]:
    print(f"margin below {-row['margin'] + 0.0:g}: {row['pairs']} of {report['pairs']} pairs ({row['percent']:.1f}%)")
  print(f"scored pairs: {scored}; report: {out / 'pair_report.md'}")
  return report
