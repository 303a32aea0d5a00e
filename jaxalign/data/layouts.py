"""Batch layouts: how examples become the static-shape rows a step reads. The only place a layout is decided.

A layout object owns, for a config: the row length limit, the bucket ladder, each example's row length and scored
token count, how per-example arrays (reference log-probs, reward heads) are gathered for a batch's pairs, and the
collate into a typed batch. The training streams, the reference pass and the evaluator's preference accuracy all
ask it; the device side picks its code path by the batch's type, never by which fields it has.

  SFTRows       one example per row, or whole examples packed into rows of `max_length` (segment ids).
  SeparateRows  a pair as two rows, prompt + chosen and prompt + rejected, run as one [2B, L] forward.
  SharedRows    a pair as ONE row, prompt + chosen + rejected (the prompt computed once); with `packing`, whole
                such pairs packed into rows of `max_length` tokens. Per-pair outputs are [B, K], K = pairs per row
                (1 without packing).

Every batch is right-padded with the pad id to a bucket length (the smallest that holds the longest row of the
global batch) and its scored tokens gathered into `targets` [rows, S] / `target_mask` [rows, S] (S a width from
`shapes.target_width`): the LM head runs at those positions only. Reward models read each response at its last
token (`chosen_end` / `rejected_end`) and need no targets (`scored=False`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jaxalign import shapes
from jaxalign.data import batches as batches_lib, tokenize
from jaxalign.data.tokenize import PackedPairs, SFTExamples, TokenizedPairs

DEFAULT_BUCKETS = (128, 256, 512, 1024)

# response_side values of a prefix-shared pair sequence.
PROMPT_SIDE, CHOSEN_SIDE, REJECTED_SIDE, PAD_SIDE = 0, 1, 2, 3

Array = Any  # numpy on the host, jax.Array on device: a batch is the same pytree on both sides


def _pytree(cls):
  fields = [f.name for f in dataclasses.fields(cls)]
  return jax.tree_util.register_dataclass(cls, data_fields=fields, meta_fields=[])


@_pytree
@dataclasses.dataclass
class SFTBatch:
  """input_ids / attention_mask [B, L] (1 = real token); targets / target_mask [B, S]: the scored tokens' positions
  (token t predicted from the slot before it). Packed rows add positions [B, L] (0-based per example) and
  segment_ids [B, L] (1, 2, … per example, 0 on padding)."""

  input_ids: Array
  attention_mask: Array
  targets: Array
  target_mask: Array
  positions: Array | None = None
  segment_ids: Array | None = None

  @property
  def num_rows(self) -> int:
    return self.input_ids.shape[0]


@_pytree
@dataclasses.dataclass
class SeparatePairBatch:
  """chosen_* / rejected_* [B, L] rows of prompt + response, padded to one length; targets / target_mask [B, S]
  (both sides one width) when the responses are scored by the LM head; extras: per-pair arrays [B] by name."""

  chosen_input_ids: Array
  chosen_attention_mask: Array
  rejected_input_ids: Array
  rejected_attention_mask: Array
  chosen_targets: Array | None = None
  chosen_target_mask: Array | None = None
  rejected_targets: Array | None = None
  rejected_target_mask: Array | None = None
  extras: dict[str, Array] = dataclasses.field(default_factory=dict)

  @property
  def num_rows(self) -> int:
    return self.chosen_input_ids.shape[0]


@_pytree
@dataclasses.dataclass
class SharedPairBatch:
  """Rows of prompt + chosen + rejected sequences, K pairs per row at most.

  input_ids / attention_mask / positions [B, L] (the rejected response restarts its positions right after its
  prompt: it sees the positions it would see alone); response_side [B, L] (PROMPT/CHOSEN/REJECTED/PAD_SIDE: the
  model masks rejected -> chosen attention with it); segment_ids [B, L] (k = the row's k-th pair, 1-based; 0 on
  padding: no attention across pairs); pair_mask [B, K] (1 where the row has a k-th pair). Scored by the LM head:
  predecessor [B, L] (the slot whose logits predict each token: t - 1, except the first rejected token, predicted
  from its prompt's last slot) and targets / target_mask [B, S]. Read by a reward head: chosen_end /
  rejected_end [B, K] (the slot of each pair's last chosen / rejected token). extras: per-pair arrays [B, K].
  """

  input_ids: Array
  attention_mask: Array
  positions: Array
  response_side: Array
  segment_ids: Array
  pair_mask: Array
  predecessor: Array | None = None
  targets: Array | None = None
  target_mask: Array | None = None
  chosen_end: Array | None = None
  rejected_end: Array | None = None
  extras: dict[str, Array] = dataclasses.field(default_factory=dict)

  @property
  def num_rows(self) -> int:
    return self.input_ids.shape[0]


def named_arrays(batch) -> dict[str, Array]:
  """A batch's arrays by field name (per-pair extras by their own names), leaving out the fields it does not
  have."""
  out = {}
  for field in dataclasses.fields(batch):
    value = getattr(batch, field.name)
    if field.name == "extras":
      out.update(value)
    elif value is not None:
      out[field.name] = value
  return out


# ------------------------------------------------------------------------------------------------ row helpers


def _pad(rows: list[np.ndarray], length: int, value, dtype) -> np.ndarray:
  out = np.full((len(rows), length), value, dtype)
  for i, row in enumerate(rows):
    out[i, :len(row)] = row
  return out


def _real(rows: list[np.ndarray], length: int) -> np.ndarray:
  return _pad([np.ones(len(row), np.int32) for row in rows], length, 0, np.int32)


def target_positions(scored: list[np.ndarray], length: int,
                     width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Where each row's scored tokens are: positions [rows, width] (0-padded) and a validity mask [rows, width].

  scored: per row, a boolean (or 0/1) array over its tokens. `width` defaults to `shapes.target_width` of these
  rows; the iterator passes the global batch's so that every host builds the same shape.
  """
  positions = [np.flatnonzero(row) for row in scored]
  if width is None:
    width = shapes.target_width(max((len(p) for p in positions), default=0), length)
  out = np.zeros((len(positions), width), np.int32)
  valid = np.zeros((len(positions), width), np.float32)
  for row, p in enumerate(positions):
    out[row, :len(p)] = p
    valid[row, :len(p)] = 1.0
  return out, valid


def gather_per_pair(per_pair: dict[str, np.ndarray], pair_index: np.ndarray) -> dict[str, np.ndarray]:
  """Each per-pair array ([N, ...]) at `pair_index` ([rows, K], -1 = no pair there: 0)."""
  present = pair_index >= 0
  safe = np.where(present, pair_index, 0)
  out = {}
  for name, values in per_pair.items():
    where = present.reshape(present.shape + (1,) * (values.ndim - 1))
    out[name] = np.where(where, values[safe], 0).astype(values.dtype)
  return out


# ---------------------------------------------------------------------------------------------------- layouts


@dataclasses.dataclass(frozen=True)
class Layout:
  """What every layout knows; see the module docstring. `max_length`: the tokenized examples' length limit."""

  max_length: int
  buckets: tuple[int, ...] = DEFAULT_BUCKETS

  @property
  def row_limit(self) -> int:
    """The longest row this layout can produce."""
    return self.max_length

  @property
  def ladder(self) -> tuple[int, ...]:
    """The row lengths batches are padded to."""
    return shapes.bucket_ladder(self.buckets, self.row_limit)

  def examples(self, data):
    """The layout's unit of batching made from tokenized data (identity unless the layout packs)."""
    return data

  def lengths(self, examples) -> np.ndarray:
    raise NotImplementedError

  def target_counts(self, examples) -> np.ndarray | None:
    """Scored tokens per example (the LM head's positions), or None when the step reads none."""
    raise NotImplementedError

  def collate(self, examples, indices: np.ndarray, length: int, pad_id: int, width: int | None = None,
              per_pair: dict[str, np.ndarray] | None = None):
    raise NotImplementedError

  def iterator(self, examples, *, pad_id: int, per_pair: dict[str, np.ndarray] | None = None,
               **kwargs) -> batches_lib.BatchIterator:
    """A BatchIterator over `examples` in this layout; kwargs as BatchIterator's (global_batch_size, seed, ...)."""
    collate = lambda indices, length, width=None: self.collate(examples, indices, length, pad_id, width, per_pair)
    return batches_lib.BatchIterator(self.lengths(examples), collate, max_length=self.row_limit, buckets=self.ladder,
                                     target_counts=self.target_counts(examples), **kwargs)


@dataclasses.dataclass(frozen=True)
class SFTRows(Layout):
  """SFT examples, one per row or packed (`packing`) into rows of `max_length` tokens."""

  packing: bool = False

  def examples(self, data: SFTExamples) -> SFTExamples:
    return tokenize.pack_examples(data, seq_len=self.max_length) if self.packing else data

  def lengths(self, examples: SFTExamples) -> np.ndarray:
    return examples.lengths

  def target_counts(self, examples: SFTExamples) -> np.ndarray:
    return np.array([int(mask.sum()) for mask in examples.loss_mask], np.int64)

  def collate(self, examples: SFTExamples, indices, length, pad_id, width=None, per_pair=None) -> SFTBatch:
    ids = [examples.input_ids[i] for i in indices]
    targets, valid = target_positions([examples.loss_mask[i] for i in indices], length, width)
    batch = SFTBatch(_pad(ids, length, pad_id, np.int32), _real(ids, length), targets, valid)
    if examples.segment_ids is not None:
      batch.segment_ids = _pad([examples.segment_ids[i] for i in indices], length, 0, np.int32)
      batch.positions = _pad([examples.positions[i] for i in indices], length, 0, np.int32)
    return batch


@dataclasses.dataclass(frozen=True)
class PairLayout(Layout):
  """A layout of preference pairs. `scored`: the step reads the responses' tokens with the LM head (DPO and the
  other preference losses); False for reward models, which read each response's last token."""

  scored: bool = True

  def pair_index(self, examples, indices: np.ndarray) -> np.ndarray:
    """The pairs of rows `indices`: [rows, K] indices into the tokenized pairs, -1 where a row has no k-th pair."""
    return np.asarray(indices)[:, None]

  def pairs_of(self, examples) -> TokenizedPairs:
    """The tokenized pairs behind `examples`."""
    return examples

  def num_pairs(self, examples) -> int:
    return len(self.pairs_of(examples))


@dataclasses.dataclass(frozen=True)
class SeparateRows(PairLayout):
  """Chosen and rejected as separate rows (prompt + response each), padded to one length."""

  def lengths(self, pairs: TokenizedPairs) -> np.ndarray:
    return pairs.lengths

  def target_counts(self, pairs: TokenizedPairs) -> np.ndarray | None:
    if not self.scored:
      return None
    return np.array([max(len(c), len(r)) for c, r in zip(pairs.chosen_ids, pairs.rejected_ids)], np.int64)

  def collate(self, pairs: TokenizedPairs, indices, length, pad_id, width=None, per_pair=None) -> SeparatePairBatch:
    sides = {side: [np.concatenate([pairs.prompt_ids[i], responses[i]]) for i in indices]
             for side, responses in (("chosen", pairs.chosen_ids), ("rejected", pairs.rejected_ids))}
    batch = SeparatePairBatch(_pad(sides["chosen"], length, pad_id, np.int32), _real(sides["chosen"], length),
                              _pad(sides["rejected"], length, pad_id, np.int32), _real(sides["rejected"], length))
    if self.scored:  # the response tokens: each row's tokens past its prompt
      scored = [np.arange(len(row)) >= len(pairs.prompt_ids[i]) for rows in sides.values()
                for i, row in zip(indices, rows)]
      targets, valid = target_positions(scored, length, width)
      rows = len(indices)
      batch.chosen_targets, batch.chosen_target_mask = targets[:rows], valid[:rows]
      batch.rejected_targets, batch.rejected_target_mask = targets[rows:], valid[rows:]
    if per_pair:
      batch.extras = {name: values[:, 0] for name, values in
                      gather_per_pair(per_pair, self.pair_index(pairs, indices)).items()}
    return batch


@dataclasses.dataclass(frozen=True)
class SharedRows(PairLayout):
  """Prefix-shared pairs: prompt + chosen + rejected as one sequence; with `packing`, whole such pairs packed into
  rows of `max_length` tokens (a pair longer than that keeps a row of its own)."""

  packing: bool = False

  @property
  def row_limit(self) -> int:
    return 2 * self.max_length  # prompt + both responses (each pair's prompt + response fits max_length)

  @property
  def ladder(self) -> tuple[int, ...]:
    # Rows reach twice the pair limit: the upper buckets doubled too.
    doubled = tuple(2 * b for b in self.buckets if b > max(self.buckets) // 2)
    return shapes.bucket_ladder(tuple(self.buckets) + doubled, self.row_limit)

  def examples(self, pairs: TokenizedPairs) -> TokenizedPairs | PackedPairs:
    return tokenize.pack_pairs(pairs, capacity=self.max_length) if self.packing else pairs

  def pairs_of(self, examples) -> TokenizedPairs:
    return examples.pairs if self.packing else examples

  def lengths(self, examples) -> np.ndarray:
    return examples.lengths if self.packing else examples.shared_lengths

  def target_counts(self, examples) -> np.ndarray | None:
    if not self.scored:
      return None
    pairs = self.pairs_of(examples)
    per_pair = np.array([len(c) + len(r) for c, r in zip(pairs.chosen_ids, pairs.rejected_ids)], np.int64)
    return np.array([per_pair[row].sum() for row in examples.rows], np.int64) if self.packing else per_pair

  def pair_index(self, examples, indices: np.ndarray) -> np.ndarray:
    return examples.pair_index[indices] if self.packing else np.asarray(indices)[:, None]

  def collate(self, examples, indices, length, pad_id, width=None, per_pair=None) -> SharedPairBatch:
    pairs = self.pairs_of(examples)
    pair_index = self.pair_index(examples, indices)
    rows = [index[index >= 0] for index in pair_index]
    fields = {"input_ids": [], "positions": [], "response_side": [], "predecessor": [], "segment_ids": []}
    ends = np.zeros((2, len(rows), pair_index.shape[1]), np.int32)  # last chosen / rejected slot per pair
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
    batch = SharedPairBatch(
        input_ids=_pad(fields["input_ids"], length, pad_id, np.int32),
        attention_mask=_real(fields["input_ids"], length),
        positions=_pad(fields["positions"], length, 0, np.int32), response_side=side,
        segment_ids=_pad(fields["segment_ids"], length, 0, np.int32), pair_mask=(pair_index >= 0).astype(np.int32))
    if self.scored:
      batch.predecessor = _pad(fields["predecessor"], length, 0, np.int32)
      batch.targets, batch.target_mask = target_positions(list((side == CHOSEN_SIDE) | (side == REJECTED_SIDE)),
                                                          length, width)
    else:
      batch.chosen_end, batch.rejected_end = ends
    if per_pair:
      batch.extras = gather_per_pair(per_pair, pair_index)
    return batch


def pair_layout(data_config, *, scored: bool, held_out: bool = False) -> PairLayout:
  """The pair layout a stage's `data` config asks for; held-out batches are never packed (metrics per pair, one
  program)."""
  common = dict(max_length=data_config.max_length, buckets=tuple(data_config.buckets), scored=scored)
  if data_config.prefix_sharing:
    return SharedRows(packing=data_config.packing and not held_out, **common)
  return SeparateRows(**common)


def sft_layout(data_config, *, held_out: bool = False) -> SFTRows:
  """The SFT layout a stage's `data` config asks for; held-out batches are never packed."""
  return SFTRows(max_length=data_config.max_length, buckets=tuple(data_config.buckets),
                 packing=data_config.packing and not held_out)


# ------------------------------------------------------------------------------------------ online: prompt groups

PROMPT_MEMBER, PAD_MEMBER = 0, -1  # group_member values besides the completions' 1 … G


@_pytree
@dataclasses.dataclass
class GroupBatch:
  """Rows of one prompt and its G sampled completions, for the online methods' training forward: the prompt once,
  then each completion, every completion attending to the prompt and to itself only (positions restart after the
  prompt, so each sees the positions it would see alone).

  input_ids / attention_mask / positions / group_member [P, L]: group_member is PROMPT_MEMBER on the prompt, g
  (1-based) on the g-th completion, PAD_MEMBER on padding. Per completion, rows prompt-major (p0 c1, p0 c2, …, p1 c1,
  …) with C = max_completion_length token slots: targets [P*G, C] (the slot of each completion token),
  predecessors [P*G, C] (the slot whose logits predict it: the prompt's last for the first token),
  completion_mask [P*G, C] (1 on real completion tokens), row_mask [P*G] (0 for the completions of filler rows).
  """

  input_ids: Array
  attention_mask: Array
  positions: Array
  group_member: Array
  targets: Array
  predecessors: Array
  completion_mask: Array
  row_mask: Array

  @property
  def num_rows(self) -> int:
    return self.input_ids.shape[0]


@dataclasses.dataclass(frozen=True)
class GroupRows:
  """The layout of prompt groups (`GroupBatch`): rows of a prompt (at most `max_prompt_length` tokens) and its
  `num_generations` completions (at most `max_completion_length` each), padded to a bucket length."""

  max_prompt_length: int
  max_completion_length: int
  num_generations: int
  buckets: tuple[int, ...] = DEFAULT_BUCKETS

  @property
  def row_limit(self) -> int:
    return self.max_prompt_length + self.num_generations * self.max_completion_length

  @property
  def ladder(self) -> tuple[int, ...]:
    return shapes.bucket_ladder(self.buckets, self.row_limit)

  def _check(self, prompt_ids, completion_ids) -> None:
    if len(prompt_ids) != len(completion_ids):
      raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} groups of completions")
    for p, (prompt, group) in enumerate(zip(prompt_ids, completion_ids)):
      if not 1 <= len(prompt) <= self.max_prompt_length:
        raise ValueError(f"prompt {p}: {len(prompt)} tokens; expected 1 to max_prompt_length "
                         f"{self.max_prompt_length}")
      if len(group) != self.num_generations or any(len(c) > self.max_completion_length for c in group):
        raise ValueError(f"prompt {p}: completions of {[len(c) for c in group]} tokens; expected "
                         f"num_generations {self.num_generations} of at most {self.max_completion_length}")

  def collate(self, prompt_ids, completion_ids, pad_id: int, *, rows: int | None = None,
              length: int | None = None) -> GroupBatch:
    """A GroupBatch of prompts (id arrays) and their completions (`num_generations` id arrays each), filled to
    `rows` prompt rows (default: as many as prompts) and padded to `length` (default: the smallest bucket that
    holds the longest row)."""
    self._check(prompt_ids, completion_ids)
    rows = rows or len(prompt_ids)
    if rows < len(prompt_ids):
      raise ValueError(f"{len(prompt_ids)} prompts do not fit {rows} rows")
    groups, width = self.num_generations, self.max_completion_length
    sequences = [np.concatenate([prompt, *group]).astype(np.int32) for prompt, group in zip(prompt_ids, completion_ids)]
    length = length or shapes.fit(max(len(s) for s in sequences), self.ladder)
    batch = GroupBatch(
        input_ids=_pad(sequences + [np.zeros(0, np.int32)] * (rows - len(sequences)), length, pad_id, np.int32),
        attention_mask=np.zeros((rows, length), np.int32), positions=np.zeros((rows, length), np.int32),
        group_member=np.full((rows, length), PAD_MEMBER, np.int32), targets=np.zeros((rows * groups, width), np.int32),
        predecessors=np.zeros((rows * groups, width), np.int32),
        completion_mask=np.zeros((rows * groups, width), np.float32), row_mask=np.zeros(rows * groups, np.float32))
    for r, (prompt, group) in enumerate(zip(prompt_ids, completion_ids)):
      n_prompt, start = len(prompt), len(prompt)
      batch.attention_mask[r, :len(sequences[r])] = 1
      batch.positions[r, :n_prompt] = np.arange(n_prompt)
      batch.group_member[r, :n_prompt] = PROMPT_MEMBER
      for g, completion in enumerate(group):
        n, row = len(completion), r * groups + g
        batch.positions[r, start:start + n] = n_prompt + np.arange(n)
        batch.group_member[r, start:start + n] = g + 1
        batch.targets[row, :n] = start + np.arange(n)
        batch.predecessors[row, :n] = np.concatenate([[n_prompt - 1], start + np.arange(n - 1)])[:n]
        batch.completion_mask[row, :n] = 1.0
        batch.row_mask[row] = 1.0
        start += n
    return batch


@_pytree
@dataclasses.dataclass
class RolloutBatch:
  """What the online methods train on (built by `rollout.py`): prompt groups in the group layout with what their
  sampling decided, every array leading with the prompt axis P, so that shards and micro-batches keep a prompt's
  completions with it.

  group: a GroupBatch whose per-completion arrays are grouped by prompt (targets / predecessors / completion_mask
    [P, G, C], row_mask [P, G]). rewards [P, G]: the combined reward (NaN: no reward scored the completion).
  advantages [P, G]. truncated [P, G]: 1 where the completion stopped at max_completion_length without ending.
  old_logps [P, G, C]: the per-token log-probs at sampling time (the "old" policy). ref_logps [P, G, C] or None: the
  reference's, present only when the loss has a KL term. num_items [P]: every entry the completion tokens of the
  whole generation batch divided by the step's micro-batches (DAPO's normaliser, per micro-batch).
  """

  group: GroupBatch
  rewards: Array
  advantages: Array
  truncated: Array
  old_logps: Array
  ref_logps: Array | None
  num_items: Array

  @property
  def num_rows(self) -> int:
    return self.group.num_rows
