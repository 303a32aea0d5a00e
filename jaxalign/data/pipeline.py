"""From a stage config to what the training loop reads, in two calls: `load` (records -> tokenized examples in
their batch layouts, per split) and, once the reference is prepared, `streams` (a resumable stream of sharded global
batches and a fixed set of held-out batches, carrying per-pair arrays by name). Glue over hh / formats -> tokenize ->
layouts -> batches; the decisions live in those modules.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os

import jax
import numpy as np

from jaxalign import parallel, tasks
from jaxalign.data import (arithmetic, batches as batches_lib, formats, hh, layouts, pair_filter, prompts, synthetic,
                            tokenize, unpaired)
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


def arithmetic_pairs_dir(cache: str) -> str:
  """A folder of the arithmetic task's SFT pairs (train.jsonl, test.jsonl: the held-out problems), written once:
  chosen = the right answer in the task's format, rejected = a wrong number (`arithmetic.sft_records`)."""
  out = os.path.join(cache, "arithmetic-pairs")
  if not os.path.exists(os.path.join(out, "done")) and jax.process_index() == 0:
    os.makedirs(out, exist_ok=True)
    for split, records in zip(("train", "test"), arithmetic.arithmetic_split()):
      with open(os.path.join(out, f"{split}.jsonl"), "w") as f:
        f.writelines(json.dumps(pair) + "\n" for pair in arithmetic.sft_records(records))
    open(os.path.join(out, "done"), "w").close()
  return out


def data_source(config) -> str:
  """The data location to load: `data.source`, or the synthetic set (or the arithmetic task's pairs) written (once)
  into the cache."""
  if config.data.source == prompts.ARITHMETIC:
    return arithmetic_pairs_dir(cache_dir(config))
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

  `last_shape` is (rows, row length, scored positions per row) of the last batch.
  """

  def __init__(self, iterator: batches_lib.BatchIterator, sharding):
    self.iterator = iterator
    self.sharding = sharding
    self.last_shape: tuple[int, ...] = ()

  def next_global(self):
    length, width = self.iterator.shape_at(self.iterator.epoch, self.iterator.position)
    self.last_shape = (self.iterator.global_batch_size, length, width or 0)
    return batches_lib.to_global(next(self.iterator), self.sharding)

  def shape_examples(self, count: int) -> list:
    """One global batch of each distinct shape among the next `count` (to compile for); the stream does not move."""
    return [batches_lib.to_global(self.iterator.batch_at(epoch, position), self.sharding)
            for epoch, position in self.iterator.first_of_each_shape(count)]

  def first_epoch(self) -> list:
    """Every global batch of epoch 0, in order (held-out batches: the same ones at every evaluation)."""
    return [batches_lib.to_global(self.iterator.batch_at(0, position), self.sharding)
            for position in range(self.iterator.batches_per_epoch)]

  def state(self) -> dict:
    return self.iterator.state()

  def restore(self, state: dict) -> None:
    self.iterator.restore(state)


@dataclasses.dataclass
class Split:
  """One split of a stage's data: its layout, the examples in that layout's form, and the records they came from
  (for per-pair arrays such as reward heads and KTO labels)."""

  layout: layouts.Layout
  examples: object
  records: list[hh.PreferencePair] | list[unpaired.UnpairedExample]


@dataclasses.dataclass
class StageData:
  """A stage's tokenized data before any batch is built: train and (optionally) held-out splits."""

  train: Split
  held_out: Split | None
  batch_kind: str

  def splits(self) -> dict[str, Split]:
    return {"train": self.train, **({"held_out": self.held_out} if self.held_out is not None else {})}


@dataclasses.dataclass
class PromptData:
  """An online stage's training prompts (its batches are sampled during training: `rollout.py`); no held-out split
  of pairs, so nothing for a reference to precompute."""

  train: list[prompts.PromptRecord]
  batch_kind: str = "prompts"

  def splits(self) -> dict[str, Split]:
    return {}


