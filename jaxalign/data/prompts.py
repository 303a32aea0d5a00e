"""Evaluation prompt sets: the paper's selection from the HH test splits (or any size, subset and split drawn the
same way), or a JSON / JSONL file of prompts.

The paper's procedure (its eval notebook): harmful = the harmless-base TEST rows whose `chosen` text contains "kill",
"murder" or "rape" (192 rows, case-sensitive), `random.seed(100)`, `random.sample(rows, 50)`; helpful =
`random.sample(helpful-base TEST rows, 50)` drawn next from the same random stream; prompt = the conversation
without its final Assistant turn, in the paper's text form: "Human: …\\n\\nAssistant: …\\n\\nHuman: …"
(stripped, so no leading "\\n\\n" and no trailing "Assistant:").

The same procedure takes any count (ALL = -1: every candidate row, in file order, nothing drawn from the stream),
any subset and split for either set, and any keywords (none: every row is a candidate).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from jaxalign import jsonl
from jaxalign.data import hh
from jaxalign.errors import DataError

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
