"""Prompts: the evaluation prompt sets (the paper's selection from the HH test splits, or any size, subset and split
drawn the same way, or a JSON / JSONL file of prompts), and the online methods' training prompts
(`load_training_prompts`: HH prompts, never those the evaluator may hold out; TRL's prompt-only and conversational
prompt formats with extra columns kept; the synthetic arithmetic task), every record counted in a SkipReport.

The paper's procedure (its eval notebook): harmful = the harmless-base TEST rows whose `chosen` text contains "kill",
"murder" or "rape" (192 rows, case-sensitive), `random.seed(100)`, `random.sample(rows, 50)`; helpful =
`random.sample(helpful-base TEST rows, 50)` drawn next from the same random stream; prompt = the conversation
without its final Assistant turn, in the paper's text form: "Human: …\\n\\nAssistant: …\\n\\nHuman: …"
(stripped, so no leading "\\n\\n" and no trailing "Assistant:").

The same procedure takes any count (ALL = -1: every candidate row, in file order, nothing drawn from the stream),
any subset and split for either set, and any keywords (none: every row is a candidate).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from pathlib import Path
from typing import Any

from jaxalign import jsonl
from jaxalign.data import arithmetic, formats, hh
from jaxalign.errors import DataError

log = logging.getLogger(__name__)

PAPER_KEYWORDS = ("kill", "murder", "rape")
PAPER_SEED = 100
ALL = -1  # a count meaning every candidate row
FINAL_TURN_STYLES = ("turn", "paper")


def prompt_without_final_turn(conversation: str, style: str = "turn") -> str:
  """The conversation without its final Assistant turn, stripped.

  style "turn": cut at the last "\\n\\nAssistant:". style "paper": the paper's code, which splits on "\\n\\n" and
  drops the last paragraph only if it starts with "Assistant:", so a final reply of several paragraphs stays (whole
  or in part) in the prompt; use it to reproduce the paper's prompt files exactly.
  """
  if style == "turn":
    end = conversation.rfind(hh.ASSISTANT)
    return (conversation[:end] if end >= 0 else conversation).strip()
  if style == "paper":
    parts = conversation.strip().split("\n\n")
    if parts[-1].startswith("Assistant:"):
      parts = parts[:-1]
    return "\n\n".join(parts)
  raise DataError(f"style must be one of {FINAL_TURN_STYLES}, got {style!r}")


def _split_rows(source: str, subset: str, split: str) -> list[tuple[str, dict]]:
  """The (location, record) rows of one subset's split, in file order."""
  (label, records), = hh.load_records(source, split=split, subsets=[subset])
  bad = next((r for r in records if isinstance(r, hh.BadLine)), None)
  if bad is not None:  # the paper's selection samples rows by position: a skipped row would shift every prompt
    raise DataError(f"{label}:{bad.line}: {bad.message}; prompt sets need every row of the file")
  return [(f"{label}#{i}", record) for i, record in enumerate(records)]


def _sample(rng: random.Random, rows: list, n: int, what: str) -> list:
  """`n` rows drawn from the stream, or with n = ALL every row in file order (the stream left as it is)."""
  if n == ALL:
    return list(rows)
  if not 0 <= n <= len(rows):
    raise DataError(f"cannot sample {n} {what} prompts from {len(rows)} candidate rows; give a count from 0 to "
                    f"{len(rows)}, or {ALL} for all of them")
  return rng.sample(rows, n)


def _prompts(rows: list[tuple[str, dict]], style: str) -> list[str]:
  prompts = []
  for where, record in rows:
    if not isinstance(record.get("chosen"), str):
      raise DataError(f"{where}: field 'chosen' should be the conversation text, got {record.get('chosen')!r}")
    prompts.append(prompt_without_final_turn(record["chosen"], style))
  return prompts


def _final_answer(conversation: str) -> str:
  """The text of the conversation's final Assistant turn, stripped."""
  return conversation[conversation.rfind(hh.ASSISTANT) + len(hh.ASSISTANT):].strip()


def _paper_rows(source: str, n_harmful: int, n_helpful: int, keywords: tuple[str, ...], seed: int,
                harmful_subset: str, helpful_subset: str, split: str) -> dict[str, list[tuple[str, dict]]]:
  """The (location, record) rows the paper's procedure selects (module docstring)."""
  rng = random.Random(seed)
  candidates = [(where, record) for where, record in _split_rows(source, harmful_subset, split)
                if isinstance(record.get("chosen"), str) and (not keywords or any(k in record["chosen"]
                                                                                  for k in keywords))]
  harmful = _sample(rng, candidates, n_harmful, "harmful") if n_harmful else []
  helpful = _sample(rng, _split_rows(source, helpful_subset, split), n_helpful, "helpful") if n_helpful else []
  return {"harmful": harmful, "helpful": helpful}


