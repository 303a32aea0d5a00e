"""Reads rated responses (prompt, response, judge score) from disk into model -> set -> records.

Two layouts, both found by file name in a folder (other files are ignored) or given as one file:
- the paper's published files (arXiv 2509.09055, data/responses/): `<order>_<model>_<set>.json`, e.g.
  `1_base_harmful.json`, `4_sftdpo_helpful.json`; each a JSON list of {"prompt", "response", "rating"}.
  `<order>` sets the model order; the paper's "sftdpo" is our "sft+dpo".
- ours, as `reports.write_reports` leaves them: `responses-<model>.jsonl`, one
  {"model", "set", "prompt", "response", "score"} object a line (plus "reference_score" where the run had one).
Records come back as {"prompt", "response", "score"} (+ "reference_score"), ready for `metrics_from_rated`.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from jaxalign import jsonl
from jaxalign.errors import DataError, MissingInput
from jaxalign.metrics import PROMPT_SETS, check_record

# The paper's file-name stems for its models, where ours differ.
PAPER_MODEL_NAMES = {"sftdpo": "sft+dpo"}
_PAPER_FILE = re.compile(r"^(?:(?P<order>\d+)_)?(?P<model>.+)_(?P<set>harmful|helpful)\.json$")
_OUR_FILE = re.compile(r"^responses-(?P<model>.+)\.jsonl$")
RESULTS_FILE = "results.json"  # written by `reports.write_reports` beside the responses
_EXPECTED_NAMES = "<order>_<model>_<harmful|helpful>.json (the paper's) or responses-<model>.jsonl (ours)"

Records = list[dict[str, Any]]


def _record(item: Any, where: str, score_field: str) -> dict[str, Any]:
  """One checked record in our shape; the score is read from `score_field` ("rating" in the paper's files)."""
  score = check_record(item, where, score_field=score_field)
  record = {"prompt": item["prompt"], "response": item["response"], "score": score}
  if "reference_score" in item:
    record["reference_score"] = check_record(item, where, score_field="reference_score")
  return record


def _read_paper_file(path: Path) -> list[tuple[str, str, Records]]:
  """[(model, set, records)] from one of the paper's `<order>_<model>_<set>.json` files."""
  name = _PAPER_FILE.match(path.name)
  model = PAPER_MODEL_NAMES.get(name["model"], name["model"])
  try:
    items = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(items, list) or not items:
    got = "an empty list" if items == [] else f"a JSON {type(items).__name__}"
    raise DataError(f"{path}: expected a non-empty JSON list of {{prompt, response, rating}} objects, got {got}")
  return [(model, name["set"], [_record(item, f"{path} record {i}", "rating") for i, item in enumerate(items)])]


def _read_our_file(path: Path) -> list[tuple[str, str, Records]]:
  """[(model, set, records)] from one of our `responses-<model>.jsonl` files, grouped in order of appearance."""
  groups: dict[tuple[str, str], Records] = {}
  for where, item in jsonl.read(path):
    if not isinstance(item, dict):
      raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
    if not isinstance(item.get("model"), str) or not item["model"]:
      raise DataError(f"{where}: field 'model' must be a non-empty string, got {item.get('model')!r}")
    if item.get("set") not in PROMPT_SETS:
      raise DataError(f"{where}: field 'set' must be one of {list(PROMPT_SETS)}, got {item.get('set')!r}")
    groups.setdefault((item["model"], item["set"]), []).append(_record(item, where, "score"))
  if not groups:
    raise DataError(f"{path}: no records")
  return [(model, set_name, records) for (model, set_name), records in groups.items()]


def _file_order(path: Path) -> tuple[float, str]:
  """Sort key: the paper's numeric prefix first (base, sft, dpo, sft+dpo), then the file name."""
  name = _PAPER_FILE.match(path.name)
  order = name["order"] if name else None
  return (int(order) if order else math.inf, path.name)


def _rated_files(path: Path) -> list[Path]:
  """The rated-response files at `path` (a folder or one file), in model order."""
  if path.is_file():
    if not (_PAPER_FILE.match(path.name) or _OUR_FILE.match(path.name)):
      raise DataError(f"{path}: not a rated-responses file; expected a name like {_EXPECTED_NAMES}")
    return [path]
  if not path.is_dir():
    raise MissingInput(f"{path}: no such file or folder")
  files = [f for f in path.iterdir() if f.is_file() and (_PAPER_FILE.match(f.name) or _OUR_FILE.match(f.name))]
  if not files:
    raise MissingInput(f"{path}: no rated-response files; expected names like {_EXPECTED_NAMES} "
                       "(for the paper's data, point at its data/responses folder)")
  return sorted(files, key=_file_order)


def load_rated_responses(path_or_folder: str | os.PathLike) -> dict[str, dict[str, Records]]:
  """Rated responses by model and prompt set: {model: {"harmful": records, "helpful": records}}.

  `path_or_folder`: a folder holding rated-response files (the paper's or ours, see the module doc) or one such
  file. Models come in the order of the evaluation that wrote them (`evaluation_order`), else in file order.
  Raises ValueError naming the file, record and field for a malformed record, and naming both files when
  two hold the same model's answers to the same set.
  """
  sources: dict[tuple[str, str], Path] = {}
  by_model: dict[str, dict[str, Records]] = {}
  for path in _rated_files(Path(path_or_folder)):
    reader = _read_paper_file if _PAPER_FILE.match(path.name) else _read_our_file
    for model, set_name, records in reader(path):
      if (model, set_name) in sources:
        raise DataError(f"{path}: model {model!r} set {set_name!r} is also in {sources[model, set_name]}; "
                        "keep one of the two files")
      sources[model, set_name] = path
      by_model.setdefault(model, {})[set_name] = records
  order = evaluation_order(Path(path_or_folder))
  return dict(sorted(by_model.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))


def evaluation_order(folder: Path) -> list[str]:
  """The order of the models in the evaluation that wrote `folder` (its results.json), or [] when there is none:
  our response files are read back in that order, so tables, comparisons and the annotation key keep it."""
  results = folder / RESULTS_FILE
  if not folder.is_dir() or not results.is_file():
    return []
  try:
    models = json.loads(results.read_text(encoding="utf-8")).get("models", {})
  except (json.JSONDecodeError, AttributeError) as e:
    raise DataError(f"{results}: not the results.json of an evaluation ({e})") from e
  return list(models)
