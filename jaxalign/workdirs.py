"""What a training workdir holds, for the code that reads one: the trainer starting a stage from an earlier one, and
the evaluator loading a trained model or reward model."""

from __future__ import annotations

import json
import os

from jaxalign.errors import ConfigError
from jaxalign.models import hub

EXPORT_DIR = "model"  # <workdir>/model: the run's exported Hugging Face folder
DONE_FILE = "done.json"  # <workdir>/done.json: a finished stage's summary (and the config it ran with)


def resolve_init_path(init_from: str) -> str:
  """A training workdir means its exported model; anything else is passed on (HF folder or Hub id)."""
  export = os.path.join(init_from, EXPORT_DIR)
  if os.path.isdir(init_from) and not os.path.exists(os.path.join(init_from, hub.CONFIG_FILE)):
    if os.path.exists(os.path.join(export, hub.CONFIG_FILE)):
      return export
    if os.path.isdir(os.path.join(init_from, "checkpoints")):
      raise ConfigError(f"init_from {init_from!r} is a workdir whose run has not finished (no {EXPORT_DIR}/ yet): "
                        f"finish it with `python train.py --workdir {init_from} --config ...`, which resumes and "
                        "exports")
  return init_from


def finished_config(workdir: str) -> dict | None:
  """The config a finished stage recorded in its done.json (None if written before done.json carried it)."""
  with open(os.path.join(workdir, DONE_FILE)) as f:
    return json.load(f).get("config")
