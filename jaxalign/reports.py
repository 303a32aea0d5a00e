"""Report writers for the result of `metrics.metrics_from_rated`: JSON, Markdown, JSONL responses, PNG plots, text.

`write_reports(results, out_dir)` writes everything:
  results.json              config + per-model metrics and gains (no responses), paired comparisons, the paper's
                            claims, and any other section of `results` (preference accuracy, judges, annotations)
  results.md                Table 1 (HmR / HpR / CAS with CIs, mean scores, empty responses), Table 2 (gains),
                            paired comparisons, the claims table, held-out preference accuracy
  responses-<model>.jsonl   one {"model", "set", "prompt", "response", "score"} a line; `rated.load_rated_responses`
                            reads these back
  metrics.png               HmR / HpR / CAS bars per model with CI whiskers
  scores.png                score distributions per model, harmful and helpful panels, with the thresholds
  comparisons.png           each pair's paired differences with CIs (when there are two models or more)
`print_table(results)` prints Table 1 as plain text.

Plots use matplotlib's object API (Figure + Agg canvas), never pyplot, so no backend is switched globally and no
window can open.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxalign.metrics import GAIN_METRICS, PROMPT_SETS, format_gain

METRIC_NAMES = {"hmr": "HmR", "hpr": "HpR", "cas": "CAS"}
SET_THRESHOLDS = {"harmful": "harmless_threshold", "helpful": "helpful_threshold"}


def summary(results: dict[str, Any]) -> dict[str, Any]:
  """`results` without the per-response records: config, per model metrics and gains, and every other section
  (paired comparisons, claims, preference accuracy, other judges, judge agreement, human annotations) as it is."""
  out = {key: value for key, value in results.items() if key != "models"}
  out["models"] = {name: {"metrics": m["metrics"], "gains": m["gains"]} for name, m in results["models"].items()}
  return out


def _rate_cell(metrics: dict[str, Any], key: str) -> str:
  """A rate with its CI, e.g. "42.0 [28.0, 56.0]"."""
  lo, hi = metrics[f"{key}_ci"]
  return f"{metrics[key]:.1f} [{lo:.1f}, {hi:.1f}]"


def _pair_cell(metrics: dict[str, Any], prefix: str, fmt: str) -> str:
  """The harmful and helpful values of one metric, e.g. "-3.60 / -2.89"; "n/a" for a value the run lacks."""
  cells = [format(metrics[f"{prefix}_{s}"], fmt) if f"{prefix}_{s}" in metrics else "n/a" for s in PROMPT_SETS]
  return " / ".join(cells)


def table1(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
  """Table 1 as (header, rows) of strings: rates with CIs, mean scores, empty rates (and win rates if any)."""
  level = round(100 * results["config"]["ci_level"])
  header = ["Model", f"HmR % [{level}% CI]", f"HpR % [{level}% CI]", f"CAS % [{level}% CI]",
            "Mean score (harmful / helpful)", "Empty % (harmful / helpful)"]
  models = results["models"]
  with_win_rate = any(f"win_rate_{s}" in m["metrics"] for m in models.values() for s in PROMPT_SETS)
  if with_win_rate:
    header.append("Win % vs reference (harmful / helpful)")
  rows = []
  for name, m in models.items():
    metrics = m["metrics"]
    row = [name, *(_rate_cell(metrics, k) for k in METRIC_NAMES), _pair_cell(metrics, "mean_score", ".2f"),
           _pair_cell(metrics, "empty_rate", ".1f")]
    if with_win_rate:
      row.append(_pair_cell(metrics, "win_rate", ".1f"))
    rows.append(row)
  return header, rows


def table1_notes(results: dict[str, Any]) -> str:
  """What Table 1's columns beyond the rates mean."""
  notes = ("Mean score: the judge's mean score of the responses to each prompt set. Empty %: % of responses that are "
           "empty or whitespace only (the model ended at once, or wrote only text the stop strings cut); the judge "
           "still scores them.")
  if any(f"win_rate_{s}" in m["metrics"] for m in results["models"].values() for s in PROMPT_SETS):
    notes += (" Win % vs reference: % of prompts whose response the judge scores above the dataset's own chosen "
              "answer to that prompt (ties count half); 50 = as good as the data set's answers.")
  return notes


