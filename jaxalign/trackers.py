"""Experiment trackers that receive what `metrics.jsonl` receives: today Weights & Biases (`logging.wandb=True`).

A stage is one W&B run: its config is the stage's whole config, every record written to metrics.jsonl is logged at
its step under the same names (`train/loss`, `eval/rewards/margins`, `perf/tokens_per_second`, ...), an online
stage's completions (prompt, completion, each reward, advantage) as a wandb.Table `train/completions` at each
record's step (its rows name the steps they trained), and at the end
`done.json` goes into the run's summary and, with `curves.png`, into its files. `WANDB_MODE=offline` (or
`logging.wandb_mode=offline`) writes the run under `<workdir>/wandb/` without any network; `wandb sync` uploads it
later. Credentials are W&B's own (`wandb login` / `WANDB_API_KEY`); nothing here reads or logs them.
"""

from __future__ import annotations

import os
from typing import Any

INSTALL_HINT = 'pip install -e ".[wandb]"  (or: pip install wandb)'


class WandbTracker:
  """One W&B run for one stage."""

  def __init__(self, config, workdir: str):
    try:
      import wandb
    except ImportError:
      raise ImportError(f"logging.wandb=True needs the W&B client, which is not installed: {INSTALL_HINT}; or set "
                        "--config.logging.wandb=False") from None
    settings = config.logging
    self.run = wandb.init(
        project=settings.wandb_project, entity=settings.wandb_entity or None,
        name=settings.wandb_name or os.path.basename(os.path.abspath(workdir)),
        group=settings.wandb_group or None, tags=list(settings.wandb_tags), config=config.to_dict(),
        dir=workdir, mode=settings.wandb_mode or None, reinit="finish_previous")

  def log(self, step: int, record: dict[str, float]) -> None:
    """Logs one metrics.jsonl record at its step (records of the same step merge into one W&B row)."""
    self.run.log({k: float(v) for k, v in record.items()}, step=step)

  def log_table(self, step: int, name: str, rows: list[dict]) -> None:
    """Logs rows of dicts (e.g. the completions of an online step) as a wandb.Table at `step`."""
    import wandb

    columns = table_columns(rows)
    self.run.log({name: wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])},
                 step=step)

  def finish(self, summary: dict[str, Any], files: list[str]) -> None:
    """Puts the stage's done.json figures into the run's summary, attaches `files`, and ends the run."""
    self.run.summary.update(_flat(summary))
    for path in files:
      if os.path.exists(path):
        self.run.save(path, base_path=os.path.dirname(path), policy="now")
    self.run.finish()


def table_columns(rows: list[dict]) -> list[str]:
  """The keys of rows of dicts, in first-seen order: a table's columns."""
  return list(dict.fromkeys(key for row in rows for key in row))


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"seconds": {"loop": 1.0}} -> {"seconds/loop": 1.0}; lists (e.g. train_shapes) are kept as they are."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}/"))
    else:
      out[f"{prefix}{key}"] = value
  return out


def start(config, workdir: str) -> WandbTracker | None:
  """The tracker the config asks for (`logging.wandb`), or None."""
  return WandbTracker(config, workdir) if config.logging.wandb else None


def apply_study_settings(study, stage, name: str, study_dir: str) -> None:
  """A study's top-level `logging.wandb*` fields, when it turns W&B on, go to each of its stages: one run per stage,
  named after the stage and grouped under the study (its workdir name unless `logging.wandb_group` is set)."""
  settings = study.logging
  if not settings.wandb:
    return
  stage.logging.update(wandb=True, wandb_project=settings.wandb_project, wandb_entity=settings.wandb_entity,
                       wandb_tags=tuple(settings.wandb_tags), wandb_mode=settings.wandb_mode,
                       wandb_name=f"{settings.wandb_name}/{name}" if settings.wandb_name else name,
                       wandb_group=settings.wandb_group or os.path.basename(os.path.abspath(study_dir)))
