"""What is trained: SFT, DPO, CPO / SimPO, ORPO, KTO and reward modelling, each a loss over a typed batch, all driven
by one loop; `TASKS` at the end is the registry of them, the one list every other module asks.

A task knows which examples it reads (`batch_kind`: "sft" rows, preference "pairs", or KTO's "unpaired" examples,
which travel in the pair layouts as (prompt, completion, mismatched completion): see `data/unpaired.py`), whether its
loss needs a reference (`uses_reference`, from the loss), how to compute its loss and metrics from a model and a
batch, and how many tokens a batch holds (for throughput). The batch's type (`data/layouts.py`) selects the code path:
separate chosen / rejected rows run as one concatenated forward; prefix-shared rows (one pair, or several packed, per
row) as one forward over prompt + chosen + rejected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxalign import logprobs, losses
from jaxalign.data.layouts import (CHOSEN_SIDE, REJECTED_SIDE, GroupBatch, RolloutBatch, SeparatePairBatch,
                                   SFTBatch, SharedPairBatch)

PairBatch = SeparatePairBatch | SharedPairBatch


class PairLogps(NamedTuple):
  """Summed response log-probs and scored tokens per response: [B] (separate rows) or [B, K] (shared rows)."""

  chosen: jax.Array
  rejected: jax.Array
  chosen_tokens: jax.Array
  rejected_tokens: jax.Array


def target_logprobs(model, hidden: jax.Array, input_ids: jax.Array, predecessors: jax.Array, targets: jax.Array,
                    target_mask: jax.Array, chunks: logprobs.Chunks = logprobs.UNCHUNKED) -> jax.Array:
  """log p of the tokens at `targets` [rows, S], each from the hidden state at `predecessors` [rows, S]; 0 where
  `target_mask` is 0. The LM head runs on these S positions only: most tokens (prompt, padding) are not scored;
  chunked as `chunks` says (`logprobs.head_logprobs`)."""
  picked = jnp.take_along_axis(hidden, predecessors[..., None], axis=1)
  tokens = jnp.take_along_axis(input_ids, targets, axis=1)
  return logprobs.head_logprobs(model, picked, tokens, chunks) * target_mask


def concatenated_pairs(batch: SeparatePairBatch) -> tuple[jax.Array, jax.Array]:
  """Chosen rows then rejected rows (collated to one length): (input_ids, attention_mask) [2B, L]."""
  return (jnp.concatenate([batch.chosen_input_ids, batch.rejected_input_ids]),
          jnp.concatenate([batch.chosen_attention_mask, batch.rejected_attention_mask]))


def separate_pair_logprobs(model, batch: SeparatePairBatch, dropout_key=None, *,
                           chunks: logprobs.Chunks = logprobs.UNCHUNKED) -> PairLogps:
  """Summed response log-probs of chosen and rejected, [B] each, from one concatenated forward."""
  ids, mask = concatenated_pairs(batch)
  targets = jnp.concatenate([batch.chosen_targets, batch.rejected_targets])
  target_mask = jnp.concatenate([batch.chosen_target_mask, batch.rejected_target_mask])
  hidden, _ = model.hidden_states(ids, mask, dropout_key=dropout_key)
  logps = target_logprobs(model, hidden, ids, jnp.maximum(targets - 1, 0), targets, target_mask,
                          chunks).sum(axis=-1)
  rows = batch.num_rows
  return PairLogps(logps[:rows], logps[rows:], batch.chosen_target_mask.sum(-1), batch.rejected_target_mask.sum(-1))


def shared_hidden_states(model, batch: SharedPairBatch, dropout_key=None) -> jax.Array:
  """The decoder's hidden states over prefix-shared rows: positions restart where the batch says, pairs in a row
  never attend to each other, and a rejected response never attends to its chosen one."""
  side = batch.response_side
  blocked = (side[:, :, None] == REJECTED_SIDE) & (side[:, None, :] == CHOSEN_SIDE)
  hidden, _ = model.hidden_states(batch.input_ids, batch.attention_mask, positions=batch.positions,
                                  segment_ids=batch.segment_ids, mask=~blocked, dropout_key=dropout_key)
  return hidden


def shared_pair_logprobs(model, batch: SharedPairBatch, dropout_key=None, *,
                         chunks: logprobs.Chunks = logprobs.UNCHUNKED) -> PairLogps:
  """Summed response log-probs of chosen and rejected, [B, K] (0 where `pair_mask` is 0), from one forward over
  prompt + chosen + rejected per pair, the rejected tokens unable to attend to the chosen ones."""
  hidden = shared_hidden_states(model, batch, dropout_key)
  targets = batch.targets
  predecessors = jnp.take_along_axis(batch.predecessor, targets, axis=1)
  logps = target_logprobs(model, hidden, batch.input_ids, predecessors, targets, batch.target_mask, chunks)
  target_side = jnp.take_along_axis(batch.response_side, targets, axis=1)
  # Each target summed into its pair's slot (segment k -> slot k - 1).
  slots = jax.nn.one_hot(jnp.take_along_axis(batch.segment_ids, targets, axis=1) - 1, batch.pair_mask.shape[1],
                         dtype=logps.dtype)
  per_pair = lambda values: jnp.einsum("bs,bsk->bk", values, slots)
  chosen_side = (target_side == CHOSEN_SIDE) * batch.target_mask
  rejected_side = (target_side == REJECTED_SIDE) * batch.target_mask
  return PairLogps(per_pair(logps * chosen_side), per_pair(logps * rejected_side), per_pair(chosen_side),
                   per_pair(rejected_side))


def group_logprobs(model, batch: GroupBatch, dropout_key=None, *, with_entropies: bool = False,
                   temperature: float = 1.0,
                   chunks: logprobs.Chunks = logprobs.UNCHUNKED) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Per-token log-probs [P*G, C] of each prompt group's completions (0 off `completion_mask`) from one forward over
  prompt + its G completions, each completion attending to the prompt and itself only; the LM head runs at the
  completion tokens only, chunked as `chunks` says (see `target_logprobs`). with_entropies: also the policy's entropy
  at those tokens [P*G, C], from the same pass of the head. temperature: of the sampling distribution the log-probs
  are of (TRL divides the logits by it in training too). The per-completion arrays may also come grouped by prompt,
  [P, G, C]: the outputs then have that shape."""
  member = batch.group_member
  other_completion = (member[:, :, None] > 0) & (member[:, None, :] > 0) & (member[:, :, None] != member[:, None, :])
  hidden, _ = model.hidden_states(batch.input_ids, batch.attention_mask, positions=batch.positions,
                                  mask=~other_completion, dropout_key=dropout_key)
  prompts = batch.num_rows
  flat = lambda x: x.reshape(prompts, -1)  # [P*G, C] -> [P, G*C]: each prompt row's completion tokens
  picked = jnp.take_along_axis(hidden, flat(batch.predecessors)[..., None], axis=1)
  tokens = jnp.take_along_axis(batch.input_ids, flat(batch.targets), axis=1)
  mask = flat(batch.completion_mask)
  shape = batch.completion_mask.shape
  if not with_entropies:
    return (logprobs.head_logprobs(model, picked, tokens, chunks, temperature=temperature) * mask).reshape(shape)
  logps, entropies = logprobs.head_logprobs(model, picked, tokens, chunks, with_entropies=True,
                                            temperature=temperature)
  return (logps * mask).reshape(shape), (entropies * mask).reshape(shape)


