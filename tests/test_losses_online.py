"""The online losses (GRPO and its variants, RLOO, online DPO) equal TRL 1.16's own code on the same inputs, loss AND
gradient with respect to the per-token log-probs; the advantages' small pieces against hand-computed values.

TRL computes these losses inside its trainers' methods, so each is called as an unbound function with a minimal
stand-in `self` carrying the attributes it reads, whose per-token log-prob function returns a fixed leaf tensor;
`backward()` gives TRL's gradient with respect to it. The test fails if either side's formula changes.
"""

import collections
import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # online DPO lives in trl.experimental
torch = pytest.importorskip("torch")
pytest.importorskip("trl")
from trl.experimental.online_dpo.online_dpo_trainer import OnlineDPOTrainer  # noqa: E402
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.rloo_trainer import RLOOTrainer  # noqa: E402

from jaxalign import losses  # noqa: E402

PROMPTS, G, WIDTH = 3, 4, 7
ROWS = PROMPTS * G
CLIP_METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
                "clip_ratio/high_max")


class _Accelerator:
  device = torch.device("cpu")
  num_processes = 1
  sync_gradients = True

  @staticmethod
  def gather(x):
    return x

  gather_for_metrics = gather

  @staticmethod
  def reduce(x, reduction="sum"):
    return x

  @staticmethod
  def backward(loss, **kwargs):
    loss.backward()


def _inputs(seed, old_noise=0.3):
  """Per-token log-probs, old and reference log-probs [ROWS, WIDTH] (0 off the completion), advantages [ROWS], the
  completion mask (lengths 1 to WIDTH, and one all-zero row: a masked truncated completion) and entropies."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, WIDTH + 1, size=ROWS)
  lengths[5] = 0
  mask = (np.arange(WIDTH)[None, :] < lengths[:, None]).astype(np.float32)
  logps = (rng.uniform(-3.0, -0.05, size=(ROWS, WIDTH)) * mask).astype(np.float32)
  old = ((logps + rng.normal(0.0, old_noise, size=logps.shape)) * mask).astype(np.float32)
  ref = ((logps + rng.normal(0.0, 0.5, size=logps.shape)) * mask).astype(np.float32)
  advantages = rng.normal(0.0, 1.0, size=ROWS).astype(np.float32)
  entropies = rng.uniform(0.1, 3.0, size=(ROWS, WIDTH)).astype(np.float32)
  return logps, old, ref, advantages, mask, entropies


def _metrics_store():
  return collections.defaultdict(lambda: collections.defaultdict(list))


def _last(metrics):
  """Each metric's last logged value."""
  return {name: values[-1] for name, values in metrics.items()}


def _leaf(values):
  return torch.tensor(values, requires_grad=True)


def _trl_grpo(logps, old, ref, advantages, mask, entropies, *, loss_type, beta, epsilon=0.2, epsilon_high=None,
              delta=None, level="token", max_completion_length=10, num_items_in_batch=None):
  policy = _leaf(logps)
  self = types.SimpleNamespace(
      _get_per_token_logps_and_entropies=lambda *args, **kwargs: (policy, torch.tensor(entropies), None),
      aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
      importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=epsilon,
      epsilon_high=epsilon if epsilon_high is None else epsilon_high, use_vllm=False,
      vllm_importance_sampling_correction=False, model=types.SimpleNamespace(training=True),
      current_gradient_accumulation_steps=1, max_completion_length=max_completion_length,
      accelerator=_Accelerator(), _entropy_bonus_enabled=False, _metrics=_metrics_store(),
      args=types.SimpleNamespace(use_bias_correction_kl=False, delta=delta, steps_per_generation=1))
  completion_mask = torch.tensor(mask, dtype=torch.int64)
  inputs = {"prompt_ids": torch.zeros((ROWS, 2), dtype=torch.int64), "prompt_mask": torch.ones((ROWS, 2)),
            "completion_ids": torch.zeros_like(completion_mask), "completion_mask": completion_mask,
            "advantages": torch.tensor(advantages), "ref_per_token_logps": torch.tensor(ref),
            "num_items_in_batch": torch.tensor(float(mask.sum() if num_items_in_batch is None else num_items_in_batch))}
  if old is not None:
    inputs["old_per_token_logps"] = torch.tensor(old)
  loss = GRPOTrainer._compute_loss(self, None, inputs)
  loss.backward()
  return float(loss.detach()), policy.grad.numpy(), _last(self._metrics["train"])


