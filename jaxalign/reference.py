"""Precomputed DPO reference log-probs: one forward pass of the starting model over every train pair, cached on disk.

The reference is then not in memory while training and costs no forward per step. The cache key is a fingerprint
of the reference weights, the tokenized pairs and the compute dtype, so a rerun (or a resumed run) reads the file
instead of recomputing, and any change to weights or data recomputes.
"""

from __future__ import annotations

import hashlib
import logging
import os

import jax
import numpy as np
from flax import nnx

from jaxalign import cache, parallel, tasks
from jaxalign.data import batches as batches_lib, pipeline, tokenize
from jaxalign.models import hub

log = logging.getLogger(__name__)


def fingerprint(model: nnx.Module, pairs, dtype: str) -> str:
  """A digest of the model's parameters (gathered to the host), the pairs' token ids and the compute dtype."""
  digest = hashlib.blake2b(digest_size=16)
  digest.update(dtype.encode())
  for path, variable in sorted(nnx.to_flat_state(nnx.state(model, nnx.Param)), key=lambda kv: str(kv[0])):
    digest.update(str(path).encode())
    digest.update(np.ascontiguousarray(hub.host_numpy(variable.get_value())).tobytes())
  for ids in (*pairs.prompt_ids, *pairs.chosen_ids, *pairs.rejected_ids):
    digest.update(np.asarray(ids, np.int32).tobytes())
    digest.update(b"|")
  return digest.hexdigest()


def compute_logps(model: nnx.Module, pairs, *, batch_size: int, buckets: tuple[int, ...], max_length: int,
                  pad_id: int, mesh, prefix_sharing: bool = False, packing: bool = False) -> np.ndarray:
  """(chosen, rejected) summed response log-probs of every pair, [N, 2], in length-sorted batches of `batch_size`
  rows: one pair per row, as prefix-shared rows when `prefix_sharing` (the prompt computed once), or packed
  prefix-shared rows of `max_length` tokens when `packing` (as the packed training batches are)."""
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, batch: tasks.dpo_logprobs(nnx.merge(graphdef, state), batch))
  sharding = parallel.batch_sharding(mesh)
  if packing:
    packed = tokenize.pack_pairs(pairs, capacity=max_length)
    data, collate, lengths, pair_index = packed, batches_lib.collate_packed_pairs, packed.lengths, packed.pair_index
    targets = batches_lib.packed_target_counts(packed)
  else:
    data, collate = pairs, (batches_lib.collate_dpo_shared if prefix_sharing else batches_lib.collate_dpo)
    lengths = pairs.shared_lengths if prefix_sharing else pairs.lengths
    pair_index = np.arange(len(lengths))[:, None]
    targets = batches_lib.pair_target_counts(pairs, shared=prefix_sharing)
  if prefix_sharing:
    max_length *= 2  # prompt + both responses
  buckets = batches_lib.bucket_lengths(tuple(buckets) + (max_length,), max_length)
  order = np.argsort(lengths, kind="stable")
  host_rows = batch_size // jax.process_count()
  chunks = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
  bucket_of = [batches_lib.pick_bucket(int(lengths[chunk].max()), buckets) for chunk in chunks]
  # One width per row length (the most any row of that length needs): one program per bucket, not per width.
  width_of = {length: batches_lib.target_width(int(targets[lengths <= length].max()), length)
              for length in set(bucket_of)}

  def global_batch(chunk: np.ndarray, length: int) -> dict[str, jax.Array]:
    padded = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - len(chunk))])  # a full batch: static shape
    mine = padded[jax.process_index() * host_rows:(jax.process_index() + 1) * host_rows]
    batch = collate(data, mine, length, pad_id, width_of[length])
    batch.pop("pair_index", None)
    return batches_lib.to_global(batch, sharding)

  first_of_length = dict(zip(bucket_of[::-1], chunks[::-1]))
  parallel.compile_all([forward.lower(state, global_batch(chunk, length)) for length, chunk in first_of_length.items()])
  out = np.zeros((len(pairs.prompt_ids), 2), np.float64)
  for chunk, length in zip(chunks, bucket_of):
    chosen, rejected = forward(state, global_batch(chunk, length))
    index = pair_index[chunk]
    present = index >= 0
    out[index[present], 0] = hub.host_numpy(chosen).reshape(batch_size, -1)[:len(chunk)][present]
    out[index[present], 1] = hub.host_numpy(rejected).reshape(batch_size, -1)[:len(chunk)][present]
  return out


def cached_logps(model: nnx.Module, pairs, config, mesh, pad_id: int) -> np.ndarray:
  """The reference log-probs of `pairs`, from the cache when this model and these pairs were seen before."""
  layout = f"shared{config.data.prefix_sharing}-packed{config.data.packing}"
  key = fingerprint(model, pairs, f"{config.model.dtype}-{layout}")
  path = os.path.join(pipeline.cache_dir(config), "reference", f"logps-{key}.npy")
  cached = cache.read(path, lambda payload: cache.npz_arrays(payload)["logps"], "reference log-prob cache")
  if cached is not None:
    log.info("reference log-probs read from %s", path)
    return cached
  log.info("computing reference log-probs for %d pairs (cached in %s)", len(pairs.prompt_ids), path)
  logps = compute_logps(model, pairs, batch_size=config.training.batch_size // config.training.grad_accum,
                        buckets=tuple(config.data.buckets), max_length=config.data.max_length, pad_id=pad_id,
                        mesh=mesh, prefix_sharing=config.data.prefix_sharing, packing=config.data.packing)
  if jax.process_index() == 0:
    cache.write(path, cache.npz_bytes(logps=logps))  # atomic and checksummed: a damaged file is rebuilt
  return logps


def attach_precomputed(model: nnx.Module, data: pipeline.TrainingData, config, mesh, pad_id: int) -> None:
  """Computes (or reads) the starting model's log-probs on the train and held-out pairs and adds them to batches."""
  eval_logps = cached_logps(model, data.eval_pairs, config, mesh, pad_id) if data.eval_pairs is not None else None
  data.attach_reference_logps(cached_logps(model, data.train_pairs, config, mesh, pad_id), eval_logps)
