"""Training metrics: a progress bar, `metrics.jsonl` in the workdir, TensorBoard events (and the source's tables,
e.g. an online stage's completions, as Markdown text), throughput and MFU."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxalign import flops, trackers

log = logging.getLogger(__name__)


def keep_records_through(path: str, step: int) -> None:
  """Drops the records of `metrics.jsonl` after `step` (the checkpoint a run resumes from; 0 for a fresh start),
  which the interrupted run wrote before it stopped and the resumed run writes again, so each step appears once.
  A torn last line (a kill mid-write) is dropped too. The file is rewritten atomically."""
  if not os.path.exists(path):
    return
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        keep = json.loads(line)["step"] <= step
      except (ValueError, KeyError, TypeError):
        keep = False
      if keep:
        kept.append(line if line.endswith("\n") else line + "\n")
      else:
        dropped += 1
  if dropped:
    log.info("%s: dropped %d record(s) after step %d, which this run writes again", path, dropped, step)
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)


def markdown_table(rows: list[dict]) -> str:
  """Rows of dicts as a Markdown table (TensorBoard's text panel renders it): numbers to 4 significant digits, None
  empty, "|" and line breaks in text escaped so that each row stays one line."""
  columns = trackers.table_columns(rows)
  cell = lambda v: "" if v is None else f"{v:.4g}" if isinstance(v, float) else (
      str(v).replace("|", "\\|").replace("\n", "\\n"))
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
  return "\n".join(lines)


class MetricLogger:
  """Receives every step's metrics (device arrays) and writes a record every `training.log_every` steps.

  Throughput counts real (non-padding) tokens; MFU is model FLOPs over the mesh's dense bf16 peak (absent on CPU
  unless `logging.peak_tflops` is set).
  """

  def __init__(self, workdir: str, config, *, total_steps: int, start_step: int,
               step_flops: Callable[[int, float, float], float], num_devices: int):
    self.is_main = jax.process_index() == 0
    self.log_every = config.training.log_every
    self.total_steps = total_steps
    self.step_flops = step_flops
    self.num_devices = num_devices
    self.peak = flops.device_peak_flops(override_tflops=config.logging.peak_tflops)
    self.shapes: set[tuple[int, ...]] = set()
    self._window = {"tokens": 0.0, "flops": 0.0, "steps": 0, "sums": {}}
    self._window_start = time.perf_counter()
    self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, unit="step", mininterval=1.0,
                    disable=not (self.is_main and config.training.progress_bar))
    if self.is_main:
      keep_records_through(os.path.join(workdir, "metrics.jsonl"), start_step)
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a") if self.is_main else None
    self.tensorboard = None
    if self.is_main and config.logging.tensorboard:
      from tensorboardX import SummaryWriter

      self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self.tracker = trackers.start(config, workdir) if self.is_main else None  # W&B: finished by the trainer
    self._tables: list[tuple[str, list[dict]]] = []  # tables waiting for the next record

  def train_step(self, step: int, metrics: dict, shape: tuple[int, ...]) -> None:
    """Accounts one finished step; `shape` is its batch's (rows, padded length, scored positions per row)."""
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    self.shapes.add(tuple(shape))
    tokens, scored = values.pop("tokens"), values.pop("scored_tokens")
    window = self._window
    window["tokens"] += tokens
    window["flops"] += self.step_flops(shape[1], tokens, scored)
    window["steps"] += 1
    for k, v in values.items():
      window["sums"][k] = window["sums"].get(k, 0.0) + v
    self.bar.update(1)
    self.bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
    if step % self.log_every == 0 or step == self.total_steps:
      self._flush(step)

  def flush(self, step: int) -> None:
    """Writes the record of the steps accounted since the last record, if any (a stop between logging steps)."""
    if self._window["steps"]:
      self._flush(step)

  def _flush(self, step: int) -> None:
    window = self._window
    elapsed = max(time.perf_counter() - self._window_start, 1e-9)
    record = {f"train/{k}": v / window["steps"] for k, v in window["sums"].items()}
    record["perf/tokens_per_second"] = window["tokens"] / elapsed
    record["perf/steps_per_second"] = window["steps"] / elapsed
    utilisation = flops.mfu(window["flops"] / elapsed, self.num_devices, self.peak)
    if utilisation is not None:
      record["perf/mfu"] = utilisation
    self.bar.set_postfix(loss=f"{record['train/loss']:.4f}", tok_s=f"{record['perf/tokens_per_second']:.0f}",
                         **({"mfu": f"{utilisation:.1%}"} if utilisation is not None else {}))
    self.write(step, record)
    self._write_tables(step)
    self._window = {"tokens": 0.0, "flops": 0.0, "steps": 0, "sums": {}}
    self._window_start = time.perf_counter()

  def write(self, step: int, record: dict[str, float]) -> None:
    if not self.is_main or not record:
      return
    self.jsonl.write(json.dumps({"step": step, **{k: float(np.asarray(v)) for k, v in record.items()}}) + "\n")
    self.jsonl.flush()
    if self.tensorboard is not None:
      for k, v in record.items():
        self.tensorboard.add_scalar(k, v, step)
    if self.tracker is not None:
      self.tracker.log(step, record)
    if any(k.startswith("eval/") for k in record):
      tqdm.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in record.items()))

  def add_tables(self, tables: dict[str, list[dict]]) -> None:
    """Queues a source's tables ({name: rows}); they are written with the next training record, so W&B, whose
    steps only grow, gets them at that record's step (TensorBoard at the step in their rows)."""
    if self.is_main and (self.tensorboard is not None or self.tracker is not None):
      self._tables.extend((name, rows) for name, rows in tables.items() if rows)

  def _write_tables(self, step: int) -> None:
    by_name: dict[str, list[dict]] = {}  # W&B keeps one value per name and step: the queued rows in one table
    for name, rows in self._tables:
      if self.tensorboard is not None:
        self.tensorboard.add_text(f"train/{name}", markdown_table(rows), rows[0].get("step", step))
      by_name.setdefault(name, []).extend(rows)
    if self.tracker is not None:
      for name, rows in by_name.items():
        self.tracker.log_table(step, f"train/{name}", rows)
    self._tables = []

  def close(self) -> None:
    self.bar.close()
    if self.jsonl is not None:
      self.jsonl.close()
    if self.tensorboard is not None:
      self.tensorboard.close()
