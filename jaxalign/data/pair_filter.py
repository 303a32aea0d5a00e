"""Cleaning a stage's train pairs with a judge's scores (`data.pair_filter`): the scores come from the
scored-<split>.jsonl that `python evaluate.py --config configs/score_pairs.py` writes (`pair_scores.py`); reading them
needs no judge.

Margin = score(chosen) - score(rejected): negative means the judge prefers the rejected response.
  keep   the pairs as they are (the default; no scores needed);
  drop   drop every pair whose margin is below -data.pair_filter_margin (the judge prefers the rejected response by
         more than that), counted as the skip reason "judge_inverted";
  swap   exchange chosen and rejected of those pairs instead, counted as "judge_swapped" (they are still used).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Mapping, Sequence

from jaxalign import jsonl
from jaxalign.data import hh

log = logging.getLogger(__name__)

PAIR_FILTERS = ("keep", "drop", "swap")  # data.pair_filter
JUDGE_INVERTED = "judge_inverted"  # skip reason: dropped by data.pair_filter = "drop"
JUDGE_SWAPPED = "judge_swapped"  # not a skip: chosen and rejected exchanged by data.pair_filter = "swap"
SCORE_FIELDS = ("chosen_score", "rejected_score")


def pair_key(prompt: str, chosen: str, rejected: str) -> str:
  """A pair's identity by its text: what ties a score to a pair wherever the data is read from."""
  digest = hashlib.blake2b(digest_size=12)
  for text in (prompt, chosen, rejected):
    digest.update(f"{len(text)}:{text}".encode())
  return digest.hexdigest()


def load_margins(path: str | os.PathLike) -> dict[str, float]:
  """{pair_key: margin} from a scored-pairs file; raises naming the line and field of a malformed row."""
  margins = {}
  for where, row in jsonl.read(path):
    if not isinstance(row, dict):
      raise ValueError(f"{where}: expected a JSON object; is this a scored-pairs file?")
    for field in ("prompt", "chosen", "rejected"):
      if not isinstance(row.get(field), str):
        raise ValueError(f"{where}: field {field!r} must be a string; is this a scored-pairs file?")
    for field in SCORE_FIELDS:
      if isinstance(row.get(field), bool) or not isinstance(row.get(field), (int, float)):
        raise ValueError(f"{where}: field {field!r} must be a number; write the file with configs/score_pairs.py")
    margins[pair_key(row["prompt"], row["chosen"], row["rejected"])] = row["chosen_score"] - row["rejected_score"]
  if not margins:
    raise ValueError(f"{path}: no scored pairs")
  return margins


def apply_pair_filter(pairs: Sequence[hh.PreferencePair], margins: Mapping[str, float], mode: str, margin: float,
                      report: hh.SkipReport | None = None,
                      scores_file: str = "the scores") -> tuple[list[hh.PreferencePair], dict[str, int]]:
  """The pairs `mode` keeps (see the module docstring), and the counts {"pairs", "kept", "dropped", "swapped"}.

  A pair counts as inverted when its margin is below -`margin`. Dropped pairs are noted in `report` as
  JUDGE_INVERTED skips (and no longer counted as used); swapped ones under JUDGE_SWAPPED in its examples. Every
  pair needs a score: one missing raises, naming it and `scores_file`.
  """
  if mode not in PAIR_FILTERS:
    raise ValueError(f"pair filter {mode!r} is not one of {list(PAIR_FILTERS)}")
  if margin < 0:
    raise ValueError(f"pair filter margin must be >= 0 (how far the judge prefers the rejected response), got {margin}")
  counts = {"pairs": len(pairs), "kept": 0, "dropped": 0, "swapped": 0}
  if mode == "keep":
    counts["kept"] = len(pairs)
    return list(pairs), counts
  kept = []
  for pair in pairs:
    key = pair_key(pair.prompt, pair.chosen, pair.rejected)
    if key not in margins:
      raise ValueError(f"{pair.source}#{pair.index}: no score in {scores_file}; score this data with "
                       "configs/score_pairs.py (same data.source, subsets and split) and point data.pair_scores at "
                       "its scored-<split>.jsonl")
    if margins[key] >= -margin:
      kept.append(pair)
    elif mode == "drop":
      counts["dropped"] += 1
      if report is not None:
        report.note(JUDGE_INVERTED, pair.source, pair.index)
        report.used -= 1
    else:
      counts["swapped"] += 1
      kept.append(dataclasses.replace(pair, chosen=pair.rejected, rejected=pair.chosen))
      if report is not None:
        report.examples.setdefault(JUDGE_SWAPPED, [])
        if len(report.examples[JUDGE_SWAPPED]) < 5:
          report.examples[JUDGE_SWAPPED].append(f"{pair.source}#{pair.index}")
  counts["kept"] = len(kept)
  return kept, counts


def filter_pairs(config, pairs: list[hh.PreferencePair],
                 report: hh.SkipReport | None = None) -> list[hh.PreferencePair]:
  """`data.pair_filter` over a stage's train pairs, with the scores of `data.pair_scores`; logs the counts."""
  data = config.data
  if data.pair_filter == "keep":
    return pairs
  kept, counts = apply_pair_filter(pairs, load_margins(data.pair_scores), data.pair_filter, data.pair_filter_margin,
                                   report, scores_file=data.pair_scores)
  log.info("data.pair_filter %s (margin %g, scores %s): %d pairs, %d kept, %d dropped as %s, %d swapped",
           data.pair_filter, data.pair_filter_margin, data.pair_scores, counts["pairs"], counts["kept"],
           counts["dropped"], JUDGE_INVERTED, counts["swapped"])
  if report is not None:
    log.info("after data.pair_filter: %s", report.summary())
  return kept
