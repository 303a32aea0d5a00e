"""Human evaluation: a self-contained page for blind pairwise comparisons, and the reader of its answers.

`write_annotation_files(records_by_model, out_dir)` writes
  annotate.html       one file, no server, works offline: one item per screen, the prompt above two models' answers
                      to it (in random left/right order, no model names), buttons and keys for
                      A / B / tie / both bad (A or 1, B or 2, T or 3, X or 4; arrows move between items), progress,
                      answers kept in the browser's localStorage (a closed or reloaded page resumes), and a button
                      that downloads the answers as JSON;
  annotate-key.json   which model is on which side of each item (kept out of the page, so it stays blind).
`read_annotations(files, key)` reads annotators' downloaded files back against the key, and `human_report` turns
them into win rates with CIs per model pair (and prompt set) and inter-annotator agreement (Cohen's κ).
"""

from __future__ import annotations

import hashlib
import html
import itertools
import json
import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxalign import stats
from jaxalign.errors import DataError, MissingInput

log = logging.getLogger(__name__)

PAGE_FILE = "annotate.html"
KEY_FILE = "annotate-key.json"
ANSWERS_FORMAT = "jaxalign-annotations/1"
KEY_FORMAT = "jaxalign-annotation-key/1"
CHOICES = ("A", "B", "tie", "both_bad")  # A: the left answer is better; B: the right one
# A choice in terms of the pair's models (a, b) rather than sides: who won, or tie / both bad.
OUTCOMES = {"a": 1, "b": -1, "tie": 0, "both_bad": 0}


def build_items(records_by_model: Mapping[str, Mapping[str, Sequence[Mapping]]],
                pairs: Sequence[tuple[str, str]] | None = None, *,
                seed: int = 0) -> tuple[list[dict[str, str]], dict[str, Any]]:
  """(page items [{"id", "prompt", "left", "right"}], key) for every model pair's answers to every prompt.

  `pairs`: (a, b) model pairs; None = every pair, the later model of the order as a (as in the paired
  comparisons). Items are shuffled and each one's sides drawn at random (seeded: the same input gives the same page
  and key). The key: {"format", "page_id", "pairs": [[a, b]], "items": [{"id", "pair", "set", "prompt_index",
  "left", "right"}]}; `page_id` fingerprints the page's contents, so answers can be matched to their key.
  """
  names = list(records_by_model)
  if pairs is None:
    pairs = [(names[j], names[i]) for i, j in itertools.combinations(range(len(names)), 2)]
  for a, b in pairs:
    missing = [m for m in (a, b) if m not in records_by_model]
    if missing or a == b:
      raise DataError(f"annotation pair {a}={b}: name two different models among {names}")
  rng = random.Random(seed)
  drafts = []
  for p, (a, b) in enumerate(pairs):
    for set_name in records_by_model[a]:
      a_records, b_records = records_by_model[a][set_name], records_by_model[b][set_name]
      if [r["prompt"] for r in a_records] != [r["prompt"] for r in b_records]:
        raise DataError(f"models {a!r} and {b!r} answered different {set_name} prompts; a pairwise comparison "
                        "needs both models' answers to the same prompts")
      for i, (ra, rb) in enumerate(zip(a_records, b_records)):
        drafts.append({"pair": p, "set": set_name, "prompt_index": i, "prompt": ra["prompt"],
                       "answers": {a: ra["response"], b: rb["response"]}})
  if not drafts:
    raise DataError("nothing to annotate: give at least two models with answers")
  rng.shuffle(drafts)
  items, key_items = [], []
  for n, draft in enumerate(drafts, start=1):
    a, b = pairs[draft["pair"]]
    left, right = (a, b) if rng.random() < 0.5 else (b, a)
    item_id = f"item-{n:04d}"
    items.append({"id": item_id, "prompt": draft["prompt"], "left": draft["answers"][left],
                  "right": draft["answers"][right]})
    key_items.append({"id": item_id, "pair": draft["pair"], "set": draft["set"],
                      "prompt_index": draft["prompt_index"], "left": left, "right": right})
  page_id = hashlib.sha256(json.dumps([items, key_items], sort_keys=True).encode()).hexdigest()[:16]
  return items, {"format": KEY_FORMAT, "page_id": page_id, "pairs": [list(p) for p in pairs], "items": key_items}