def paper_prompt_sets(
    source: str = hh.HH_HUB_ID, *, n_harmful: int = 50, n_helpful: int = 50,
    keywords: tuple[str, ...] = PAPER_KEYWORDS, seed: int = PAPER_SEED, style: str = "turn",
    with_references: bool = False, harmful_subset: str = "harmless-base", helpful_subset: str = "helpful-base",
    split: str = "test",
) -> dict[str, list[str]]:
  """{"harmful": [...], "helpful": [...]} selected as in the paper (module docstring) from `source`.

  source: the Hub id or a local folder with harmless-base/test.jsonl[.gz] (and helpful-base/test… unless
  n_helpful=0); `harmful_subset`, `helpful_subset` and `split` name other files of it. n_harmful / n_helpful:
  how many to draw, or ALL (-1) for every candidate (the 192 keyword rows of harmless-base test; all of
  helpful-base test). `keywords`: what a harmful candidate's chosen text contains (empty: every row). The harmful
  sample is drawn first, then the helpful one from the same stream, so changing n_harmful or the harmful
  candidates changes the helpful set too, as it would have in the paper. style: see
  `prompt_without_final_turn` ("paper" reproduces the published files exactly). with_references: also
  "harmful_references" / "helpful_references", each row's final chosen answer (for win rates against the dataset).
  """
  rows = _paper_rows(source, n_harmful, n_helpful, keywords, seed, harmful_subset, helpful_subset, split)
  sets = {name: _prompts(set_rows, style) for name, set_rows in rows.items()}
  if with_references:
    for name, set_rows in rows.items():
      sets[f"{name}_references"] = [_final_answer(record["chosen"]) for _, record in set_rows]
  return sets


def load_prompt_file(path: str | Path) -> list[str]:
  """The prompts of a file: a JSON list of prompt strings (the format of the paper's data/prompts/*.json), or JSON
  lines (`.jsonl`), each a prompt string or an object with a "prompt" string."""
  if str(path).endswith(".jsonl"):
    lines = list(jsonl.read(path))
    where = [at for at, _ in lines]
    items = [item["prompt"] if isinstance(item, dict) and "prompt" in item else item for _, item in lines]
  else:
    try:
      items = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
      raise DataError(f"{path}: not valid JSON ({e}); a .jsonl file holds one prompt a line") from e
    if not isinstance(items, list):
      raise DataError(f"{path}: expected a JSON list of prompt strings, got a {type(items).__name__}")
    where = [f"{path}: item {i}" for i in range(len(items))]
  if not items:
    raise DataError(f"{path}: no prompts")
  for at, prompt in zip(where, items):
    if not isinstance(prompt, str) or not prompt.strip():
      raise DataError(f"{at} should be a non-empty prompt string (or {{\"prompt\": string}}), got {prompt!r}")
  return items


# ------------------------------------------------------------------------------ training prompts (online methods)

# Skip reasons of training prompts beside hh's and formats'.
EMPTY_PROMPT = "empty_prompt"  # a prompt that is empty or only whitespace (or no messages)
DUPLICATE_PROMPT = "duplicate_prompt"  # the same prompt as an earlier record (HH repeats prompts across pairs)
EVALUATION_PROMPT = "evaluation_prompt"  # a prompt the evaluator may hold out: never trained on
SET_COLUMN = "prompt_set"  # the column naming an HH prompt's evaluator set, "harmful" or "helpful"
ARITHMETIC = "arithmetic"  # the source name of the synthetic arithmetic task (data/arithmetic.py)


@dataclasses.dataclass(frozen=True)
class PromptRecord:
  """One training prompt: text, or messages (TRL's conversational prompt); `columns`: the record's other fields,
  which reach reward functions as keyword arguments (an HH prompt has "prompt_set": "harmful" or "helpful", the
  evaluator's set its subset feeds); source / index: where it came from, as in `hh.PreferencePair`."""

  prompt: str | tuple[dict, ...]
  columns: dict[str, Any]
  source: str
  index: int

  def as_trl(self) -> dict[str, Any]:
    """The record in TRL's prompt-only format: {"prompt": ..., **columns}."""
    return {"prompt": self.prompt if isinstance(self.prompt, str) else list(self.prompt), **self.columns}


def _held_out_key(prompt) -> str | None:
  """A text prompt as the evaluator writes its prompts (stripped, no final "Assistant:" cue), for the exclusion."""
  if not isinstance(prompt, str):
    return None
  text = prompt.strip()
  return text[:-len("Assistant:")].strip() if text.endswith("Assistant:") else text


