"""The preference-loss menu against hand-computed values: every DPO loss type, weighted combinations, the
f-divergences, SimPO, CPO, ORPO and KTO; masks (packed batches), the option checks and the reference / token-count
tables. (tests/test_losses_trl.py checks the same functions against TRL's own code.)"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import losses


def sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


def ell(x):
  """-log sigmoid(x)."""
  return math.log1p(math.exp(-x))


def mean(*values):
  return sum(values) / len(values)


# Two pairs, beta 0.5. Pair A: u_c = 1, u_r = -1 (D = 2, beta D = 1), pi_c - pi_r = 2, n_c = 2, n_r = 1.
# Pair B: u_c = 0, u_r = 0.5 (D = -0.5, beta D = -0.25), pi_c - pi_r = -1, n_c = 4, n_r = 2.
PAIRS = dict(policy_chosen_logps=jnp.array([-1.0, -2.0]), policy_rejected_logps=jnp.array([-3.0, -1.0]),
             reference_chosen_logps=jnp.array([-2.0, -2.0]), reference_rejected_logps=jnp.array([-2.0, -1.5]))
LENGTHS = dict(chosen_lengths=jnp.array([2.0, 4.0]), rejected_lengths=jnp.array([1.0, 2.0]))
BETA = 0.5


def exo(x, eps):
  return sigmoid(x) * (math.log(sigmoid(x)) - math.log(1 - eps)) + sigmoid(-x) * (math.log(sigmoid(-x)) - math.log(eps))


def robust(x, eps):
  return ((1 - eps) * ell(x) - eps * ell(-x)) / (1 - 2 * eps)


def discopop(x, tau=0.05):
  return (1 - sigmoid(x / tau)) * ell(x) + sigmoid(x / tau) * math.exp(-x)


# (loss_type, label_smoothing, expected loss), each worked out from the pair values above.
BY_HAND = [
    ("sigmoid", 0.0, mean(ell(1.0), ell(-0.25))),
    ("sigmoid", 0.2, mean(0.8 * ell(1.0) + 0.2 * ell(-1.0), 0.8 * ell(-0.25) + 0.2 * ell(0.25))),
    ("hinge", 0.0, mean(0.0, 1.25)),
    # Per token: A 1/2 - (-1)/1 = 1.5, B 0/4 - 0.5/2 = -0.25; 1 / (2 beta) = 1.
    ("ipo", 0.0, mean(0.5**2, 1.25**2)),
    ("exo_pair", 0.1, mean(exo(1.0, 0.1), exo(-0.25, 0.1))),
    # beta u_c: A 0.5, B 0; beta u_r: A -0.5, B 0.25.
    ("nca_pair", 0.0, mean(ell(0.5) + 0.5 * ell(-0.5) + 0.5 * ell(0.5), ell(0.0) + 0.5 * ell(0.0) + 0.5 * ell(-0.25))),
    ("robust", 0.1, mean(robust(1.0, 0.1), robust(-0.25, 0.1))),
    ("bco_pair", 0.0, mean(ell(0.5) + ell(0.5), ell(0.0) + ell(-0.25))),
    # 1 / (2 beta) = 1: A (1 - 1)^2 + (-1 + 1)^2, B (0 - 1)^2 + (0.5 + 1)^2.
    ("sppo_hard", 0.0, mean(0.0, 1.0 + 2.25)),
    ("apo_zero", 0.0, mean(1 - sigmoid(0.5) + sigmoid(-0.5), 1 - sigmoid(0.0) + sigmoid(0.25))),
    ("apo_down", 0.0, mean(sigmoid(0.5) + 1 - sigmoid(1.0), sigmoid(0.0) + 1 - sigmoid(-0.25))),
    ("discopop", 0.0, mean(discopop(1.0), discopop(-0.25))),
    # -(pi_c summed) / (n_c summed) = 3 / 6.
    ("sft", 0.0, 0.5),
    ("sigmoid_norm", 0.0, mean(ell(0.75), ell(-0.125))),
    # beta (pi_c - pi_r): A 1, B -0.5.
    ("reference_free", 0.0, mean(ell(1.0), ell(-0.5))),
    ("reference_free", 0.2, mean(0.8 * ell(1.0) + 0.2 * ell(-1.0), 0.8 * ell(-0.5) + 0.2 * ell(0.5))),
]


@pytest.mark.parametrize("loss_type,eps,expected", BY_HAND)
def test_every_dpo_loss_type_by_hand(loss_type, eps, expected):
  loss, metrics = losses.dpo_loss(**PAIRS, **LENGTHS, beta=BETA, loss_type=loss_type, label_smoothing=eps)
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  assert float(metrics["loss"]) == float(loss)
  assert set(metrics) == {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                          "logps/chosen", "logps/rejected"}
  if losses.needs_reference(loss_type):  # beta u: chosen 0.5, 0; rejected -0.5, 0.25
    assert float(metrics["rewards/chosen"]) == pytest.approx(0.25)
    assert float(metrics["rewards/rejected"]) == pytest.approx(-0.125)
    assert float(metrics["rewards/accuracies"]) == 0.5
  else:  # no reference: rewards are beta pi
    assert float(metrics["rewards/chosen"]) == pytest.approx(0.5 * -1.5)
    assert float(metrics["rewards/margins"]) == pytest.approx(0.5 * (-1.5 + 2.0))


def test_every_loss_type_has_a_hand_computed_value():
  assert {loss_type for loss_type, _, _ in BY_HAND} | {"aot", "aot_unpaired"} == set(losses.DPO_LOSS_TYPES)


def test_aot_compares_sorted_margins_across_the_batch():
  # Policy margins pi_c - pi_r = 3, -1, 0.5 against reference margins 1, 2, -2: sorted, -1 meets -2, 0.5 meets 1 and
  # 3 meets 2, so d = 1, -0.5, 1 (paired as given they would be 2, -3, 2.5).
  pairs = dict(policy_chosen_logps=jnp.array([-1.0, -3.0, -2.0]), policy_rejected_logps=jnp.array([-4.0, -2.0, -2.5]),
               reference_chosen_logps=jnp.array([-2.0, -1.0, -4.0]),
               reference_rejected_logps=jnp.array([-3.0, -3.0, -2.0]))
  loss, _ = losses.dpo_loss(**pairs, beta=BETA, loss_type="aot", label_smoothing=0.1)
  smoothed = lambda x: 0.9 * ell(x) + 0.1 * ell(-x)
  assert float(loss) == pytest.approx(mean(smoothed(0.5), smoothed(-0.25), smoothed(0.5)), rel=1e-5)
  # aot_unpaired sorts the log-ratios: u_c = 1, -2, 2 -> -2, 1, 2; u_r = -1, 1, -0.5 -> -1, -0.5, 1; d = -1, 1.5, 1.
  loss, _ = losses.dpo_loss(**pairs, beta=BETA, loss_type="aot_unpaired")
  assert float(loss) == pytest.approx(mean(ell(-0.5), ell(0.75), ell(0.5)), rel=1e-5)


def test_weighted_loss_types_sum_and_report_each_term():
  loss, metrics = losses.dpo_loss(**PAIRS, **LENGTHS, beta=BETA, loss_type=("sigmoid", "sft"), loss_weights=(1.0, 0.5))
  sigmoid_term = mean(ell(1.0), ell(-0.25))
  assert float(loss) == pytest.approx(sigmoid_term + 0.5 * 0.5, rel=1e-6)
  assert float(metrics["loss/sigmoid"]) == pytest.approx(sigmoid_term, rel=1e-6)
  assert float(metrics["loss/sft"]) == pytest.approx(0.5, rel=1e-6)
  # Without weights each counts once; a list works as well as a tuple.
  loss, _ = losses.dpo_loss(**PAIRS, **LENGTHS, beta=BETA, loss_type=["sigmoid", "hinge", "sppo_hard"])
  assert float(loss) == pytest.approx(sigmoid_term + 0.625 + 1.625, rel=1e-6)


# f-divergence scores g(u) for u_c = (1, 0), u_r = (-1, 0.5): the differences D of pairs A and B.
F_DELTAS = {
    "forward_kl": ((1 - math.exp(-1)) - (1 - math.e), 0.0 - (1 - math.exp(-0.5))),
    # log sigmoid(x) - log sigmoid(-x) = x, so pair A's difference is exactly 1.
    "js_divergence": (1.0, math.log(0.5) - math.log(sigmoid(0.5))),
    # alpha 0.5: g(u) = (exp(-u / 2) - 1) / (-1 / 2).
    "alpha_divergence": (2 * (1 - math.exp(-0.5)) - 2 * (1 - math.exp(0.5)), 0.0 - 2 * (1 - math.exp(-0.25))),
}


@pytest.mark.parametrize("f_divergence_type", sorted(F_DELTAS))
def test_f_divergences_by_hand(f_divergence_type):
  delta_a, delta_b = F_DELTAS[f_divergence_type]
  loss, metrics = losses.dpo_loss(**PAIRS, beta=BETA, f_divergence_type=f_divergence_type)
  assert float(loss) == pytest.approx(mean(ell(BETA * delta_a), ell(BETA * delta_b)), rel=1e-5)
  assert float(metrics["rewards/chosen"]) == pytest.approx(0.25)  # rewards stay beta times the log-ratios
  loss, _ = losses.dpo_loss(**PAIRS, beta=BETA, loss_type="hinge", f_divergence_type=f_divergence_type)
  assert float(loss) == pytest.approx(mean(max(0, 1 - BETA * delta_a), max(0, 1 - BETA * delta_b)), rel=1e-5)


def test_f_divergence_scores_are_normalised_per_token_for_ipo():
  # forward_kl scores: chosen (1 - 1/e, 0), rejected (1 - e, 1 - e^-0.5); per token over n_c = (2, 4), n_r = (1, 2).
  a = (1 - math.exp(-1)) / 2 - (1 - math.e) / 1
  b = 0.0 / 4 - (1 - math.exp(-0.5)) / 2
  loss, _ = losses.dpo_loss(**PAIRS, **LENGTHS, beta=BETA, loss_type="ipo", f_divergence_type="forward_kl")
  assert float(loss) == pytest.approx(mean((a - 1) ** 2, (b - 1) ** 2), rel=1e-5)


def test_alpha_divergence_at_one_is_reverse_kl():
  at_one, _ = losses.dpo_loss(**PAIRS, beta=BETA, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)
  reverse, _ = losses.dpo_loss(**PAIRS, beta=BETA)
  assert float(at_one) == float(reverse)


def test_ipo_without_token_counts_is_the_sequence_level_formula():
  # Without counts, n = 1: (D - 1 / (2 beta))^2 on summed log-ratios, D = 2 and -0.5.
  loss, _ = losses.dpo_loss(**PAIRS, beta=BETA, loss_type="ipo")
  assert float(loss) == pytest.approx(mean(1.0**2, 1.5**2), rel=1e-6)


def test_discopop_tau_and_large_margins_stay_finite():
  loss, _ = losses.dpo_loss(**PAIRS, beta=BETA, loss_type="discopop", discopop_tau=0.5)
  assert float(loss) == pytest.approx(mean(discopop(1.0, 0.5), discopop(-0.25, 0.5)), rel=1e-5)
  # Pair B at u_c = -1000: beta D = -500.25, exp(500.25) overflows fp32 and its weight sigmoid(-10005) is 0, so the
  # pair's loss is l(-500.25) = 500.25, not inf * 0 = nan.
  far = dict(PAIRS, policy_chosen_logps=jnp.array([-1.0, -1002.0]))
  f = lambda logps: losses.dpo_loss(**dict(far, policy_chosen_logps=logps), beta=BETA, loss_type="discopop")[0]
  loss, grad = jax.value_and_grad(f)(far["policy_chosen_logps"])
  assert float(loss) == pytest.approx(mean(discopop(1.0), 500.25), rel=1e-5)
  assert np.isfinite(np.asarray(grad)).all()


def test_reference_free_loss_types_take_no_reference():
  no_reference = dict(PAIRS, reference_chosen_logps=None, reference_rejected_logps=None)
  for loss_type in ("sft", "reference_free", ("reference_free", "sft")):
    with_none, _ = losses.dpo_loss(**no_reference, **LENGTHS, beta=BETA, loss_type=loss_type)
    with_reference, _ = losses.dpo_loss(**PAIRS, **LENGTHS, beta=BETA, loss_type=loss_type)
    assert float(with_none) == float(with_reference)
  with pytest.raises(ValueError, match="needs reference log-probs"):
    losses.dpo_loss(**no_reference, beta=BETA, loss_type=("sigmoid", "sft"), **LENGTHS)


def test_reference_and_token_count_tables():
  assert [t for t in losses.DPO_LOSS_TYPES if not losses.needs_reference(t)] == ["sft", "reference_free"]
  assert losses.needs_reference(("sigmoid", "sft")) and not losses.needs_reference(("sft", "reference_free"))
  assert [t for t in losses.DPO_LOSS_TYPES if losses.needs_token_counts(t)] == ["ipo", "sft", "sigmoid_norm"]
  assert losses.needs_token_counts(("sigmoid", "sft")) and not losses.needs_token_counts(("sigmoid", "hinge"))


@pytest.mark.parametrize("options,message", [
    (dict(loss_type="kto"), "loss_type"),
    (dict(loss_type=()), "loss_type"),
    (dict(loss_type=("sigmoid", "sigmoid")), "twice"),
    (dict(loss_type=("sigmoid", "sft"), loss_weights=(1.0,)), "one weight per loss type"),
    (dict(f_divergence_type="kl"), "f_divergence_type"),
    (dict(loss_type="nca_pair", f_divergence_type="js_divergence"), "works only with"),
    (dict(loss_type="reference_free", f_divergence_type="forward_kl"), "works only with"),
    (dict(loss_type="exo_pair"), "exo_pair"),
    (dict(loss_type="robust", label_smoothing=0.5), "robust"),
    (dict(label_smoothing=-0.1), r"\[0, 1\]"),
    (dict(loss_type="discopop", discopop_tau=0.0), "discopop_tau"),
])
def test_bad_dpo_options_fail_with_the_option_named(options, message):
  with pytest.raises(ValueError, match=message):
    losses.check_dpo_options(**options)
  with pytest.raises(ValueError, match=message):
    losses.dpo_loss(**PAIRS, **LENGTHS, **options)


@pytest.mark.parametrize("loss_type", ["sft", "sigmoid_norm", ("sigmoid", "sft")])
def test_token_count_loss_types_require_the_counts(loss_type):
  with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
    losses.dpo_loss(**PAIRS, loss_type=loss_type)


def _with_absent_slots(values, garbage):
  """[2] -> [2, 2] packed rows: each present pair followed by an absent slot holding `garbage`."""
  return jnp.stack([jnp.asarray(values, jnp.float32), jnp.full((2,), garbage, jnp.float32)], axis=1)


PACKED_MASK = jnp.array([[1, 0], [1, 0]])


@pytest.mark.parametrize("loss_type", losses.DPO_LOSS_TYPES)
def test_absent_pairs_change_neither_loss_nor_gradient(loss_type):
  eps = 0.1 if loss_type in ("exo_pair", "robust", "aot") else 0.0
  options = dict(beta=BETA, loss_type=loss_type, label_smoothing=eps)

  def loss_of(policy_chosen, args):
    return losses.dpo_loss(policy_chosen, *args[1:], **options)[0]

  flat = [PAIRS[k] for k in PAIRS]
  packed = [_with_absent_slots(v, garbage) for v, garbage in zip(flat, (37.0, -900.0, 0.0, 5.0))]
  loss, grad = jax.value_and_grad(lambda x: losses.dpo_loss(x, *flat[1:], **LENGTHS, **options)[0])(flat[0])
  packed_lengths = {k: _with_absent_slots(v, 0.0) for k, v in LENGTHS.items()}
  packed_loss, packed_grad = jax.value_and_grad(
      lambda x: losses.dpo_loss(x, *packed[1:], **packed_lengths, mask=PACKED_MASK, **options)[0])(packed[0])
  assert float(packed_loss) == pytest.approx(float(loss), rel=1e-6)
  np.testing.assert_allclose(packed_grad[:, 0], grad, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(packed_grad[:, 1], 0.0)


def test_dpo_loss_jits_with_a_tuple_of_loss_types():
  f = jax.jit(lambda *a: losses.dpo_loss(*a, **LENGTHS, beta=BETA, loss_type=("sigmoid", "sft"))[0])
  assert float(f(*PAIRS.values())) == pytest.approx(mean(ell(1.0), ell(-0.25)) + 0.5, rel=1e-6)


# Reference-free methods. Mean token log-probs a = pi / n: chosen (-0.5, -0.5), rejected (-3, -0.5).
POLICY = dict(policy_chosen_logps=PAIRS["policy_chosen_logps"], policy_rejected_logps=PAIRS["policy_rejected_logps"])


def test_simpo_by_hand():
  # beta 2, gamma 1: beta (a_c - a_r) - gamma = 2 * 2.5 - 1 = 4 and 0 - 1 = -1.
  loss, metrics = losses.simpo_loss(**POLICY, **LENGTHS, beta=2.0, gamma=1.0)
  assert float(loss) == pytest.approx(mean(ell(4.0), ell(-1.0)), rel=1e-6)
  assert float(metrics["rewards/chosen"]) == pytest.approx(-1.0)  # beta a_c
  assert float(metrics["rewards/rejected"]) == pytest.approx(2.0 * -1.75)
  assert float(metrics["rewards/accuracies"]) == 0.5
  assert float(metrics["logps/chosen"]) == pytest.approx(-0.5)
  assert float(metrics["nll_loss"]) == 0.0
  loss, metrics = losses.simpo_loss(**POLICY, **LENGTHS, beta=2.0, gamma=1.0, label_smoothing=0.1, sft_weight=0.5)
  smoothed = lambda x: 0.9 * ell(x) + 0.1 * ell(-x)
  assert float(loss) == pytest.approx(mean(smoothed(4.0), smoothed(-1.0)) + 0.5 * 0.5, rel=1e-6)
  assert float(metrics["nll_loss"]) == pytest.approx(0.5)


def test_cpo_by_hand():
  # beta (pi_c - pi_r) = 1 and -0.5; the chosen responses' NLL is 3 / 6.
  loss, metrics = losses.cpo_loss(**POLICY, **LENGTHS, beta=BETA)
  assert float(loss) == pytest.approx(mean(ell(1.0), ell(-0.5)) + 0.5, rel=1e-6)
  assert float(metrics["nll_loss"]) == pytest.approx(0.5)
  assert float(metrics["rewards/chosen"]) == pytest.approx(BETA * -1.5)
  loss, _ = losses.cpo_loss(**POLICY, beta=BETA, cpo_alpha=0.0)  # no NLL: token counts not needed
  assert float(loss) == pytest.approx(mean(ell(1.0), ell(-0.5)), rel=1e-6)
  loss, _ = losses.cpo_loss(**POLICY, **LENGTHS, beta=BETA, loss_type="hinge", cpo_alpha=2.0)
  assert float(loss) == pytest.approx(mean(0.0, 1.5) + 2.0 * 0.5, rel=1e-6)
  # ipo on mean token log-probs: a_c - a_r = 2.5 and 0, 1 / (2 beta) = 1.
  loss, _ = losses.cpo_loss(**POLICY, **LENGTHS, beta=BETA, loss_type="ipo", cpo_alpha=0.0)
  assert float(loss) == pytest.approx(mean(1.5**2, 1.0), rel=1e-6)
  with pytest.raises(ValueError, match="chosen_lengths"):
    losses.cpo_loss(**POLICY)
  with pytest.raises(ValueError, match="rejected_lengths"):
    losses.cpo_loss(**POLICY, chosen_lengths=LENGTHS["chosen_lengths"], loss_type="simpo")
  with pytest.raises(ValueError, match="cpo loss_type"):
    losses.cpo_loss(**POLICY, **LENGTHS, loss_type="sppo_hard")


def test_orpo_by_hand():
  # Chosen: 2 tokens of probability 1/2 (odds 1); rejected: 3 tokens of probability 1/5 (odds 1/4): log odds ratio
  # log 4, log sigmoid(log 4) = log 0.8; the NLL is log 2 per chosen token.
  pairs = dict(policy_chosen_logps=jnp.array([2 * math.log(0.5)]), policy_rejected_logps=jnp.array([3 * math.log(0.2)]),
               chosen_lengths=jnp.array([2.0]), rejected_lengths=jnp.array([3.0]))
  loss, metrics = losses.orpo_loss(**pairs, beta=0.1)
  assert float(loss) == pytest.approx(math.log(2) - 0.1 * math.log(0.8), rel=1e-6)
  assert float(metrics["log_odds_chosen"]) == pytest.approx(math.log(4), rel=1e-6)
  assert float(metrics["log_odds_ratio"]) == pytest.approx(math.log(0.8), rel=1e-6)
  assert float(metrics["nll_loss"]) == pytest.approx(math.log(2), rel=1e-6)
  assert float(metrics["rewards/chosen"]) == pytest.approx(0.1 * math.log(0.5), rel=1e-6)
  assert float(metrics["logps/rejected"]) == pytest.approx(math.log(0.2), rel=1e-6)
  loss, metrics = losses.orpo_loss(**pairs, beta=0.1, nll_loss=jnp.float32(2.0))  # e.g. TRL's prompt-inclusive NLL
  assert float(loss) == pytest.approx(2.0 - 0.1 * math.log(0.8), rel=1e-6)


@pytest.mark.parametrize("method", ["simpo", "cpo", "orpo"])
def test_reference_free_methods_ignore_absent_pairs(method):
  fn = {"simpo": losses.simpo_loss, "cpo": losses.cpo_loss, "orpo": losses.orpo_loss}[method]
  flat = [POLICY["policy_chosen_logps"], POLICY["policy_rejected_logps"]]
  # Absent slots hold all-zero log-probs and no tokens, as padding does (ORPO's log(1 - e^0) would be -inf).
  packed = [_with_absent_slots(v, 0.0) for v in flat]
  packed_lengths = {k: _with_absent_slots(v, 0.0) for k, v in LENGTHS.items()}
  loss, grad = jax.value_and_grad(lambda x: fn(x, flat[1], **LENGTHS)[0])(flat[0])
  packed_loss, packed_grad = jax.value_and_grad(
      lambda x: fn(x, packed[1], **packed_lengths, mask=PACKED_MASK)[0])(packed[0])
  assert float(packed_loss) == pytest.approx(float(loss), rel=1e-6)
  np.testing.assert_allclose(packed_grad[:, 0], grad, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(packed_grad[:, 1], 0.0)


# KTO, beta 0.5: log-ratios u = 1 (desirable), -1 and 0.5 (undesirable); the mismatched pairs' policy - reference
# gaps 0.4, 0.2, 0 give the reference point z = 0.2.
KTO = dict(policy_logps=jnp.array([-2.0, -4.0, -1.5]), reference_logps=jnp.array([-3.0, -3.0, -2.0]),
           desirable=jnp.array([True, False, False]), kl_policy_logps=jnp.array([-5.0, -6.0, -7.0]),
           kl_reference_logps=jnp.array([-5.4, -6.2, -7.0]))


def test_kto_by_hand():
  loss, metrics = losses.kto_loss(**KTO, beta=0.5, desirable_weight=1.33)
  expected = mean(1.33 * (1 - sigmoid(0.5 * (1 - 0.2))), 1 - sigmoid(0.5 * (0.2 + 1)), 1 - sigmoid(0.5 * (0.2 - 0.5)))
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  assert float(metrics["kl"]) == pytest.approx(0.2, rel=1e-5)
  assert float(metrics["rewards/chosen"]) == pytest.approx(0.5)
  assert float(metrics["rewards/rejected"]) == pytest.approx(mean(-0.5, 0.25))
  assert float(metrics["rewards/margins"]) == pytest.approx(0.5 + 0.125)
  assert float(metrics["logps/chosen"]) == pytest.approx(-2.0)
  assert float(metrics["logps/rejected"]) == pytest.approx(-2.75)


def test_kto_reference_point_is_clamped_and_carries_no_gradient():
  below = dict(KTO, kl_reference_logps=KTO["kl_policy_logps"] + 1.0)  # policy below the reference: z = max(0, -1)
  loss, metrics = losses.kto_loss(**below, beta=0.5)
  assert float(metrics["kl"]) == 0.0
  assert float(loss) == pytest.approx(mean(1 - sigmoid(0.5), 1 - sigmoid(0.5), 1 - sigmoid(-0.25)), rel=1e-6)
  grad = jax.grad(lambda kl: losses.kto_loss(**dict(KTO, kl_policy_logps=kl), beta=0.5)[0])(KTO["kl_policy_logps"])
  np.testing.assert_array_equal(grad, 0.0)


def test_kto_apo_zero_unpaired_needs_no_kl():
  kto = {k: v for k, v in KTO.items() if not k.startswith("kl_")}
  loss, metrics = losses.kto_loss(**kto, beta=0.5, loss_type="apo_zero_unpaired", undesirable_weight=2.0)
  expected = mean(1 - sigmoid(0.5), 2.0 * sigmoid(-0.5), 2.0 * sigmoid(0.25))
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  assert float(metrics["kl"]) == 0.0
  with pytest.raises(ValueError, match="kl_policy_logps"):
    losses.kto_loss(**kto)
  with pytest.raises(ValueError, match="kto loss_type"):
    losses.kto_loss(**KTO, loss_type="sigmoid")


def test_kto_mask_drops_absent_examples_from_loss_metrics_and_reference_point():
  grown = {k: jnp.concatenate([v, jnp.array([True] if v.dtype == bool else [50.0])]) for k, v in KTO.items()}
  loss, metrics = losses.kto_loss(**grown, beta=0.5, mask=jnp.array([1, 1, 1, 0]))
  expected_loss, expected = losses.kto_loss(**KTO, beta=0.5)
  assert float(loss) == pytest.approx(float(expected_loss), rel=1e-6)
  for name in expected:
    assert float(metrics[name]) == pytest.approx(float(expected[name]), rel=1e-6, abs=1e-7), name
