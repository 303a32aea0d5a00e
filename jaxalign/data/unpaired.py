"""KTO's unpaired examples: a prompt, a completion, and whether that completion is desirable.

Two sources load, told apart by their records' fields:
  * unpaired JSON lines `{"prompt": text, "completion": text, "label": true | false}` (TRL's unpaired preference
    format), read from the same places as pairs (a file, a folder with `<split>.jsonl[.gz]`, an HH-layout folder);
  * preference pairs (HH or `{prompt, chosen, rejected}`, loaded by `hh.py`), each split into two examples: the
    chosen response desirable, the rejected one undesirable.
Every record is accounted for in a `hh.SkipReport` (unpaired: total == used + skipped by reason; pairs: the pair
loader's report, each used pair giving two examples).

KTO's KL reference point needs, for each example, a completion that does not answer its prompt. As TRL does (its
`_get_kl_dataset` shifts the completions of each batch of examples by one), each example is given another
example's completion, here along a seeded permutation of the whole split (the chosen and rejected halves of one pair
are adjacent in load order, and would otherwise often swap answers to the same prompt). An example then travels as a
preference pair (prompt, completion, mismatched completion), so every pair layout (separate, prefix-shared, packed)
and every reference mode carries it unchanged: its "chosen" side is the completion, its "rejected" side the KL term.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from jaxalign.data import hh
from jaxalign.errors import DataError

log = logging.getLogger(__name__)

UNPAIRED_FIELDS = ("prompt", "completion", "label")
# Skip reason of the unpaired format, besides hh's missing_field / not_a_string / empty_response.
NOT_A_BOOLEAN = "label_not_a_boolean"


@dataclasses.dataclass(frozen=True)
class UnpairedExample:
  """One KTO example; source / index: the record it came from (for split pairs, the pair's record)."""

  prompt: str
  completion: str
  desirable: bool
  source: str
  index: int


def is_unpaired(records: list[dict]) -> bool:
  """Whether a file's records are in the unpaired format (judged by its first record's fields)."""
  return bool(records) and "completion" in records[0] and "chosen" not in records[0]


def examples_from_records(records: list[dict], source: str) -> tuple[list[UnpairedExample], hh.SkipReport]:
  """The usable unpaired examples of one file and the report accounting for all its records."""
  examples, report = [], hh.SkipReport(total=len(records))
  for index, record in enumerate(records):
    reason = _unusable(record)
    if reason:
      report.note(reason, source, index)
      continue
    examples.append(UnpairedExample(record["prompt"], record["completion"], record["label"], source, index))
  report.used = len(examples)
  return examples, report


def _unusable(record: dict) -> str | None:
  for field in ("prompt", "completion"):
    value = record.get(field)
    if value is None:
      return hh.MISSING_FIELD
    if not isinstance(value, str):
      return hh.NOT_A_STRING
  if record.get("label") is None:
    return hh.MISSING_FIELD
  if not isinstance(record["label"], bool):
    return NOT_A_BOOLEAN
  if not record["completion"].strip():
    return hh.EMPTY_RESPONSE
  return None


def examples_from_pairs(pairs: list[hh.PreferencePair]) -> list[UnpairedExample]:
  """Each pair as two examples, in order: its chosen response desirable, its rejected one undesirable."""
  return [UnpairedExample(p.prompt, response, desirable, p.source, p.index)
          for p in pairs for response, desirable in ((p.chosen, True), (p.rejected, False))]


def load_examples(source: str, *, split: str = "train",
                  subsets: list[str] | None = None) -> tuple[list[UnpairedExample], hh.SkipReport]:
  """KTO examples from unpaired JSON lines or from preference pairs (see the module docstring), with the report of
  every record read. A source with no usable record is an error naming it."""
  examples, report = [], hh.SkipReport()
  for label, records in hh.load_records(source, split=split, subsets=subsets):
    if is_unpaired(records):
      found, found_report = examples_from_records(records, label)
      if not found:
        raise DataError(f"{label}: no usable unpaired example among its {len(records)} records "
                        f"({found_report.summary()}); expected JSON lines with {list(UNPAIRED_FIELDS)} (label a "
                        "boolean: true = desirable)")
    else:
      pairs, found_report = hh.pairs_from_records(records, label)
      found = examples_from_pairs(pairs)
    log.info("%s: %s -> %d KTO examples", label, found_report.summary(), len(found))
    examples.extend(found)
    report.merge(found_report)
  desirable = sum(e.desirable for e in examples)
  log.info("%s (%s): %s; %d KTO examples (%d desirable, %d undesirable)", source, split, report.summary(),
           len(examples), desirable, len(examples) - desirable)
  return examples, report


def mismatched(count: int, seed: int) -> np.ndarray:
  """For each of `count` examples, the index of the example whose completion it is paired with for the KL term:
  the next one along a seeded permutation (never itself when there are two or more)."""
  order = np.random.default_rng(seed).permutation(count)
  partner = np.empty(count, np.int64)
  partner[order] = np.roll(order, -1)
  return partner


def as_pairs(examples: list[UnpairedExample], seed: int) -> list[hh.PreferencePair]:
  """Each example as (prompt, its completion, a mismatched completion): what the pair layouts carry for KTO."""
  partner = mismatched(len(examples), seed)
  return [hh.PreferencePair(e.prompt, e.completion, examples[j].completion, e.source, e.index)
          for e, j in zip(examples, partner)]


def desirable_labels(examples: list[UnpairedExample]) -> np.ndarray:
  """The examples' labels, int32 [N] (1 = desirable), carried with the batches as the `desirable` extra."""
  return np.array([e.desirable for e in examples], np.int32)
