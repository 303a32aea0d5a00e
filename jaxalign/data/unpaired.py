"""KTO's unpaired examples: a prompt, a completion, and whether that completion is desirable.

Two kinds of record load, told apart per record by their fields (one file may hold both):
  * unpaired JSON lines `{"prompt": text, "completion": text, "label": true | false}` (TRL's unpaired preference
    format), read from the same places as pairs (a file, a folder with `<split>.jsonl[.gz]`, an HH-layout folder);
  * preference pairs (HH or `{prompt, chosen, rejected}`, loaded by `hh.py`), each split into two examples: the
    chosen response desirable, the rejected one undesirable.
Every record is accounted for in a `hh.SkipReport` (total == used + skipped by reason; a used pair gives two
examples; a line that is not JSON is a counted `malformed_line`), and a file with more than `data.warn_skipped_share`
of its records skipped gets the same loud warning as any other format. A source whose examples are all desirable or
all undesirable is refused (`check_classes`): KTO weighs the two classes against each other, and with one empty
it is not KTO.

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


def is_unpaired(record) -> bool:
  """Whether a record is in the unpaired format (a "completion" and no "chosen"); decided per record, so a file may
  mix unpaired records and preference pairs."""
  return isinstance(record, dict) and "completion" in record and "chosen" not in record


def _record_examples(record, source: str, index: int) -> tuple[list[UnpairedExample], bool]:
  """(the examples of one record, whether its pair needed the turn-boundary fallback); raises hh.UnusableRecord."""
  if isinstance(record, hh.BadLine):
    raise hh.UnusableRecord(record.reason)
  if is_unpaired(record):
    reason = _unusable(record)
    if reason:
      raise hh.UnusableRecord(reason)
    return [UnpairedExample(record["prompt"], record["completion"], record["label"], source, index)], False
  prompt, chosen, rejected, fallback = hh.split_record(record)
  return [UnpairedExample(prompt, chosen, True, source, index), UnpairedExample(prompt, rejected, False, source, index)],\
      fallback


def examples_from_records(records: list, source: str) -> tuple[list[UnpairedExample], hh.SkipReport]:
  """The usable examples of one file (unpaired records and split pairs) and the report accounting for all its
  records (used = records that gave examples)."""
  examples, report = [], hh.SkipReport(total=len(records))
  for index, record in enumerate(records):
    try:
      found, fallback = _record_examples(record, source, index)
    except hh.UnusableRecord as e:
      report.note(e.args[0], source, index, e.detail)
      continue
    if fallback:
      report.note(hh.FALLBACK, source, index)
    examples.extend(found)
    report.used += 1
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


def check_classes(examples: list[UnpairedExample], source: str, split: str) -> None:
  """Refuses examples that are all desirable or all undesirable: one of KTO's two terms would be empty, so the run
  would not be KTO (and its per-class metrics undefined)."""
  desirable = sum(e.desirable for e in examples)
  if desirable == 0 or desirable == len(examples):
    missing, label = ("desirable", "true") if desirable == 0 else ("undesirable", "false")
    raise DataError(f"{source} ({split}): all {len(examples)} usable KTO examples are "
                     f"{'undesirable' if desirable == 0 else 'desirable'}, none is {missing}: KTO needs both classes. "
                     f"Add examples with label {label}, or use preference pairs (each gives one of each)")


def load_examples(source: str, *, split: str = "train", subsets: list[str] | None = None,
                  warn_skipped_share: float = hh.WARN_SKIPPED_SHARE) -> tuple[list[UnpairedExample], hh.SkipReport]:
  """KTO examples from unpaired JSON lines and / or preference pairs (see the module docstring), with the report of
  every record read, logged as for pairs (a file with more than `warn_skipped_share` of its records skipped gets a
  loud warning). A file with no usable record, or a source without desirable or without undesirable examples
  (`check_classes`), is an error naming it."""
  examples, report = [], hh.SkipReport()
  for label, records in hh.load_records(source, split=split, subsets=subsets):
    if not any(is_unpaired(r) for r in records):
      hh.check_columns(records, label)
    found, found_report = examples_from_records(records, label)
    if not found:
      raise DataError(f"{label}: no usable unpaired example among its {len(records)} records "
                       f"({found_report.explained()}); expected JSON lines with {list(UNPAIRED_FIELDS)} (label a "
                       "boolean: true = desirable), or preference pairs")
    log.info("%s: %s -> %d KTO examples", label, found_report.summary(), len(found))
    hh.warn_if_mostly_skipped(label, found_report, warn_skipped_share)
    examples.extend(found)
    report.merge(found_report)
  desirable = sum(e.desirable for e in examples)
  hh.log_report(report, source, split)
  log.info("%s (%s): %d KTO examples (%d desirable, %d undesirable)", source, split, len(examples), desirable,
           len(examples) - desirable)
  check_classes(examples, source, split)
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
