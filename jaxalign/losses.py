"""Losses and their metrics as pure functions of arrays (fp32 throughout). Preference losses take each response's
summed token log-probs (and, where a formula needs them, its number of scored tokens) and average over the pairs or
examples present (`mask`: packed batches hold a varying number); names, formulas and metric names are TRL 1.16's.
Token log-probs come from the logits at the positions that predict the scored tokens (see `tasks.py`).

Notation: per pair, pi_c / pi_r are the policy's summed log-probs of the chosen / rejected response, ref_c / ref_r
the reference's, n_c / n_r their scored tokens; log-ratios u_c = pi_c - ref_c, u_r = pi_r - ref_r; scores
s = g(u) under the f-divergence g; D = s_c - s_r; eps = label_smoothing; l(x) = -log sigmoid(x).

f-divergence g (`f_divergence_type`; f-DPO, Wang et al. 2023, arXiv 2309.16240); only for the loss types built on
D (sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft):
  reverse_kl        u (standard DPO)
  forward_kl        1 - exp(-u)
  js_divergence     log 2 + log sigmoid(u)
  alpha_divergence  (exp((a - 1) u) - 1) / (a - 1), a = f_alpha_divergence_coef (exponent clipped at 80; a = 1 is u)

`dpo_loss` loss types (one name, or a tuple summed with `loss_weights`: ("sigmoid", "sft") is RPO):
  sigmoid         (1 - eps) l(beta D) + eps l(-beta D)          DPO, Rafailov et al. 2023, arXiv 2305.18290; eps > 0
                  is conservative DPO (Mitchell 2023, as in the reference implementation; TRL 1.16 ignores eps here)
  hinge           max(0, 1 - beta D)                           SLiC-HF, Zhao et al. 2023, arXiv 2305.10425
  ipo             (s_c / n_c - s_r / n_r - 1 / (2 beta))^2       IPO, Azar et al. 2023, arXiv 2310.12036; per token as
                  TRL and the IPO authors do (without token counts, n = 1: the paper's Eq. 17 on summed log-probs)
  exo_pair        q (log q - log(1 - eps)) + (1 - q) (log(1 - q) - log eps), q = sigmoid(beta D)
                                                               EXO, Ji et al. 2024, arXiv 2402.00856 (eps > 0; 1e-3)
  nca_pair        l(beta u_c) + l(-beta u_c) / 2 + l(-beta u_r) / 2   NCA, Chen et al. 2024, arXiv 2402.05369
  robust          ((1 - eps) l(beta D) - eps l(-beta D)) / (1 - 2 eps)   rDPO, Chowdhury et al. 2024, arXiv 2403.00409
                  (eps in [0, 0.5): the label-flip rate; 0.1 in the paper)
  bco_pair        l(beta u_c) + l(-beta u_r)                   BCO, Jung et al. 2024, arXiv 2404.04656
  sppo_hard       (u_c - 1 / (2 beta))^2 + (u_r + 1 / (2 beta))^2   SPPO (hard labels), Wu et al. 2024, arXiv 2405.00675
  aot             (1 - eps) l(beta d) + eps l(-beta d), d = sort(pi_c - pi_r) - sort(ref_c - ref_r), sorted over the
                  global batch's pairs (TRL sorts each device's) AOT, Melnyk et al. 2024, arXiv 2406.05882
  aot_unpaired    the same with d = sort(u_c) - sort(u_r)      AOT
  apo_zero        1 - sigmoid(beta u_c) + sigmoid(beta u_r)    APO, D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 7
  apo_down        sigmoid(beta u_c) + 1 - sigmoid(beta (u_c - u_r))   APO, Eq. 8
  discopop        (1 - m) l(beta D) + m exp(-beta D), m = sigmoid(beta D / tau), tau = discopop_tau (0.05)
                                                               DiscoPOP, Lu et al. 2024, arXiv 2406.08414
  sft             -sum(pi_c) / sum(n_c) over the batch: the chosen responses' mean token NLL (no reference)
                                                               RPO, Pang et al. 2024, arXiv 2404.19733 (with sigmoid)
  sigmoid_norm    l(beta (s_c / n_c - s_r / n_r))              length-normalised DPO, Tulu 3, Lambert et al. 2024,
                                                               arXiv 2411.15124
  reference_free  (ours) (1 - eps) l(beta (pi_c - pi_r)) + eps l(-beta (pi_c - pi_r)): sigmoid with no reference
  DPO metrics: rewards/chosen = beta u_c, rewards/rejected = beta u_r, rewards/accuracies, rewards/margins,
  logps/chosen = pi_c, logps/rejected = pi_r (u with the reference taken as 0 when the loss needs none); with several
  loss types also loss/<type>, each term before its weight.

Reference-free methods (no reference model at all; TRL's CPOTrainer / ORPOTrainer; a = pi / n, the mean token log-prob):
  simpo_loss  (1 - eps) l(beta (a_c - a_r) - gamma) + eps l(gamma - beta (a_c - a_r))  [+ sft_weight NLL]
              SimPO, Meng et al. 2024, arXiv 2405.14734 (beta 2.0, gamma 1.0: gamma / beta 0.5 for Llama-3-Base)
  cpo_loss    (1 - eps) l(beta (pi_c - pi_r)) + eps l(-beta (pi_c - pi_r)) + alpha NLL   (loss_type hinge / ipo /
              simpo as TRL's CPO: ipo and simpo on a)      CPO, Xu et al. 2024, arXiv 2401.08417 (beta 0.1, alpha 1)
  orpo_loss   NLL - lambda log sigmoid(log odds), log odds = (a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r))
              ORPO, Hong et al. 2024, arXiv 2403.07691 (lambda = `beta`, 0.1 as in Mistral-ORPO and TRL)
  NLL = -sum(pi_c) / sum(n_c) over the batch: the chosen responses' mean token NLL (metric nll_loss). Metrics:
  rewards/* = beta pi (beta a for simpo, ipo and orpo), logps/* = the log-probs the loss compares, nll_loss; ORPO
  adds log_odds_ratio = mean log sigmoid(log odds) and log_odds_chosen = mean log odds.

KTO (`kto_loss`, TRL's KTOTrainer; unpaired examples, each desirable or not, against a reference):
  desirable     desirable_weight (1 - sigmoid(beta (u - z)))     KTO, Ethayarajh et al. 2024, arXiv 2402.01306
  undesirable   undesirable_weight (1 - sigmoid(beta (z - u)))  (beta 0.1; weights 1, or with
                desirable_weight n_desirable / (undesirable_weight n_undesirable) in [1, 4/3])
  z = max(0, mean(pi' - ref')) over mismatched (prompt, completion) pairs of the batch, no gradient through it;
  loss_type apo_zero_unpaired: desirable 1 - sigmoid(beta u), undesirable sigmoid(beta u), no z (APO, arXiv
  2408.06266).
  Metrics: kl = z, rewards/chosen|rejected = mean beta u over desirable | undesirable examples (0 when there are
  none), rewards/margins, logps/chosen|rejected.

Online methods (TRL 1.16's GRPOTrainer, RLOOTrainer and experimental OnlineDPOTrainer), on per-token log-probs
[rows, T] of sampled completions (rows = prompts x num_generations, each prompt's completions adjacent), m the
completion mask (0 on padding, and on truncated completions with `mask_truncated_completions`: `loss_mask`):
  advantages  group_advantages: A = (r - mean_group(r)) / (std + 1e-4), std over the group (`scale_rewards`
              "group"), the batch ("batch") or none ("none": A = r - mean_group(r)); GRPO, Shao et al. 2024, arXiv
              2402.03300; Dr. GRPO (Liu et al. 2025, arXiv 2503.20783) drops the std. rloo_advantages: A = r - the
              mean of the other completions' rewards of the prompt, r = reward - beta sum_t (old_t - ref_t) (the KL
              in the reward); RLOO, Ahmadian et al. 2024, arXiv 2402.14740. NaN rewards (no reward function scored
              the completion) are left out of every mean and std and get advantage 0 (TRL's rule).
  grpo_loss   ratio w = exp(logp - old) per token, or with importance_sampling_level "sequence" the exponential of
              the mean of (logp - old) over the completion (GSPO, Zheng et al. 2025, arXiv 2507.18071);
              l = -min(min(w, delta) A, clip(w, 1 - epsilon, 1 + epsilon_high) A) + beta k3, k3 = exp(ref - logp)
              - (ref - logp) - 1 (Schulman's estimator; no reference when beta = 0), aggregated by loss_type:
                grpo     mean over completions of each completion's mean over its tokens
                bnpo     sum(l m) / sum(m) over the batch
                dr_grpo  sum(l m) / (completions x max_completion_length)
                dapo     sum(l m) / num_items_in_batch (the generation batch's completion tokens; TRL's default;
                         DAPO, Yu et al. 2025, arXiv 2503.14476, with epsilon_high 0.28)
              delta: two-sided clipping (INTELLECT-2, arXiv 2505.07291); old = logp without gradient when None
              (one update per generation). Metrics: loss, kl (mean k3), entropy (given per-token entropies),
              clip_ratio/low_mean|high_mean|region_mean (share of tokens, or of completions at sequence level,
              whose ratio is clipped on the side their advantage pushes), clip_ratio/low_min|high_max.
  rloo_loss   w = exp(sum_t logp - sum_t old) per completion, l = -min(w A, clip(w, 1 - epsilon, 1 + epsilon_high) A),
              mean over completions. Metrics: loss, entropy, clip_ratio/*.
  online_dpo_loss  two completions per prompt: the one with the higher reward (the first on a tie) is chosen, then
              `dpo_loss` with any loss type on their summed log-probs. Metrics: dpo_loss's, objective/kl
              (mean summed logp - ref), objective/entropy (mean -summed logp), objective/non_score_reward,
              objective/rlhf_reward, objective/scores, objective/scores_margin (TRL's names).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", "reference_free")
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The f-DPO reparameterisation leaves a beta log Z(x) term that cancels only in the chosen-minus-rejected score
# difference, so only the loss types built on it generalise (TRL's set).
F_DIVERGENCE_LOSS_TYPES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop",
                                     "sft"})
# Loss types that read no reference log-probs: a run of only these builds, loads and runs no reference.
REFERENCE_FREE_LOSS_TYPES = frozenset({"sft", "reference_free"})
# Loss types that read each response's number of scored tokens (`chosen_lengths` / `rejected_lengths`).
TOKEN_COUNT_LOSS_TYPES = frozenset({"ipo", "sigmoid_norm", "sft"})
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")

def selected_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(targets) under each position's logits: [..., vocab] and [...] -> [...] (fp32).

  Target logit minus log-sum-exp, so no full log-softmax is materialised.
  """
  logits = logits.astype(jnp.float32)
  return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)