def pair_logprobs(model, batch: PairBatch, dropout_key=None, *, chunks: logprobs.Chunks = logprobs.UNCHUNKED) -> PairLogps:
  """Chosen and rejected log-probs and scored tokens, by the batch's layout (`chunks`: see
  `target_logprobs`)."""
  if isinstance(batch, SharedPairBatch):
    return shared_pair_logprobs(model, batch, dropout_key, chunks=chunks)
  return separate_pair_logprobs(model, batch, dropout_key, chunks=chunks)


def reference_pair_logps(reference, batch: PairBatch, *,
                         chunks: logprobs.Chunks = logprobs.UNCHUNKED) -> tuple[jax.Array, jax.Array]:
  """The reference's chosen and rejected log-probs: from `reference` (a model) when given, else the precomputed ones
  the batch carries (`extras` "reference_chosen_logps" / "reference_rejected_logps"); no gradient."""
  if reference is None:
    return batch.extras["reference_chosen_logps"], batch.extras["reference_rejected_logps"]
  logps = pair_logprobs(reference, batch, chunks=chunks)
  return jax.lax.stop_gradient(logps.chosen), jax.lax.stop_gradient(logps.rejected)


def pair_mask(batch: PairBatch) -> jax.Array | None:
  """Which per-pair entries are pairs ([B, K] for shared rows; None: every row of separate rows is one)."""
  return batch.pair_mask if isinstance(batch, SharedPairBatch) else None


