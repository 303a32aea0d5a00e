"""Fixed shapes: bucket ladders, fitting a length to a bucket, and sorted fixed-size batches scattered back in order.

A run compiles one program per shape, so every batched path (training batches, the reference pass, sampling,
judges) pads rows to a few bucket lengths and fills batches to a fixed row count; these are the helpers they share.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bucket_ladder(buckets: Sequence[int], max_length: int) -> tuple[int, ...]:
  """The buckets below `max_length`, then `max_length` itself: every row fits the last one."""
  return tuple(sorted({b for b in buckets if b < max_length} | {max_length}))


def power_ladder(max_length: int | None, smallest: int = 64) -> tuple[int, ...]:
  """Powers of two from `smallest` below `max_length`, then `max_length` itself (512 when None): e.g. 64, 128,
  256, 512."""
  max_length = max_length or 512
  powers = []
  length = smallest
  while length < max_length:
    powers.append(length)
    length *= 2
  return (*powers, max_length)


def fit(length: int, buckets: Sequence[int], *, beyond: bool = False) -> int:
  """The smallest bucket that holds `length` tokens. Past the last bucket: an error, or with `beyond` the next
  multiple of the last bucket (for rows no limit was put on)."""
  ladder = sorted(buckets)
  for bucket in ladder:
    if length <= bucket:
      return bucket
  if beyond:
    return -(-length // ladder[-1]) * ladder[-1]
  raise ValueError(f"a row of {length} tokens does not fit the largest bucket {ladder[-1]}")


def target_width(most_targets: int, length: int) -> int:
  """The smallest of length/8, length/4, length/2 and length that holds `most_targets` scored tokens (so a row
  length compiles at most four programs)."""
  return next(w for w in (length // 8, length // 4, length // 2, length) if w >= max(most_targets, 1))


def sorted_chunks(lengths: Sequence[int], batch_size: int, *, longest_first: bool = False) -> list[np.ndarray]:
  """Example indices sorted by length (stable), cut into chunks of `batch_size` (the last may be shorter)."""
  lengths = np.asarray(lengths)
  order = np.argsort(-lengths if longest_first else lengths, kind="stable")
  return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def fill(chunk: np.ndarray, batch_size: int) -> np.ndarray:
  """`chunk` made a full batch of `batch_size` by repeating its first index (the filler rows' results are
  dropped): every batch then has one static shape."""
  return np.concatenate([chunk, np.repeat(chunk[:1], batch_size - len(chunk))])


def scatter(chunks: Sequence[np.ndarray], outputs: Sequence[np.ndarray], count: int) -> np.ndarray:
  """The chunks' per-row outputs ([batch_size, ...] each, filler rows last) put back in example order: [count, ...]."""
  first = np.asarray(outputs[0])
  out = np.zeros((count, *first.shape[1:]), first.dtype)
  for chunk, output in zip(chunks, outputs):
    out[chunk] = np.asarray(output)[:len(chunk)]
  return out