def _ours_grpo(logps, old, ref, advantages, mask, entropies, *, loss_type, beta, epsilon=0.2, epsilon_high=None,
               delta=None, level="token", max_completion_length=10, num_items_in_batch=None):
  def loss_of(per_token):
    return losses.grpo_loss(per_token, old, ref if beta else None, advantages, mask, loss_type=loss_type, beta=beta,
                            epsilon=epsilon, epsilon_high=epsilon_high, delta=delta,
                            importance_sampling_level=level, max_completion_length=max_completion_length,
                            num_items_in_batch=num_items_in_batch, entropies=entropies)

  (loss, metrics), grad = jax.value_and_grad(loss_of, has_aux=True)(jnp.asarray(logps))
  return float(loss), np.asarray(grad), metrics


def _assert_grpo_matches_trl(seed, old_given=True, old_noise=0.3, **options):
  logps, old, ref, advantages, mask, entropies = _inputs(seed, old_noise)
  old = old if old_given else None
  trl_loss, trl_grad, trl_metrics = _trl_grpo(logps, old, ref, advantages, mask, entropies, **options)
  loss, grad, metrics = _ours_grpo(logps, old, ref, advantages, mask, entropies, **options)
  np.testing.assert_allclose(loss, trl_loss, rtol=2e-5, atol=1e-6, err_msg=str(options))
  np.testing.assert_allclose(grad, trl_grad, rtol=2e-5, atol=1e-7, err_msg=str(options))
  names = CLIP_METRICS + ("entropy",) + (("kl",) if options["beta"] else ())
  for name in names:
    np.testing.assert_allclose(float(metrics[name]), trl_metrics[name], rtol=2e-5, atol=1e-6, err_msg=name)
  assert ("kl" in metrics) == bool(options["beta"])
  return metrics


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("level", losses.IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("loss_type", losses.GRPO_LOSS_TYPES)
def test_grpo_loss_and_gradient_equal_trl(loss_type, level, beta):
  metrics = _assert_grpo_matches_trl(seed=len(loss_type) + 7 * len(level), loss_type=loss_type, level=level,
                                     beta=beta)
  assert float(metrics["clip_ratio/region_mean"]) > 0  # the clipped branch is exercised


@pytest.mark.parametrize("level", losses.IMPORTANCE_SAMPLING_LEVELS)
def test_grpo_options_equal_trl(level):
  # DAPO's asymmetric clip, two-sided clipping, dapo's normaliser from a larger generation batch, dr_grpo's constant.
  _assert_grpo_matches_trl(seed=1, loss_type="dapo", level=level, beta=0.0, epsilon=0.2, epsilon_high=0.28)
  _assert_grpo_matches_trl(seed=2, loss_type="grpo", level=level, beta=0.04, delta=1.5, old_noise=0.6)
  _assert_grpo_matches_trl(seed=3, loss_type="dapo", level=level, beta=0.04, num_items_in_batch=97)
  _assert_grpo_matches_trl(seed=4, loss_type="dr_grpo", level=level, beta=0.0, max_completion_length=32)


@pytest.mark.parametrize("loss_type", losses.GRPO_LOSS_TYPES)
def test_grpo_without_old_logps_equals_trl(loss_type):
  # One update per generation: the ratio is 1 with the policy's gradient (TRL detaches the log-probs).
  metrics = _assert_grpo_matches_trl(seed=5, old_given=False, loss_type=loss_type, level="token", beta=0.1)
  assert float(metrics["clip_ratio/region_mean"]) == 0


def test_grpo_delta_clips_the_ratio_from_above():
  logps, old, _, _, mask, _ = _inputs(0)
  advantages = np.ones(ROWS, np.float32)
  plain, _ = losses.grpo_loss(logps, logps - 2.0, None, -advantages, mask, loss_type="bnpo")
  two_sided, _ = losses.grpo_loss(logps, logps - 2.0, None, -advantages, mask, loss_type="bnpo", delta=3.0)
  # Every ratio is e^2 ≈ 7.39: a negative advantage uses it unclipped, unless delta bounds it at 3.
  np.testing.assert_allclose([float(plain), float(two_sided)], [math.exp(2.0), 3.0], rtol=1e-5)


def test_grpo_row_mask_leaves_filler_rows_out():
  logps, old, ref, advantages, mask, _ = _inputs(6)
  row_mask = np.ones(ROWS, np.float32)
  row_mask[-G:] = 0
  for loss_type in losses.GRPO_LOSS_TYPES:
    kept = slice(0, ROWS - G)
    want, _ = losses.grpo_loss(logps[kept], old[kept], ref[kept], advantages[kept], mask[kept], loss_type=loss_type,
                               beta=0.04)
    got, _ = losses.grpo_loss(logps, old, ref, advantages, mask * row_mask[:, None], loss_type=loss_type, beta=0.04,
                              row_mask=row_mask)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6, err_msg=loss_type)