def pair_tokens(batch: PairBatch) -> jax.Array:
  if isinstance(batch, SharedPairBatch):
    return batch.attention_mask.sum()
  return batch.chosen_attention_mask.sum() + batch.rejected_attention_mask.sum()


def pair_scored_tokens(batch: PairBatch) -> jax.Array:
  if isinstance(batch, SharedPairBatch):
    return batch.target_mask.sum()
  return batch.chosen_target_mask.sum() + batch.rejected_target_mask.sum()


class ScoredPairCounts:
  """Throughput counts of a task whose LM head scores pair (or KTO) rows: all tokens, and the scored ones."""

  def tokens(self, batch: PairBatch) -> jax.Array:
    return pair_tokens(batch)

  def scored_tokens(self, batch: PairBatch) -> jax.Array:
    return pair_scored_tokens(batch)


@dataclasses.dataclass(frozen=True)
class ReadsLMHead:
  """A task whose loss reads token log-probs off the LM head, chunked as `logprob_chunks` says (config
  model.logprob_chunk, logprob_vocab_chunk and logprob_chunk_above_mib; unchunked when built without a config)."""

  logprob_chunks: logprobs.Chunks = logprobs.UNCHUNKED


@dataclasses.dataclass(frozen=True)
class SFTTask(ReadsLMHead):
  """Next-token cross-entropy on the masked targets (the whole conversation, or only the final response)."""

  batch_kind = "sft"
  uses_reference = False

  def loss(self, model, batch: SFTBatch, *, dropout_key=None, reference=None) -> tuple[jax.Array, dict]:
    hidden, _ = model.hidden_states(batch.input_ids, batch.attention_mask, positions=batch.positions,
                                    segment_ids=batch.segment_ids, dropout_key=dropout_key)
    logps = target_logprobs(model, hidden, batch.input_ids, jnp.maximum(batch.targets - 1, 0), batch.targets,
                            batch.target_mask, self.logprob_chunks)
    return losses.sft_loss(logps, batch.target_mask)

  def tokens(self, batch: SFTBatch) -> jax.Array:
    return batch.attention_mask.sum()

  def scored_tokens(self, batch: SFTBatch) -> jax.Array:
    """Positions where the LM head runs."""
    return batch.target_mask.sum()


@dataclasses.dataclass(frozen=True)
class DPOTask(ReadsLMHead, ScoredPairCounts):
  """DPO and its variants. Against a reference when the loss needs one: a model (a frozen copy, or the LoRA base with
  adapters off) passed as `reference`, or precomputed log-probs carried by the batch (`extras`
  "reference_chosen_logps" / "reference_rejected_logps") with `reference` None."""

  beta: float = 0.1
  loss_type: str | tuple[str, ...] = "sigmoid"
  label_smoothing: float = 0.0
  loss_weights: tuple[float, ...] | None = None
  f_divergence_type: str = "reverse_kl"
  f_alpha_divergence_coef: float = 0.5
  discopop_tau: float = 0.05
  batch_kind = "pairs"

  @property
  def uses_reference(self) -> bool:
    return losses.needs_reference(self.loss_type)

  def reference_logps(self, reference, batch: PairBatch) -> tuple[jax.Array | None, jax.Array | None]:
    if not self.uses_reference:
      return None, None
    return reference_pair_logps(reference, batch, chunks=self.logprob_chunks)

  def loss(self, model, batch: PairBatch, *, dropout_key=None, reference=None) -> tuple[jax.Array, dict]:
    policy = pair_logprobs(model, batch, dropout_key, chunks=self.logprob_chunks)
    ref_chosen, ref_rejected = self.reference_logps(reference, batch)
    return losses.dpo_loss(policy.chosen, policy.rejected, ref_chosen, ref_rejected, beta=self.beta,
                           loss_type=self.loss_type, label_smoothing=self.label_smoothing, mask=pair_mask(batch),
                           chosen_lengths=policy.chosen_tokens, rejected_lengths=policy.rejected_tokens,
                           loss_weights=self.loss_weights, f_divergence_type=self.f_divergence_type,
                           f_alpha_divergence_coef=self.f_alpha_divergence_coef, discopop_tau=self.discopop_tau)


