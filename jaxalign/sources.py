"""Where the training loop gets its batches: a `Source` hands out the next global batch given the current train
state, says which batch shapes to compile ahead, how many steps the stage runs, and has a resumable state that rides
in every checkpoint.

`OfflineSource` serves fixed data (today's streams, `data/pipeline.py`): the train state is not looked at. An online
source (sampling completions from the current policy each step, then scoring them) implements the same protocol: it
is built with what it needs to sample (the policy's graph and untrained variables from `step.split_model`, a key, a
reward) and reads the current parameters and step from the state that `next` receives.
"""

from __future__ import annotations

from typing import Any, Protocol

from jaxalign.data import pipeline
from jaxalign.step import TrainState


class Source(Protocol):
  """The loop's one way to get batches (see the module docstring)."""

  total_steps: int  # optimizer steps the stage runs
  held_out: list  # held-out global batches, the same ones at every evaluation (may be empty)

  def next(self, state: TrainState) -> Any:
    """The next global batch (a layout's batch type, sharded over the mesh) for the step after `state`."""

  @property
  def last_shape(self) -> tuple[int, ...]:
    """(rows, row length, scored positions per row) of the last batch `next` returned (throughput, FLOPs)."""

  def precompile_batches(self, steps_left: int) -> list:
    """One global batch (or abstract batch) of each shape among the next `steps_left`; the source does not move."""

  def state(self) -> dict:
    """JSON-serialisable position, saved with each checkpoint."""

  def restore(self, state: dict) -> None:
    """Continues from a `state()`."""

  def metrics(self) -> dict[str, float]:
    """Host-side metrics of the last batch `next` returned (an online source's rewards, lengths and timings), logged
    with the step's; empty when the source has none."""

  def tables(self) -> dict[str, list[dict]]:
    """Tables made since the last call ({name: rows, each a dict with a "step"}, e.g. an online source's completions
    of a log step), shown by the logger in TensorBoard / W&B; empty when the source has none."""


class OfflineSource:
  """Fixed data in a seeded, resumable order (`pipeline.streams`); the train state does not change the batches."""

  def __init__(self, data: pipeline.TrainingData):
    self.stream = data.train
    self.held_out = data.eval_batches
    self.total_steps = data.total_steps

  def next(self, state: TrainState):
    del state  # offline: the same batches whatever the model
    return self.stream.next_global()

  @property
  def last_shape(self) -> tuple[int, ...]:
    return self.stream.last_shape

  def precompile_batches(self, steps_left: int) -> list:
    return self.stream.shape_examples(steps_left)

  def state(self) -> dict:
    return self.stream.state()

  def restore(self, state: dict) -> None:
    self.stream.restore(state)

  def metrics(self) -> dict[str, float]:
    return {}

  def tables(self) -> dict[str, list[dict]]:
    return {}


def build(config, data: pipeline.StageData | pipeline.PromptData, mesh, tokenizer, reference, *, graphdef, rest,
          workdir: str) -> Source:
  """The source of a stage's batches: its loaded data as sharded global batches, carrying what the reference
  precomputed (`reference.per_pair()`); or for an online task's prompts, completions sampled from the policy
  (`graphdef`, the train state's parameters, `rest`) as training goes (`rollout.RolloutSource`)."""
  if data.batch_kind == "prompts":
    from jaxalign import rollout  # rollout builds on sources' neighbours (sampling, rewards); only online runs need it

    return rollout.RolloutSource(config, data.train, mesh, tokenizer, reference, graphdef=graphdef, rest=rest,
                                 workdir=workdir)
  return OfflineSource(pipeline.streams(config, data, mesh, tokenizer.pad_token_id, reference.per_pair()))
