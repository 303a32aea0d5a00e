"""Our preference losses equal TRL 1.16's own code for the same inputs.

TRL's losses live inside its trainers' methods, so each is called as an unbound function with a minimal stand-in
`self` that carries the attributes it reads, and a stand-in model that returns fixed per-token log-probs (DPO, KTO)
or logits (CPO, ORPO). Our functions get the same numbers as summed log-probs and token counts. The test fails if
either side's formula changes.
"""

import collections
import types

import os

import numpy as np
import pytest

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # CPO and ORPO live in trl.experimental
torch = pytest.importorskip("torch")
pytest.importorskip("trl")
from trl.experimental.cpo.cpo_trainer import CPOTrainer  # noqa: E402
from trl.experimental.orpo.orpo_trainer import ORPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402

from jaxalign import losses  # noqa: E402

NUM_PAIRS, WIDTH, VOCAB = 8, 12, 7
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected")


class _Accelerator:
  device = torch.device("cpu")

  @staticmethod
  def gather_for_metrics(x):
    return x

  gather = gather_for_metrics


def _stand_in(**attributes):
  """A stand-in `self` for TRL's DPO / KTO `_compute_loss`: what they read besides the loss options."""
  metrics = collections.defaultdict(lambda: collections.defaultdict(list))
  return types.SimpleNamespace(model=types.SimpleNamespace(training=True), accelerator=_Accelerator(),
                               aux_loss_enabled=False, _metrics=metrics, _total_train_tokens=0, _tp_size=1,
                               **attributes)


def _completions(rng, rows):
  """Per-token log-probs [rows, WIDTH - 1] (0 off the completion) and the completion mask [rows, WIDTH]: column 0
  is a one-token prompt, then 1 to WIDTH - 2 completion tokens, then padding."""
  lengths = rng.integers(1, WIDTH - 1, size=rows)
  completion_mask = np.zeros((rows, WIDTH), np.int64)
  for row, length in enumerate(lengths):
    completion_mask[row, 1:1 + length] = 1
  per_token = rng.uniform(-3.0, -0.05, size=(rows, WIDTH - 1)) * completion_mask[:, 1:]
  return per_token.astype(np.float32), completion_mask


def _dpo_inputs(seed):
  rng = np.random.default_rng(seed)
  per_token, completion_mask = _completions(rng, 2 * NUM_PAIRS)
  logps = per_token.sum(axis=1)
  reference = (logps + rng.normal(0.0, 1.5, size=logps.shape)).astype(np.float32)
  return per_token, completion_mask, logps, reference


def _trl_dpo(per_token, completion_mask, reference, *, loss_type, loss_weights=None, beta=0.1, label_smoothing=0.0,
             f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, discopop_tau=0.05):
  outputs = types.SimpleNamespace(log_probs=torch.tensor(per_token), entropy=torch.zeros(per_token.shape),
                                  mean_logits=torch.zeros(per_token.shape),
                                  is_top1=torch.zeros(per_token.shape, dtype=torch.bool))
  loss_types = list(losses.dpo_loss_types(loss_type))
  self = _stand_in(beta=beta, label_smoothing=label_smoothing, loss_types=loss_types,
                   loss_weights=loss_weights or [1.0] * len(loss_types), ld_alpha=None, use_weighting=False,
                   precompute_ref_logps=True, f_divergence_type=f_divergence_type,
                   f_alpha_divergence_coef=f_alpha_divergence_coef,
                   args=types.SimpleNamespace(discopop_tau=discopop_tau))
  mask = torch.tensor(completion_mask)
  inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
            "ref_chosen_logps": torch.tensor(reference[:NUM_PAIRS]),
            "ref_rejected_logps": torch.tensor(reference[NUM_PAIRS:])}
  loss = DPOTrainer._compute_loss(self, lambda **_: outputs, inputs, return_outputs=False)
  return float(loss), {name: values[-1] for name, values in self._metrics["train"].items()}


