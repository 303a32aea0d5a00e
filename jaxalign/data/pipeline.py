"""From a stage config to what the training loop reads: a resumable stream of sharded global batches and a fixed
set of held-out batches. Glue over hh -> tokenize -> batches; the decisions live in those modules.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os

import jax
import numpy as np

from jaxalign import parallel
from jaxalign.data import batches as batches_lib, hh, synthetic, tokenize
from jaxalign.tokenizer import train_bpe_tokenizer

log = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
SYNTHETIC_TEST_FRACTION = 0.1
SYNTHETIC_VOCAB_SIZE = 1024


def cache_dir(config) -> str:
  """Where tokenized data, synthetic data and reference log-probs are cached (shared by runs and stages)."""
  return config.data.cache_dir or default_cache_dir()


def default_cache_dir() -> str:
  return os.environ.get("JAXALIGN_CACHE", os.path.expanduser("~/.cache/jaxalign"))


def synthetic_dir(cache: str, num_pairs: int, seed: int) -> str:
  """Where the synthetic HH set of `num_pairs` train pairs for `seed` is written in the cache."""
  return os.path.join(cache, f"synthetic-hh-{num_pairs}-seed{seed}")


def data_source(config) -> str:
  """The data location to load: `data.source`, or the synthetic set written (once) into the cache."""
  if config.data.source != SYNTHETIC:
    return config.data.source
  out = synthetic_dir(cache_dir(config), config.data.synthetic_pairs, config.seed)
  if not os.path.exists(os.path.join(out, "done")) and jax.process_index() == 0:
    n_train = config.data.synthetic_pairs
    synthetic.write_synthetic_hh(out, n_train=n_train, n_test=max(1, int(n_train * SYNTHETIC_TEST_FRACTION)),
                                 seed=config.seed)
    open(os.path.join(out, "done"), "w").close()
  return out


def tokenizer_path(config, workdir: str) -> str:
  """`config.tokenizer`, or for "synthetic" a tiny byte-level BPE trained (once) on the synthetic corpus."""
  if config.tokenizer != SYNTHETIC:
    return config.tokenizer
  out = os.path.join(cache_dir(config), f"synthetic-tokenizer-{SYNTHETIC_VOCAB_SIZE}")
  if not os.path.exists(os.path.join(out, "tokenizer.json")) and jax.process_index() == 0:
    train_bpe_tokenizer(synthetic.synthetic_corpus(seed=0), out, vocab_size=SYNTHETIC_VOCAB_SIZE)
  return out


def head_index(source: str, heads: tuple[str, ...]) -> int:
  """Which reward head a pair trains: the head whose name appears in its source (e.g. 'harmless' in harmless-base)."""
  if len(heads) == 1:
    return 0
  matches = [i for i, name in enumerate(heads) if name in source]
  if len(matches) != 1:
    raise ValueError(f"cannot tell which reward head {heads} a pair from {source!r} trains: name each head after "
                     "part of its subsets' names (e.g. 'harmless' for harmless-base, 'helpful' for helpful-*)")
  return matches[0]


class TrainStream:
  """Global batches for the train step: this host's rows from the iterator, made into sharded jax arrays.

  `extra_fields(indices)` adds per-example arrays (reward heads, precomputed reference log-probs) by example index
  (by pair index [rows, K] for packed pair rows, -1 where a row has no k-th pair).
  Reward models have no LM head, so their batches leave out the scored-token positions (whose varying width would
  only cost compilations). `last_shape` is (rows, row length, scored positions per row) of the last batch.
  """

  def __init__(self, iterator: batches_lib.BatchIterator, sharding, extra_fields=None, with_targets: bool = True):
    self.iterator = iterator
    self.sharding = sharding
    self.extra_fields = extra_fields
    self.with_targets = with_targets
    self.last_shape: tuple[int, ...] = ()

  def next_global(self) -> dict[str, jax.Array]:
    return self._global(next(self.iterator))

  def shape_examples(self, count: int) -> list[dict[str, jax.Array]]:
    """One global batch of each distinct shape among the next `count` (to compile for); the stream does not move."""
    return [self._global(self.iterator.batch_at(epoch, position))
            for epoch, position in self.iterator.first_of_each_shape(count)]

  def _global(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    indices = batch.pop("index")
    if "pair_index" in batch:  # packed rows: per-pair extras go by pair
      indices = batch.pop("pair_index")
    if self.extra_fields is not None:
      batch.update(self.extra_fields(indices))
    target_keys = [k for k in batch if k.endswith(("targets", "target_mask"))]
    width = max((batch[k].shape[1] for k in target_keys), default=0)
    if not self.with_targets:
      for key in target_keys:
        del batch[key]
      width = 0
    rows = next(iter(batch.values()))
    self.last_shape = (rows.shape[0] * jax.process_count(), rows.shape[1], width)
    return batches_lib.to_global(batch, self.sharding)

  def state(self) -> dict:
    return self.iterator.state()

  def restore(self, state: dict) -> None:
    self.iterator.restore(state)


@dataclasses.dataclass
class TrainingData:
  train: TrainStream
  eval_stream: TrainStream | None  # one pass over the held-out examples, the same batches at every evaluation
  total_steps: int
  train_pairs: tokenize.TokenizedPairs | None  # kept for a precomputed-reference pass (pair tasks only)
  eval_pairs: tokenize.TokenizedPairs | None
  _eval_batches: list | None = None

  @property
  def eval_batches(self) -> list[dict[str, jax.Array]]:
    if self._eval_batches is None:
      self._eval_batches = []
      if self.eval_stream is not None:
        self.eval_stream.restore({**self.eval_stream.state(), "epoch": 0, "position": 0})
        self._eval_batches = [self.eval_stream.next_global()
                              for _ in range(self.eval_stream.iterator.batches_per_epoch)]
    return self._eval_batches

  def attach_reference_logps(self, train_logps: np.ndarray, eval_logps: np.ndarray | None) -> None:
    """Makes batches carry `reference_chosen_logps` / `reference_rejected_logps` from [N, 2] arrays per split."""
    for stream, logps in ((self.train, train_logps), (self.eval_stream, eval_logps)):
      if stream is not None:
        stream.extra_fields = _with_reference(stream.extra_fields, logps)
    self._eval_batches = None


def _with_reference(previous, logps: np.ndarray):
  def fields(indices):
    out = previous(indices) if previous is not None else {}
    present = indices >= 0  # -1: no pair in that slot of a packed row
    picked = logps[np.where(present, indices, 0)] * present[..., None]
    out["reference_chosen_logps"] = picked[..., 0].astype(np.float32)
    out["reference_rejected_logps"] = picked[..., 1].astype(np.float32)
    return out

  return fields


def _head_fields(config, pairs: list[hh.PreferencePair]):
  """For multi-head reward models: a function adding each row's `head` index; None otherwise."""
  if config.task != "reward" or len(config.reward.heads) == 1:
    return None
  heads = np.array([head_index(p.source, tuple(config.reward.heads)) for p in pairs], np.int32)
  return lambda indices: {"head": np.where(indices >= 0, heads[indices], 0).astype(np.int32)}  # -1: no pair