def token_entropies(logits: jax.Array) -> jax.Array:
  """The entropy of each position's next-token distribution: [..., vocab] -> [...] (fp32)."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -(jnp.exp(log_probs) * log_probs).sum(-1)


def sft_loss(target_logps: jax.Array, target_mask: jax.Array) -> tuple[jax.Array, dict]:
  """Mean token negative log-likelihood over all scored targets of the batch."""
  num_tokens = target_mask.sum()
  loss = -(target_logps * target_mask).sum() / jnp.maximum(num_tokens, 1.0)
  return loss, {"loss": loss, "perplexity": jnp.exp(loss), "num_tokens": num_tokens}


def dpo_loss_types(loss_type: str | Sequence[str]) -> tuple[str, ...]:
  """`loss_type` (one name, or several to sum) as a tuple of names."""
  return (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)


def needs_reference(loss_type: str | Sequence[str]) -> bool:
  """Whether a DPO loss (one type or several) reads reference log-probs; when not, no reference is built."""
  return not set(dpo_loss_types(loss_type)) <= REFERENCE_FREE_LOSS_TYPES


def needs_token_counts(loss_type: str | Sequence[str]) -> bool:
  """Whether a DPO loss (one type or several) reads each response's number of scored tokens."""
  return bool(set(dpo_loss_types(loss_type)) & TOKEN_COUNT_LOSS_TYPES)