@dataclasses.dataclass(frozen=True)
class CPOTask(ReadsLMHead, ScoredPairCounts):
  """CPO (TRL's CPOTrainer) and SimPO (its loss_type "simpo"): a preference loss on the policy's own log-probs plus
  `alpha` times the chosen responses' NLL; no reference is built or run."""

  beta: float = 0.1
  loss_type: str = "sigmoid"
  alpha: float = 1.0
  simpo_gamma: float = 0.5
  label_smoothing: float = 0.0
  batch_kind = "pairs"
  uses_reference = False

  def loss(self, model, batch: PairBatch, *, dropout_key=None, reference=None) -> tuple[jax.Array, dict]:
    policy = pair_logprobs(model, batch, dropout_key, chunks=self.logprob_chunks)
    return losses.cpo_loss(policy.chosen, policy.rejected, beta=self.beta, cpo_alpha=self.alpha,
                           loss_type=self.loss_type, simpo_gamma=self.simpo_gamma,
                           label_smoothing=self.label_smoothing, mask=pair_mask(batch),
                           chosen_lengths=policy.chosen_tokens, rejected_lengths=policy.rejected_tokens)


@dataclasses.dataclass(frozen=True)
class ORPOTask(ReadsLMHead, ScoredPairCounts):
  """ORPO (TRL's ORPOTrainer): the chosen responses' NLL plus `beta` (the paper's lambda) times the log-odds-ratio
  term; no reference, so it trains from the base model in one stage."""

  beta: float = 0.1
  batch_kind = "pairs"
  uses_reference = False

  def loss(self, model, batch: PairBatch, *, dropout_key=None, reference=None) -> tuple[jax.Array, dict]:
    policy = pair_logprobs(model, batch, dropout_key, chunks=self.logprob_chunks)
    return losses.orpo_loss(policy.chosen, policy.rejected, chosen_lengths=policy.chosen_tokens,
                            rejected_lengths=policy.rejected_tokens, beta=self.beta, mask=pair_mask(batch))


@dataclasses.dataclass(frozen=True)
class KTOTask(ReadsLMHead, ScoredPairCounts):
  """KTO (TRL's KTOTrainer) on unpaired examples, each batch row pair (completion, mismatched completion): the
  completion's log-ratio against the reference, and the mismatched completions' for the KL point z. The reference
  as for DPO: a model passed as `reference`, or precomputed log-probs in the batch's extras; labels in the
  `desirable` extra.

  Besides `losses.kto_loss`'s metrics, rewards/accuracies: the fraction of examples whose log-ratio lies on the side
  of z their label asks for (above for desirable, below for undesirable; 0.5 for the starting model on balanced
  labels), KTO's own notion of a correct implicit reward for unpaired data."""

  beta: float = 0.1
  desirable_weight: float = 1.0
  undesirable_weight: float = 1.0
  loss_type: str = "kto"
  batch_kind = "unpaired"
  uses_reference = True

  def loss(self, model, batch: PairBatch, *, dropout_key=None, reference=None) -> tuple[jax.Array, dict]:
    policy = pair_logprobs(model, batch, dropout_key, chunks=self.logprob_chunks)
    # The KL point carries no gradient (TRL computes it under no_grad).
    kl_policy = jax.lax.stop_gradient(policy.rejected)
    ref_completion, ref_kl = reference_pair_logps(reference, batch, chunks=self.logprob_chunks)
    desirable = batch.extras["desirable"]
    mask = pair_mask(batch)
    loss, metrics = losses.kto_loss(policy.chosen, ref_completion, desirable, kl_policy_logps=kl_policy,
                                    kl_reference_logps=ref_kl, beta=self.beta,
                                    desirable_weight=self.desirable_weight,
                                    undesirable_weight=self.undesirable_weight, loss_type=self.loss_type, mask=mask)
    logratio = policy.chosen - ref_completion
    correct = jnp.where(desirable > 0, logratio > metrics["kl"], logratio < metrics["kl"]).astype(jnp.float32)
    weights = jnp.ones_like(correct) if mask is None else mask.astype(jnp.float32)
    metrics["rewards/accuracies"] = (correct * weights).sum() / jnp.maximum(weights.sum(), 1.0)
    return loss, metrics


