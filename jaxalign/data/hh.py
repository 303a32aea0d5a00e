"""Anthropic HH-RLHF and generic preference data: load records, split them into prompt / chosen / rejected, count skips.

Sources:
  * the Hub id "Anthropic/hh-rlhf" (read through `datasets`): one `data_dir` per subset; by default all four, whose
    train splits together are the paper's 160,800 pairs;
  * a local folder laid out like that repository: `<folder>/<subset>/<split>.jsonl.gz` (or `.jsonl`);
  * a local folder holding `<split>.jsonl[.gz]` (or `<split>.parquet`) directly, or a single such file.
Local JSON lines files are read here, line by line, every run (no cache keyed by path or modification time, so a
replaced file is always read anew; the tokenization cache downstream is keyed by the text itself). What is refused
and what is skipped, by format:
  * a JSON line that is not valid UTF-8, not valid JSON, or not a JSON object: that record is skipped and counted
    (`invalid_utf8`, `malformed_line`), and the first few are logged with file, line number and the parser's message;
    blank lines are not records;
  * a `.gz` file whose stream is truncated or corrupt: the whole file is refused (the records after the damage are
    lost, and a partial file would be trained on silently), naming the file and the last complete line;
  * a file with no record at all (empty, or only blank lines): refused.
Each record is in one of two formats, told apart by its fields (per record: a file may mix them):
  * HH: `{"chosen": text, "rejected": text}`, two whole conversations ("\\n\\nHuman: … \\n\\nAssistant: …")
    that share everything up to the final "\\n\\nAssistant:";
  * generic: `{"prompt": text, "chosen": response, "rejected": response}` (TRL's convention: responses only).

An HH pair's prompt is the chosen text through its last "\\n\\nAssistant:"; the responses are what follows in the chosen
and rejected texts. Where the rejected text does not share that prompt the prompt falls back to the longest common
prefix that ends at a turn boundary (a "\\n\\nAssistant:"). In harmless-base test that is 4 pairs; of the 5 whose
texts differ before their own last "\\n\\nAssistant:", the fifth (#1950) shares the chosen prompt and only its
rejected response runs on into more turns. Unusable records are skipped and counted by reason in a `SkipReport`; a
source with no usable record at all is an error, and a source where more than `warn_skipped_share` of the records are
skipped (a wrong file, a wrong format) is warned about loudly.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import logging
import os
import zlib
from pathlib import Path

import datasets

from jaxalign.errors import DataError, MissingInput

log = logging.getLogger(__name__)

HH_HUB_ID = "Anthropic/hh-rlhf"
# The subsets whose train splits make up the Hub dataset's default train split (160,800 pairs).
HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
ASSISTANT = "\n\nAssistant:"
_EXTENSIONS = (".jsonl.gz", ".jsonl", ".parquet")
_HH_FIELDS = ("chosen", "rejected")
_GENERIC_FIELDS = ("prompt", "chosen", "rejected")
# How many record locations per reason a SkipReport keeps, to point at examples without flooding the log.
_EXAMPLES_KEPT = 5

# Skip reasons.
MISSING_FIELD = "missing_field"  # the field is absent or null
NOT_A_STRING = "not_a_string"  # the field holds a number, list, object, …
NO_ASSISTANT_MARKER = "no_assistant_marker"  # HH chosen text without "\n\nAssistant:"
NO_SHARED_PROMPT = "no_shared_prompt"  # chosen and rejected share no prefix ending at an "\n\nAssistant:"
EMPTY_RESPONSE = "empty_response"  # a response that is empty or only whitespace
IDENTICAL = "identical"  # chosen and rejected are the same text: no preference to learn
INVALID_UTF8 = "invalid_utf8"  # a JSON line whose bytes are not UTF-8
MALFORMED_LINE = "malformed_line"  # a line that is not valid JSON, or JSON but not an object
# A source with more than this share of its records skipped gets a loud warning (configs: data.warn_skipped_share).
WARN_SKIPPED_SHARE = 0.5
# Not a skip: the pair was split with the turn-boundary fallback.
FALLBACK = "fallback_prompt"


@dataclasses.dataclass(frozen=True)
class PreferencePair:
  """One usable preference pair. `prompt + chosen` is the whole chosen conversation (likewise for rejected).

  prompt: the conversation through the final "\\n\\nAssistant:" (generic data: the record's prompt);
  chosen / rejected: the two responses (for HH they start with the space after "Assistant:");
  source: the file (or Hub subset/split) it came from; index: its 0-based record index there.
  """

  prompt: str
  chosen: str
  rejected: str
  source: str
  index: int


@dataclasses.dataclass
class SkipReport:
  """Counts what happened to every record read: `total == used + sum(skipped.values())`.

  skipped: count per skip reason (the module's constants); fallback: pairs split with the turn-boundary fallback
  (they are used); examples: the first few "source#index" locations per reason (and for FALLBACK); details: for a
  reason whose records say more (what was found, what was expected), the first record's "source#index: detail".
  """

  total: int = 0
  used: int = 0
  fallback: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  details: dict[str, str] = dataclasses.field(default_factory=dict)

  def note(self, reason: str, source: str, index: int, detail: str = "") -> None:
    """Records one skipped record (or, with FALLBACK, one used pair that needed the fallback)."""
    if detail and reason not in self.details:
      self.details[reason] = f"{source}#{index}: {detail}"
    if reason == FALLBACK:
      self.fallback += 1
    else:
      self.skipped[reason] += 1
    kept = self.examples.setdefault(reason, [])
    if len(kept) < _EXAMPLES_KEPT:
      kept.append(f"{source}#{index}")

  def merge(self, other: SkipReport) -> None:
    """Adds another source's counts to these."""
    self.total += other.total
    self.used += other.used
    self.fallback += other.fallback
    self.skipped.update(other.skipped)
    for reason, kept in other.examples.items():
      mine = self.examples.setdefault(reason, [])
      mine.extend(kept[: _EXAMPLES_KEPT - len(mine)])
    for reason, detail in other.details.items():
      self.details.setdefault(reason, detail)

  def summary(self) -> str:
    """One line: records read, used (with the fallback) and skipped by reason."""
    skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(self.skipped.items())) or "none"
    return (f"{self.total} records: {self.used} used ({self.fallback} with the turn-boundary prompt fallback), "
            f"{sum(self.skipped.values())} skipped ({skipped})")

  def explained(self) -> str:
    """The summary, then what the first record of each reason that says more was found to be."""
    return self.summary() + "".join(f"; {reason} at {detail}" for reason, detail in sorted(self.details.items()))


class UnusableRecord(Exception):
  """Raised by the split functions for a record that cannot be used; `args[0]` is the skip reason, `args[1]` (if
  given) what was found and what was expected."""

  @property
  def detail(self) -> str:
    return self.args[1] if len(self.args) > 1 else ""


def _check_strings(record: dict, fields: tuple[str, ...]) -> None:
  for field in fields:
    value = record.get(field)
    if value is None:
      raise UnusableRecord(MISSING_FIELD)
    if not isinstance(value, str):
      raise UnusableRecord(NOT_A_STRING)


def _check_responses(chosen: str, rejected: str) -> None:
  if not chosen.strip() or not rejected.strip():
    raise UnusableRecord(EMPTY_RESPONSE)


def shared_prompt(chosen: str, rejected: str) -> tuple[str, bool]:
  """The prompt of an HH pair and whether the fallback was needed.

  Normally the chosen text through its last "\\n\\nAssistant:". If the rejected text does not start with that, the
  longest common prefix of the two texts cut back to its last "\\n\\nAssistant:", so both responses answer the same
  conversation (they may then span several turns). Raises UnusableRecord when there is no such prompt.
  """
  end = chosen.rfind(ASSISTANT)
  if end < 0:
    raise UnusableRecord(NO_ASSISTANT_MARKER)
  prompt = chosen[: end + len(ASSISTANT)]
  if rejected.startswith(prompt):
    return prompt, False
  common = len(os.path.commonprefix([chosen, rejected]))
  end = chosen.rfind(ASSISTANT, 0, common)
  if end < 0:
    raise UnusableRecord(NO_SHARED_PROMPT)
  return chosen[: end + len(ASSISTANT)], True


def split_hh_record(record: dict) -> tuple[str, str, str, bool]:
  """(prompt, chosen response, rejected response, used the fallback) of an HH record; raises UnusableRecord."""
  _check_strings(record, _HH_FIELDS)
  chosen, rejected = record["chosen"], record["rejected"]
  if chosen == rejected:
    raise UnusableRecord(IDENTICAL)
  prompt, fallback = shared_prompt(chosen, rejected)
  chosen_response, rejected_response = chosen[len(prompt):], rejected[len(prompt):]
  _check_responses(chosen_response, rejected_response)
  return prompt, chosen_response, rejected_response, fallback


def split_generic_record(record: dict) -> tuple[str, str, str, bool]:
  """(prompt, chosen, rejected, False) of a generic {prompt, chosen, rejected} record; raises UnusableRecord."""
  _check_strings(record, _GENERIC_FIELDS)
  if record["chosen"] == record["rejected"]:
    raise UnusableRecord(IDENTICAL)
  _check_responses(record["chosen"], record["rejected"])
  return record["prompt"], record["chosen"], record["rejected"], False


def split_record(record: dict) -> tuple[str, str, str, bool]:
  """(prompt, chosen, rejected, used the fallback) of a record in either text format, decided per record by its
  fields (a file may mix HH and generic records): a "prompt" field makes it generic, otherwise it is HH."""
  return split_generic_record(record) if "prompt" in record else split_hh_record(record)


def check_columns(records: list, source: str) -> None:
  """Raises ValueError naming the source when no record has the fields of a preference pair."""
  columns = sorted({key for record in records if isinstance(record, dict) for key in record})
  if records and not any(isinstance(r, dict) and set(_HH_FIELDS) & set(r) for r in records):
    raise DataError(f"{source}: records have fields {columns}; expected {list(_HH_FIELDS)} (HH format) or "
                     f"{list(_GENERIC_FIELDS)} (generic preference format)")


@dataclasses.dataclass(frozen=True)
class BadLine:
  """A line of a JSON lines file that is not a record: `reason` (INVALID_UTF8 or MALFORMED_LINE), 1-based `line`."""

  reason: str
  line: int
  message: str


def pairs_from_records(records: list[dict | BadLine], source: str,
                       split=None) -> tuple[list[PreferencePair], SkipReport]:
  """Splits one source's records into pairs (with `split`, else `split_record`: the format of each record decided by
  its fields); raises ValueError naming the source when none is usable."""
  if split is None:
    check_columns(records, source)
    split = split_record
  pairs, report = [], SkipReport(total=len(records))
  for index, record in enumerate(records):
    try:
      if isinstance(record, BadLine):
        raise UnusableRecord(record.reason)
      prompt, chosen, rejected, fallback = split(record)
    except UnusableRecord as e:
      report.note(e.args[0], source, index, e.detail)
      continue
    if fallback:
      report.note(FALLBACK, source, index)
    pairs.append(PreferencePair(prompt, chosen, rejected, source, index))
  report.used = len(pairs)
  if not pairs:
    raise DataError(f"{source}: no usable preference pair among its {len(records)} records ({report.explained()}); "
                     "check that it is HH or {prompt, chosen, rejected} JSON lines")
  return pairs, report


def _split_file(folder: Path, split: str) -> Path | None:
  for ext in _EXTENSIONS:
    path = folder / f"{split}{ext}"
    if path.is_file():
      return path
  return None


def _expected(folder: Path, split: str) -> str:
  return " or ".join(str(folder / f"{split}{ext}") for ext in _EXTENSIONS)


def local_files(root: Path, split: str, subsets: list[str] | None) -> list[Path]:
  """The files a local source stands for (see the module docstring for the layouts)."""
  if root.is_file():
    return [root]
  if subsets is not None:
    missing = [_expected(root / s, split) for s in subsets if _split_file(root / s, split) is None]
    if missing:
      raise MissingInput(f"{root}: missing {'; '.join(missing)}")
    return [_split_file(root / s, split) for s in subsets]
  direct = _split_file(root, split)
  if direct is not None:
    return [direct]
  found = [s for s in HH_SUBSETS if _split_file(root / s, split) is not None]
  if not found:
    raise MissingInput(f"{root}: found neither {_expected(root, split)} nor any <subset>/{split}.jsonl[.gz] for "
                       f"the subsets {list(HH_SUBSETS)}")
  if len(found) < len(HH_SUBSETS):
    log.warning("%s: using the %s split of %s only; missing %s (the paper's data uses all four)", root, split, found,
                [s for s in HH_SUBSETS if s not in found])
  return [_split_file(root / s, split) for s in found]


def _parse_line(raw: bytes, number: int) -> dict | BadLine:
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    return BadLine(INVALID_UTF8, number, f"not UTF-8 ({e.reason} at byte {e.start})")
  try:
    record = json.loads(text)
  except json.JSONDecodeError as e:
    return BadLine(MALFORMED_LINE, number, f"not valid JSON ({e.msg} at column {e.colno})")
  if not isinstance(record, dict):
    return BadLine(MALFORMED_LINE, number, f"a JSON {type(record).__name__}, expected an object")
  return record


def _read_json_lines(path: Path) -> list[dict | BadLine]:
  """The records of a JSON lines file (gzip-compressed if it ends in .gz), bad lines as BadLine (see the module
  docstring for what is refused)."""
  records, number = [], 0
  try:
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
      for number, raw in enumerate(f, start=1):
        if raw.strip():
          records.append(_parse_line(raw, number))
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise DataError(f"{path}: the gzip stream is truncated or corrupt after line {number} ({type(e).__name__}: {e});"
                    " expected a complete .gz file: download or copy it again") from e
  if not records:
    raise DataError(f"{path}: no records (the file is empty); expected JSON lines, one {{chosen, rejected}} or "
                    "{prompt, chosen, rejected} object per line")
  bad = [r for r in records if isinstance(r, BadLine)]
  for r in bad[:_EXAMPLES_KEPT]:
    log.warning("%s:%d: skipped, %s", path, r.line, r.message)
  if len(bad) > _EXAMPLES_KEPT:
    log.warning("%s: %d more bad lines skipped", path, len(bad) - _EXAMPLES_KEPT)
  return records


def _read_parquet(path: Path) -> list[dict]:
  try:
    return datasets.load_dataset("parquet", data_files=str(path), split="train").to_list()
  except datasets.exceptions.DatasetGenerationError as e:
    raise DataError(f"{path}: not a readable Parquet file ({e.__cause__ or e})") from e


def _read_hub(hub_id: str, subset: str | None, split: str) -> list[dict]:
  try:
    return datasets.load_dataset(hub_id, data_dir=subset, split=split).to_list()
  except (OSError, ValueError) as e:  # not on the Hub, offline, gated, no such split: the user's to fix
    raise MissingInput(f"could not read the {split!r} split{f' of {subset!r}' if subset else ''} of the Hub dataset "
                       f"{hub_id!r}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}; check the id, the "
                       "split and network access, or give a local file or folder") from e


def load_records(source: str, *, split: str = "train",
                 subsets: list[str] | None = None) -> list[tuple[str, list[dict]]]:
  """The raw records of each file a source stands for, as (source label, records) in a fixed order.

  source: a local file or folder, else a Hub dataset id. For "Anthropic/hh-rlhf" `subsets` defaults to all four
  (HH_SUBSETS); for a local HH-layout folder to the subsets present (with a warning when some are missing).
  """
  root = Path(source).expanduser()
  if root.exists():
    return [(str(path), _read_parquet(path) if path.suffix == ".parquet" else _read_json_lines(path))
            for path in local_files(root, split, subsets)]
  if source.count("/") != 1:
    raise MissingInput(f"{source!r} is neither an existing file or folder nor a Hub dataset id (owner/name)")
  if subsets is None and source == HH_HUB_ID:
    subsets = list(HH_SUBSETS)
  return [(f"{source}:{subset or ''}/{split}", _read_hub(source, subset, split)) for subset in (subsets or [None])]


def load_preference_pairs(
    source: str = HH_HUB_ID, *, split: str = "train", subsets: list[str] | None = None,
    warn_skipped_share: float = WARN_SKIPPED_SHARE,
) -> tuple[list[PreferencePair], SkipReport]:
  """Loads and splits preference pairs from `source` (see `load_records`); logs and returns the skip summary.

  Returns the usable pairs in source order and a SkipReport accounting for every record read. Each file (or Hub
  subset) where more than `warn_skipped_share` of the records are skipped gets a loud warning.
  """
  pairs, report = [], SkipReport()
  for label, records in load_records(source, split=split, subsets=subsets):
    source_pairs, source_report = pairs_from_records(records, label)
    log.info("%s: %s", label, source_report.summary())
    warn_if_mostly_skipped(label, source_report, warn_skipped_share)
    pairs.extend(source_pairs)
    report.merge(source_report)
  log_report(report, source, split)
  return pairs, report


def warn_if_mostly_skipped(label: str, report: SkipReport, share: float) -> None:
  """A loud warning when more than `share` of one file's records were skipped (a wrong file, a wrong format)."""
  skipped = sum(report.skipped.values())
  if skipped > share * report.total:
    log.warning("!!! %s: %d of its %d records (%.0f%%, more than data.warn_skipped_share = %.0f%%) were SKIPPED, "
                "so the run trains on a small part of it: %s. Check the file and its format.", label, skipped,
                report.total, 100 * skipped / report.total, 100 * share, report.explained())


def log_report(report: SkipReport, source: str, split: str) -> None:
  """Logs a source's summary and the first few records per reason."""
  log.info("%s (%s): %s", source, split, report.summary())
  for reason, where in report.examples.items():
    log.info("  %s, e.g. %s", reason, ", ".join(where))
  for reason, detail in report.details.items():
    log.warning("%s (%s): records skipped as %s, e.g. %s", source, split, reason, detail)