def check_dpo_options(loss_type: str | Sequence[str] = "sigmoid", *, loss_weights: Sequence[float] | None = None,
                      label_smoothing: float = 0.0, f_divergence_type: str = "reverse_kl",
                      discopop_tau: float = 0.05) -> tuple[tuple[str, ...], tuple[float, ...]]:
  """Validate a DPO loss's options (before anything compiles); return its loss types and their weights.

  Raises ValueError naming the option, what it was and what is allowed.
  """
  types = dpo_loss_types(loss_type)
  unknown = [name for name in types if name not in DPO_LOSS_TYPES]
  if not types or unknown:
    raise ValueError(f"dpo loss_type {loss_type!r}: expected one of {DPO_LOSS_TYPES}, or a non-empty tuple of them")
  if len(set(types)) != len(types):
    raise ValueError(f"dpo loss_type {types} names a loss type twice; give each once and weight it in loss_weights")
  weights = (1.0,) * len(types) if loss_weights is None else tuple(float(w) for w in loss_weights)
  if len(weights) != len(types):
    raise ValueError(f"dpo loss_weights {weights}: expected one weight per loss type of {types}")
  if f_divergence_type not in F_DIVERGENCE_TYPES:
    raise ValueError(f"dpo f_divergence_type {f_divergence_type!r}: expected one of {F_DIVERGENCE_TYPES}")
  if f_divergence_type != "reverse_kl" and not set(types) <= F_DIVERGENCE_LOSS_TYPES:
    raise ValueError(f"dpo f_divergence_type {f_divergence_type!r} works only with the loss types "
                     f"{sorted(F_DIVERGENCE_LOSS_TYPES)}, not {types}; use reverse_kl with these")
  if not 0.0 <= label_smoothing <= 1.0:
    raise ValueError(f"dpo label_smoothing {label_smoothing}: expected a number in [0, 1]")
  if "robust" in types and not label_smoothing < 0.5:
    raise ValueError(f"dpo label_smoothing {label_smoothing}: the robust loss needs the label-flip rate in [0, 0.5)")
  if "exo_pair" in types and not 0.0 < label_smoothing < 1.0:
    raise ValueError(f"dpo label_smoothing {label_smoothing}: the exo_pair loss needs eps in (0, 1) (the EXO paper "
                     "uses 1e-3)")
  if "discopop" in types and not discopop_tau > 0:
    raise ValueError(f"dpo discopop_tau {discopop_tau}: expected a positive temperature (the paper uses 0.05)")
  return types, weights


def dpo_loss(
    policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array, reference_chosen_logps: jax.Array | None,
    reference_rejected_logps: jax.Array | None, *, beta: float = 0.1, loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0, mask: jax.Array | None = None, chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None, loss_weights: Sequence[float] | None = None,
    f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5, discopop_tau: float = 0.05,
) -> tuple[jax.Array, dict]:
  """Direct Preference Optimization and TRL 1.16's whole menu of its variants (formulas in the module docstring):
  the weighted sum of each loss type's mean over pairs (over the pairs where `mask` is 1, when given).

  Log-probs are summed over each response's scored tokens; `chosen_lengths` / `rejected_lengths` count those
  tokens (needed by ipo, sigmoid_norm and sft: `needs_token_counts`). The reference log-probs may be None when the
  loss needs no reference (`needs_reference`).
  """
  types, weights = check_dpo_options(loss_type, loss_weights=loss_weights, label_smoothing=label_smoothing,
                                     f_divergence_type=f_divergence_type, discopop_tau=discopop_tau)
  needs_counts = {"sigmoid_norm", "sft"} & set(types)
  if needs_counts and (chosen_lengths is None or rejected_lengths is None):
    raise ValueError(f"dpo loss_type {sorted(needs_counts)} needs chosen_lengths and rejected_lengths (the scored "
                     "tokens of each response)")
  policy_chosen_logps, policy_rejected_logps = _fp32(policy_chosen_logps), _fp32(policy_rejected_logps)
  if not needs_reference(types):
    reference_chosen_logps = reference_rejected_logps = jnp.zeros_like(policy_chosen_logps)
  elif reference_chosen_logps is None or reference_rejected_logps is None:
    raise ValueError(f"dpo loss_type {types} needs reference log-probs; got None")
  reference_chosen_logps, reference_rejected_logps = _fp32(reference_chosen_logps), _fp32(reference_rejected_logps)
  ones = jnp.ones_like(policy_chosen_logps)
  pairs = _Pairs(
      policy_chosen=policy_chosen_logps, policy_rejected=policy_rejected_logps,
      reference_chosen=reference_chosen_logps, reference_rejected=reference_rejected_logps,
      chosen_lengths=ones if chosen_lengths is None else _fp32(chosen_lengths),
      rejected_lengths=ones if rejected_lengths is None else _fp32(rejected_lengths),
      beta=beta, eps=label_smoothing, discopop_tau=discopop_tau, mask=mask,
      f_divergence=lambda u: _f_divergence_score(u, f_divergence_type, f_alpha_divergence_coef))
  mean = _masked_mean(mask, policy_chosen_logps)
  terms = {name: _DPO_TERMS[name](pairs, mean) for name in types}
  loss = sum(weight * terms[name] for name, weight in zip(types, weights))
  metrics = _pair_metrics(loss, beta * pairs.chosen_logratio, beta * pairs.rejected_logratio, policy_chosen_logps,
                          policy_rejected_logps, mean)
  if len(types) > 1:
    metrics.update({f"loss/{name}": term for name, term in terms.items()})
  return loss, metrics


class _Pairs:
  """One batch of pairs as the DPO loss terms read them: log-probs, token counts, options, and the
  log-ratios and f-divergence scores derived from them."""

  def __init__(self, *, policy_chosen, policy_rejected, reference_chosen, reference_rejected, chosen_lengths,
               rejected_lengths, beta, eps, discopop_tau, mask, f_divergence):
    self.policy_chosen, self.policy_rejected = policy_chosen, policy_rejected
    self.reference_chosen, self.reference_rejected = reference_chosen, reference_rejected
    self.chosen_lengths, self.rejected_lengths = chosen_lengths, rejected_lengths
    self.beta, self.eps, self.discopop_tau, self.mask = beta, eps, discopop_tau, mask
    self.chosen_logratio = policy_chosen - reference_chosen
    self.rejected_logratio = policy_rejected - reference_rejected
    self.chosen_score, self.rejected_score = f_divergence(self.chosen_logratio), f_divergence(self.rejected_logratio)
    self.delta = self.chosen_score - self.rejected_score


def _f_divergence_score(logratio: jax.Array, f_divergence_type: str, alpha: float) -> jax.Array:
  """g(u) of the f-divergence regulariser (f-DPO): the score that replaces the log-ratio u in the loss."""
  if f_divergence_type == "forward_kl":
    return 1.0 - jnp.exp(-logratio)
  if f_divergence_type == "js_divergence":
    return math.log(2.0) + jax.nn.log_sigmoid(logratio)
  if f_divergence_type == "alpha_divergence" and abs(alpha - 1.0) >= 1e-6:
    # Clipped so exp stays finite in fp32 (as TRL does).
    return (jnp.exp(jnp.minimum((alpha - 1.0) * logratio, 80.0)) - 1.0) / (alpha - 1.0)
  return logratio  # reverse_kl, and alpha_divergence's limit at alpha = 1