def _check_divisible(config, mesh) -> None:
  micro = config.training.batch_size // config.training.grad_accum
  if micro % mesh.size:
    raise ValueError(f"config.training.batch_size / grad_accum = {micro} rows per micro-batch cannot be split over "
                     f"{mesh.size} devices: make it a multiple of {mesh.size}")


def _iterator(config, examples, batch_kind: str, *, seed: int, global_batch_size: int, buckets, pad_id: int,
              fixed_shape: bool = False):
  """A BatchIterator whose batches also carry each row's example `index` (for per-example extra fields).

  Prefix-shared pair rows hold prompt + chosen + rejected, so their buckets reach twice `data.max_length` (packed
  rows fill max_length; a pair longer than that has a row of its own).
  """
  common = dict(pad_id=pad_id, with_index=True, global_batch_size=global_batch_size, seed=seed,
                group_by_length=config.data.group_by_length, fixed_shape=fixed_shape)
  if batch_kind == "sft":
    return batches_lib.sft_batches(examples, max_length=config.data.max_length, buckets=tuple(buckets), **common)
  shared = config.data.prefix_sharing
  if shared:
    buckets = tuple(buckets) + tuple(2 * b for b in buckets if b > buckets[-1] // 2)
  max_length = config.data.max_length * (2 if shared else 1)
  if isinstance(examples, tokenize.PackedPairs):
    return batches_lib.packed_pair_batches(examples, max_length=max_length, buckets=tuple(buckets), **common)
  return batches_lib.dpo_batches(examples, shared=shared, max_length=max_length, buckets=tuple(buckets), **common)


def _examples(config, pairs: tokenize.TokenizedPairs, batch_kind: str, packing: bool):
  if batch_kind != "sft":
    return tokenize.pack_pairs(pairs, capacity=config.data.max_length) if packing else pairs
  sides = {"chosen": [pairs], "rejected": [], "both": [pairs]}[config.data.sft_responses]
  if config.data.sft_responses in ("rejected", "both"):
    # Language modelling on the rejected side too: an unaligned "pretrained" model for the offline quickstart.
    sides.append(dataclasses.replace(pairs, chosen_ids=pairs.rejected_ids))
  parts = [tokenize.sft_examples(side, loss_on=config.data.loss_on, max_length=config.data.max_length)
           for side in sides]
  examples = tokenize.SFTExamples([ids for part in parts for ids in part.input_ids],
                                  [mask for part in parts for mask in part.loss_mask])
  if packing:
    examples = tokenize.pack_examples(examples, seq_len=config.data.max_length)
  return examples


def _load(config, tokenizer, split: str, batch_kind: str):
  """The split's pairs and their tokens. SFT rows are cut later, keeping their start (as TRL's SFTTrainer does);
  pairs are cut here the reference-DPO way (the prompt keeps its end, then the responses are shortened)."""
  subsets = [s.strip() for s in config.data.subsets.split(",") if s.strip()] or None
  pairs, _ = hh.load_preference_pairs(data_source(config), split=split, subsets=subsets,
                                      warn_skipped_share=config.data.warn_skipped_share)
  pair_task = batch_kind != "sft"
  tokenized = tokenize.tokenize_pairs(pairs, tokenizer, max_length=config.data.max_length if pair_task else None,
                                      max_prompt_length=config.data.max_prompt_length if pair_task else None,
                                      truncation_mode=config.data.truncation_mode,
                                      cache_dir=os.path.join(cache_dir(config), "tokenized"))
  return pairs, tokenized


def build(config, tokenizer, workdir: str, batch_kind: str, mesh) -> TrainingData:
  """The train stream and held-out batches of a stage; `batch_kind` "sft" or "pairs"."""
  del workdir  # data is cached by content, not per run
  _check_divisible(config, mesh)
  sharding = parallel.batch_sharding(mesh)
  pad_id = tokenizer.pad_token_id
  buckets = config.data.buckets
  train_pairs_text, train_pairs = _load(config, tokenizer, config.data.train_split, batch_kind)
  train_examples = _examples(config, train_pairs, batch_kind, config.data.packing)
  iterator = _iterator(config, train_examples, batch_kind, seed=config.seed,
                       global_batch_size=config.training.batch_size, buckets=buckets, pad_id=pad_id)
  stream = TrainStream(iterator, sharding, _head_fields(config, train_pairs_text), config.task != "reward")

  if config.training.max_steps > 0:
    total_steps = config.training.max_steps
  else:
    total_steps = math.ceil(config.training.num_epochs * iterator.batches_per_epoch)

  eval_stream, eval_pairs = None, None
  if config.data.eval_pairs:
    eval_text, eval_pairs = _load(config, tokenizer, config.data.eval_split, batch_kind)
    keep = np.sort(np.random.default_rng(config.seed).permutation(len(eval_pairs))[:config.data.eval_pairs])
    eval_text, eval_pairs = [eval_text[i] for i in keep], eval_pairs.subset(keep)
    eval_examples = _examples(config, eval_pairs, batch_kind, packing=False)  # metrics per example, never packed
    eval_size = min(config.training.batch_size, len(eval_examples) // mesh.size * mesh.size)
    if not eval_size:
      log.warning("no held-out evaluation: %d held-out examples are fewer than the %d devices", len(eval_examples),
                  mesh.size)
    else:
      eval_iterator = _iterator(config, eval_examples, batch_kind, seed=config.seed, global_batch_size=eval_size,
                                buckets=buckets, pad_id=pad_id, fixed_shape=True)  # one eval program
      eval_stream = TrainStream(eval_iterator, sharding, _head_fields(config, eval_text), config.task != "reward")
      log.info("held-out: %d batches of %d", eval_iterator.batches_per_epoch, eval_size)
  pair_task = batch_kind != "sft"
  return TrainingData(stream, eval_stream, total_steps, train_pairs if pair_task else None,
                      eval_pairs if pair_task else None)