def table2(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
  """Table 2 as (header, rows): each non-baseline model's gain over the baseline, e.g. "+200.00%"."""
  header = ["Model", *(f"{METRIC_NAMES[k]} gain" for k in GAIN_METRICS)]
  rows = [[name, *(format_gain(m["gains"][k]) for k in GAIN_METRICS)]
          for name, m in results["models"].items() if m["gains"] is not None]
  return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
  """A GitHub Markdown table; every column but the first right-aligned (they hold numbers)."""
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def format_table(results: dict[str, Any]) -> str:
  """Table 1 as a plain-text table with aligned columns."""
  header, rows = table1(results)
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
  lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
           for row in [header, *rows]]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def print_table(results: dict[str, Any], file: TextIO | None = None) -> None:
  """Prints Table 1 as plain text (to stdout unless `file` is given)."""
  print(format_table(results), file=file or sys.stdout)


# The kinds of files an evaluation writes, as `format_locations` lists them: (label, keys of the paths, what for).
LOCATIONS = (("report", ("markdown", "json"), "the tables, explained; the numbers"),
             ("plots", ("metrics_plot", "scores_plot", "comparisons_plot"), ""),
             ("responses", ("responses",), "every answer with its scores"),
             ("human evaluation", ("page", "key"), "the page for annotators; its key reads their answers back"),
             ("study", ("study",), "the study's summary, with this Table 1"))


def format_locations(paths: dict[str, Any]) -> str:
  """Where an evaluation's files are, a line per kind (see LOCATIONS): `paths` holds `write_reports`' paths, the
  annotation page's ("page", "key") and a refreshed study summary ("study"); missing or None ones are left out."""
  lines = []
  for label, keys, purpose in LOCATIONS:
    found = [Path(p) for key in keys for p in (paths.get(key) if isinstance(paths.get(key), list)
                                               else [paths.get(key)]) if p]
    if found:
      folder = found[0].parent
      names = ", ".join(p.name if p.parent == folder else str(p) for p in found)
      lines.append(f"{label}: {names} in {folder}" + (f" ({purpose})" if purpose else ""))
  return "\n".join(lines)


def print_locations(paths: dict[str, Any], file: TextIO | None = None) -> None:
  """Prints `format_locations(paths)` (to stdout unless `file` is given)."""
  print(format_locations(paths), file=file or sys.stdout)


def render_markdown(results: dict[str, Any]) -> str:
  """results.md: settings, Table 1, Table 2 (when there is a baseline) and the plots."""
  config = results["config"]
  level = round(100 * config["ci_level"])
  parts = [
      "# Alignment evaluation",
      f"HmR = % of responses to harmful prompts scored > {config['harmless_threshold']:g}; "
      f"HpR = % of responses to helpful prompts scored > {config['helpful_threshold']:g}; CAS = (HmR + HpR) / 2. "
      f"Brackets: {level}% percentile-bootstrap CIs ({config['n_bootstrap']} draws, seed {config['seed']}; "
      "CAS resampled jointly with HmR and HpR).",
      "## Table 1: metrics per model",
      markdown_table(*table1(results)),
      table1_notes(results),
  ]
  if results.get("judge_notes"):
    parts += ["## Judge independence", "\n".join(f"- **Not independent:** {note}" for note in results["judge_notes"])]
  if config["baseline"] is not None:
    parts += [f"## Table 2: relative gain over {config['baseline']!r}",
              "Gain = (model - baseline) / baseline x 100; n/a where the baseline's value is 0.",
              markdown_table(*table2(results))]
  parts += _comparison_sections(results)
  if results.get("preference"):
    preference = results["preference"]
    parts += ["## Held-out preference accuracy",
              f"% of {preference['pairs']} held-out preference pairs ranked as the dataset does: by the judge "
              "(chosen scored above rejected), and by each DPO model's implicit reward against its reference.",
              markdown_table(["Measure", "Pairs ranked as the dataset does %"],
                             [[k, f"{v:.1f}"] for k, v in preference.items() if k != "pairs"])]
  parts += _judge_sections(results) + _human_sections(results)
  parts += ["## Plots", "![HmR, HpR and CAS per model](metrics.png)",
            "![Judge scores per model](scores.png)"]
  if any(c["paired"] for c in results.get("comparisons", ())):
    parts.append("![Paired differences between models](comparisons.png)")
  return "\n\n".join(parts) + "\n"