@dataclasses.dataclass(frozen=True)
class RewardTask:
  """Bradley–Terry reward modelling; with several heads each pair trains the head named by its `head` extra."""

  margin: float = 0.0
  center_rewards_coefficient: float = 0.0
  batch_kind = "pairs"
  uses_reference = False

  def loss(self, model, batch: PairBatch, *, dropout_key=None, reference=None) -> tuple[jax.Array, dict]:
    chosen, rejected = self.pair_rewards(model, batch, dropout_key)  # [B, heads] or [B, K, heads]
    head = batch.extras["head"]
    pick = lambda rewards: jnp.take_along_axis(rewards, head[..., None], axis=-1)[..., 0]
    margin = jnp.full(chosen.shape[:-1], self.margin) if self.margin else None
    return losses.reward_model_loss(pick(chosen), pick(rejected), margin=margin,
                                    center_rewards_coefficient=self.center_rewards_coefficient, mask=pair_mask(batch))

  @staticmethod
  def pair_rewards(model, batch: PairBatch, dropout_key=None) -> tuple[jax.Array, jax.Array]:
    """Chosen and rejected rewards of every head: [B, heads] from one forward over separate chosen / rejected rows,
    or [B, K, heads] from prefix-shared rows (each response read at its last token)."""
    if isinstance(batch, SharedPairBatch):
      hidden = shared_hidden_states(model.backbone, batch, dropout_key)
      return model.scores(hidden, batch.chosen_end), model.scores(hidden, batch.rejected_end)
    ids, mask = concatenated_pairs(batch)
    rewards = model(ids, mask, dropout_key=dropout_key)
    return rewards[:batch.num_rows], rewards[batch.num_rows:]

  def tokens(self, batch: PairBatch) -> jax.Array:
    return pair_tokens(batch)

  def scored_tokens(self, batch: PairBatch) -> jax.Array:
    return jnp.zeros((), jnp.int32)  # a scalar head, no LM head


def dpo_loss_type(dpo) -> str | tuple[str, ...]:
  """`dpo.loss_type` as `losses.dpo_loss` takes it: one name, or several given as "sigmoid,sft" or
  '("sigmoid", "sft")' (a config string; the command line passes strings)."""
  names = [name.strip(" '\"") for name in str(dpo.loss_type).strip().strip("()[]").split(",")]
  names = [name for name in names if name]
  return names[0] if len(names) == 1 else tuple(names)


def _dpo(config) -> DPOTask:
  dpo = config.dpo
  return DPOTask(beta=dpo.beta, loss_type=dpo_loss_type(dpo), label_smoothing=dpo.label_smoothing,
                 loss_weights=tuple(dpo.loss_weights) if dpo.loss_weights else None,
                 f_divergence_type=dpo.f_divergence_type, f_alpha_divergence_coef=dpo.f_alpha_divergence_coef,
                 discopop_tau=dpo.discopop_tau)


def _cpo(config) -> CPOTask:
  cpo = config.cpo
  return CPOTask(beta=cpo.beta, loss_type=cpo.loss_type, alpha=cpo.alpha, simpo_gamma=cpo.simpo_gamma,
                 label_smoothing=cpo.label_smoothing)


def _kto(config) -> KTOTask:
  kto = config.kto
  return KTOTask(beta=kto.beta, desirable_weight=kto.desirable_weight, undesirable_weight=kto.undesirable_weight,
                 loss_type=kto.loss_type)


# ------------------------------------------------------------------------------------------- online methods


