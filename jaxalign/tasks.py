"""What is trained: SFT, DPO and reward modelling, each a loss over a batch dict, all driven by one loop.

A task knows which batches it reads (`batch_kind`: "sft" rows or preference "pairs"), how to compute its loss and
metrics from a model and a batch, and how many tokens a batch holds (for throughput). Pairs run chosen and
rejected through the model as one concatenated batch (one forward, one backward).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxalign import losses
from jaxalign.data.batches import CHOSEN_SIDE, REJECTED_SIDE

Batch = dict[str, jax.Array]


def target_logprobs(model, hidden: jax.Array, input_ids: jax.Array, predecessors: jax.Array,
                    targets: jax.Array, target_mask: jax.Array) -> jax.Array:
  """log p of the tokens at `targets` [rows, S], each from the hidden state at `predecessors` [rows, S]; 0 where
  `target_mask` is 0. The LM head runs on these S positions only: most tokens (prompt, padding) are not scored."""
  picked = jnp.take_along_axis(hidden, predecessors[..., None], axis=1)
  tokens = jnp.take_along_axis(input_ids, targets, axis=1)
  return losses.selected_logprobs(model.logits(picked), tokens) * target_mask


def concatenated_pairs(batch: Batch) -> tuple[jax.Array, jax.Array]:
  """Chosen rows then rejected rows (collated to one length): (input_ids, attention_mask) [2B, L]."""
  return tuple(jnp.concatenate([batch[f"chosen_{field}"], batch[f"rejected_{field}"]], axis=0)
               for field in ("input_ids", "attention_mask"))


def pair_logprobs(model, batch: Batch, dropout_key=None) -> tuple[jax.Array, jax.Array]:
  """Summed response log-probs of chosen and rejected, [B] each, from one concatenated forward."""
  ids, mask = concatenated_pairs(batch)
  targets = jnp.concatenate([batch["chosen_targets"], batch["rejected_targets"]])
  target_mask = jnp.concatenate([batch["chosen_target_mask"], batch["rejected_target_mask"]])
  hidden, _ = model.hidden_states(ids, mask, dropout_key=dropout_key)
  logps = target_logprobs(model, hidden, ids, jnp.maximum(targets - 1, 0), targets, target_mask).sum(axis=-1)
  num_pairs = batch["chosen_input_ids"].shape[0]
  return logps[:num_pairs], logps[num_pairs:]


def shared_hidden_states(model, batch: Batch, dropout_key=None) -> jax.Array:
  """The decoder's hidden states over prefix-shared (or packed) rows: positions restart where the batch says, pairs
  in a row never attend to each other, and a rejected response never attends to its chosen one."""
  side = batch["response_side"]
  blocked = (side[:, :, None] == REJECTED_SIDE) & (side[:, None, :] == CHOSEN_SIDE)
  hidden, _ = model.hidden_states(batch["input_ids"], batch["attention_mask"], positions=batch["positions"],
                                  segment_ids=batch.get("segment_ids"), mask=~blocked, dropout_key=dropout_key)
  return hidden


def shared_pair_logprobs(model, batch: Batch, dropout_key=None) -> tuple[jax.Array, jax.Array]:
  """Summed response log-probs of chosen and rejected from prefix-shared rows: one forward over prompt + chosen +
  rejected, the rejected tokens unable to attend to the chosen ones. [B] each for one pair per row
  (`collate_dpo_shared`); [B, K] for packed rows (`collate_packed_pairs`; 0 where `pair_mask` is 0)."""
  side, segment_ids = batch["response_side"], batch.get("segment_ids")
  hidden = shared_hidden_states(model, batch, dropout_key)
  targets = batch["targets"]
  predecessors = jnp.take_along_axis(batch["predecessor"], targets, axis=1)
  logps = target_logprobs(model, hidden, batch["input_ids"], predecessors, targets, batch["target_mask"])
  target_side = jnp.take_along_axis(side, targets, axis=1)
  chosen, rejected = logps * (target_side == CHOSEN_SIDE), logps * (target_side == REJECTED_SIDE)
  if "pair_mask" not in batch:
    return chosen.sum(axis=-1), rejected.sum(axis=-1)
  # Packed: sum each target into its pair's slot (segment k -> slot k - 1).
  slots = jax.nn.one_hot(jnp.take_along_axis(segment_ids, targets, axis=1) - 1, batch["pair_mask"].shape[1],
                         dtype=logps.dtype)
  return jnp.einsum("bs,bsk->bk", chosen, slots), jnp.einsum("bs,bsk->bk", rejected, slots)


def dpo_logprobs(model, batch: Batch, dropout_key=None) -> tuple[jax.Array, jax.Array]:
  """Chosen and rejected log-probs from whichever layout the batch has (prefix-shared or separate rows)."""
  if "response_side" in batch:
    return shared_pair_logprobs(model, batch, dropout_key)
  return pair_logprobs(model, batch, dropout_key)


def pair_tokens(batch: Batch) -> jax.Array:
  if "response_side" in batch:
    return batch["attention_mask"].sum()
  return batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum()


@dataclasses.dataclass(frozen=True)
class SFTTask:
  """Next-token cross-entropy on the masked targets (the whole conversation, or only the final response)."""

  batch_kind = "sft"
  uses_reference = False

  def loss(self, model, batch: Batch, *, dropout_key=None, reference=None) -> tuple[jax.Array, dict]:
    hidden, _ = model.hidden_states(batch["input_ids"], batch["attention_mask"], positions=batch.get("positions"),
                                    segment_ids=batch.get("segment_ids"), dropout_key=dropout_key)
    targets = batch["targets"]
    logps = target_logprobs(model, hidden, batch["input_ids"], jnp.maximum(targets - 1, 0), targets,
                            batch["target_mask"])
    return losses.sft_loss(logps, batch["target_mask"])

  def tokens(self, batch: Batch) -> jax.Array:
    return batch["attention_mask"].sum()

  def scored_tokens(self, batch: Batch) -> jax.Array:
    """Positions where the LM head runs."""
    return batch["target_mask"].sum()


@dataclasses.dataclass(frozen=True)
class DPOTask:
  """DPO against a reference: a model (frozen copy, or the LoRA base with adapters off) or precomputed log-probs.

  With precomputed reference log-probs the batch carries `reference_chosen_logps` / `reference_rejected_logps`
  and `reference` is None.
  """

  beta: float = 0.1
  loss_type: str = "sigmoid"
  label_smoothing: float = 0.0
  batch_kind = "pairs"
  uses_reference = True

  def reference_logps(self, reference, batch: Batch) -> tuple[jax.Array, jax.Array]:
    if reference is None:
      return batch["reference_chosen_logps"], batch["reference_rejected_logps"]
    chosen, rejected = dpo_logprobs(reference, batch)
    return jax.lax.stop_gradient(chosen), jax.lax.stop_gradient(rejected)

  def loss(self, model, batch: Batch, *, dropout_key=None, reference=None) -> tuple[jax.Array, dict]:
    ref_chosen, ref_rejected = self.reference_logps(reference, batch)
    chosen, rejected = dpo_logprobs(model, batch, dropout_key)
    return losses.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=self.beta, loss_type=self.loss_type,
                           label_smoothing=self.label_smoothing, mask=batch.get("pair_mask"))

  def tokens(self, batch: Batch) -> jax.Array:
    return pair_tokens(batch)

  def scored_tokens(self, batch: Batch) -> jax.Array:
    if "response_side" in batch:
      return batch["target_mask"].sum()
    return batch["chosen_target_mask"].sum() + batch["rejected_target_mask"].sum()


@dataclasses.dataclass(frozen=True)
class RewardTask:
  """Bradley–Terry reward modelling; with several heads each pair trains the head named by its `head` index."""

  margin: float = 0.0
  center_rewards_coefficient: float = 0.0
  batch_kind = "pairs"
  uses_reference = False

  def loss(self, model, batch: Batch, *, dropout_key=None, reference=None) -> tuple[jax.Array, dict]:
    chosen, rejected = self.pair_rewards(model, batch, dropout_key)  # [B, heads] or [B, K, heads] (packed)
    head = batch.get("head", jnp.zeros(chosen.shape[:-1], jnp.int32))
    pick = lambda rewards: jnp.take_along_axis(rewards, head[..., None], axis=-1)[..., 0]
    margin = jnp.full(chosen.shape[:-1], self.margin) if self.margin else None
    return losses.reward_model_loss(pick(chosen), pick(rejected), margin=margin,
                                    center_rewards_coefficient=self.center_rewards_coefficient,
                                    mask=batch.get("pair_mask"))

  @staticmethod
  def pair_rewards(model, batch: Batch, dropout_key=None) -> tuple[jax.Array, jax.Array]:
    """Chosen and rejected rewards of every head: from one forward over separate chosen / rejected rows, or over
    prefix-shared rows (each response read at its last token; [B, K, heads] for packed rows)."""
    if "response_side" in batch:
      hidden = shared_hidden_states(model.backbone, batch, dropout_key)
      ends = lambda side: batch[f"{side}_end"] if "pair_mask" in batch else batch[f"{side}_end"][:, None]
      chosen, rejected = model.scores(hidden, ends("chosen")), model.scores(hidden, ends("rejected"))
      return (chosen, rejected) if "pair_mask" in batch else (chosen[:, 0], rejected[:, 0])
    ids, mask = concatenated_pairs(batch)
    rewards = model(ids, mask, dropout_key=dropout_key)
    num_pairs = batch["chosen_input_ids"].shape[0]
    return rewards[:num_pairs], rewards[num_pairs:]

  def tokens(self, batch: Batch) -> jax.Array:
    return pair_tokens(batch)

  def scored_tokens(self, batch: Batch) -> jax.Array:
    return jnp.zeros((), jnp.int32)  # a scalar head, no LM head


def make_task(config: Any):
  """The task named by `config.task` with its settings from the config."""
  if config.task == "sft":
    return SFTTask()
  if config.task == "dpo":
    return DPOTask(beta=config.dpo.beta, loss_type=config.dpo.loss_type, label_smoothing=config.dpo.label_smoothing)
  if config.task == "reward":
    return RewardTask(margin=config.reward.margin, center_rewards_coefficient=config.reward.center_rewards_coefficient)
  raise ValueError(f"task {config.task!r} unknown; one of 'sft', 'dpo', 'reward'")
