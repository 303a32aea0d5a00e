"""The reference of a task whose loss needs one (`task.uses_reference`: DPO's losses with a reference term, KTO),
prepared before the batch source is built: what the step needs of it, decided by the loss. KTO's examples travel as
pairs (completion, mismatched completion), so all of the modes below serve it unchanged. Inside the step the
reference answers for itself (`Reference.model`): a model to run, or None.

`prepare` returns one of:
  none         the loss has no reference term (e.g. `reference_free`): nothing is built, loaded or run;
  model        a frozen copy of the starting model, run in every step;
  lora_off     with LoRA adapters: the trained model itself with its adapters off (no copy);
  precomputed  the starting model's log-probs of every pair, from one pass over the data before training (in the
               layout each split's batches have), cached on disk; they travel with the batches by name
               (`PER_PAIR_NAMES`), so the reference is not in memory and costs no forward per step.

The cache key is a fingerprint of the reference weights, the tokenized pairs, the layout and the compute dtype, so
a rerun (or a resumed run) reads the file instead of recomputing, and any change to weights or data recomputes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign import cache, logprobs, parallel, shapes, tasks
from jaxalign.data import batches as batches_lib, layouts, pipeline

log = logging.getLogger(__name__)

PER_PAIR_NAMES = ("reference_chosen_logps", "reference_rejected_logps")


@dataclasses.dataclass
class Reference:
  """What the step needs of the reference (see the module docstring). `state`: the frozen copy's parameters (mode
  "model"); `logps`: per split name, [pairs, 2] chosen / rejected log-probs (mode "precomputed")."""

  mode: str
  graphdef: Any = None
  state: Any = None
  logps: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  @property
  def arrays(self):
    """What the compiled step takes as the reference's input: the frozen copy's parameters, or None."""
    return self.state

  def model(self, graphdef, params, rest, arrays) -> nnx.Module | None:
    """The reference model inside the step, from the policy's graph, trained parameters and rest, and `arrays`; None
    when there is none or its log-probs travel with the batch (precomputed)."""
    if self.mode == "lora_off":
      return nnx.merge(graphdef, jax.tree.map(jnp.zeros_like, params), rest)
    if self.mode == "model":
      return nnx.merge(self.graphdef, arrays)
    return None

  @property
  def runs_forward(self) -> bool:
    """Whether each step runs a reference forward (counted in the step's FLOPs)."""
    return self.mode in ("model", "lora_off")

  def per_pair(self) -> dict[str, dict[str, np.ndarray]]:
    """Per split name, the arrays the batches carry (precomputed log-probs), for `pipeline.streams`."""
    return {split: dict(zip(PER_PAIR_NAMES, logps.T.astype(np.float32))) for split, logps in self.logps.items()}


def fingerprint(model: nnx.Module, pairs, settings: str) -> str:
  """A digest of the model's parameters (gathered to the host), the pairs' token ids and `settings`."""
  digest = hashlib.blake2b(digest_size=16)
  digest.update(settings.encode())
  for path, variable in sorted(nnx.to_flat_state(nnx.state(model, nnx.Param)), key=lambda kv: str(kv[0])):
    digest.update(str(path).encode())
    digest.update(np.ascontiguousarray(parallel.host_numpy(variable.get_value())).tobytes())
  for ids in (*pairs.prompt_ids, *pairs.chosen_ids, *pairs.rejected_ids):
    digest.update(np.asarray(ids, np.int32).tobytes())
    digest.update(b"|")
  return digest.hexdigest()


def compute_logps(model: nnx.Module, layout: layouts.PairLayout, examples, *, batch_size: int, pad_id: int,
                  mesh, logprob_chunks: logprobs.Chunks = logprobs.UNCHUNKED) -> np.ndarray:
  """(chosen, rejected) summed response log-probs of every pair of `examples`, [pairs, 2], in the batches of
  `layout` (length-sorted, `batch_size` rows each, padded to the layout's buckets)."""
  graphdef, state = nnx.split(model)
  logps = lambda state, batch: tasks.pair_logprobs(nnx.merge(graphdef, state), batch, chunks=logprob_chunks)
  forward = jax.jit(lambda state, batch: jnp.stack(logps(state, batch)[:2], -1))
  sharding = parallel.batch_sharding(mesh)
  lengths, counts = layout.lengths(examples), layout.target_counts(examples)
  host_rows = batch_size // jax.process_count()
  chunks = shapes.sorted_chunks(lengths, batch_size)
  bucket_of = [shapes.fit(int(lengths[chunk].max()), layout.ladder) for chunk in chunks]
  # One width per row length (the most any row of that length needs): one program per bucket, not per width.
  width_of = {length: shapes.target_width(int(counts[lengths <= length].max()), length) for length in set(bucket_of)}

  def global_batch(chunk: np.ndarray, length: int):
    mine = shapes.fill(chunk, batch_size)[jax.process_index() * host_rows:(jax.process_index() + 1) * host_rows]
    return batches_lib.to_global(layout.collate(examples, mine, length, pad_id, width_of[length]), sharding)

  first_of_length = dict(zip(bucket_of[::-1], chunks[::-1]))
  parallel.compile_all([forward.lower(state, global_batch(chunk, length)) for length, chunk in first_of_length.items()])
  per_row = shapes.scatter(chunks, [parallel.host_numpy(forward(state, global_batch(chunk, length)))
                                    for chunk, length in zip(chunks, bucket_of)], len(lengths))  # [rows, K, 2]
  pair_index = layout.pair_index(examples, np.arange(len(lengths)))
  out = np.zeros((layout.num_pairs(examples), 2), np.float64)
  present = pair_index >= 0
  out[pair_index[present]] = per_row.reshape(len(lengths), -1, 2)[present]
  return out


def cached_logps(model: nnx.Module, split: pipeline.Split, config, mesh, pad_id: int) -> np.ndarray:
  """The reference log-probs of a split's pairs, from the cache when this model and these pairs were seen before."""
  layout, examples = split.layout, split.examples
  key = fingerprint(model, layout.pairs_of(examples), f"{config.model.dtype}-{layout!r}")
  path = os.path.join(pipeline.cache_dir(config), "reference", f"logps-{key}.npy")
  cached = cache.read(path, lambda payload: cache.npz_arrays(payload)["logps"], "reference log-prob cache")
  if cached is not None:
    log.info("reference log-probs read from %s", path)
    return cached
  log.info("computing reference log-probs for %d pairs (cached in %s)", layout.num_pairs(examples), path)
  logps = compute_logps(model, layout, examples, batch_size=config.training.batch_size // config.training.grad_accum,
                        pad_id=pad_id, mesh=mesh, logprob_chunks=logprobs.configured(config.model))
  if jax.process_index() == 0:
    cache.write(path, cache.npz_bytes(logps=logps))  # atomic and checksummed: a damaged file is rebuilt
  return logps


def prepare(task, model: nnx.Module, data: pipeline.StageData, config, mesh, pad_id: int) -> Reference:
  """What the step needs of the reference, before any stream exists (see the module docstring)."""
  if not task.uses_reference:
    log.info("task %s's loss has no reference term: no reference is built or run (dpo.reference=%s unused)",
             config.task, config.dpo.reference)
    return Reference("none")
  if config.dpo.reference == "model":
    if config.lora.enabled:
      return Reference("lora_off")
    graphdef, state = nnx.split(model)
    # A copy (never aliasing the trained parameters, which the step donates), optionally in lower precision.
    state = jax.tree.map(lambda x: jnp.array(x, dtype=config.dpo.reference_dtype, copy=True), state)
    return Reference("model", graphdef, state)
  return Reference("precomputed", logps={name: cached_logps(model, split, config, mesh, pad_id)
                                         for name, split in data.splits().items()})