def load_prompts(config) -> PromptData:
  """The training prompts of an online stage: data.source ("arithmetic", an HH source without the evaluator's
  prompts, or a prompt file), its data.train_split and data.subsets; every record used or counted."""
  subsets = [s.strip() for s in config.data.subsets.split(",") if s.strip()] or None
  source = config.data.source if config.data.source == prompts.ARITHMETIC else data_source(config)
  records, _ = prompts.load_training_prompts(source, split=config.data.train_split, subsets=subsets,
                                             warn_skipped_share=config.data.warn_skipped_share)
  if not records:
    raise ValueError(f"config.data.source = {config.data.source!r} gave no training prompts (split "
                     f"{config.data.train_split!r}, subsets {subsets}); see the skip report above")
  return PromptData(records)


@dataclasses.dataclass
class TrainingData:
  train: TrainStream
  eval_batches: list  # one pass over the held-out examples, the same batches at every evaluation
  total_steps: int


def _head_per_pair(config, records: list[hh.PreferencePair]) -> dict[str, np.ndarray]:
  """Reward models: each pair's `head` index (0 with one head)."""
  heads = tuple(config.reward.heads)
  return {"head": np.array([head_index(p.source, heads) for p in records], np.int32)}


def _check_divisible(config, mesh) -> None:
  micro = config.training.batch_size // config.training.grad_accum
  if micro % mesh.size:
    raise ValueError(f"config.training.batch_size / grad_accum = {micro} rows per micro-batch cannot be split over "
                     f"{mesh.size} devices: make it a multiple of {mesh.size}")


def _sft_examples(config, pairs: tokenize.TokenizedPairs) -> tokenize.SFTExamples:
  sides = {"chosen": [pairs], "rejected": [], "both": [pairs]}[config.data.sft_responses]
  if config.data.sft_responses in ("rejected", "both"):
    # Language modelling on the rejected side too: an unaligned "pretrained" model for the offline quickstart.
    sides.append(dataclasses.replace(pairs, chosen_ids=pairs.rejected_ids))
  parts = [tokenize.sft_examples(side, loss_on=config.data.loss_on, max_length=config.data.max_length)
           for side in sides]
  return tokenize.SFTExamples([ids for part in parts for ids in part.input_ids],
                              [mask for part in parts for mask in part.loss_mask])


def _load(config, tokenizer, split: str, batch_kind: str):
  """The split's records (pairs, or KTO's unpaired examples) and their tokens. SFT rows are cut later, keeping their
  start (as TRL's SFTTrainer does); pairs are cut here the reference-DPO way (the prompt keeps its end, then the
  responses are shortened)."""
  subsets = [s.strip() for s in config.data.subsets.split(",") if s.strip()] or None
  chat = bool(config.data.chat_template)
  if batch_kind == "unpaired":
    # KTO: its examples, each travelling as (prompt, completion, mismatched completion) in the pair layouts.
    records, _ = unpaired.load_examples(data_source(config), split=split, subsets=subsets)
    pairs = unpaired.as_pairs(records, seed=config.seed)
  else:
    pairs, skips = formats.load_examples(data_source(config), data_format=config.data.format, chat=chat, split=split,
                                         subsets=subsets, warn_skipped_share=config.data.warn_skipped_share)
    if split == config.data.train_split and not chat:  # held-out pairs stay as they are
      pairs = pair_filter.filter_pairs(config, pairs, skips)
    records = pairs
  pair_task = batch_kind != "sft"
  if chat and not pair_task:
    return pairs, tokenize.conversation_sft_examples(pairs, tokenizer, loss_on=config.data.loss_on,
                                                     responses=config.data.sft_responses,
                                                     max_length=config.data.max_length)
  if chat:
    pairs, _ = tokenize.render_pairs(pairs, tokenizer)
  tokenized = tokenize.tokenize_pairs(pairs, tokenizer, max_length=config.data.max_length if pair_task else None,
                                      max_prompt_length=config.data.max_prompt_length if pair_task else None,
                                      truncation_mode=config.data.truncation_mode, rendered=chat,
                                      cache_dir=os.path.join(cache_dir(config), "tokenized"))
  return records, tokenized


