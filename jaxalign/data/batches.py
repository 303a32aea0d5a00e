"""Batch order and iteration: a deterministic, resumable iterator over a layout's examples, per-host slices, and
global jax arrays. What a batch holds is the layout's business (`data/layouts.py`).

Order: epoch e visits the examples in `epoch_order` (a permutation seeded by [seed, e], optionally grouped by
length), in consecutive global batches of `global_batch_size`; the last `n % global_batch_size` examples of each
permutation are dropped (counted in `dropped_per_epoch`; a different permutation drops different ones next epoch).
The iterator's state is {epoch, position} (plus checks), so a restored run continues with exactly the batches it
would have seen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import jax
import numpy as np

from jaxalign import shapes

log = logging.getLogger(__name__)

# With length grouping, examples are sorted by length within windows of this many global batches.
GROUP_WINDOW_BATCHES = 64


def epoch_order(lengths: np.ndarray, global_batch_size: int, seed: int, epoch: int,
                group_by_length: bool = False) -> np.ndarray:
  """The example order of one epoch: a permutation seeded by (seed, epoch).

  With `group_by_length`, each window of GROUP_WINDOW_BATCHES global batches is sorted by length and cut into
  batches, and the batches are shuffled: rows in a batch have similar lengths, so bucket padding wastes little,
  while the order stays random at the level of batches.
  """
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(len(lengths))
  if not group_by_length:
    return order
  window = GROUP_WINDOW_BATCHES * global_batch_size
  usable = len(order) // global_batch_size * global_batch_size
  grouped = [chunk[np.argsort(-lengths[chunk], kind="stable")] for chunk in np.split(order[:usable],
                                                                                    range(window, usable, window))]
  batches_in_order = np.concatenate(grouped).reshape(-1, global_batch_size)
  return np.concatenate([batches_in_order[rng.permutation(len(batches_in_order))].reshape(-1), order[usable:]])


class BatchIterator:
  """Endless iterator of this host's slice of each global batch, epoch after epoch; see the module docstring.

  lengths: tokens per example (what its row needs); collate(indices, length[, target_width]) -> batch, where
  target_width comes from `target_counts` (scored tokens per example) when given. With `fixed_shape` every batch
  has the shape the data's longest example and widest target count call for: one program for all of them
  (held-out batches, which are few and not worth a compilation per shape). global_batch_size must
  be divisible by process_count; host p gets rows [p*b, (p+1)*b) of each global batch, b = global_batch_size /
  process_count (process_index / process_count default to jax's; pass them to simulate hosts in tests).
  """

  def __init__(self, lengths: np.ndarray, collate: Callable[..., object], *, global_batch_size: int,
               seed: int, max_length: int, buckets: tuple[int, ...], group_by_length: bool = False,
               target_counts: np.ndarray | None = None, fixed_shape: bool = False, process_index: int | None = None,
               process_count: int | None = None):
    self.lengths = np.asarray(lengths)
    self.target_counts = None if target_counts is None else np.asarray(target_counts)
    self.collate = collate
    self.global_batch_size = global_batch_size
    self.seed = seed
    self.group_by_length = group_by_length
    self.fixed_shape = fixed_shape
    self.buckets = shapes.bucket_ladder(buckets, max_length)
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    too_long = np.flatnonzero(self.lengths > max_length)
    if too_long.size:
      raise ValueError(f"{too_long.size} examples are longer than max_length={max_length} (e.g. example "
                       f"{too_long[0]}: {self.lengths[too_long[0]]} tokens); tokenize with that max_length")
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f"process_index {self.process_index} is outside 0..{self.process_count - 1}")
    if global_batch_size % self.process_count:
      raise ValueError(f"global_batch_size={global_batch_size} is not divisible by the {self.process_count} hosts")
    self.batches_per_epoch, self.dropped_per_epoch = divmod(len(self.lengths), global_batch_size)
    if self.batches_per_epoch == 0:
      raise ValueError(f"{len(self.lengths)} examples are fewer than one global batch of {global_batch_size}")
    self.host_batch_size = global_batch_size // self.process_count
    self.epoch = self.position = 0
    self._cached_order: tuple[int, np.ndarray | None] = (-1, None)
    log.info("%d examples: %d batches of %d per epoch, %d dropped per epoch; buckets %s", len(self.lengths),
             self.batches_per_epoch, global_batch_size, self.dropped_per_epoch, self.buckets)

  def _order(self, epoch: int) -> np.ndarray:
    # One permutation per epoch, kept while the epoch lasts.
    if self._cached_order[0] != epoch:
      self._cached_order = (epoch, epoch_order(self.lengths, self.global_batch_size, self.seed, epoch,
                                               self.group_by_length))
    return self._cached_order[1]

  def global_indices(self, epoch: int, position: int) -> np.ndarray:
    """Example indices of global batch `position` of `epoch`."""
    start = position * self.global_batch_size
    return self._order(epoch)[start:start + self.global_batch_size]

  def __iter__(self):
    return self

  def __next__(self):
    batch = self.batch_at(self.epoch, self.position)
    self.epoch, self.position = self._after(self.epoch, self.position)
    return batch

  def _after(self, epoch: int, position: int) -> tuple[int, int]:
    position += 1
    return (epoch + 1, 0) if position == self.batches_per_epoch else (epoch, position)

  def shape_at(self, epoch: int, position: int) -> tuple[int, int | None]:
    """(row length, target width or None) of global batch `position` of `epoch`, without building it."""
    indices = self.global_indices(epoch, position)
    shape_from = slice(None) if self.fixed_shape else indices  # fixed: from all examples
    length = shapes.fit(int(self.lengths[shape_from].max()), self.buckets)
    # One target width for the whole global batch, so every host builds the same shapes.
    most = None if self.target_counts is None else int(self.target_counts[shape_from].max())
    width = None if most is None else shapes.target_width(most, length)
    return length, width

  def batch_at(self, epoch: int, position: int):
    """This host's slice of global batch `position` of `epoch`; the iterator does not move."""
    indices = self.global_indices(epoch, position)
    length, width = self.shape_at(epoch, position)
    start = self.process_index * self.host_batch_size
    host_indices = indices[start:start + self.host_batch_size]
    return self.collate(host_indices, length) if width is None else self.collate(host_indices, length, width)

  def first_of_each_shape(self, count: int) -> list[tuple[int, int]]:
    """(epoch, position) of the first batch of each distinct shape among the next `count` batches."""
    first: dict[tuple, tuple[int, int]] = {}
    epoch, position = self.epoch, self.position
    for _ in range(count):
      first.setdefault(self.shape_at(epoch, position), (epoch, position))
      epoch, position = self._after(epoch, position)
    return list(first.values())

  def state(self) -> dict[str, int]:
    """JSON-serialisable position of the iterator (the next batch to produce), for checkpoints."""
    return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_examples": len(self.lengths),
            "global_batch_size": self.global_batch_size}

  def restore(self, state: dict[str, int]) -> None:
    """Continues from a `state()`; refuses one taken over other data, seed or batch size."""
    expected = {k: v for k, v in self.state().items() if k not in ("epoch", "position")}
    different = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
    if different:
      raise ValueError(f"data iterator state does not match this run (saved, current): {different}")
    if not 0 <= state["position"] < self.batches_per_epoch:
      raise ValueError(f"data iterator position {state['position']} is outside 0..{self.batches_per_epoch - 1}")
    self.epoch, self.position = int(state["epoch"]), int(state["position"])


