"""Losses and their metrics as pure functions of arrays (fp32 throughout). DPO and reward-model metrics use TRL's
names. Token log-probs come from the logits at the positions that predict the scored tokens (see `tasks.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "reference_free")
# Loss types whose formula has no reference term: no reference model is built, loaded or run for them.
REFERENCE_FREE_LOSS_TYPES = ("reference_free",)


def needs_reference(loss_type: str) -> bool:
  """Whether `dpo_loss` with this loss type reads reference log-probs."""
  return loss_type not in REFERENCE_FREE_LOSS_TYPES


def selected_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(targets) under each position's logits: [..., vocab] and [...] -> [...] (fp32).

  Target logit minus log-sum-exp, so no full log-softmax is materialised.
  """
  logits = logits.astype(jnp.float32)
  return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)


def sft_loss(target_logps: jax.Array, target_mask: jax.Array) -> tuple[jax.Array, dict]:
  """Mean token negative log-likelihood over all scored targets of the batch."""
  num_tokens = target_mask.sum()
  loss = -(target_logps * target_mask).sum() / jnp.maximum(num_tokens, 1.0)
  return loss, {"loss": loss, "perplexity": jnp.exp(loss), "num_tokens": num_tokens}


def dpo_loss(
    policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array, reference_chosen_logps: jax.Array,
    reference_rejected_logps: jax.Array, *, beta: float = 0.1, loss_type: str = "sigmoid",
    label_smoothing: float = 0.0, mask: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
  """Direct Preference Optimization (Rafailov et al., 2023) and its variants, averaged over pairs (over the pairs
  where `mask` is 1, when given: packed batches hold a varying number of pairs).

  logits h = beta * ((pi_c - ref_c) - (pi_r - ref_r)):
    sigmoid:         -(1 - eps) log σ(h) - eps log σ(-h)   (eps = label_smoothing: conservative DPO)
    ipo:             ((pi_c - ref_c) - (pi_r - ref_r) - 1 / (2 beta))^2   (Azar et al., 2023)
    hinge:           max(0, 1 - h)   (SLiC)
    reference_free:  the sigmoid loss with the reference log-probs taken as 0
  """
  if loss_type not in DPO_LOSS_TYPES:
    raise ValueError(f"dpo loss_type {loss_type!r} unknown; one of {DPO_LOSS_TYPES}")
  if loss_type == "reference_free":
    reference_chosen_logps = jnp.zeros_like(reference_chosen_logps)
    reference_rejected_logps = jnp.zeros_like(reference_rejected_logps)
  chosen_ratio = policy_chosen_logps - reference_chosen_logps
  rejected_ratio = policy_rejected_logps - reference_rejected_logps
  h = beta * (chosen_ratio - rejected_ratio)
  if loss_type == "ipo":
    losses = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)) ** 2
  elif loss_type == "hinge":
    losses = jax.nn.relu(1.0 - h)
  else:
    losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(h) - label_smoothing * jax.nn.log_sigmoid(-h)
  chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
  mean = _masked_mean(mask, losses)
  loss = mean(losses)
  return loss, {
      "loss": loss,
      "rewards/chosen": mean(chosen_rewards),
      "rewards/rejected": mean(rejected_rewards),
      "rewards/accuracies": mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
      "rewards/margins": mean(chosen_rewards - rejected_rewards),
      "logps/chosen": mean(policy_chosen_logps),
      "logps/rejected": mean(policy_rejected_logps),
  }


def reward_model_loss(chosen_rewards: jax.Array, rejected_rewards: jax.Array, *, margin: jax.Array | None = None,
                      center_rewards_coefficient: float = 0.0, mask: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Bradley–Terry loss -log σ(r_c - r_r - margin), plus an optional penalty pulling rewards toward 0 (centering);
  averaged over pairs (over the pairs where `mask` is 1, when given)."""
  diff = chosen_rewards - rejected_rewards
  if margin is not None:
    diff = diff - margin
  mean = _masked_mean(mask, diff)
  loss = mean(-jax.nn.log_sigmoid(diff))
  if center_rewards_coefficient:
    loss = loss + center_rewards_coefficient * mean((chosen_rewards + rejected_rewards) ** 2)
  return loss, {
      "loss": loss,
      "accuracy": mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
      "rewards/chosen": mean(chosen_rewards),
      "rewards/rejected": mean(rejected_rewards),
      "rewards/margins": mean(chosen_rewards - rejected_rewards),
  }


def _masked_mean(mask: jax.Array | None, like: jax.Array):
  """A mean over the entries where `mask` is 1 (all entries without a mask)."""
  weights = jnp.ones_like(like) if mask is None else mask.astype(like.dtype)
  return lambda x: (x * weights).sum() / jnp.maximum(weights.sum(), 1.0)