def _split(config, layout: layouts.Layout, records, tokenized, batch_kind: str) -> Split:
  # Conversations rendered with a chat template are SFT examples already.
  sft_pairs = batch_kind == "sft" and isinstance(tokenized, tokenize.TokenizedPairs)
  data = _sft_examples(config, tokenized) if sft_pairs else tokenized
  return Split(layout, layout.examples(data), records)


def layout_for(config, batch_kind: str, *, held_out: bool = False) -> layouts.Layout:
  """The batch layout of a stage's train or held-out split (KTO's unpaired examples use the pair layouts)."""
  if batch_kind == "sft":
    return layouts.sft_layout(config.data, held_out=held_out)
  return layouts.pair_layout(config.data, scored=not tasks.spec(config.task).reward_model, held_out=held_out)


def load(config, tokenizer, batch_kind: str, mesh) -> StageData | PromptData:
  """A stage's train and held-out examples in their layouts; `batch_kind` "sft", "pairs" or "unpaired" (KTO); or
  for "prompts" (the online methods) its training prompts."""
  if batch_kind == "prompts":
    return load_prompts(config)
  _check_divisible(config, mesh)
  if config.data.chat_template:
    tokenize.set_chat_template(tokenizer, config.data.chat_template)  # saved with the tokenizer on export
  records, tokenized = _load(config, tokenizer, config.data.train_split, batch_kind)
  train = _split(config, layout_for(config, batch_kind), records, tokenized, batch_kind)
  held_out = None
  if config.data.eval_pairs:
    records, tokenized = _load(config, tokenizer, config.data.eval_split, batch_kind)
    keep = np.sort(np.random.default_rng(config.seed).permutation(len(tokenized))[:config.data.eval_pairs])
    kept_records = [records[i] for i in keep] if batch_kind != "sft" else records  # records: for per-pair arrays
    held_out = _split(config, layout_for(config, batch_kind, held_out=True), kept_records, tokenized.subset(keep),
                      batch_kind)
  return StageData(train, held_out, batch_kind)


def streams(config, data: StageData, mesh, pad_id: int,
            per_pair: dict[str, dict[str, np.ndarray]] | None = None) -> TrainingData:
  """The train stream and held-out batches of a stage. per_pair: per split name ("train", "held_out"), arrays
  indexed by pair that the batches carry by name (e.g. precomputed reference log-probs)."""
  sharding = parallel.batch_sharding(mesh)
  pad_id = int(pad_id)

  def arrays(name: str, split: Split) -> dict[str, np.ndarray]:
    out = dict((per_pair or {}).get(name, {}))
    if tasks.spec(config.task).reward_model:
      out.update(_head_per_pair(config, split.records))
    if data.batch_kind == "unpaired":
      out["desirable"] = unpaired.desirable_labels(split.records)
    return out

  common = dict(pad_id=pad_id, seed=config.seed, group_by_length=config.data.group_by_length)
  train = data.train
  iterator = train.layout.iterator(train.examples, per_pair=arrays("train", train),
                                   global_batch_size=config.training.batch_size, **common)
  if config.training.max_steps > 0:
    total_steps = config.training.max_steps
  else:
    total_steps = math.ceil(config.training.num_epochs * iterator.batches_per_epoch)

  eval_batches = []
  held_out = data.held_out
  if held_out is not None:
    eval_size = min(config.training.batch_size, len(held_out.examples) // mesh.size * mesh.size)
    if not eval_size:
      log.warning("no held-out evaluation: %d held-out examples are fewer than the %d devices",
                  len(held_out.examples), mesh.size)
    else:
      eval_iterator = held_out.layout.iterator(held_out.examples, per_pair=arrays("held_out", held_out),
                                               global_batch_size=eval_size, fixed_shape=True, **common)  # one program
      eval_batches = TrainStream(eval_iterator, sharding).first_epoch()
      log.info("held-out: %d batches of %d", len(eval_batches), eval_size)
  return TrainingData(TrainStream(iterator, sharding), eval_batches, total_steps)