def _ours_dpo(completion_mask, logps, reference, **options):
  lengths = completion_mask.sum(axis=1).astype(np.float32)
  half = NUM_PAIRS
  return losses.dpo_loss(logps[:half], logps[half:], reference[:half], reference[half:],
                         chosen_lengths=lengths[:half], rejected_lengths=lengths[half:], **options)


def _assert_dpo_matches_trl(seed, **options):
  per_token, completion_mask, logps, reference = _dpo_inputs(seed)
  trl_loss, trl_metrics = _trl_dpo(per_token, completion_mask, reference, **options)
  loss, metrics = _ours_dpo(completion_mask, logps, reference, **options)
  np.testing.assert_allclose(float(loss), trl_loss, rtol=2e-5, atol=1e-6, err_msg=str(options))
  # A loss that reads no reference (sft alone) has rewards beta * pi with us (no reference is built), TRL's use one.
  for name in PAIR_METRICS if losses.needs_reference(options["loss_type"]) else ("logps/chosen", "logps/rejected"):
    np.testing.assert_allclose(float(metrics[name]), trl_metrics[name], rtol=2e-5, atol=1e-6, err_msg=name)


# label_smoothing is TRL's eps where TRL's formula reads it; sigmoid's (our conservative DPO) is tested by hand.
EPSILON = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1, "aot_unpaired": 0.2}
TRL_LOSS_TYPES = [name for name in losses.DPO_LOSS_TYPES if name != "reference_free"]


@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_every_dpo_loss_type_equals_trl(loss_type):
  _assert_dpo_matches_trl(seed=len(loss_type), loss_type=loss_type, beta=0.3,
                          label_smoothing=EPSILON.get(loss_type, 0.0))


@pytest.mark.parametrize("f_divergence_type,coef", [("forward_kl", 0.5), ("js_divergence", 0.5),
                                                    ("alpha_divergence", 0.5), ("alpha_divergence", 1.7),
                                                    ("alpha_divergence", 1.0)])
def test_f_divergences_equal_trl_for_every_loss_type_that_takes_one(f_divergence_type, coef):
  for loss_type in sorted(losses.F_DIVERGENCE_LOSS_TYPES):
    _assert_dpo_matches_trl(seed=3, loss_type=loss_type, beta=0.2, label_smoothing=EPSILON.get(loss_type, 0.0),
                            f_divergence_type=f_divergence_type, f_alpha_divergence_coef=coef)


@pytest.mark.parametrize("loss_type,loss_weights", [(("sigmoid", "sft"), [1.0, 1.0]),  # RPO
                                                    (("sigmoid", "bco_pair", "sft"), [0.8, 0.2, 1.0]),  # MPO
                                                    (("ipo", "apo_zero", "discopop"), [0.5, 2.0, 1.0])])
def test_weighted_loss_combinations_equal_trl(loss_type, loss_weights):
  _assert_dpo_matches_trl(seed=11, loss_type=loss_type, loss_weights=loss_weights, beta=0.1)


def test_discopop_tau_reaches_the_formula_as_in_trl():
  _assert_dpo_matches_trl(seed=5, loss_type="discopop", beta=0.5, discopop_tau=0.7)