def _per_completion(x: jax.Array) -> jax.Array:
  """[P, G, ...] -> [P*G, ...]: prompt-major completion rows, as the losses take them."""
  return x.reshape(-1, *x.shape[2:])


@dataclasses.dataclass(frozen=True)
class OnlineTask(ReadsLMHead):
  """What the online methods share: their batches are `RolloutBatch`es of sampled prompt groups (`batch_kind`
  "prompts": the source is `rollout.py`), their log-probs come from the group forward at the sampling temperature,
  and their advantages are computed on the host when a generation is scored (`advantages`).

  use_old_logps: the sampling-time log-probs are the "old" policy of the ratio (TRL: when num_iterations > 1 or a
  generation serves several steps); otherwise the ratio is to this policy itself, without gradient."""

  num_generations: int = 8
  temperature: float = 1.0
  use_old_logps: bool = False
  mask_truncated_completions: bool = False
  batch_kind = "prompts"

  def policy_logps(self, model, batch: RolloutBatch, dropout_key=None) -> tuple[jax.Array, jax.Array]:
    """The policy's per-token log-probs and entropies, [P*G, C] each."""
    logps, entropies = group_logprobs(model, batch.group, dropout_key, with_entropies=True,
                                      temperature=self.temperature, chunks=self.logprob_chunks)
    return _per_completion(logps), _per_completion(entropies)

  def loss_inputs(self, batch: RolloutBatch) -> dict[str, jax.Array | None]:
    """Old log-probs (or None), loss mask and row mask as the losses take them."""
    mask = losses.loss_mask(_per_completion(batch.group.completion_mask), _per_completion(batch.truncated),
                            self.mask_truncated_completions)
    return {"old": _per_completion(batch.old_logps) if self.use_old_logps else None, "mask": mask,
            "rows": _per_completion(batch.group.row_mask)}

  def tokens(self, batch: RolloutBatch) -> jax.Array:
    return batch.group.attention_mask.sum()

  def scored_tokens(self, batch: RolloutBatch) -> jax.Array:
    return batch.group.completion_mask.sum()


@dataclasses.dataclass(frozen=True)
class GRPOTask(OnlineTask):
  """GRPO (TRL's GRPOTrainer) and its variants by `loss_type` (DAPO, Dr. GRPO, BNPO) and `importance_sampling_level`
  (GSPO: sequence); group-normalised advantages (`scale_rewards`); the k3 KL to the reference when beta != 0."""

  beta: float = 0.0
  loss_type: str = "dapo"
  epsilon: float = 0.2
  epsilon_high: float | None = None
  delta: float | None = None
  importance_sampling_level: str = "token"
  scale_rewards: str = "group"
  max_completion_length: int | None = None

  @property
  def uses_reference(self) -> bool:
    return losses.grpo_needs_reference(self.beta)

  def advantages(self, rewards, old_logps, ref_logps, completion_mask, finished) -> tuple:
    """(rewards, advantages, metrics) of a scored generation batch, rows prompt-major [P*G]."""
    advantages, metrics = losses.group_advantages(rewards, self.num_generations, scale_rewards=self.scale_rewards)
    return rewards, advantages, metrics

  def loss(self, model, batch: RolloutBatch, *, dropout_key=None, reference=None) -> tuple[jax.Array, dict]:
    logps, entropies = self.policy_logps(model, batch, dropout_key)
    inputs = self.loss_inputs(batch)
    ref = _per_completion(batch.ref_logps) if self.uses_reference else None
    return losses.grpo_loss(logps, inputs["old"], ref, _per_completion(batch.advantages), inputs["mask"],
                            loss_type=self.loss_type, beta=self.beta, epsilon=self.epsilon,
                            epsilon_high=self.epsilon_high, delta=self.delta,
                            importance_sampling_level=self.importance_sampling_level,
                            max_completion_length=self.max_completion_length,
                            num_items_in_batch=batch.num_items.mean(), row_mask=inputs["rows"], entropies=entropies)