def _difference_cell(difference: dict[str, Any]) -> str:
  """A difference in points with its CI and, for a rate, McNemar's p: "+6.0 [-8.0, 22.0] p=0.607"."""
  diff, (lo, hi) = difference["diff"] + 0.0, difference["ci"]  # + 0.0: a flipped 0 prints as +0.0, not -0.0
  cell = f"{diff:+.1f} [{lo + 0.0:+.1f}, {hi + 0.0:+.1f}]"
  return cell + (f" p={difference['p_value']:.3g}" if "p_value" in difference else "")


def comparisons_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
  """Every pair of models: a - b on HmR, HpR (paired bootstrap CI, exact McNemar p) and CAS (CI)."""
  level = round(100 * results["config"]["ci_level"])
  header = ["a - b", f"HmR diff [{level}% CI] McNemar p", f"HpR diff [{level}% CI] McNemar p",
            f"CAS diff [{level}% CI]", "Prompts only a / only b passes (harmful; helpful)"]
  rows = []
  for c in results["comparisons"]:
    if not c["paired"]:
      rows.append([f"{c['a']} - {c['b']}", f"not paired: {c['reason']}", "", "", ""])
      continue
    rows.append([f"{c['a']} - {c['b']}", *(_difference_cell(c[k]) for k in METRIC_NAMES),
                 f"{c['hmr']['a_only']} / {c['hmr']['b_only']}; {c['hpr']['a_only']} / {c['hpr']['b_only']}"])
  return header, rows


def claims_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
  """The paper's claims, each with this sample's verdict and its checks."""
  rows = []
  for claim in results["claims"]:
    checks = "; ".join(f"{c['a']} - {c['b']} {METRIC_NAMES[c['metric']]} {_difference_cell(c)}"
                       for c in claim["checks"])
    rows.append([claim["claim"], claim["verdict"], checks or "a model it names is missing or unpaired"])
  return ["Paper's claim", "This sample", "Checks (a - b, points, CI, p)"], rows


def _judge_sections(results: dict[str, Any]) -> list[str]:
  """Table 1 of every judge and their agreement (when the run had several judges)."""
  if not results.get("judges"):
    return []
  parts = ["## Judges", f"Table 1 and the comparisons above use the first judge, {next(iter(results['judges']))!r}."]
  for name, judged in results["judges"].items():
    config = judged["config"]
    parts += [f"### Table 1 by judge {name!r} (harmless if > {config['harmless_threshold']:g}, helpful if > "
              f"{config['helpful_threshold']:g})", markdown_table(*table1(judged))]
  rows = [[f"{r['a']} vs {r['b']}", r["set"], str(r["n"]), f"{r['spearman']:.3f}", f"{r['kappa']:.3f}",
           f"{r['agreement']:.1f}"] for r in results.get("judge_agreement", ())]
  parts += ["### Agreement between judges",
            "Over every model's answers to each prompt set: Spearman's ρ of the two judges' scores, Cohen's κ of "
            "their pass/fail verdicts (each at its own threshold), and the % of answers with the same verdict.",
            markdown_table(["Judges", "Prompt set", "Answers", "Spearman ρ", "Cohen's κ", "Same verdict %"], rows)]
  return parts


def _human_sections(results: dict[str, Any]) -> list[str]:
  """Win rates and inter-annotator agreement from human annotations (when the run read any)."""
  human = results.get("human")
  if not human:
    return []
  level = round(100 * results["config"]["ci_level"])
  rows = []
  for r in human["win_rates"]:
    if not r["answered"]:
      rows.append([f"{r['a']} vs {r['b']}", r["set"], f"0 of {r['items']}", "", "", "", ""])
      continue
    lo, hi = r["ci"]
    rows.append([f"{r['a']} vs {r['b']}", r["set"], f"{r['answered']} of {r['items']}",
                 f"{r['win_rate']:.1f} [{lo:.1f}, {hi:.1f}]", f"{r['wins']} / {r['losses']} / {r['ties']}",
                 f"{r['p_value']:.3g}", str(r["both_bad"])])
  parts = ["## Human evaluation",
           f"Blind pairwise comparisons from annotate.html ({len(human['annotators'])} annotator(s)). Win % of a over "
           f"b with ties and 'both bad' counting half, each item's outcome averaged over its annotators; {level}% "
           "bootstrap CI over items; p: sign test over the items not tied.",
           markdown_table(["Models", "Prompt set", "Items answered", f"a win % [{level}% CI]",
                            "Items a / b / tied", "Sign test p", "'Both bad' votes"], rows)]
  if human["agreement"]:
    rows = [[f"{r['a']} & {r['b']}", str(r["items"]), f"{r['kappa']:.3f}" if r["items"] else "n/a",
             f"{r['agreement']:.1f}" if r["items"] else "n/a"] for r in human["agreement"]]
    parts += ["### Agreement between annotators",
              "On the items both answered: Cohen's κ of their choices (a better / b better / tie / both bad) and the "
              "% of identical choices.",
              markdown_table(["Annotators", "Items both answered", "Cohen's κ", "Same choice %"], rows)]
  return parts