def _pair_batch(seed, prompt_tokens=1):
  """Chosen / rejected rows for TRL's CPO and ORPO forwards (one-token prompt, labels -100 on prompt and padding),
  fixed random logits [2B, WIDTH, VOCAB], and each response's summed log-probs and token count from them."""
  rng = np.random.default_rng(seed)
  batch = {}
  for side in ("chosen", "rejected"):
    ids = torch.tensor(rng.integers(0, VOCAB, size=(NUM_PAIRS, WIDTH)))
    lengths = rng.integers(1, WIDTH - prompt_tokens + 1, size=NUM_PAIRS)
    attention = torch.zeros((NUM_PAIRS, WIDTH), dtype=torch.long)
    labels = torch.full((NUM_PAIRS, WIDTH), -100)
    for row, length in enumerate(lengths):
      attention[row, :prompt_tokens + length] = 1
      labels[row, prompt_tokens:prompt_tokens + length] = ids[row, prompt_tokens:prompt_tokens + length]
    batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attention, f"{side}_labels": labels})
  logits = torch.tensor(rng.normal(0.0, 2.0, size=(2 * NUM_PAIRS, WIDTH, VOCAB)).astype(np.float32))
  labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])[:, 1:]
  scored = labels != -100
  token_logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
  logps = (token_logps * scored).sum(dim=1).numpy()
  lengths = scored.sum(dim=1).numpy().astype(np.float32)
  return batch, logits, logps, lengths


def _pair_trainer_stand_in(trainer, loss_method, **attributes):
  """A stand-in `self` for TRL's CPO / ORPO trainers: their forward, loss and metrics methods, and the attributes
  those read."""
  methods = {name: getattr(trainer, name) for name in ("concatenated_forward", "get_batch_loss_metrics", loss_method)}
  methods.update({name: staticmethod(getattr(trainer, name)) for name in ("concatenated_inputs", "get_batch_logps")})
  stand_in = type(f"{trainer.__name__}StandIn", (), methods)()
  stand_in.__dict__.update(accelerator=_Accelerator(), is_encoder_decoder=False, aux_loss_enabled=False,
                           **attributes)
  return stand_in


def _logits_model(logits):
  return lambda *args, **kwargs: types.SimpleNamespace(logits=logits)


def _split(values):
  return values[:NUM_PAIRS], values[NUM_PAIRS:]


@pytest.mark.parametrize("loss_type,label_smoothing,cpo_alpha", [("sigmoid", 0.0, 1.0), ("sigmoid", 0.1, 0.5),
                                                                 ("hinge", 0.0, 1.0), ("ipo", 0.0, 1.0),
                                                                 ("simpo", 0.0, 0.0), ("simpo", 0.1, 1.0)])