def _smoothed_logistic(logits: jax.Array, eps: float) -> jax.Array:
  """(1 - eps) l(x) + eps l(-x), l(x) = -log sigmoid(x): the logistic loss with labels flipped at rate eps."""
  return -(1.0 - eps) * jax.nn.log_sigmoid(logits) - eps * jax.nn.log_sigmoid(-logits)


def _chosen_nll(policy_chosen_logps: jax.Array, chosen_lengths: jax.Array, mask: jax.Array | None) -> jax.Array:
  """The chosen responses' mean token negative log-likelihood over the batch (all their tokens pooled)."""
  weights = jnp.ones_like(policy_chosen_logps) if mask is None else mask.astype(jnp.float32)
  return -(policy_chosen_logps * weights).sum() / jnp.maximum((chosen_lengths * weights).sum(), 1.0)


def _sorted_present(values: jax.Array, mask: jax.Array | None) -> jax.Array:
  """The batch's values, flattened and sorted ascending, the absent pairs' (mask 0) placed last."""
  values = values.reshape(-1)
  if mask is not None:
    values = jnp.where(mask.reshape(-1) > 0, values, jnp.finfo(jnp.float32).max)
  return jnp.sort(values)


def _aot_term(p: _Pairs, chosen: jax.Array, rejected: jax.Array) -> jax.Array:
  """AOT's smoothed logistic loss on the sorted differences: the i-th smallest chosen value against the i-th
  smallest rejected one, over the pairs present."""
  d = _sorted_present(chosen, p.mask) - _sorted_present(rejected, p.mask)
  present = None
  if p.mask is not None:
    present = jnp.arange(d.shape[0]) < (p.mask > 0).sum()
  return _masked_mean(present, d)(_smoothed_logistic(p.beta * d, p.eps))


def _discopop(p: _Pairs) -> jax.Array:
  logits = p.beta * p.delta
  # m exp(-x) as exp(-x + log m), so a very negative x (m -> 0) gives 0, not inf * 0.
  modulated_exp = jnp.exp(-logits + jax.nn.log_sigmoid(logits / p.discopop_tau))
  return jax.nn.sigmoid(-logits / p.discopop_tau) * -jax.nn.log_sigmoid(logits) + modulated_exp


def _exo_pair(p: _Pairs) -> jax.Array:
  logits = p.beta * p.delta
  log_q, log_not_q = jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
  return (jnp.exp(log_q) * (log_q - math.log1p(-p.eps)) + jnp.exp(log_not_q) * (log_not_q - math.log(p.eps)))


def _per_token_delta(p: _Pairs) -> jax.Array:
  """s_c / n_c - s_r / n_r (a response with no scored token counts as one, as in TRL)."""
  return p.chosen_score / jnp.maximum(p.chosen_lengths, 1.0) - p.rejected_score / jnp.maximum(p.rejected_lengths, 1.0)


_PairTerm = Callable[[_Pairs, Callable[[jax.Array], jax.Array]], jax.Array]
# Each loss type: (pairs, masked mean over pairs) -> its scalar term.
_DPO_TERMS: dict[str, _PairTerm] = {
    "sigmoid": lambda p, mean: mean(_smoothed_logistic(p.beta * p.delta, p.eps)),
    "hinge": lambda p, mean: mean(jax.nn.relu(1.0 - p.beta * p.delta)),
    "ipo": lambda p, mean: mean((_per_token_delta(p) - 1.0 / (2.0 * p.beta)) ** 2),
    "exo_pair": lambda p, mean: mean(_exo_pair(p)),
    "nca_pair": lambda p, mean: mean(-jax.nn.log_sigmoid(p.beta * p.chosen_logratio)
                                     - 0.5 * jax.nn.log_sigmoid(-p.beta * p.chosen_logratio)
                                     - 0.5 * jax.nn.log_sigmoid(-p.beta * p.rejected_logratio)),
    "robust": lambda p, mean: mean((-(1.0 - p.eps) * jax.nn.log_sigmoid(p.beta * p.delta)
                                    + p.eps * jax.nn.log_sigmoid(-p.beta * p.delta)) / (1.0 - 2.0 * p.eps)),
    "bco_pair": lambda p, mean: mean(-jax.nn.log_sigmoid(p.beta * p.chosen_logratio)
                                     - jax.nn.log_sigmoid(-p.beta * p.rejected_logratio)),
    "sppo_hard": lambda p, mean: mean((p.chosen_logratio - 0.5 / p.beta) ** 2
                                      + (p.rejected_logratio + 0.5 / p.beta) ** 2),
    "aot": lambda p, mean: _aot_term(p, p.policy_chosen - p.policy_rejected,
                                     p.reference_chosen - p.reference_rejected),
    "aot_unpaired": lambda p, mean: _aot_term(p, p.chosen_logratio, p.rejected_logratio),
    "apo_zero": lambda p, mean: mean(1.0 - jax.nn.sigmoid(p.beta * p.chosen_logratio)
                                     + jax.nn.sigmoid(p.beta * p.rejected_logratio)),
    "apo_down": lambda p, mean: mean(jax.nn.sigmoid(p.beta * p.chosen_logratio) + 1.0
                                     - jax.nn.sigmoid(p.beta * (p.chosen_logratio - p.rejected_logratio))),
    "discopop": lambda p, mean: mean(_discopop(p)),
    "sft": lambda p, mean: _chosen_nll(p.policy_chosen, p.chosen_lengths, p.mask),
    "sigmoid_norm": lambda p, mean: mean(-jax.nn.log_sigmoid(p.beta * _per_token_delta(p))),
    "reference_free": lambda p, mean: mean(_smoothed_logistic(p.beta * (p.policy_chosen - p.policy_rejected), p.eps)),
}


