"""Static-shape batches: bucketed padding, a deterministic resumable iterator, per-host slices, global jax arrays.

A batch is a dict of numpy arrays, right-padded with the pad id to one of a few bucket lengths (so a run compiles a
handful of programs), the smallest bucket that holds the longest row of the *global* batch (so every host agrees).

  SFT:  input_ids [B, L] int32, attention_mask [B, L] int32 (1 = real token), loss_mask [B, L] float32
        (loss_mask[:, t] = 1: token t is a target, predicted from tokens < t); packed rows add segment_ids [B, L]
        int32 (1, 2, 3… per example, 0 = padding) and positions [B, L] int32 (0-based per example, 0 on padding).
  DPO:  chosen_input_ids, chosen_attention_mask, chosen_loss_mask, and the same for rejected_ (all [B, L], chosen
        and rejected padded to the same L so they can run as one [2B, L] forward), plus prompt_length [B] int32
        (the shared prompt's token count; the loss masks are 1 exactly on the response tokens). Prefix-shared
        rows (`collate_dpo_shared`) hold prompt + chosen + rejected as one sequence; packed ones
        (`collate_packed_pairs`) several such sequences, kept apart by segment_ids.

Order: epoch e visits the examples in `epoch_order` (a permutation seeded by [seed, e], optionally grouped by
length), in consecutive global
batches of `global_batch_size`; the last `n % global_batch_size` examples of each permutation are dropped (counted
in `dropped_per_epoch`; a different permutation drops different ones next epoch). The iterator's state is
{epoch, position} (plus checks), so a restored run continues with exactly the batches it would have seen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import jax
import numpy as np

from jaxalign.data.tokenize import PackedPairs, SFTExamples, TokenizedPairs

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (128, 256, 512, 1024)


def bucket_lengths(buckets: tuple[int, ...], max_length: int) -> tuple[int, ...]:
  """The buckets below `max_length`, then `max_length` itself: every row fits the last one."""
  return tuple(sorted({b for b in buckets if b < max_length} | {max_length}))


def pick_bucket(length: int, buckets: tuple[int, ...]) -> int:
  """The smallest bucket that holds `length` tokens."""
  for bucket in buckets:
    if length <= bucket:
      return bucket
  raise ValueError(f"a row of {length} tokens does not fit the largest bucket {buckets[-1]}")


def _pad(rows: list[np.ndarray], length: int, value, dtype) -> np.ndarray:
  out = np.full((len(rows), length), value, dtype)
  for i, row in enumerate(rows):
    out[i, :len(row)] = row
  return out


def _sequences(ids: list[np.ndarray], loss: list[np.ndarray], length: int, pad_id: int) -> dict[str, np.ndarray]:
  return {
      "input_ids": _pad(ids, length, pad_id, np.int32),
      "attention_mask": _pad([np.ones(len(row), np.int32) for row in ids], length, 0, np.int32),
      "loss_mask": _pad(loss, length, 0, np.float32),
  }


def target_width(most_targets: int, length: int) -> int:
  """The smallest of length/8, length/4, length/2 and length that holds `most_targets` scored tokens (so a row
  length compiles at most four programs)."""
  return next(w for w in (length // 8, length // 4, length // 2, length) if w >= max(most_targets, 1))


def target_positions(loss_masks: list[np.ndarray], length: int,
                     width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Where each row's scored tokens are: positions [rows, width] (0-padded) and a validity mask [rows, width].

  The loss needs the language-model head only at these positions, and for HH pairs most tokens (the prompt,
  the padding) are not scored. `width` defaults to `target_width` of these rows; the iterator passes the global
  batch's so that every host builds the same shape.
  """
  positions = [np.flatnonzero(mask) for mask in loss_masks]
  if width is None:
    width = target_width(max((len(p) for p in positions), default=0), length)
  out = np.zeros((len(positions), width), np.int32)
  valid = np.zeros((len(positions), width), np.float32)
  for row, p in enumerate(positions):
    out[row, :len(p)] = p
    valid[row, :len(p)] = 1.0
  return out, valid


