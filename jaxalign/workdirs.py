"""What a training workdir holds, for the code that reads one: the trainer starting a stage from an earlier one, and
the evaluator loading a trained model or reward model."""

from __future__ import annotations

import json
import os

from jaxalign.errors import ConfigError

EXPORT_DIR = "model"  # <workdir>/model: the run's exported Hugging Face folder
CONFIG_FILE = "config.json"  # a Hugging Face model folder's config (models/hub.py reads and writes it)
DONE_FILE = "done.json"  # <workdir>/done.json: a finished stage's summary (and the config it ran with)
CHECKPOINT_DIR = "checkpoints"  # <workdir>/checkpoints: Orbax steps, each with the run's config in its extra item


def resolve_init_path(init_from: str) -> str:
  """A training workdir means its exported model; anything else is passed on (HF folder or Hub id)."""
  export = os.path.join(init_from, EXPORT_DIR)
  if os.path.isdir(init_from) and not os.path.exists(os.path.join(init_from, CONFIG_FILE)):
    if os.path.exists(os.path.join(export, CONFIG_FILE)):
      return export
    if os.path.isdir(os.path.join(init_from, CHECKPOINT_DIR)):
      raise ConfigError(f"init_from {init_from!r} is a workdir whose run has not finished (no {EXPORT_DIR}/ yet): "
                        f"finish it with `python train.py --workdir {init_from} --config ...`, which resumes and "
                        "exports")
  return init_from


def finished_config(workdir: str) -> dict | None:
  """The config a finished stage recorded in its done.json (None if written before done.json carried it)."""
  with open(os.path.join(workdir, DONE_FILE)) as f:
    return json.load(f).get("config")


def training_workdir(path: str) -> str | None:
  """The training workdir a model path belongs to: the workdir itself, or the workdir whose export folder
  (<workdir>/model) it is; None for a Hub id or any other folder."""
  path = os.path.normpath(path)
  candidates = [path] + ([os.path.dirname(path)] if os.path.basename(path) == EXPORT_DIR else [])
  return next((c for c in candidates if os.path.isdir(os.path.join(c, CHECKPOINT_DIR))
               or os.path.exists(os.path.join(c, DONE_FILE))), None)


def training_config(workdir: str) -> dict | None:
  """The config a training workdir's run recorded (its done.json's once finished, else its newest checkpoint's), or
  None when it has neither."""
  if os.path.exists(os.path.join(workdir, DONE_FILE)):
    return finished_config(workdir)
  from jaxalign import checkpoint  # Orbax; only the readers of a running workdir's config need it

  extra = checkpoint.latest_extra(os.path.join(workdir, CHECKPOINT_DIR))
  return None if extra is None else extra.get("config")


def model_location(path: str) -> str:
  """Where a model named by a config lives, for telling whether two names are one model: a folder (a training
  workdir means its export) as its real path, anything else (a Hub id) as it is."""
  path = os.path.expanduser(path)
  if os.path.isdir(path):
    export = os.path.join(path, EXPORT_DIR)
    return os.path.realpath(export if os.path.isdir(export) and not os.path.exists(
        os.path.join(path, CONFIG_FILE)) else path)
  return path