def cpo_loss(
    policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array, *, beta: float = 0.1, cpo_alpha: float = 1.0,
    loss_type: str = "sigmoid", simpo_gamma: float = 0.5, label_smoothing: float = 0.0,
    mask: jax.Array | None = None, chosen_lengths: jax.Array | None = None, rejected_lengths: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
  """Contrastive Preference Optimization (TRL's CPOTrainer): a preference loss on the policy's own log-probs (no
  reference) plus `cpo_alpha` times the chosen responses' mean token NLL; averaged over the pairs where `mask` is 1.

  loss_type sigmoid (smoothed by `label_smoothing`) and hinge compare summed log-probs; ipo and simpo (with margin
  `simpo_gamma`) compare mean token log-probs, so they, and the NLL term, need the token counts.
  """
  if loss_type not in CPO_LOSS_TYPES:
    raise ValueError(f"cpo loss_type {loss_type!r}: expected one of {CPO_LOSS_TYPES}")
  per_token = loss_type in ("ipo", "simpo")
  needed = {"chosen_lengths": chosen_lengths is None and (per_token or cpo_alpha != 0),
            "rejected_lengths": rejected_lengths is None and per_token}
  if any(needed.values()):
    missing = " and ".join(name for name, absent in needed.items() if absent)
    raise ValueError(f"cpo loss_type {loss_type!r} with cpo_alpha {cpo_alpha} needs {missing} (scored tokens per "
                     "response)")
  policy_chosen_logps, policy_rejected_logps = _fp32(policy_chosen_logps), _fp32(policy_rejected_logps)
  chosen, rejected = policy_chosen_logps, policy_rejected_logps
  if per_token:
    chosen, rejected = _mean_token_logps(chosen, chosen_lengths), _mean_token_logps(rejected, rejected_lengths)
  logits = chosen - rejected
  if loss_type == "simpo":
    losses = _smoothed_logistic(beta * logits - simpo_gamma, label_smoothing)
  elif loss_type == "sigmoid":
    losses = _smoothed_logistic(beta * logits, label_smoothing)
  elif loss_type == "hinge":
    losses = jax.nn.relu(1.0 - beta * logits)
  else:
    losses = (logits - 1.0 / (2.0 * beta)) ** 2
  mean = _masked_mean(mask, losses)
  nll = _chosen_nll(policy_chosen_logps, _fp32(chosen_lengths), mask) if cpo_alpha != 0 else jnp.zeros(())
  loss = mean(losses) + cpo_alpha * nll
  # TRL's rewards for these methods: beta times the log-probs the loss compares.
  return loss, {**_pair_metrics(loss, beta * chosen, beta * rejected, chosen, rejected, mean), "nll_loss": nll}


def simpo_loss(
    policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array, *, chosen_lengths: jax.Array,
    rejected_lengths: jax.Array, beta: float = 2.0, gamma: float = 1.0, label_smoothing: float = 0.0,
    sft_weight: float = 0.0, mask: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
  """SimPO (Meng et al., 2024): the logistic loss on beta times the difference of mean token log-probs minus the
  margin `gamma`, no reference; `sft_weight` adds the chosen responses' mean token NLL (CPO-SimPO). TRL runs it as
  CPOTrainer with loss_type "simpo", simpo_gamma = gamma and cpo_alpha = sft_weight."""
  return cpo_loss(policy_chosen_logps, policy_rejected_logps, beta=beta, cpo_alpha=sft_weight, loss_type="simpo",
                  simpo_gamma=gamma, label_smoothing=label_smoothing, mask=mask, chosen_lengths=chosen_lengths,
                  rejected_lengths=rejected_lengths)


def orpo_loss(
    policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array, *, chosen_lengths: jax.Array,
    rejected_lengths: jax.Array, beta: float = 0.1, mask: jax.Array | None = None, nll_loss: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
  """Odds Ratio Preference Optimization (Hong et al., 2024; TRL's ORPOTrainer): NLL - beta * mean log sigmoid(log
  odds ratio of the mean token log-probs), no reference; beta is the paper's lambda. Averaged over the pairs where
  `mask` is 1.

  The NLL is the chosen responses' mean token NLL; `nll_loss` replaces it (TRL scores the prompt tokens too).
  """
  policy_chosen_logps, policy_rejected_logps = _fp32(policy_chosen_logps), _fp32(policy_rejected_logps)
  present = jnp.ones(policy_chosen_logps.shape, bool) if mask is None else mask > 0
  # Absent pairs (mask 0, all-zero log-probs) get a harmless stand-in: log(1 - e^0) would be -inf, and nan * 0 = nan.
  chosen = jnp.where(present, _mean_token_logps(policy_chosen_logps, chosen_lengths), -1.0)
  rejected = jnp.where(present, _mean_token_logps(policy_rejected_logps, rejected_lengths), -1.0)
  log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
  log_odds_ratio = jax.nn.log_sigmoid(log_odds)
  mean = _masked_mean(mask, log_odds)
  nll = _chosen_nll(policy_chosen_logps, _fp32(chosen_lengths), mask) if nll_loss is None else nll_loss
  loss = nll - beta * mean(log_odds_ratio)
  return loss, {**_pair_metrics(loss, beta * chosen, beta * rejected, chosen, rejected, mean), "nll_loss": nll,
                "log_odds_ratio": mean(log_odds_ratio), "log_odds_chosen": mean(log_odds)}


def kto_loss(
    policy_logps: jax.Array, reference_logps: jax.Array, desirable: jax.Array, *,
    kl_policy_logps: jax.Array | None = None, kl_reference_logps: jax.Array | None = None, beta: float = 0.1,
    desirable_weight: float = 1.0, undesirable_weight: float = 1.0, loss_type: str = "kto",
    mask: jax.Array | None = None, kl_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
  """Kahneman-Tversky Optimization (Ethayarajh et al., 2024; TRL's KTOTrainer) on unpaired examples: each a
  completion's summed log-probs under policy and reference, `desirable` (True) or not; the weighted losses averaged
  over the examples where `mask` is 1.

  The KL reference point z comes from the same completions paired with other prompts of the batch
  (`kl_policy_logps` / `kl_reference_logps`, averaged where `kl_mask` is 1, default `mask`); loss_type
  apo_zero_unpaired needs none.
  """
  if loss_type not in KTO_LOSS_TYPES:
    raise ValueError(f"kto loss_type {loss_type!r}: expected one of {KTO_LOSS_TYPES}")
  logratio = _fp32(policy_logps) - _fp32(reference_logps)
  if loss_type == "kto":
    if kl_policy_logps is None or kl_reference_logps is None:
      raise ValueError("kto loss_type 'kto' needs kl_policy_logps and kl_reference_logps (log-probs of the batch's "
                       "mismatched prompt / completion pairs)")
    kl_gap = _fp32(kl_policy_logps) - _fp32(kl_reference_logps)
    kl = jax.lax.stop_gradient(jnp.maximum(_masked_mean(mask if kl_mask is None else kl_mask, kl_gap)(kl_gap), 0.0))
    desirable_losses = 1.0 - jax.nn.sigmoid(beta * (logratio - kl))
    undesirable_losses = 1.0 - jax.nn.sigmoid(beta * (kl - logratio))
  else:
    kl = jnp.zeros(())
    desirable_losses = 1.0 - jax.nn.sigmoid(beta * logratio)
    undesirable_losses = jax.nn.sigmoid(beta * logratio)
  desirable = desirable.astype(bool)
  losses = jnp.where(desirable, desirable_weight * desirable_losses, undesirable_weight * undesirable_losses)
  loss = _masked_mean(mask, losses)(losses)
  present = jnp.ones_like(losses) if mask is None else mask.astype(jnp.float32)
  mean_desirable = _masked_mean(present * desirable, losses)
  mean_undesirable = _masked_mean(present * ~desirable, losses)
  chosen_rewards, rejected_rewards = mean_desirable(beta * logratio), mean_undesirable(beta * logratio)
  return loss, {
      "loss": loss,
      "kl": kl,
      "rewards/chosen": chosen_rewards,
      "rewards/rejected": rejected_rewards,
      "rewards/margins": chosen_rewards - rejected_rewards,
      "logps/chosen": mean_desirable(_fp32(policy_logps)),
      "logps/rejected": mean_undesirable(_fp32(policy_logps)),
  }


def _pair_metrics(loss: jax.Array, chosen_rewards: jax.Array, rejected_rewards: jax.Array, chosen_logps: jax.Array,
                  rejected_logps: jax.Array, mean: Callable[[jax.Array], jax.Array]) -> dict:
  """TRL's metrics of a pair loss: the loss, mean rewards, reward accuracy and margin, mean log-probs."""
  return {
      "loss": loss,
      "rewards/chosen": mean(chosen_rewards),
      "rewards/rejected": mean(rejected_rewards),
      "rewards/accuracies": mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
      "rewards/margins": mean(chosen_rewards - rejected_rewards),
      "logps/chosen": mean(chosen_logps),
      "logps/rejected": mean(rejected_logps),
  }


def _mean_token_logps(summed_logps: jax.Array, lengths: jax.Array) -> jax.Array:
  """Summed log-probs over a response's scored tokens -> their mean (a response with none counts as one token)."""
  return summed_logps / jnp.maximum(_fp32(lengths), 1.0)


def _log1mexp(x: jax.Array) -> jax.Array:
  """log(1 - e^x) for x < 0, accurate on both sides of -log 2."""
  return jnp.where(x < -math.log(2.0), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


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


def _fp32(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


# ------------------------------------------------------------------------------------------------ online methods

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
SCALE_REWARDS = ("group", "batch", "none")
_STD_EPS = 1e-4  # TRL's: advantages divide by std + 1e-4


def grpo_needs_reference(beta: float) -> bool:
  """Whether GRPO reads reference log-probs (the k3 KL term): only when beta != 0; otherwise no reference is built,
  loaded or run."""
  return beta != 0.0


def loss_mask(completion_mask: jax.Array, truncated: jax.Array, mask_truncated_completions: bool) -> jax.Array:
  """The completion mask the loss reads: with `mask_truncated_completions` (DAPO's overlong filtering), the
  completions that stopped at max_completion_length without EOS (`truncated` [rows]) have no scored token."""
  if not mask_truncated_completions:
    return completion_mask
  return completion_mask * (1 - jnp.asarray(truncated, completion_mask.dtype))[:, None]


def nanstd(x: jax.Array, axis=None, keepdims: bool = False) -> jax.Array:
  """The standard deviation ignoring NaNs, with Bessel's correction (NaN with fewer than two values), as TRL's."""
  count = (~jnp.isnan(x)).sum(axis=axis, keepdims=True)
  mean = jnp.nanmean(x, axis=axis, keepdims=True)
  variance = jnp.nanmean((x - mean) ** 2, axis=axis, keepdims=True) * count / jnp.maximum(count - 1, 1)
  std = jnp.where(count > 1, jnp.sqrt(variance), jnp.nan)
  return std if keepdims else jnp.squeeze(std, axis=axis)


def _check_groups(rewards: jax.Array, num_generations: int) -> jax.Array:
  rewards = _fp32(rewards)
  if rewards.ndim != 1 or num_generations < 1 or rewards.shape[0] % num_generations:
    raise ValueError(f"rewards of shape {rewards.shape}: expected [prompts x num_generations] with num_generations "
                     f"{num_generations} (each prompt's completions adjacent)")
  return rewards


def group_advantages(rewards: jax.Array, num_generations: int, *,
                     scale_rewards: str = "group") -> tuple[jax.Array, dict]:
  """GRPO's advantages [rows] from the combined rewards [rows] (NaN: unscorable, advantage 0), each prompt's
  `num_generations` completions adjacent; `scale_rewards` group / batch / none (module docstring). Metric
  frac_reward_zero_std: the share of rows whose std is 0 (all rewards of the group, or of the batch, equal)."""
  if scale_rewards not in SCALE_REWARDS:
    raise ValueError(f"scale_rewards {scale_rewards!r}: expected one of {SCALE_REWARDS}")
  rewards = _check_groups(rewards, num_generations)
  grouped = rewards.reshape(-1, num_generations)
  centred = (grouped - jnp.nanmean(grouped, axis=1, keepdims=True)).reshape(-1)
  if scale_rewards == "batch":
    std = jnp.broadcast_to(nanstd(rewards) if rewards.size > 1 else jnp.zeros(()), rewards.shape)
  elif num_generations > 1:
    std = jnp.repeat(nanstd(grouped, axis=1), num_generations)
  else:
    std = jnp.zeros_like(rewards)
  advantages = centred if scale_rewards == "none" else centred / (std + _STD_EPS)
  zero_std = jnp.isclose(std, 0.0).astype(jnp.float32)
  return jnp.nan_to_num(advantages, nan=0.0), {"frac_reward_zero_std": zero_std.mean()}


def rloo_advantages(rewards: jax.Array, num_generations: int, *, beta: float = 0.0,
                    old_per_token_logps: jax.Array | None = None, ref_per_token_logps: jax.Array | None = None,
                    completion_mask: jax.Array | None = None, normalize_advantages: bool = False,
                    reward_clip_range: tuple[float, float] | None = None) -> tuple[jax.Array, dict]:
  """RLOO's advantages [rows] (TRL's RLOOTrainer): rewards (NaN: unscorable) clipped to `reward_clip_range`, minus
  beta times each completion's summed old - ref log-probs (the KL in the reward; old and ref [rows, T] needed when
  beta != 0), minus the mean of the other scorable completions of its prompt; optionally normalised over the batch.
  Metrics: kl (mean per-token old - ref, when beta != 0), frac_reward_zero_std (share of groups of equal rewards)."""
  rewards = _check_groups(rewards, num_generations)
  if reward_clip_range is not None:
    rewards = jnp.clip(rewards, *reward_clip_range)
  metrics = {}
  if beta != 0.0:
    if old_per_token_logps is None or ref_per_token_logps is None or completion_mask is None:
      raise ValueError("rloo_advantages with beta != 0 needs old_per_token_logps, ref_per_token_logps and "
                       "completion_mask (the KL in the reward)")
    mask = _fp32(completion_mask)
    per_token_kl = (_fp32(old_per_token_logps) - _fp32(ref_per_token_logps)) * mask
    rewards = rewards - beta * per_token_kl.sum(axis=-1)
    metrics["kl"] = per_token_kl.sum() / jnp.maximum(mask.sum(), 1.0)
  grouped = rewards.reshape(-1, num_generations)
  std = nanstd(grouped, axis=1) if num_generations > 1 else jnp.zeros(grouped.shape[0])
  if num_generations > 1:
    scorable = (~jnp.isnan(grouped)).sum(axis=1, keepdims=True)
    # 0 / 0 = NaN for a group with one scorable completion: zeroed below, as unscorable rows are.
    baselines = (jnp.nansum(grouped, axis=1, keepdims=True) - grouped) / (scorable - 1)
    advantages = (grouped - baselines).reshape(-1)
  else:
    advantages = jnp.zeros_like(rewards)
  if normalize_advantages:
    advantages = (advantages - jnp.nanmean(advantages)) / (nanstd(advantages) + _STD_EPS)
  metrics["frac_reward_zero_std"] = jnp.isclose(std, 0.0).astype(jnp.float32).mean()
  return jnp.nan_to_num(advantages, nan=0.0), metrics


def check_grpo_options(*, loss_type: str, importance_sampling_level: str, epsilon: float,
                       epsilon_high: float | None, delta: float | None) -> None:
  """Validate GRPO's options (before anything compiles); raises ValueError naming the option."""
  if loss_type not in GRPO_LOSS_TYPES:
    raise ValueError(f"grpo loss_type {loss_type!r}: expected one of {GRPO_LOSS_TYPES}")
  if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
    raise ValueError(f"grpo importance_sampling_level {importance_sampling_level!r}: expected one of "
                     f"{IMPORTANCE_SAMPLING_LEVELS}")
  if not 0.0 <= epsilon < 1.0 or (epsilon_high is not None and epsilon_high < 0.0):
    raise ValueError(f"grpo epsilon {epsilon} / epsilon_high {epsilon_high}: expected epsilon in [0, 1) and "
                     "epsilon_high >= 0 (DAPO uses 0.28)")
  if delta is not None and not delta > 1.0:
    raise ValueError(f"grpo delta {delta}: expected a bound above 1 (INTELLECT-2 recommends more than 1 + epsilon)")


def grpo_loss(
    per_token_logps: jax.Array, old_per_token_logps: jax.Array | None, ref_per_token_logps: jax.Array | None,
    advantages: jax.Array, completion_mask: jax.Array, *, loss_type: str = "dapo", beta: float = 0.0,
    epsilon: float = 0.2, epsilon_high: float | None = None, delta: float | None = None,
    importance_sampling_level: str = "token", max_completion_length: int | None = None,
    num_items_in_batch: jax.Array | None = None, row_mask: jax.Array | None = None,
    entropies: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
  """GRPO and its variants (TRL 1.16's GRPOTrainer; formulas in the module docstring) on per-token log-probs
  [rows, T], advantages [rows] and the completion mask [rows, T] (`loss_mask`).

  old: the sampling policy's log-probs (None: this policy's, without gradient). ref: needed when beta != 0.
  row_mask [rows]: the completions present (a fixed-shape batch's filler rows are 0; default all), counted by grpo
  and dr_grpo. max_completion_length: dr_grpo's constant (default T). num_items_in_batch: dapo's normaliser, the
  completion tokens of the generation batch this batch is a part of (default: this batch's).
  """
  check_grpo_options(loss_type=loss_type, importance_sampling_level=importance_sampling_level, epsilon=epsilon,
                     epsilon_high=epsilon_high, delta=delta)
  logps, mask = _fp32(per_token_logps), _fp32(completion_mask)
  old = jax.lax.stop_gradient(logps) if old_per_token_logps is None else _fp32(old_per_token_logps)
  rows = jnp.ones(mask.shape[0]) if row_mask is None else _fp32(row_mask)
  high = epsilon if epsilon_high is None else epsilon_high
  log_ratio = logps - old
  if importance_sampling_level == "sequence":  # one ratio per completion: [rows, 1]
    log_ratio = (log_ratio * mask).sum(-1, keepdims=True) / jnp.maximum(mask.sum(-1, keepdims=True), 1.0)
  ratio = jnp.exp(log_ratio)
  clipped = jnp.clip(ratio, 1.0 - epsilon, 1.0 + high)
  if delta is not None:
    ratio = jnp.minimum(ratio, delta)
  advantages = _fp32(advantages)[:, None]
  per_token = jnp.broadcast_to(-jnp.minimum(ratio * advantages, clipped * advantages), mask.shape)
  metrics = {}
  if grpo_needs_reference(beta):
    if ref_per_token_logps is None:
      raise ValueError(f"grpo beta {beta} needs reference log-probs (ref_per_token_logps); got None")
    gap = _fp32(ref_per_token_logps) - logps
    per_token_kl = jnp.exp(gap) - gap - 1.0
    per_token = per_token + beta * per_token_kl
    metrics["kl"] = _token_mean(per_token_kl, mask)
  loss = _aggregate_grpo(per_token * mask, mask, rows, loss_type, max_completion_length, num_items_in_batch)
  metrics["loss"] = loss
  if entropies is not None:
    metrics["entropy"] = _token_mean(_fp32(entropies), mask)
  metrics.update(_clip_metrics(ratio, advantages, mask, rows, epsilon, high))
  return loss, metrics


def _aggregate_grpo(losses, mask, rows, loss_type, max_completion_length, num_items_in_batch) -> jax.Array:
  """The batch's loss from masked per-token losses [rows, T] by GRPO's loss_type (module docstring)."""
  if loss_type == "grpo":
    per_row = losses.sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
    return (per_row * rows).sum() / jnp.maximum(rows.sum(), 1.0)
  if loss_type == "bnpo":
    return losses.sum() / jnp.maximum(mask.sum(), 1.0)
  if loss_type == "dr_grpo":
    return losses.sum() / (rows.sum() * (max_completion_length or mask.shape[1]))
  tokens = mask.sum() if num_items_in_batch is None else _fp32(num_items_in_batch)
  return losses.sum() / jnp.maximum(tokens, 1.0)


def _token_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  return (values * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def _clip_metrics(ratio, advantages, mask, rows, epsilon: float, epsilon_high: float) -> dict:
  """TRL's clip_ratio metrics: the share of tokens (or, with one ratio per completion, of completions) whose ratio
  lies beyond the clip range on the side its advantage pushes; low_min / high_max: the extreme per-completion share
  over the completions that have any token."""
  low = ((ratio < 1.0 - epsilon) & (advantages < 0)).astype(jnp.float32)
  high = ((ratio > 1.0 + epsilon_high) & (advantages > 0)).astype(jnp.float32)
  region = jnp.maximum(low, high)
  if ratio.shape[1] == 1:  # sequence level: one value per completion
    weights, per_row, counted = rows[:, None], (lambda x: x[:, 0]), rows > 0
  else:
    weights, counted = mask * rows[:, None], (mask.sum(-1) > 0) & (rows > 0)
    per_row = lambda x: (x * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
  mean = lambda x: (x * weights).sum() / jnp.maximum(weights.sum(), 1.0)
  none = jnp.full((), jnp.nan)
  return {"clip_ratio/low_mean": mean(low), "clip_ratio/high_mean": mean(high), "clip_ratio/region_mean": mean(region),
          "clip_ratio/low_min": jnp.where(counted.any(), jnp.min(jnp.where(counted, per_row(low), jnp.inf)), none),
          "clip_ratio/high_max": jnp.where(counted.any(), jnp.max(jnp.where(counted, per_row(high), -jnp.inf)), none)}


def rloo_loss(
    per_token_logps: jax.Array, old_per_token_logps: jax.Array | None, advantages: jax.Array,
    completion_mask: jax.Array, *, epsilon: float = 0.2, epsilon_high: float | None = None,
    row_mask: jax.Array | None = None, entropies: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
  """RLOO's clipped loss (TRL 1.16's RLOOTrainer) with one importance ratio per completion from its summed
  log-probs, averaged over the completions present (`row_mask`, default all); old None: this policy's, without
  gradient. The KL is in the advantages (`rloo_advantages`)."""
  logps, mask = _fp32(per_token_logps), _fp32(completion_mask)
  old = jax.lax.stop_gradient(logps) if old_per_token_logps is None else _fp32(old_per_token_logps)
  rows = jnp.ones(mask.shape[0]) if row_mask is None else _fp32(row_mask)
  high = epsilon if epsilon_high is None else epsilon_high
  ratio = jnp.exp(((logps - old) * mask).sum(-1))[:, None]
  advantages = _fp32(advantages)[:, None]
  per_row = -jnp.minimum(ratio * advantages, jnp.clip(ratio, 1.0 - epsilon, 1.0 + high) * advantages)[:, 0]
  loss = (per_row * rows).sum() / jnp.maximum(rows.sum(), 1.0)
  metrics = {"loss": loss, **_clip_metrics(ratio, advantages, mask, rows, epsilon, high)}
  if entropies is not None:
    metrics["entropy"] = _token_mean(_fp32(entropies), mask * rows[:, None])
  return loss, metrics


def online_dpo_loss(
    per_token_logps: jax.Array, ref_per_token_logps: jax.Array | None, rewards: jax.Array,
    completion_mask: jax.Array, *, beta: float = 0.1, loss_type: str | Sequence[str] = "sigmoid",
    row_mask: jax.Array | None = None, **dpo_options,
) -> tuple[jax.Array, dict]:
  """Online DPO (TRL 1.16's experimental OnlineDPOTrainer, any `dpo_loss` loss type): two completions per prompt,
  rows [p0 c0, p0 c1, p1 c0, ...] with per-token log-probs [2P, T] and rewards [2P]; the completion with the higher
  reward (the first on a tie) is chosen, then `dpo_loss` on their summed log-probs (with their token counts) and
  `dpo_options`. A pair with a NaN reward (unscorable) or a filler row (`row_mask` 0) is left out (TRL would score
  an unscorable completion 0); metric unscorable_pairs counts the former."""
  logps, mask = _fp32(per_token_logps), _fp32(completion_mask)
  if logps.shape[0] % 2 or jnp.shape(rewards) != logps.shape[:1]:
    raise ValueError(f"online DPO: per-token log-probs of shape {logps.shape} and rewards of shape "
                     f"{jnp.shape(rewards)}; expected two completions per prompt and one reward per completion")
  pairs = logps.shape[0] // 2
  summed = (logps * mask).sum(-1).reshape(pairs, 2)
  lengths = mask.sum(-1).reshape(pairs, 2)
  ref = jnp.zeros_like(summed) if ref_per_token_logps is None else (_fp32(ref_per_token_logps) * mask).sum(-1).reshape(
      pairs, 2)
  rewards = _fp32(rewards).reshape(pairs, 2)
  present = jnp.ones(pairs) if row_mask is None else _fp32(row_mask).reshape(pairs, 2).min(-1)
  scorable = ~jnp.isnan(rewards).any(-1)
  pair_mask = present * scorable
  first_chosen = rewards[:, 0] >= rewards[:, 1]
  pick = lambda values, first: jnp.where(first, values[:, 0], values[:, 1])
  chosen, rejected = (lambda values: pick(values, first_chosen)), (lambda values: pick(values, ~first_chosen))
  loss, metrics = dpo_loss(chosen(summed), rejected(summed), chosen(ref), rejected(ref), beta=beta,
                           loss_type=loss_type, mask=pair_mask, chosen_lengths=chosen(lengths),
                           rejected_lengths=rejected(lengths), **dpo_options)
  mean = _masked_mean(pair_mask, summed[:, 0])
  kl = (summed - ref).sum(-1) / 2.0  # mean over the pair's two completions
  rewards_or_0 = jnp.nan_to_num(rewards)
  metrics.update({
      "objective/kl": mean(kl), "objective/entropy": mean(-summed.sum(-1) / 2.0),
      "objective/non_score_reward": -beta * mean(kl), "objective/scores": mean(rewards_or_0.sum(-1) / 2.0),
      "objective/rlhf_reward": mean(rewards_or_0.sum(-1) / 2.0 - beta * kl),
      "objective/scores_margin": mean(chosen(rewards_or_0) - rejected(rewards_or_0)),
      "unscorable_pairs": (present * ~scorable).sum()})
  return loss, metrics


def apply_missing_eos_penalty(rewards: jax.Array, finished: jax.Array, penalty: float | None) -> jax.Array:
  """Online DPO's `missing_eos_penalty`: subtracted from the reward of each completion that did not end with EOS."""
  if penalty is None:
    return rewards
  return jnp.where(jnp.asarray(finished, bool), rewards, rewards - penalty)