def test_grpo_needs_a_reference_only_with_beta():
  assert not losses.grpo_needs_reference(0.0) and losses.grpo_needs_reference(0.04)
  logps, old, _, advantages, mask, _ = _inputs(0)
  with pytest.raises(ValueError, match="beta 0.04 needs reference log-probs"):
    losses.grpo_loss(logps, old, None, advantages, mask, beta=0.04)


@pytest.mark.parametrize("options,message", [
    ({"loss_type": "cispo"}, "loss_type 'cispo'"), ({"importance_sampling_level": "batch"}, "importance_sampling"),
    ({"epsilon": 1.2}, "epsilon 1.2"), ({"delta": 0.9}, "delta 0.9")])
def test_grpo_options_are_checked(options, message):
  logps, old, _, advantages, mask, _ = _inputs(0)
  with pytest.raises(ValueError, match=message):
    losses.grpo_loss(logps, old, None, advantages, mask, **options)


def test_loss_mask_masks_truncated_completions_only_when_asked():
  mask = np.ones((3, 4), np.float32)
  truncated = np.array([False, True, False])
  np.testing.assert_array_equal(losses.loss_mask(mask, truncated, False), mask)
  np.testing.assert_array_equal(losses.loss_mask(mask, truncated, True).sum(-1), [4, 0, 4])


# ---------------------------------------------------------------------------------------------------- advantages


def test_group_advantages_by_hand():
  rewards = np.array([1.0, 3.0, 1.0, 3.0, 2.0, 2.0, 2.0, 2.0], np.float32)  # two groups of 4
  std = math.sqrt(4.0 / 3.0)  # of 1, 3, 1, 3 with Bessel's correction
  got, metrics = losses.group_advantages(rewards, 4, scale_rewards="group")
  np.testing.assert_allclose(got, [-1 / (std + 1e-4), 1 / (std + 1e-4)] * 2 + [0.0] * 4, rtol=1e-6)
  assert float(metrics["frac_reward_zero_std"]) == 0.5  # the second group's rewards are all equal
  got, _ = losses.group_advantages(rewards, 4, scale_rewards="none")
  np.testing.assert_allclose(got, [-1, 1, -1, 1, 0, 0, 0, 0])
  batch_std = float(np.std(rewards, ddof=1))
  got, metrics = losses.group_advantages(rewards, 4, scale_rewards="batch")
  np.testing.assert_allclose(got, np.array([-1, 1, -1, 1, 0, 0, 0, 0]) / (batch_std + 1e-4), rtol=1e-6)
  assert float(metrics["frac_reward_zero_std"]) == 0.0