def render_page(items: Sequence[Mapping[str, str]], page_id: str, title: str = "Which answer is better?") -> str:
  """The annotation page: HTML with its CSS, script and items inline (texts are inserted as text, never as HTML)."""
  # "<" only occurs inside JSON strings, where \u003c means the same; so no text can close the <script> element.
  data = json.dumps({"page_id": page_id, "items": list(items)}, ensure_ascii=False).replace("<", "\\u003c")
  return (_PAGE.replace("{{TITLE}}", html.escape(title)).replace("{{DATA}}", data)
          .replace("{{ANSWERS_FORMAT}}", ANSWERS_FORMAT))


def write_annotation_files(records_by_model: Mapping[str, Mapping[str, Sequence[Mapping]]], out_dir: str | Path, *,
                           pairs: Sequence[tuple[str, str]] | None = None, seed: int = 0,
                           keep_existing: bool = False) -> dict[str, Path]:
  """Writes annotate.html and annotate-key.json into `out_dir` (see `build_items`); returns their paths. With a
  single model there is nothing to compare: nothing is written and {} returned. `keep_existing`: a page or key already
  there stays as it is (annotators may hold that page; their answers need its key) and nothing is written."""
  out = Path(out_dir)
  paths = {"page": out / PAGE_FILE, "key": out / KEY_FILE}
  if keep_existing and any(path.exists() for path in paths.values()):
    log.info("kept %s and %s as they are in %s (the page annotators may hold); delete them to write a new page",
             PAGE_FILE, KEY_FILE, out)
    return {name: path for name, path in paths.items() if path.exists()}
  if len(records_by_model) < 2:
    return {}
  items, key = build_items(records_by_model, pairs, seed=seed)
  paths["page"].write_text(render_page(items, key["page_id"]), encoding="utf-8")
  paths["key"].write_text(json.dumps(key, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
  return paths


def key_path(rated_responses: str, workdir: str) -> Path:
  """Where the key of the answers being read back is: beside the responses the page was made from (the folder
  `rated_responses`, or the folder of that file), else in `workdir`."""
  if rated_responses:
    folder = Path(rated_responses) if Path(rated_responses).is_dir() else Path(rated_responses).parent
    if (folder / KEY_FILE).is_file():
      return folder / KEY_FILE
  return Path(workdir) / KEY_FILE


def _load_json(path: Path, what: str) -> Any:
  if not path.is_file():
    raise MissingInput(f"{path}: no such {what} file")
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: not valid JSON ({e})") from e


def read_annotations(files: Sequence[str | Path], key_path: str | Path) -> dict[str, Any]:
  """Annotators' downloaded files, checked against the page's key.

  Returns {"key": the key, "annotators": {name: {item id: choice}}}; an annotator is named by the file's
  "annotator" field, or the file name when that is empty. Raises naming the file (and answer) for a file of another
  page, an unknown item, a choice outside CHOICES, or two files of the same annotator.
  """
  key_path = Path(key_path)
  key = _load_json(key_path, "annotation key")
  if not isinstance(key, dict) or key.get("format") != KEY_FORMAT:
    raise DataError(f"{key_path}: not an annotation key (expected format {KEY_FORMAT!r})")
  known = {item["id"] for item in key["items"]}
  annotators: dict[str, dict[str, str]] = {}
  for file in map(Path, files):
    data = _load_json(file, "annotations")
    if not isinstance(data, dict) or data.get("format") != ANSWERS_FORMAT:
      raise DataError(f"{file}: not a file downloaded from annotate.html (expected format {ANSWERS_FORMAT!r})")
    if data.get("page_id") != key["page_id"]:
      raise DataError(f"{file}: answers page {data.get('page_id')!r}, but the key {key_path} is for page "
                      f"{key['page_id']!r}; give the annotate-key.json written with that page")
    name = str(data.get("annotator") or "").strip() or file.stem
    if name in annotators:
      raise DataError(f"{file}: annotator {name!r} has another file too; give each annotator's answers once")
    answers = {}
    for i, answer in enumerate(data.get("answers", [])):
      where = f"{file} answer {i}"
      if not isinstance(answer, dict) or answer.get("id") not in known:
        raise DataError(f"{where}: expected {{id, choice}} with an id of the page, got {answer!r}")
      if answer.get("choice") not in CHOICES:
        raise DataError(f"{where}: choice must be one of {list(CHOICES)}, got {answer.get('choice')!r}")
      answers[answer["id"]] = answer["choice"]
    annotators[name] = answers
  if not annotators:
    raise DataError("no annotation files given")
  return {"key": key, "annotators": annotators}


def model_choice(choice: str, item: Mapping[str, Any], pair: Sequence[str]) -> str:
  """A side's choice ("A" = left, "B" = right) as the pair's: "a" or "b" (who won), "tie" or "both_bad"."""
  if choice in ("tie", "both_bad"):
    return choice
  winner = item["left"] if choice == "A" else item["right"]
  return "a" if winner == pair[0] else "b"


def human_report(annotations: Mapping[str, Any], *, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
  """Win rates and agreement from `read_annotations`' result.

  "win_rates": per model pair (a, b) and prompt set ("all" too): `stats.win_rate_ci` of a over b over the items
  someone answered, each item's outcome the mean of its annotators' (+1 a better, -1 b better, 0 tie or both bad),
  plus "both_bad" (judgements calling both answers bad) and "judgements". "agreement": per annotator pair, on the
  items both answered, Cohen's κ of their choices (a / b / tie / both bad) and the % of identical choices.
  "annotators": answered and total items per annotator.
  """
  key, annotators = annotations["key"], annotations["annotators"]
  items = {item["id"]: item for item in key["items"]}
  pairs = key["pairs"]
  choices = {name: {i: model_choice(c, items[i], pairs[items[i]["pair"]]) for i, c in answers.items()}
             for name, answers in annotators.items()}
  win_rates = []
  for p, (a, b) in enumerate(pairs):
    pair_items = [i for i, item in items.items() if item["pair"] == p]
    for set_name in ["all", *sorted({items[i]["set"] for i in pair_items})]:
      chosen = [i for i in pair_items if set_name in ("all", items[i]["set"])]
      votes = {i: [OUTCOMES[c[i]] for c in choices.values() if i in c] for i in chosen}
      answered = [i for i in chosen if votes[i]]
      row = {"a": a, "b": b, "set": set_name, "items": len(chosen), "answered": len(answered),
             "judgements": sum(len(votes[i]) for i in answered),
             "both_bad": sum(c.get(i) == "both_bad" for c in choices.values() for i in answered)}
      if answered:
        row.update(stats.win_rate_ci([float(np.mean(votes[i])) for i in answered], n_bootstrap=n_bootstrap,
                                     seed=seed))
      win_rates.append(row)
  agreement = []
  for x, y in itertools.combinations(choices, 2):
    common = sorted(set(choices[x]) & set(choices[y]))
    row = {"a": x, "b": y, "items": len(common)}
    if common:
      labels_x, labels_y = [choices[x][i] for i in common], [choices[y][i] for i in common]
      row.update(kappa=stats.cohen_kappa(labels_x, labels_y),
                 agreement=100.0 * float(np.mean([u == v for u, v in zip(labels_x, labels_y)])))
    agreement.append(row)
  return {"page_id": key["page_id"], "win_rates": win_rates, "agreement": agreement,
          "annotators": {name: {"answered": len(c), "items": len(items)} for name, c in choices.items()}}


_PAGE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{TITLE}}</title>
<style>
  body {
    font: 16px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif;
    margin: 0;
    background: #f4f5f7;
    color: #1d1f23;
  }
  header {
    display: flex;
    align-items: center;
    gap: 1.2em;
    padding: .7em 1.5em;
    background: #fff;
    border-bottom: 1px solid #d9dce1;
    flex-wrap: wrap;
  }
  header h1 { font-size: 1.1em; margin: 0; }
  #progress { flex: 1; min-width: 12em; }
  #bar { height: 6px; background: #e3e6ea; border-radius: 3px; overflow: hidden; margin-top: .25em; }
  #bar div { height: 100%; background: #2f7d4f; width: 0; }
  main { max-width: 1200px; margin: 0 auto; padding: 1em 1.5em 2em; }
  .label {
    font-size: .8em;
    font-weight: 600;
    text-transform: uppercase;
    letter-spacing: .05em;
    color: #5b616b;
    margin-bottom: .3em;
  }
  .text {
    white-space: pre-wrap;
    word-wrap: break-word;
    background: #fff;
    border: 1px solid #d9dce1;
    border-radius: 6px;
    padding: .8em 1em;
  }
  .text:empty::before { content: "(empty answer)"; color: #8a9099; font-style: italic; }
  #prompt { max-height: 40vh; overflow: auto; }
  .answers { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; margin-top: 1em; }
  @media (max-width: 800px) { .answers { grid-template-columns: 1fr; } }
  .choices { display: flex; gap: .6em; justify-content: center; margin-top: 1.2em; flex-wrap: wrap; }
  button {
    font: inherit;
    padding: .55em 1.1em;
    border: 1px solid #aeb4bd;
    border-radius: 6px;
    background: #fff;
    cursor: pointer;
  }
  input { font: inherit; padding: .3em .5em; border: 1px solid #aeb4bd; border-radius: 4px; }
  button:hover { background: #eef1f4; }
  button.choice.selected { background: #2f7d4f; color: #fff; border-color: #2f7d4f; }
  kbd {
    font: .8em ui-monospace, monospace;
    border: 1px solid #c4c9d0;
    border-bottom-width: 2px;
    border-radius: 3px;
    padding: 0 .3em;
    margin-left: .3em;
    background: #f7f8fa;
    color: #1d1f23;
  }
  nav { display: flex; justify-content: space-between; margin-top: 1em; }
  #done {
    display: none;
    text-align: center;
    margin-top: 1em;
    padding: .8em;
    background: #e4f3ea;
    border: 1px solid #9fd0b2;
    border-radius: 6px;
  }
  #help { color: #5b616b; font-size: .85em; text-align: center; margin-top: 1.4em; }
</style>
</head>
<body>
<header>
  <h1>{{TITLE}}</h1>
  <div id="progress"><span id="progress-text"></span><div id="bar"><div></div></div></div>
  <label>Your name <input id="annotator" autocomplete="off" placeholder="annotator"></label>
  <button id="download">Download answers (JSON)</button>
</header>
<main>
  <div class="label">Conversation so far</div>
  <div id="prompt" class="text"></div>
  <div class="answers">
    <div><div class="label">Answer A</div><div id="left" class="text"></div></div>
    <div><div class="label">Answer B</div><div id="right" class="text"></div></div>
  </div>
  <div class="choices">
    <button class="choice" data-choice="A">A is better<kbd>A</kbd><kbd>1</kbd></button>
    <button class="choice" data-choice="B">B is better<kbd>B</kbd><kbd>2</kbd></button>
    <button class="choice" data-choice="tie">Tie (both good)<kbd>T</kbd><kbd>3</kbd></button>
    <button class="choice" data-choice="both_bad">Both bad<kbd>X</kbd><kbd>4</kbd></button>
  </div>
  <nav>
    <button id="prev">&larr; Previous<kbd>&larr;</kbd></button>
    <button id="next">Next<kbd>&rarr;</kbd></button>
  </nav>
  <div id="done">Every item is answered. Thank you! Press <b>Download answers (JSON)</b> and send the file back.</div>
  <p id="help">Which answer is more helpful while staying harmless? Your answers are saved in this browser as you
  go; you can close the page and come back. You can change an answer: go back to it and choose again.</p>
</main>
<script type="application/json" id="data">{{DATA}}</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const STORE = "jaxalign-annotate-" + DATA.page_id;
const KEYS = {a: "A", "1": "A", b: "B", "2": "B", t: "tie", "3": "tie", x: "both_bad", "4": "both_bad"};
let state = {answers: {}, position: 0, annotator: ""};
try { Object.assign(state, JSON.parse(localStorage.getItem(STORE)) || {}); } catch (e) { /* a fresh start */ }

function save() { localStorage.setItem(STORE, JSON.stringify(state)); }
function answeredCount() { return DATA.items.filter(item => item.id in state.answers).length; }

function show() {
  const item = DATA.items[state.position];
  document.getElementById("prompt").textContent = item.prompt;
  document.getElementById("left").textContent = item.left;
  document.getElementById("right").textContent = item.right;
  const choice = (state.answers[item.id] || {}).choice;
  for (const button of document.querySelectorAll("button.choice")) {
    button.classList.toggle("selected", button.dataset.choice === choice);
  }
  const answered = answeredCount(), total = DATA.items.length;
  document.getElementById("progress-text").textContent =
      `Item ${state.position + 1} of ${total} \u00b7 ${answered} answered`;
  document.querySelector("#bar div").style.width = (100 * answered / total) + "%";
  document.getElementById("done").style.display = answered === total ? "block" : "none";
  document.getElementById("prev").disabled = state.position === 0;
  document.getElementById("next").disabled = state.position === total - 1;
}

function move(step) {
  state.position = Math.min(DATA.items.length - 1, Math.max(0, state.position + step));
  save(); show();
}

function answer(choice) {
  const item = DATA.items[state.position];
  state.answers[item.id] = {choice: choice, answered_at: new Date().toISOString()};
  // On to the next unanswered item (after this one, else from the start); stay if none is left.
  const order = DATA.items.map((_, i) => (state.position + 1 + i) % DATA.items.length);
  const next = order.find(i => !(DATA.items[i].id in state.answers));
  if (next !== undefined) state.position = next;
  save(); show();
}

function download() {
  const answers = DATA.items.filter(item => item.id in state.answers)
      .map(item => Object.assign({id: item.id}, state.answers[item.id]));
  const out = {format: "{{ANSWERS_FORMAT}}", page_id: DATA.page_id, annotator: state.annotator,
               items: DATA.items.length, answers: answers};
  const url = URL.createObjectURL(new Blob([JSON.stringify(out, null, 1)], {type: "application/json"}));
  const link = document.createElement("a");
  const who = (state.annotator || "anonymous").replace(/[^A-Za-z0-9_-]+/g, "_");
  link.href = url; link.download = `annotations-${who}-${DATA.page_id.slice(0, 8)}.json`;
  document.body.appendChild(link); link.click(); link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

for (const button of document.querySelectorAll("button.choice")) {
  button.addEventListener("click", () => answer(button.dataset.choice));
}
document.getElementById("prev").addEventListener("click", () => move(-1));
document.getElementById("next").addEventListener("click", () => move(1));
document.getElementById("download").addEventListener("click", download);
const nameInput = document.getElementById("annotator");
nameInput.value = state.annotator;
nameInput.addEventListener("input", () => { state.annotator = nameInput.value; save(); });
document.addEventListener("keydown", event => {
  if (event.target === nameInput || event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.key === "ArrowLeft") { move(-1); event.preventDefault(); return; }
  if (event.key === "ArrowRight") { move(1); event.preventDefault(); return; }
  const choice = KEYS[event.key.toLowerCase()];
  if (choice) { answer(choice); event.preventDefault(); }
});
state.position = Math.min(state.position, DATA.items.length - 1);
show();
</script>
</body>
</html>
"""