def test_cpo_and_simpo_equal_trl(loss_type, label_smoothing, cpo_alpha):
  batch, logits, logps, lengths = _pair_batch(seed=len(loss_type))
  beta, gamma = (2.0, 1.0) if loss_type == "simpo" else (0.1, 0.5)
  trl_self = _pair_trainer_stand_in(CPOTrainer, "cpo_loss", beta=beta, label_smoothing=label_smoothing,
                                    loss_type=loss_type, cpo_alpha=cpo_alpha, simpo_gamma=gamma, pad_token_id=0,
                                    alpha=0.0)  # alpha: AlphaPO off
  trl_loss, trl_metrics = trl_self.get_batch_loss_metrics(_logits_model(logits), batch)
  (chosen, rejected), (chosen_lengths, rejected_lengths) = _split(logps), _split(lengths)
  if loss_type == "simpo":
    loss, metrics = losses.simpo_loss(chosen, rejected, chosen_lengths=chosen_lengths,
                                      rejected_lengths=rejected_lengths, beta=beta, gamma=gamma,
                                      label_smoothing=label_smoothing, sft_weight=cpo_alpha)
  else:
    loss, metrics = losses.cpo_loss(chosen, rejected, beta=beta, cpo_alpha=cpo_alpha, loss_type=loss_type,
                                    label_smoothing=label_smoothing, chosen_lengths=chosen_lengths,
                                    rejected_lengths=rejected_lengths)
  np.testing.assert_allclose(float(loss), float(trl_loss), rtol=2e-5, atol=1e-6)
  for name in PAIR_METRICS + ("nll_loss",):
    np.testing.assert_allclose(float(metrics[name]), trl_metrics[name], rtol=2e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_equals_trl(beta):
  # With a one-token prompt TRL's NLL (over prompt and response, the first token never a target) is exactly the
  # chosen responses' NLL that orpo_loss computes by default.
  batch, logits, logps, lengths = _pair_batch(seed=7)
  trl_self = _pair_trainer_stand_in(ORPOTrainer, "odds_ratio_loss", beta=beta, padding_value=0)
  trl_loss, trl_metrics = trl_self.get_batch_loss_metrics(_logits_model(logits), batch)
  (chosen, rejected), (chosen_lengths, rejected_lengths) = _split(logps), _split(lengths)
  loss, metrics = losses.orpo_loss(chosen, rejected, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                                   beta=beta)
  np.testing.assert_allclose(float(loss), float(trl_loss), rtol=2e-5, atol=1e-6)
  for name in PAIR_METRICS + ("nll_loss", "log_odds_ratio", "log_odds_chosen"):
    np.testing.assert_allclose(float(metrics[name]), trl_metrics[name], rtol=2e-5, atol=1e-6, err_msg=name)


def _trl_kto(seed, *, loss_type, beta, desirable_weight, undesirable_weight):
  rng = np.random.default_rng(seed)
  rows = 10
  per_token, completion_mask = _completions(rng, rows)
  kl_per_token, kl_completion_mask = _completions(rng, rows)
  desirable = np.array([True, False, True, True, False, True, False, False, True, True])
  reference = (per_token.sum(1) + rng.normal(0.0, 1.5, size=rows)).astype(np.float32)
  # Reference KL log-probs a little below the policy's, so the estimate z is positive (TRL clamps it at 0).
  kl_reference = (kl_per_token.sum(1) - rng.uniform(0.0, 2.0, size=rows)).astype(np.float32)
  kl_ids = torch.tensor(kl_completion_mask)

  def model(**kwargs):
    log_probs = kl_per_token if kwargs["input_ids"] is kl_ids else per_token
    return types.SimpleNamespace(log_probs=torch.tensor(log_probs), entropy=torch.zeros(log_probs.shape),
                                 mean_logits=torch.zeros(log_probs.shape))

  self = _stand_in(beta=beta, loss_type=loss_type, desirable_weight=desirable_weight,
                   undesirable_weight=undesirable_weight, calculate_KL=loss_type == "kto", precompute_ref_logps=True)
  self._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, self)
  mask = torch.tensor(completion_mask)
  batch = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
           "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids), "KL_completion_mask": kl_ids,
           "label": torch.tensor(desirable), "ref_logps": torch.tensor(reference),
           "ref_KL_logps": torch.tensor(kl_reference)}
  loss = KTOTrainer._compute_loss(self, model, batch, return_outputs=False)
  trl_metrics = {name: values[-1] for name, values in self._metrics["train"].items()}
  ours = losses.kto_loss(per_token.sum(1), reference, desirable, kl_policy_logps=kl_per_token.sum(1),
                         kl_reference_logps=kl_reference, beta=beta, desirable_weight=desirable_weight,
                         undesirable_weight=undesirable_weight, loss_type=loss_type)
  return float(loss), trl_metrics, ours


@pytest.mark.parametrize("loss_type,beta,desirable_weight,undesirable_weight", [
    ("kto", 0.1, 1.0, 1.0), ("kto", 0.5, 1.33, 0.8), ("apo_zero_unpaired", 0.3, 1.0, 1.2)])
def test_kto_equals_trl(loss_type, beta, desirable_weight, undesirable_weight):
  trl_loss, trl_metrics, (loss, metrics) = _trl_kto(4, loss_type=loss_type, beta=beta,
                                                    desirable_weight=desirable_weight,
                                                    undesirable_weight=undesirable_weight)
  np.testing.assert_allclose(float(loss), trl_loss, rtol=2e-5, atol=1e-6)
  if loss_type == "kto":
    assert trl_metrics["kl"] > 0  # the estimate is live, not clamped to 0
  for name in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
    np.testing.assert_allclose(float(metrics[name]), trl_metrics[name], rtol=2e-5, atol=1e-6, err_msg=name)