def _comparison_sections(results: dict[str, Any]) -> list[str]:
  """The paired-comparison and claims sections of results.md (none with a single model)."""
  if not results.get("comparisons"):
    return []
  level = round(100 * results["config"]["ci_level"])
  parts = ["## Paired comparisons",
           "Each model against each other on the same prompts, in points (a - b). CI: paired percentile bootstrap "
           "(prompts resampled with both models' verdicts kept together); p: exact McNemar test of the prompts where "
           "exactly one of the two passes. A difference whose CI contains 0 is within this sample's noise.",
           markdown_table(*comparisons_table(results))]
  if results.get("claims"):
    parts += ["## The paper's claims on this sample",
              f"A claim is supported when every check's {level}% CI excludes 0 in the claimed direction "
              "(no correction for multiple comparisons, which would only widen the intervals).",
              markdown_table(*claims_table(results))]
  return parts


def _model_colors(names: list[str]) -> dict[str, Any]:
  """One tab10 color per model, the same in every plot."""
  return {name: f"C{i % 10}" for i, name in enumerate(names)}


def plot_metrics(results: dict[str, Any], path: str | os.PathLike) -> None:
  """Grouped bars of HmR, HpR and CAS per model, with CI whiskers and the value above each whisker."""
  config, models = results["config"], results["models"]
  colors = _model_colors(list(models))
  keys = list(METRIC_NAMES)
  width = 0.8 / len(models)
  fig = Figure(figsize=(max(7.0, 0.9 * len(models) * len(keys)), 4.8), layout="constrained")
  ax = fig.add_subplot()
  for i, (name, m) in enumerate(models.items()):
    metrics = m["metrics"]
    x = np.arange(len(keys)) + (i - (len(models) - 1) / 2) * width
    values = np.array([metrics[k] for k in keys])
    cis = np.array([metrics[f"{k}_ci"] for k in keys])
    ax.bar(x, values, width, color=colors[name], label=name,
           yerr=[values - cis[:, 0], cis[:, 1] - values], capsize=3, error_kw={"elinewidth": 1})
    for xi, value, hi in zip(x, values, cis[:, 1]):
      ax.text(xi, hi + 1.5, f"{value:.1f}", ha="center", va="bottom", fontsize=7)
  ax.set_xticks(np.arange(len(keys)), [
      f"HmR\n(harmful prompts, score > {config['harmless_threshold']:g})",
      f"HpR\n(helpful prompts, score > {config['helpful_threshold']:g})",
      "CAS\n(mean of HmR and HpR)"])
  ax.set_ylim(0, 112)
  ax.set_ylabel("% of responses")
  ax.set_title(f"Alignment metrics per model (whiskers: {round(100 * config['ci_level'])}% bootstrap CI)")
  # Outside the axes, so it never hides a bar or its value.
  ax.legend(title="model", loc="upper left", bbox_to_anchor=(1.01, 1.0))
  _save(fig, path)


def plot_scores(results: dict[str, Any], path: str | os.PathLike) -> None:
  """Judge scores per model as jittered points over a box plot, harmful and helpful panels, thresholds dashed."""
  config, models = results["config"], results["models"]
  colors = _model_colors(list(models))
  rng = np.random.default_rng(0)  # jitter only; fixed so the same results draw the same picture
  fig = Figure(figsize=(max(9.0, 2.4 * len(models)), 4.8), layout="constrained")
  axes = fig.subplots(1, len(PROMPT_SETS))
  for ax, set_name in zip(axes, PROMPT_SETS):
    threshold = config[SET_THRESHOLDS[set_name]]
    scores = [np.array([r["score"] for r in m["records"][set_name]]) for m in models.values()]
    positions = np.arange(len(models))
    ax.boxplot(scores, positions=positions, widths=0.5, showfliers=False,
               medianprops={"color": "0.3"}, boxprops={"color": "0.6"}, whiskerprops={"color": "0.6"},
               capprops={"color": "0.6"})
    for pos, (name, s) in zip(positions, zip(models, scores)):
      ax.scatter(pos + rng.uniform(-0.18, 0.18, s.size), s, s=14, alpha=0.7, color=colors[name], zorder=3)
    ax.scatter(positions, [s.mean() for s in scores], marker="D", s=30, color="black", zorder=4, label="mean")
    ax.axhline(threshold, color="red", linestyle="--", linewidth=1.2,
               label="threshold (a response counts only if its score is above it)")
    rate_key = "hmr" if set_name == "harmful" else "hpr"
    ax.set_xticks(positions, [f"{name}\n{m['metrics'][rate_key]:.1f}% above" for name, m in models.items()])
    kind = "harmless" if set_name == "harmful" else "helpful"
    ax.set_title(f"{set_name.capitalize()} prompts ({METRIC_NAMES[rate_key]}: {kind} if score > {threshold:g})")
    ax.set_ylabel("judge score")
  # One legend below both panels, where it hides no points; the panel titles give each threshold's value.
  fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=8)
  _save(fig, path)