def test_group_advantages_leave_unscorable_completions_out():
  # NaN: no reward function scored the completion. It is out of its group's mean and std, and gets advantage 0;
  # a group with one scorable completion has std NaN (not zero) and advantage 0 for it.
  rewards = np.array([1.0, np.nan, 4.0, 1.0, np.nan, np.nan, 5.0, np.nan], np.float32)
  got, metrics = losses.group_advantages(rewards, 4)
  std = float(np.std([1.0, 4.0, 1.0], ddof=1))
  np.testing.assert_allclose(got, [-1 / (std + 1e-4), 0, 2 / (std + 1e-4), -1 / (std + 1e-4), 0, 0, 0, 0],
                             rtol=1e-6)
  assert float(metrics["frac_reward_zero_std"]) == 0.0
  with pytest.raises(ValueError, match="num_generations 3"):
    losses.group_advantages(rewards, 3)
  with pytest.raises(ValueError, match="scale_rewards"):
    losses.group_advantages(rewards, 4, scale_rewards="True")


def test_rloo_leave_one_out_baseline_by_hand():
  rewards = np.array([1.0, 2.0, 6.0, np.nan, 3.0, 3.0], np.float32)  # groups of 3
  got, metrics = losses.rloo_advantages(rewards, 3)
  # Group 1: each minus the mean of the other two. Group 2: the unscorable one gets 0, the others their sibling's.
  np.testing.assert_allclose(got, [1 - 4, 2 - 3.5, 6 - 1.5, 0, 0, 0])
  assert float(metrics["frac_reward_zero_std"]) == 0.5
  got, _ = losses.rloo_advantages(np.array([1.0, np.nan, np.nan, 2.0], np.float32), 2)
  np.testing.assert_array_equal(got, [0, 0, 0, 0])  # one scorable completion: no baseline, no advantage


def test_rloo_puts_the_kl_in_the_reward():
  old = np.array([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0]], np.float32)
  ref = np.array([[-1.5, -1.0, 0.0], [-2.0, -1.0, -3.0]], np.float32)
  mask = np.array([[1, 1, 0], [1, 1, 1]], np.float32)
  rewards = np.array([1.0, 1.0], np.float32)
  got, metrics = losses.rloo_advantages(rewards, 2, beta=0.1, old_per_token_logps=old, ref_per_token_logps=ref,
                                        completion_mask=mask, reward_clip_range=(-5.0, 0.5))
  # Summed KL: -0.5 and 3.0; rewards clipped to 0.5, then 0.5 + 0.05 and 0.5 - 0.3.
  np.testing.assert_allclose(got, [0.55 - 0.2, 0.2 - 0.55], rtol=1e-6)
  np.testing.assert_allclose(float(metrics["kl"]), 2.5 / 5, rtol=1e-6)
  normalised, _ = losses.rloo_advantages(rewards, 2, beta=0.1, old_per_token_logps=old, ref_per_token_logps=ref,
                                         completion_mask=mask, normalize_advantages=True)
  np.testing.assert_allclose(normalised, np.array([1.0, -1.0]) * 0.35 / (0.35 * math.sqrt(2) + 1e-4), rtol=1e-5)
  with pytest.raises(ValueError, match="needs old_per_token_logps"):
    losses.rloo_advantages(rewards, 2, beta=0.1)


# ---------------------------------------------------------------------------------------------------------- RLOO


