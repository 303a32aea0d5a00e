"""Losses against hand-computed values."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import losses


def test_selected_logprobs_by_hand():
  # Vocab of 2: uniform logits, then logits favouring token 0 three to one.
  logits = jnp.array([[[0.0, 0.0], [math.log(3.0), 0.0]]])
  got = losses.selected_logprobs(logits, jnp.array([[1, 0]]))
  np.testing.assert_allclose(got, [[math.log(0.5), math.log(0.75)]], rtol=1e-6)


def test_sft_loss_is_mean_over_scored_targets():
  logps = jnp.array([[-1.0, -2.0, -9.0], [-3.0, -9.0, -9.0]])
  mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
  loss, metrics = losses.sft_loss(logps, mask)
  assert float(loss) == pytest.approx(2.0)
  assert float(metrics["num_tokens"]) == 3
  assert float(metrics["perplexity"]) == pytest.approx(math.exp(2.0), rel=1e-6)


def sigmoid(x):
  return 1 / (1 + math.exp(-x))


def test_dpo_sigmoid_loss_and_metrics_by_hand():
  pc, pr, rc, rr = jnp.array([-1.0, -2.0]), jnp.array([-3.0, -1.0]), jnp.array([-2.0, -2.0]), jnp.array([-2.0, -2.0])
  loss, m = losses.dpo_loss(pc, pr, rc, rr, beta=0.5)
  # Pair 0: h = 0.5 * ((1) - (-1)) = 1; pair 1: h = 0.5 * (0 - 1) = -0.5.
  expected = (-math.log(sigmoid(1.0)) - math.log(sigmoid(-0.5))) / 2
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  assert float(m["rewards/chosen"]) == pytest.approx((0.5 + 0.0) / 2)
  assert float(m["rewards/rejected"]) == pytest.approx((-0.5 + 0.5) / 2)
  assert float(m["rewards/accuracies"]) == 0.5
  assert float(m["rewards/margins"]) == pytest.approx((1.0 - 0.5) / 2)
  assert float(m["logps/chosen"]) == pytest.approx(-1.5)
  assert float(m["logps/rejected"]) == pytest.approx(-2.0)


def test_dpo_label_smoothing_ipo_hinge_reference_free_by_hand():
  one = lambda x: jnp.array([x])
  args = (one(-1.0), one(-3.0), one(-2.0), one(-2.0))  # chosen ratio 1, rejected ratio -1
  h = 0.5 * 2.0
  loss, _ = losses.dpo_loss(*args, beta=0.5, label_smoothing=0.2)
  assert float(loss) == pytest.approx(-0.8 * math.log(sigmoid(h)) - 0.2 * math.log(sigmoid(-h)), rel=1e-6)
  loss, _ = losses.dpo_loss(*args, beta=0.5, loss_type="ipo")
  assert float(loss) == pytest.approx((2.0 - 1.0) ** 2, rel=1e-6)
  loss, _ = losses.dpo_loss(*args, beta=0.25, loss_type="hinge")
  assert float(loss) == pytest.approx(1.0 - 0.5, rel=1e-6)
  loss, _ = losses.dpo_loss(*args, beta=0.5, loss_type="reference_free")
  assert float(loss) == pytest.approx(-math.log(sigmoid(0.5 * (-1.0 + 3.0))), rel=1e-6)
  with pytest.raises(ValueError, match="loss_type"):
    losses.dpo_loss(*args, loss_type="kto")


def test_dpo_loss_is_ln2_when_policy_equals_reference():
  logps = jnp.array([-5.0, -7.5, -1.25])
  loss, m = losses.dpo_loss(logps, logps + 1, logps, logps + 1, beta=0.1)
  assert float(loss) == pytest.approx(math.log(2.0), abs=1e-7)
  assert float(m["rewards/margins"]) == 0.0


def test_reward_model_loss_margin_and_centering_by_hand():
  rc, rr = jnp.array([2.0, 0.0]), jnp.array([1.0, 1.0])
  loss, m = losses.reward_model_loss(rc, rr)
  assert float(loss) == pytest.approx((-math.log(sigmoid(1.0)) - math.log(sigmoid(-1.0))) / 2, rel=1e-6)
  assert float(m["accuracy"]) == 0.5
  loss, _ = losses.reward_model_loss(rc, rr, margin=jnp.array([1.0, 0.0]), center_rewards_coefficient=0.1)
  centered = 0.1 * ((3.0**2 + 1.0**2) / 2)
  assert float(loss) == pytest.approx((-math.log(0.5) - math.log(sigmoid(-1.0))) / 2 + centered, rel=1e-6)


def test_dpo_loss_mask_averages_over_present_pairs_only():
  pc, pr, rc, rr = (jnp.array([[-1.0, 7.0], [-2.0, 0.0]]), jnp.array([[-3.0, 9.0], [-1.0, 0.0]]),
                    jnp.full((2, 2), -2.0), jnp.full((2, 2), -2.0))
  mask = jnp.array([[1, 0], [1, 0]])  # packed rows: the second slot of each row holds no pair
  loss, m = losses.dpo_loss(pc, pr, rc, rr, beta=0.5, mask=mask)
  # The two present pairs are those of test_dpo_sigmoid_loss_and_metrics_by_hand: h = 1 and h = -0.5.
  assert float(loss) == pytest.approx((-math.log(sigmoid(1.0)) - math.log(sigmoid(-0.5))) / 2, rel=1e-6)
  assert float(m["rewards/accuracies"]) == 0.5
  assert float(m["logps/chosen"]) == pytest.approx(-1.5)