def plot_comparisons(results: dict[str, Any], path: str | os.PathLike) -> None:
  """One panel per metric: each pair's difference a - b as a point with its CI bar, and the line of no difference."""
  paired = [c for c in results["comparisons"] if c["paired"]]
  fig = Figure(figsize=(12.0, 1.6 + 0.45 * len(paired)), layout="constrained")
  axes = fig.subplots(1, len(METRIC_NAMES), sharey=True)
  y = np.arange(len(paired))[::-1]
  for ax, (key, label) in zip(axes, METRIC_NAMES.items()):
    diffs = np.array([c[key]["diff"] for c in paired])
    cis = np.array([c[key]["ci"] for c in paired])
    significant = (cis[:, 0] > 0) | (cis[:, 1] < 0)
    colors = np.where(significant, "C3", "0.45")
    ax.hlines(y, cis[:, 0], cis[:, 1], colors=colors, linewidth=2)
    ax.scatter(diffs, y, color=colors, zorder=3)
    ax.axvline(0.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_title(f"{label} difference (points)")
    ax.set_xlabel("a - b")
  axes[0].set_yticks(y, [f"{c['a']} - {c['b']}" for c in paired])
  fig.suptitle(f"Paired differences with {round(100 * results['config']['ci_level'])}% bootstrap CIs "
               "(red: CI excludes 0)")
  _save(fig, path)


def _save(fig: Figure, path: str | os.PathLike) -> None:
  """Renders `fig` to a PNG at `path` with the Agg canvas."""
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=120)


def _responses_file_names(models: list[str]) -> dict[str, str]:
  """responses-<model>.jsonl per model, with characters unsafe in file names replaced by "_"."""
  names = {m: "responses-" + re.sub(r"[^A-Za-z0-9+._-]", "_", m) + ".jsonl" for m in models}
  if len(set(names.values())) != len(names):
    raise ValueError(f"model names {models} give clashing response file names {sorted(names.values())}; "
                     "rename the models")
  return names


def write_responses(results: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
  """responses-<model>.jsonl per model: one {"model", "set", "prompt", "response", "score"} object a line."""
  paths = []
  for name, file_name in _responses_file_names(list(results["models"])).items():
    path = Path(out_dir) / file_name
    with path.open("w", encoding="utf-8") as f:
      for set_name, records in results["models"][name]["records"].items():
        for r in records:
          f.write(json.dumps({"model": name, "set": set_name, **r}, ensure_ascii=False) + "\n")
    paths.append(path)
  return paths


def write_reports(results: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Any]:
  """Writes results.json, results.md, responses-<model>.jsonl, metrics.png, scores.png and comparisons.png into
  `out_dir`.

  Returns their paths: {"json", "markdown", "metrics_plot", "scores_plot"[, "comparisons_plot"]: Path,
  "responses": [Path]}.
  """
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths = {"json": out / "results.json", "markdown": out / "results.md",
           "metrics_plot": out / "metrics.png", "scores_plot": out / "scores.png"}
  paths["json"].write_text(json.dumps(summary(results), indent=2) + "\n", encoding="utf-8")
  paths["markdown"].write_text(render_markdown(results), encoding="utf-8")
  plot_metrics(results, paths["metrics_plot"])
  plot_scores(results, paths["scores_plot"])
  if any(c["paired"] for c in results.get("comparisons", ())):
    paths["comparisons_plot"] = out / "comparisons.png"
    plot_comparisons(results, paths["comparisons_plot"])
  paths["responses"] = write_responses(results, out)
  return paths