def _trl_rloo(logps, old, advantages, mask, entropies, *, epsilon, epsilon_high):
  policy = _leaf(logps)
  self = types.SimpleNamespace(
      _get_per_token_logps_and_entropies=lambda *args, **kwargs: (policy, torch.tensor(entropies), None),
      aux_loss_enabled=False, epsilon_low=epsilon, epsilon_high=epsilon_high,
      model=types.SimpleNamespace(training=True), accelerator=_Accelerator(), _metrics=_metrics_store())
  completion_mask = torch.tensor(mask, dtype=torch.int64)
  inputs = {"prompt_ids": torch.zeros((ROWS, 2), dtype=torch.int64), "prompt_mask": torch.ones((ROWS, 2)),
            "completion_ids": torch.zeros_like(completion_mask), "completion_mask": completion_mask,
            "advantages": torch.tensor(advantages), "old_logps": torch.tensor((old * mask).sum(-1))}
  loss = RLOOTrainer._compute_loss(self, None, inputs)
  loss.backward()
  return float(loss.detach()), policy.grad.numpy(), _last(self._metrics["train"])


@pytest.mark.parametrize("epsilon,epsilon_high", [(0.2, 0.2), (0.2, 0.28)])
def test_rloo_loss_and_gradient_equal_trl(epsilon, epsilon_high):
  logps, old, _, advantages, mask, entropies = _inputs(9, old_noise=0.12)
  trl_loss, trl_grad, trl_metrics = _trl_rloo(logps, old, advantages, mask, entropies, epsilon=epsilon,
                                              epsilon_high=epsilon_high)
  (loss, metrics), grad = jax.value_and_grad(
      lambda per_token: losses.rloo_loss(per_token, old, advantages, mask, epsilon=epsilon, epsilon_high=epsilon_high,
                                         entropies=entropies), has_aux=True)(jnp.asarray(logps))
  np.testing.assert_allclose(float(loss), trl_loss, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), trl_grad, rtol=2e-5, atol=1e-7)
  assert 0 < float(metrics["clip_ratio/region_mean"]) < 1
  for name in CLIP_METRICS + ("entropy",):
    np.testing.assert_allclose(float(metrics[name]), trl_metrics[name], rtol=2e-5, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------------------------- online DPO


def _trl_online_dpo(logps, ref, rewards, mask, *, loss_type, beta):
  """TRL's training step on fixed completions: its rows are every prompt's first completion, then every second one
  (ours alternate); returns the loss, the gradient in our row order and TRL's stats."""
  order = np.concatenate([np.arange(0, len(logps), 2), np.arange(1, len(logps), 2)])
  policy, completion_mask = _leaf(logps[order]), torch.tensor(mask[order], dtype=torch.int64)
  completion_ids = completion_mask * 2  # every completion holds the EOS id 2: no missing-EOS penalty applies
  model = types.SimpleNamespace(train=lambda: None)
  self = types.SimpleNamespace(
      args=types.SimpleNamespace(use_vllm=False, missing_eos_penalty=None, loss_type=loss_type,
                                 torch_empty_cache_steps=None, optim="adamw_torch", n_gpu=1,
                                 gradient_accumulation_steps=1),
      beta=beta, eos_token_ids=[2], ref_model=object(), reward_weights=None, reward_processing_classes=[None],
      reward_funcs=[lambda prompts, completions, completion_ids, **kwargs: list(rewards[order])],
      processing_class=types.SimpleNamespace(batch_decode=lambda ids, skip_special_tokens: [""] * len(ids)),
      accelerator=_Accelerator(), stats=collections.defaultdict(list), state=types.SimpleNamespace(global_step=1),
      _generate=lambda *args: (None, None, completion_ids, completion_mask, None),
      _forward=lambda forward_model, *args: policy if forward_model is model else torch.tensor(ref[order]))
  self._calculate_rewards_from_functions = types.MethodType(OnlineDPOTrainer._calculate_rewards_from_functions, self)
  loss = OnlineDPOTrainer.training_step(self, model, {"prompt": [f"prompt {i}" for i in range(len(logps) // 2)]})
  grad = np.empty_like(logps)
  grad[order] = policy.grad.numpy()
  return float(loss), grad, _last(self.stats)


def _online_dpo_inputs(seed, width=WIDTH):
  rng = np.random.default_rng(seed)
  rows = 2 * 5
  lengths = rng.integers(1, width + 1, size=rows)
  mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.float32)
  logps = (rng.uniform(-3.0, -0.05, size=(rows, width)) * mask).astype(np.float32)
  ref = ((logps + rng.normal(0.0, 0.5, size=logps.shape)) * mask).astype(np.float32)
  rewards = rng.normal(0.0, 1.0, size=rows).astype(np.float32)
  rewards[6] = rewards[7]  # a tie: the first completion is chosen
  return logps, ref, rewards, mask


def _assert_online_dpo_matches_trl(loss_type, width=WIDTH, beta=0.1):
  logps, ref, rewards, mask = _online_dpo_inputs(len(loss_type), width)
  trl_loss, trl_grad, trl_stats = _trl_online_dpo(logps, ref, rewards, mask, loss_type=loss_type, beta=beta)
  (loss, metrics), grad = jax.value_and_grad(
      lambda per_token: losses.online_dpo_loss(per_token, ref, rewards, mask, beta=beta, loss_type=loss_type),
      has_aux=True)(jnp.asarray(logps))
  np.testing.assert_allclose(float(loss), trl_loss, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), trl_grad, rtol=2e-5, atol=1e-7)
  for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected", "objective/kl", "objective/entropy", "objective/non_score_reward",
               "objective/rlhf_reward", "objective/scores", "objective/scores_margin"):
    np.testing.assert_allclose(float(metrics[name]), trl_stats[name], rtol=2e-5, atol=1e-5, err_msg=name)


def test_online_dpo_sigmoid_equals_trl():
  _assert_online_dpo_matches_trl("sigmoid", beta=0.3)


def test_online_dpo_ipo_equals_trl_on_one_token_completions():
  # Our ipo is DPOTrainer's (per token, as the IPO authors); TRL's OnlineDPOTrainer applies it to summed log-probs.
  # With one-token completions the two are the same formula.
  _assert_online_dpo_matches_trl("ipo", width=1)


def test_online_dpo_any_dpo_loss_type_on_the_picked_pairs():
  logps, ref, rewards, mask = _online_dpo_inputs(3)
  summed, ref_summed, lengths = (logps * mask).sum(-1), (ref * mask).sum(-1), mask.sum(-1)
  first = rewards[0::2] >= rewards[1::2]
  chosen = np.where(first, np.arange(0, 10, 2), np.arange(1, 10, 2))
  rejected = np.where(first, np.arange(1, 10, 2), np.arange(0, 10, 2))
  for loss_type in (("sigmoid", "sft"), "apo_zero", "sigmoid_norm"):
    want, _ = losses.dpo_loss(summed[chosen], summed[rejected], ref_summed[chosen], ref_summed[rejected], beta=0.2,
                              loss_type=loss_type, chosen_lengths=lengths[chosen], rejected_lengths=lengths[rejected])
    got, _ = losses.online_dpo_loss(logps, ref, rewards, mask, beta=0.2, loss_type=loss_type)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6, err_msg=str(loss_type))


def test_online_dpo_leaves_pairs_with_an_unscorable_completion_out():
  logps, ref, rewards, mask = _online_dpo_inputs(4)
  rewards[3] = np.nan
  got, metrics = losses.online_dpo_loss(logps, ref, rewards, mask)
  keep = np.r_[0:2, 4:10]
  want, _ = losses.online_dpo_loss(logps[keep], ref[keep], rewards[keep], mask[keep])
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  assert int(metrics["unscorable_pairs"]) == 1
  with pytest.raises(ValueError, match="two completions per prompt"):
    losses.online_dpo_loss(logps[:9], ref[:9], rewards[:9], mask[:9])