def collate_sft(examples: SFTExamples, indices: np.ndarray, length: int, pad_id: int,
                target_width: int | None = None) -> dict[str, np.ndarray]:
  """The SFT batch of `examples[indices]`, right-padded to `length`, with its `targets` / `target_mask`."""
  batch = _sequences([examples.input_ids[i] for i in indices], [examples.loss_mask[i] for i in indices], length,
                     pad_id)
  batch["targets"], batch["target_mask"] = target_positions(list(batch["loss_mask"]), length, target_width)
  if examples.segment_ids is not None:
    batch["segment_ids"] = _pad([examples.segment_ids[i] for i in indices], length, 0, np.int32)
    batch["positions"] = _pad([examples.positions[i] for i in indices], length, 0, np.int32)
  return batch


def _response_rows(pairs: TokenizedPairs, responses: list[np.ndarray], indices: np.ndarray):
  """(ids, loss masks) of prompt + response rows; the loss marks the response tokens only."""
  ids, loss = [], []
  for i in indices:
    prompt, response = pairs.prompt_ids[i], responses[i]
    ids.append(np.concatenate([prompt, response]))
    loss.append(np.concatenate([np.zeros(len(prompt), np.float32), np.ones(len(response), np.float32)]))
  return ids, loss


def collate_dpo(pairs: TokenizedPairs, indices: np.ndarray, length: int, pad_id: int,
                target_width: int | None = None) -> dict[str, np.ndarray]:
  """The DPO batch of `pairs[indices]`: chosen_* and rejected_* rows right-padded to `length` (with targets of one
  width, so they can run as one [2B, L] forward), and prompt_length."""
  batch = {}
  for side, responses in (("chosen", pairs.chosen_ids), ("rejected", pairs.rejected_ids)):
    for key, value in _sequences(*_response_rows(pairs, responses, indices), length, pad_id).items():
      batch[f"{side}_{key}"] = value
  targets, valid = target_positions(list(batch["chosen_loss_mask"]) + list(batch["rejected_loss_mask"]), length,
                                    target_width)
  rows = len(indices)
  batch.update(chosen_targets=targets[:rows], chosen_target_mask=valid[:rows], rejected_targets=targets[rows:],
               rejected_target_mask=valid[rows:])
  batch["prompt_length"] = np.array([len(pairs.prompt_ids[i]) for i in indices], np.int32)
  return batch


# response_side values of a prefix-shared DPO row.
PROMPT_SIDE, CHOSEN_SIDE, REJECTED_SIDE, PAD_SIDE = 0, 1, 2, 3


def pair_target_counts(pairs: TokenizedPairs, shared: bool) -> np.ndarray:
  """Scored tokens per pair in a row: both responses in a prefix-shared row, else the longer response."""
  combine = (lambda c, r: c + r) if shared else max
  return np.array([combine(len(c), len(r)) for c, r in zip(pairs.chosen_ids, pairs.rejected_ids)], np.int64)


def packed_target_counts(packed: PackedPairs) -> np.ndarray:
  """Scored tokens per packed row: both responses of each of its pairs."""
  per_pair = pair_target_counts(packed.pairs, shared=True)
  return np.array([per_pair[row].sum() for row in packed.rows], np.int64)


def collate_dpo_shared(pairs: TokenizedPairs, indices: np.ndarray, length: int, pad_id: int,
                       target_width: int | None = None) -> dict[str, np.ndarray]:
  """Prefix-shared DPO rows: prompt, chosen, rejected as ONE sequence, so the prompt is computed once.

  input_ids / attention_mask [B, L]; positions [B, L]: the rejected response restarts right after the prompt (it
  sees the positions it would see alone); response_side [B, L]: 0 prompt, 1 chosen, 2 rejected, 3 padding (the
  model masks rejected->chosen attention with it); predecessor [B, L]: the slot whose logits predict each token
  (t - 1, except the first rejected token, predicted from the prompt's last slot); targets / target_mask [B, S]:
  the response tokens' positions (`target_positions`); chosen_end / rejected_end [B]: the slot of the last chosen /
  rejected token (where a reward model reads its score); prompt_length [B].
  """
  batch = _shared_rows(pairs, [[i] for i in indices], length, pad_id, target_width, pairs_per_row=1)
  del batch["segment_ids"]  # one pair per row
  batch["chosen_end"], batch["rejected_end"] = batch["chosen_end"][:, 0], batch["rejected_end"][:, 0]
  batch["prompt_length"] = np.array([len(pairs.prompt_ids[i]) for i in indices], np.int32)
  return batch