@dataclasses.dataclass(frozen=True)
class RLOOTask(OnlineTask):
  """RLOO (TRL's RLOOTrainer): leave-one-out advantages with beta x the sampled completion's KL to the reference in
  the reward, and a clipped ratio per completion."""

  beta: float = 0.05
  epsilon: float = 0.2
  epsilon_high: float | None = None
  normalize_advantages: bool = False
  reward_clip_range: tuple[float, float] | None = None

  @property
  def uses_reference(self) -> bool:
    return self.beta != 0.0

  def advantages(self, rewards, old_logps, ref_logps, completion_mask, finished) -> tuple:
    advantages, metrics = losses.rloo_advantages(
        rewards, self.num_generations, beta=self.beta, old_per_token_logps=old_logps,
        ref_per_token_logps=ref_logps, completion_mask=completion_mask,
        normalize_advantages=self.normalize_advantages, reward_clip_range=self.reward_clip_range)
    return rewards, advantages, metrics

  def loss(self, model, batch: RolloutBatch, *, dropout_key=None, reference=None) -> tuple[jax.Array, dict]:
    logps, entropies = self.policy_logps(model, batch, dropout_key)
    inputs = self.loss_inputs(batch)
    return losses.rloo_loss(logps, inputs["old"], _per_completion(batch.advantages), inputs["mask"],
                            epsilon=self.epsilon, epsilon_high=self.epsilon_high, row_mask=inputs["rows"],
                            entropies=entropies)


@dataclasses.dataclass(frozen=True)
class OnlineDPOTask(OnlineTask):
  """Online DPO (TRL's OnlineDPOTrainer): two completions per prompt, the higher reward chosen, then a DPO loss
  (`dpo_loss_type`) against the reference; `missing_eos_penalty` subtracted from completions that did not end."""

  num_generations: int = 2
  beta: float = 0.1
  loss_type: str | tuple[str, ...] = "sigmoid"
  missing_eos_penalty: float | None = None
  uses_reference = True

  def advantages(self, rewards, old_logps, ref_logps, completion_mask, finished) -> tuple:
    """The rewards after the missing-EOS penalty; no advantages (zeros): the loss reads the rewards."""
    penalised = losses.apply_missing_eos_penalty(rewards, finished, self.missing_eos_penalty)
    return penalised, jnp.zeros_like(jnp.asarray(rewards)), {}

  def loss(self, model, batch: RolloutBatch, *, dropout_key=None, reference=None) -> tuple[jax.Array, dict]:
    logps, entropies = self.policy_logps(model, batch, dropout_key)
    inputs = self.loss_inputs(batch)
    loss, metrics = losses.online_dpo_loss(logps, _per_completion(batch.ref_logps), _per_completion(batch.rewards),
                                           inputs["mask"], beta=self.beta, loss_type=self.loss_type,
                                           row_mask=inputs["rows"])
    metrics["entropy"] = (entropies * inputs["mask"]).sum() / jnp.maximum(inputs["mask"].sum(), 1.0)
    return loss, metrics


def _online(config) -> dict[str, Any]:
  online = config.online
  return dict(num_generations=online.num_generations, temperature=online.temperature,
              use_old_logps=online.num_iterations > 1 or online.steps_per_generation > 1,
              mask_truncated_completions=online.mask_truncated_completions)


def _grpo(config) -> GRPOTask:
  grpo = config.grpo
  return GRPOTask(**_online(config), beta=grpo.beta, loss_type=grpo.loss_type, epsilon=grpo.epsilon,
                  epsilon_high=grpo.epsilon_high, delta=grpo.delta,
                  importance_sampling_level=grpo.importance_sampling_level, scale_rewards=grpo.scale_rewards,
                  max_completion_length=config.online.max_completion_length)


def _rloo(config) -> RLOOTask:
  rloo = config.rloo
  clip = tuple(rloo.reward_clip_range) or None
  return RLOOTask(**_online(config), beta=rloo.beta, epsilon=rloo.epsilon, epsilon_high=rloo.epsilon_high,
                  normalize_advantages=rloo.normalize_advantages, reward_clip_range=clip)


def _online_dpo(config) -> OnlineDPOTask:
  return OnlineDPOTask(**_online(config), beta=config.online_dpo.beta, loss_type=dpo_loss_type(config.online_dpo),
                       missing_eos_penalty=config.online_dpo.missing_eos_penalty)


# ---------------------------------------------------------------------------------------------------- registry


