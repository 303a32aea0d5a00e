"""Training curves of a stage (`curves.png`) and the summary of a study (`study.md`), read back from the workdirs.

`write_stage_curves(workdir)` plots `metrics.jsonl`: one panel per logged quantity that the stage has (loss; SFT
perplexity; DPO rewards/chosen and rewards/rejected, rewards/margins, rewards/accuracies, log-probs; the online
methods' training reward, KL and completion length; a reward model's accuracy; gradient norm), the training values as a line and the held-out evaluations as points on top.

`write_study_summary(root)` writes `<root>/study.md`: per stage a row of its `done.json` figures (steps, seconds,
tokens/s, MFU, compilations) and its curves; and, for every evaluation folder inside the study (one holding
evaluate.py's `results.json`), its Table 1.

Plots use matplotlib's object API (Figure + Agg canvas), never pyplot, as `reports.py` does.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxalign import reports, tasks

CURVES_FILE = "curves.png"
STUDY_FILE = "study.md"
METRICS_FILE = "metrics.jsonl"
DONE_FILE = "done.json"  # trainer.DONE_FILE (the trainer imports this module, not the other way round)
RESULTS_FILE = "results.json"  # evaluate.py's

# (panel title, metric names without their train/ or eval/ prefix, log-scale y); a panel is drawn when the stage
# logged at least one of its metrics.
PANELS = (
    ("loss", ("loss",), False),
    ("perplexity", ("perplexity",), True),
    ("rewards of the chosen and rejected responses", ("rewards/chosen", "rewards/rejected"), False),
    ("reward margin (chosen - rejected)", ("rewards/margins",), False),
    ("preference accuracy", ("rewards/accuracies", "accuracy"), False),
    ("log-probs of the responses", ("logps/chosen", "logps/rejected"), False),
    ("training reward (online methods)", ("reward",), False),
    ("KL to the reference", ("kl", "objective/kl"), False),
    ("completion length (tokens)", ("completions/mean_length", "completions/mean_terminated_length"), False),
    ("gradient norm (before clipping)", ("grad_norm",), True),
)


def read_metrics(path: str) -> dict[str, dict[int, float]]:
  """{metric: {step: value}} from a metrics.jsonl; a step logged twice (a resumed run) keeps its last value."""
  series: dict[str, dict[int, float]] = {}
  with open(path) as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        step = int(record.pop("step"))
      except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}, line {line_number}: expected a JSON object with a 'step' field ({e})") from None
      for name, value in record.items():
        series.setdefault(name, {})[step] = float(value)
  return {name: dict(sorted(values.items())) for name, values in series.items()}


def _panels(series: dict[str, dict[int, float]]) -> list[tuple[str, list[str], bool]]:
  panels = []
  for title, names, log_scale in PANELS:
    present = [n for n in names if f"train/{n}" in series or f"eval/{n}" in series]
    if present:
      panels.append((title, present, log_scale))
  return panels


def plot_curves(series: dict[str, dict[int, float]], path: str, title: str, task: str = "") -> list[str]:
  """Draws the panels `series` has into a PNG at `path`; returns the panel titles drawn."""
  panels = _panels(series)
  if not panels:
    raise ValueError(f"no train/ or eval/ metrics to plot for {title!r}")
  columns = min(3, len(panels))
  rows = math.ceil(len(panels) / columns)
  fig = Figure(figsize=(5.0 * columns, 3.6 * rows), layout="constrained")
  axes = fig.subplots(rows, columns, squeeze=False).ravel()
  for ax, (panel_title, names, log_scale) in zip(axes, panels):
    for i, name in enumerate(names):
      color = f"C{i}"
      train, held_out = series.get(f"train/{name}", {}), series.get(f"eval/{name}", {})
      if train:
        ax.plot(list(train), list(train.values()), color=color, linewidth=1.4, label=f"train {name}")
      if held_out:
        ax.plot(list(held_out), list(held_out.values()), "o", color=color, markersize=7, markeredgecolor="black",
                zorder=3, label=f"held-out {name}")
    if log_scale and all(v > 0 for n in names for k in ("train", "eval") for v in series.get(f"{k}/{n}", {}).values()):
      ax.set_yscale("log")
    spec = tasks.TASKS.get(task)
    kind = spec.reward_kind if spec and names[0].startswith("rewards/") and "accuracies" not in names[0] else None
    ax.set_title(f"{panel_title}\n({kind})" if kind else panel_title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  for ax in axes[len(panels):]:
    ax.set_visible(False)
  fig.suptitle(title)
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=110)
  return [p[0] for p in panels]


def write_stage_curves(workdir: str, task: str = "") -> str | None:
  """`<workdir>/curves.png` from its metrics.jsonl; returns its path (None when the stage logged nothing)."""
  metrics_path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(metrics_path):
    return None
  series = read_metrics(metrics_path)
  if not _panels(series):
    return None
  path = os.path.join(workdir, CURVES_FILE)
  name = os.path.basename(os.path.normpath(workdir))
  plot_curves(series, path, f"{name}: {task} stage" if task else name, task)
  return path


# ------------------------------------------------------------------------------------------------- study.md


def _median(values) -> float | None:
  values = list(values)
  return statistics.median(values) if values else None


def stage_figures(workdir: str) -> dict[str, Any]:
  """What study.md reports of a finished stage: its done.json figures and the median logged throughput and MFU."""
  with open(os.path.join(workdir, DONE_FILE)) as f:
    done = json.load(f)
  metrics_path = os.path.join(workdir, METRICS_FILE)
  series = read_metrics(metrics_path) if os.path.exists(metrics_path) else {}
  return {"task": done.get("task", ""), "init_from": done.get("init_from", ""), "steps": done.get("steps"),
          "seconds": done.get("seconds", {}), "compilations": done.get("compilations", {}),
          "tokens_per_second": _median(series.get("perf/tokens_per_second", {}).values()),
          "mfu": _median(series.get("perf/mfu", {}).values()),
          "eval": {k: v for k, v in done.items() if k.startswith("eval/")}}


def _cell(value, fmt: str) -> str:
  return "n/a" if value is None else format(value, fmt)


def _start(root: str, init_from: str) -> str:
  """Where a stage started: a random init, a Hub id, or a path (relative to the study when inside it)."""
  if not init_from:
    return "random init"
  if os.path.isabs(init_from) or os.path.exists(init_from):
    relative = os.path.relpath(os.path.abspath(init_from), os.path.abspath(root))
    if not relative.startswith(".."):
      return f"[{relative}]({relative})"
  return f"`{init_from}`"


def _finished_stages(root: str) -> list[str]:
  """Subfolders of `root` holding done.json, in the order they finished."""
  names = [n for n in os.listdir(root) if os.path.exists(os.path.join(root, n, DONE_FILE))]
  return sorted(names, key=lambda n: os.path.getmtime(os.path.join(root, n, DONE_FILE)))


def _evaluations(root: str) -> list[str]:
  """Subfolders of `root` holding an evaluate.py results.json."""
  return sorted(n for n in os.listdir(root) if os.path.exists(os.path.join(root, n, RESULTS_FILE)))


def render_study_summary(root: str, stages: list[str] | None = None) -> str:
  """study.md's text. `stages`: the study's stage names in order (None: every finished stage under `root`)."""
  stages = [s for s in (stages or _finished_stages(root)) if os.path.exists(os.path.join(root, s, DONE_FILE))]
  figures = {s: stage_figures(os.path.join(root, s)) for s in stages}
  parts = [f"# Study `{os.path.basename(os.path.normpath(root))}`",
           "One row per finished stage, from its `done.json` and `metrics.jsonl` (tokens/s and MFU: the median of the "
           "logged windows; MFU is n/a where the device's peak is unknown, e.g. on CPU)."]
  header = ["Stage", "Task", "Starts from", "Steps", "Seconds (stage / loop)", "Tokens/s", "MFU",
            "Compilations (train / eval)", "Held-out loss"]
  rows = []
  for name, fig in figures.items():
    seconds, compiled = fig["seconds"], fig["compilations"]
    rows.append([f"[{name}](#{name})", fig["task"] or "n/a", _start(root, fig["init_from"]),
                 str(fig["steps"]), f"{_cell(seconds.get('stage'), '.1f')} / {_cell(seconds.get('loop'), '.1f')}",
                 _cell(fig["tokens_per_second"], ",.0f"), _cell(fig["mfu"], ".1%"),
                 f"{compiled.get('train', 'n/a')} / {compiled.get('eval', 'n/a')}",
                 _cell(fig["eval"].get("eval/loss"), ".4f")])
  parts.append(reports.markdown_table(header, rows))
  for name in _evaluations(root):
    with open(os.path.join(root, name, RESULTS_FILE)) as f:
      results = json.load(f)
    parts += [f"## Evaluation `{name}`", f"Table 1 of [{name}/results.md]({name}/results.md):",
              reports.markdown_table(*reports.table1(results))]
  for name, fig in figures.items():
    held_out = ", ".join(f"{k[len('eval/'):]} {v:.4f}" for k, v in fig["eval"].items() if k != "eval/num_tokens")
    parts += [f"## {name}", f"Held-out: {held_out or 'none'}. Workdir: [{name}/]({name}/), "
              f"model: [{name}/model/]({name}/model/)."]
    if os.path.exists(os.path.join(root, name, CURVES_FILE)):
      parts.append(f"![{name} training curves]({name}/{CURVES_FILE})")
  return "\n\n".join(parts) + "\n"


def write_study_summary(root: str, stages: list[str] | None = None) -> str:
  """Writes `<root>/study.md` (see `render_study_summary`); returns its path."""
  path = os.path.join(root, STUDY_FILE)
  with open(path, "w", encoding="utf-8") as f:
    f.write(render_study_summary(root, stages))
  return path


def refresh_study_summary(evaluation_dir: str) -> str | None:
  """Rewrites the study.md of the study folder holding `evaluation_dir` (an evaluate.py workdir), so it shows the
  new Table 1; returns its path, or None when the folder is not inside a study."""
  root = os.path.dirname(os.path.abspath(evaluation_dir))
  if not os.path.exists(os.path.join(root, STUDY_FILE)):
    return None
  return write_study_summary(root)