def collate_packed_pairs(packed: PackedPairs, indices: np.ndarray, length: int, pad_id: int,
                       target_width: int | None = None) -> dict[str, np.ndarray]:
  """Packed prefix-shared pair rows (`tokenize.pack_pairs`): rows `indices` of `packed`, each holding whole pairs.

  The fields of `collate_dpo_shared` (positions restart at every pair; predecessor counts slots in the row), plus
  segment_ids [B, L] (k = the row's k-th pair, 1-based; 0 padding: no attention across pairs), pair_mask [B, K]
  (1 where the row has a k-th pair; K = the most pairs any row holds, so every batch has one shape), pair_index
  [B, K] (the pairs' indices in `packed.pairs`, -1 where none; for per-pair extras such as reference log-probs);
  chosen_end / rejected_end are [B, K] (0 where no pair).
  """
  pair_index = packed.pair_index[indices]
  batch = _shared_rows(packed.pairs, [packed.rows[r] for r in indices], length, pad_id, target_width,
                       pairs_per_row=pair_index.shape[1])
  batch["pair_mask"] = (pair_index >= 0).astype(np.int32)
  batch["pair_index"] = pair_index
  return batch


def _shared_rows(pairs: TokenizedPairs, rows: list, length: int, pad_id: int, target_width: int | None, *,
                 pairs_per_row: int) -> dict[str, np.ndarray]:
  """Rows of prompt + chosen + rejected sequences, one sequence per pair of each row's pair list."""
  fields = {"input_ids": [], "positions": [], "response_side": [], "predecessor": [], "segment_ids": []}
  ends = np.zeros((2, len(rows), pairs_per_row), np.int32)  # last chosen / rejected slot per pair
  for r, row in enumerate(rows):
    pieces = {key: [] for key in fields}
    start = 0
    for segment, i in enumerate(row, 1):
      prompt, chosen, rejected = pairs.prompt_ids[i], pairs.chosen_ids[i], pairs.rejected_ids[i]
      n_prompt, n_chosen, n_rejected = len(prompt), len(chosen), len(rejected)
      n = n_prompt + n_chosen + n_rejected
      predecessor = np.arange(start - 1, start + n - 1, dtype=np.int32)
      predecessor[0] = start
      predecessor[n_prompt + n_chosen] = start + n_prompt - 1
      pieces["input_ids"].append(np.concatenate([prompt, chosen, rejected]))
      pieces["positions"].append(np.concatenate([np.arange(n_prompt + n_chosen), n_prompt + np.arange(n_rejected)]))
      pieces["response_side"].append(np.repeat(np.array([PROMPT_SIDE, CHOSEN_SIDE, REJECTED_SIDE], np.int32),
                                               [n_prompt, n_chosen, n_rejected]))
      pieces["predecessor"].append(predecessor)
      pieces["segment_ids"].append(np.full(n, segment, np.int32))
      ends[:, r, segment - 1] = start + n_prompt + n_chosen - 1, start + n - 1
      start += n
    for key, values in pieces.items():
      fields[key].append(np.concatenate(values))
  side = _pad(fields["response_side"], length, PAD_SIDE, np.int32)
  targets, valid = target_positions(list((side == CHOSEN_SIDE) | (side == REJECTED_SIDE)), length, target_width)
  return {
      "input_ids": _pad(fields["input_ids"], length, pad_id, np.int32),
      "attention_mask": _pad([np.ones(len(r), np.int32) for r in fields["input_ids"]], length, 0, np.int32),
      "positions": _pad(fields["positions"], length, 0, np.int32),
      "response_side": side,
      "predecessor": _pad(fields["predecessor"], length, 0, np.int32),
      "segment_ids": _pad(fields["segment_ids"], length, 0, np.int32),
      "targets": targets,
      "target_mask": valid,
      "chosen_end": ends[0],
      "rejected_end": ends[1],
  }


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

  lengths: tokens per example (what its row needs); collate(indices, length[, target_width]) -> batch dict, where
  target_width comes from `target_counts` (scored tokens per example) when given. With `fixed_shape` every batch
  has the shape the data's longest example and widest target count call for: one program for all of them
  (held-out batches, which are few and not worth a compilation per shape). global_batch_size must
  be divisible by process_count; host p gets rows [p*b, (p+1)*b) of each global batch, b = global_batch_size /
  process_count (process_index / process_count default to jax's; pass them to simulate hosts in tests).
  """

  def __init__(self, lengths: np.ndarray, collate: Callable[[np.ndarray, int], dict], *, global_batch_size: int,
               seed: int, max_length: int, buckets: tuple[int, ...] = DEFAULT_BUCKETS, group_by_length: bool = False,
               target_counts: np.ndarray | None = None, fixed_shape: bool = False, process_index: int | None = None,
               process_count: int | None = None):
    self.lengths = np.asarray(lengths)
    self.target_counts = None if target_counts is None else np.asarray(target_counts)
    self.collate = collate
    self.global_batch_size = global_batch_size
    self.seed = seed
    self.group_by_length = group_by_length
    self.fixed_shape = fixed_shape
    self.buckets = bucket_lengths(buckets, max_length)
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

  def __next__(self) -> dict[str, np.ndarray]:
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
    length = pick_bucket(int(self.lengths[shape_from].max()), self.buckets)
    # One target width for the whole global batch, so every host builds the same shapes.
    width = None if self.target_counts is None else target_width(int(self.target_counts[shape_from].max()), length)
    return length, width

  def batch_at(self, epoch: int, position: int) -> dict[str, np.ndarray]:
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


def _collator(collate, data, pad_id: int, with_index: bool):
  def make(indices: np.ndarray, length: int, width: int) -> dict[str, np.ndarray]:
    batch = collate(data, indices, length, pad_id, width)
    if with_index:
      batch["index"] = indices  # each row's example, for per-example extras (reference log-probs, reward heads)
    return batch

  return make


def sft_batches(examples: SFTExamples, *, pad_id: int, with_index: bool = False, **kwargs) -> BatchIterator:
  """A BatchIterator over SFT examples or packed rows; kwargs as BatchIterator's."""
  targets = np.array([int(mask.sum()) for mask in examples.loss_mask], np.int64)
  return BatchIterator(examples.lengths, _collator(collate_sft, examples, pad_id, with_index), target_counts=targets,
                       **kwargs)


def dpo_batches(pairs: TokenizedPairs, *, pad_id: int, shared: bool = False, with_index: bool = False,
                **kwargs) -> BatchIterator:
  """A BatchIterator over tokenized preference pairs, as separate chosen / rejected rows or prefix-shared rows
  (whose lengths, and so `max_length`, reach prompt + both responses); kwargs as BatchIterator's."""
  collate, lengths = (collate_dpo_shared, pairs.shared_lengths) if shared else (collate_dpo, pairs.lengths)
  return BatchIterator(lengths, _collator(collate, pairs, pad_id, with_index),
                       target_counts=pair_target_counts(pairs, shared), **kwargs)


def packed_pair_batches(packed: PackedPairs, *, pad_id: int, with_index: bool = False, **kwargs) -> BatchIterator:
  """A BatchIterator over packed prefix-shared pair rows (`tokenize.pack_pairs`): its examples are rows, so
  global_batch_size counts rows, and `max_length` must hold the longest (an oversize pair's); kwargs as
  BatchIterator's."""
  return BatchIterator(packed.lengths, _collator(collate_packed_pairs, packed, pad_id, with_index),
                       target_counts=packed_target_counts(packed), **kwargs)


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


def to_global(host_batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """Global jax arrays from every host's slice, split along the batch axis by `sharding`.

  sharding: over the leading (batch) axis only, e.g. `parallel.batch_sharding(mesh)`; it applies to [B] and
  [B, L] arrays alike.
  """
  global_rows = len(next(iter(host_batch.values()))) * jax.process_count()
  _check_host_rows(sharding, global_rows)
  return {key: jax.make_array_from_process_local_data(sharding, value) for key, value in host_batch.items()}