ONLINE_SETTINGS = ("online.rewards", "online.reward_weights", "online.num_generations",
                   "online.max_completion_length", "online.temperature", "online.steps_per_generation",
                   "online.num_iterations")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A task as the rest of jaxalign sees it: how to build its loss from a config, which examples it reads, what it
  trains, and how its model card and curves describe it."""

  name: str  # config.task
  make: Callable[[Any], Any]  # config -> the task object (its loss and metrics, with the config's settings)
  batch_kind: str  # "sft" rows, preference "pairs", KTO's "unpaired" examples, or "prompts" (online: rollout.py)
  description: str  # the method, as a model card names it
  settings: tuple[str, ...]  # its own config fields (dotted names) a model card lists beside the common ones
  reward_model: bool = False  # trains a reward model (scalar heads on the decoder) instead of a causal LM
  reward_kind: str | None = None  # what its rewards/* metrics are, for the curves' panel titles


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("sft", lambda config: SFTTask(), "sft", "supervised fine-tuning (SFT)",
             ("data.loss_on", "data.sft_responses")),
    TaskSpec("dpo", _dpo, "pairs", "Direct Preference Optimization (DPO)",
             ("dpo.beta", "dpo.loss_type", "dpo.label_smoothing", "dpo.reference"),
             reward_kind="DPO's implicit reward: beta x log-ratio to the reference"),
    TaskSpec("cpo", _cpo, "pairs", "Contrastive Preference Optimization (CPO; SimPO with cpo.loss_type simpo)",
             ("cpo.beta", "cpo.loss_type", "cpo.alpha", "cpo.simpo_gamma", "cpo.label_smoothing"),
             reward_kind="beta x the policy's log-prob (mean token log-prob for ipo and simpo)"),
    TaskSpec("orpo", lambda config: ORPOTask(beta=config.orpo.beta), "pairs",
             "Odds Ratio Preference Optimization (ORPO)", ("orpo.beta",),
             reward_kind="beta x the policy's mean token log-prob"),
    TaskSpec("kto", _kto, "unpaired", "Kahneman-Tversky Optimization (KTO)",
             ("kto.beta", "kto.loss_type", "kto.desirable_weight", "kto.undesirable_weight", "dpo.reference"),
             reward_kind="KTO's implicit reward: beta x log-ratio to the reference"),
    TaskSpec("reward", lambda config: RewardTask(margin=config.reward.margin,
                                                 center_rewards_coefficient=config.reward.center_rewards_coefficient),
             "pairs", "a Bradley-Terry reward model", ("reward.heads", "reward.margin"), reward_model=True,
             reward_kind="the reward head's score"),
    TaskSpec("grpo", _grpo, "prompts", "Group Relative Policy Optimization (GRPO; DAPO, Dr. GRPO, GSPO variants)",
             ONLINE_SETTINGS + ("grpo.loss_type", "grpo.beta", "grpo.epsilon", "grpo.epsilon_high",
                                "grpo.importance_sampling_level", "grpo.scale_rewards"),
             reward_kind="the training reward (weighted sum of online.rewards)"),
    TaskSpec("rloo", _rloo, "prompts", "REINFORCE Leave-One-Out (RLOO)",
             ONLINE_SETTINGS + ("rloo.beta", "rloo.epsilon", "rloo.normalize_advantages"),
             reward_kind="the training reward (weighted sum of online.rewards)"),
    TaskSpec("online_dpo", _online_dpo, "prompts", "Online Direct Preference Optimization (online DPO)",
             ONLINE_SETTINGS + ("online_dpo.beta", "online_dpo.loss_type", "online_dpo.missing_eos_penalty"),
             reward_kind="the training reward (weighted sum of online.rewards)"),
)}


def spec(name: str) -> TaskSpec:
  """The registry entry of task `name`."""
  if name not in TASKS:
    raise ValueError(f"task {name!r} unknown; one of {list(TASKS)}")
  return TASKS[name]


def make_task(config: Any):
  """The task named by `config.task` with its settings from the config."""
  task = spec(config.task).make(config)
  if isinstance(task, ReadsLMHead):
    return dataclasses.replace(task, logprob_chunks=logprobs.configured(config.model))
  return task