def _check_host_rows(sharding: jax.sharding.Sharding, global_rows: int) -> None:
  """The per-host slice (process p holds rows [p*b, (p+1)*b)) must be what the sharding puts on p's devices."""
  host_rows = global_rows // jax.process_count()
  start = jax.process_index() * host_rows
  covered = set()
  for index in sharding.addressable_devices_indices_map((global_rows,)).values():
    covered.update(range(global_rows)[index[0]])
  if covered != set(range(start, start + host_rows)):
    raise ValueError(f"the batch sharding puts rows {sorted(covered)[:4]}… on process {jax.process_index()}, not its "
                     f"slice [{start}, {start + host_rows}): lay the mesh's batch axes out in process order")


def to_global(host_batch, sharding: jax.sharding.Sharding):
  """A batch (any pytree of arrays: a layout's batch type) of global jax arrays from every host's slice, split along
  the batch axis by `sharding`.

  sharding: over the leading (batch) axis only, e.g. `parallel.batch_sharding(mesh)`; it applies to [B] and
  [B, L] arrays alike.
  """
  global_rows = len(jax.tree.leaves(host_batch)[0]) * jax.process_count()
  _check_host_rows(sharding, global_rows)
  return jax.tree.map(lambda value: jax.make_array_from_process_local_data(sharding, value), host_batch)