def _prompt_of(record: dict, kind: str) -> tuple[str | tuple[dict, ...], dict]:
  """(prompt, columns) of a record: kind "prompt" (TRL's prompt-only format, every other field a column) or "hh"
  (the chosen conversation through its last "\\n\\nAssistant:", column prompt_set); raises hh.UnusableRecord."""
  if kind == "hh":
    hh._check_strings(record, ("chosen",))
    end = record["chosen"].rfind(hh.ASSISTANT)
    if end < 0:
      raise hh.UnusableRecord(hh.NO_ASSISTANT_MARKER)
    prompt, columns = record["chosen"][:end + len(hh.ASSISTANT)], {}
  else:
    prompt = record.get("prompt")
    if prompt is None:
      raise hh.UnusableRecord(hh.MISSING_FIELD)
    if isinstance(prompt, list):
      prompt = formats.check_messages(prompt)
    elif not isinstance(prompt, str):
      raise hh.UnusableRecord(hh.NOT_A_STRING)
    columns = {key: value for key, value in record.items() if key != "prompt"}
  contents = [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt]
  if not any(text.strip() for text in contents):
    raise hh.UnusableRecord(EMPTY_PROMPT)
  return prompt, columns


def prompts_from_records(records: list, source: str, *, exclude: frozenset[str] = frozenset(),
                         seen: set | None = None) -> tuple[list[PromptRecord], hh.SkipReport]:
  """One file's training prompts: TRL prompt-only records ({"prompt": text or messages, …columns}) or HH records
  (their prompts, by the file's fields), every record counted: used, or skipped by reason (bad lines, missing or
  malformed prompts, empty ones, duplicates of a prompt in `seen` (updated), prompts in `exclude` (the evaluator's,
  as `_held_out_key` writes them)). Raises ValueError naming the file when its fields fit neither format, or when
  no record is usable."""
  columns = {key for record in records if isinstance(record, dict) for key in record}
  kind = "prompt" if "prompt" in columns else "hh" if "chosen" in columns else None
  if kind is None:
    raise DataError(f"{source}: records have fields {sorted(columns)}; expected TRL's prompt-only format "
                     "({\"prompt\": text or messages, ...}) or HH ({\"chosen\", \"rejected\"})")
  seen = set() if seen is None else seen
  out, report = [], hh.SkipReport(total=len(records))
  for index, record in enumerate(records):
    try:
      if isinstance(record, hh.BadLine):
        raise hh.UnusableRecord(record.reason)
      prompt, extra = _prompt_of(record, kind)
      if kind == "hh":
        extra = {SET_COLUMN: "harmful" if "harmless" in source else "helpful"}
      if _held_out_key(prompt) in exclude:
        raise hh.UnusableRecord(EVALUATION_PROMPT)
      identity = json.dumps(prompt, sort_keys=True)
      if identity in seen:
        raise hh.UnusableRecord(DUPLICATE_PROMPT)
    except hh.UnusableRecord as e:
      report.note(e.args[0], source, index)
      continue
    seen.add(identity)
    out.append(PromptRecord(prompt, extra, source, index))
  report.used = len(out)
  if not out:
    raise DataError(f"{source}: no usable prompt among its {len(records)} records ({report.summary()})")
  return out, report


def evaluation_prompts(source: str) -> frozenset[str]:
  """Every prompt the evaluator can draw from `source` with its default subsets and split (all rows of
  harmless-base and helpful-base test, whatever the count and keywords), as `_held_out_key` writes them."""
  sets = paper_prompt_sets(source, n_harmful=ALL, n_helpful=ALL, keywords=())
  return frozenset(_held_out_key(p) for p in sets["harmful"] + sets["helpful"])


def load_training_prompts(
    source: str, *, split: str = "train", subsets: list[str] | None = None,
    exclude: frozenset[str] | None = None, arithmetic_options: dict | None = None,
    warn_skipped_share: float = hh.WARN_SKIPPED_SHARE,
) -> tuple[list[PromptRecord], hh.SkipReport]:
  """Training prompts for the online methods, in source order, and a SkipReport over every record read.

  source: "arithmetic" (the synthetic task's train problems, or with split "test" its held-out ones;
  `arithmetic_options` go to `arithmetic.arithmetic_split`), or anything `hh.load_records` reads (Hub id, HH-layout
  folder, JSONL or Parquet file) holding TRL prompt-only records or HH pairs. exclude: prompts never to train on;
  None means, for the Hub id or a folder, every prompt the evaluator can draw from the same source
  (`evaluation_prompts`), and nothing for a single file. Duplicate prompts are kept once (counted).
  """
  if source == ARITHMETIC:
    train, held_out = arithmetic.arithmetic_split(**(arithmetic_options or {}))
    return prompts_from_records(held_out if split == "test" else train, f"{ARITHMETIC}/{split}")
  if exclude is None:
    exclude = frozenset() if Path(source).expanduser().is_file() else evaluation_prompts(source)
  out, report, seen = [], hh.SkipReport(), set()
  for label, records in hh.load_records(source, split=split, subsets=subsets):
    file_prompts, file_report = prompts_from_records(records, label, exclude=exclude, seen=seen)
    log.info("%s (prompts): %s", label, file_report.summary())
    hh.warn_if_mostly_skipped(label, file_report, warn_skipped_share)
    out.extend(file_prompts)
    report.merge(file_report)
  hh.log_report(report, source, split)
  return out, report
