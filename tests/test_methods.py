"""CPO / SimPO, ORPO and KTO as tasks: the same loss in every pair layout, no reference for the reference-free ones
(none prepared, no reference forward compiled into the step), LoRA, configs, and an exact resume after SIGKILL."""

import os

import numpy as np
import pytest
from flax import nnx

from configs import cpo, ipo, kto, methods, orpo, quickstart_methods, quickstart_methods_eval, simpo
from jaxalign import config_lib, losses, reference as reference_lib, tasks, trainer
from jaxalign.data import layouts
from jaxalign.models import opt
from helpers import (TINY, assert_kill_and_resume_is_bit_identical, exported, losses_by_step, on_device, prepared,
                     random_pairs, step_flops, tiny_config)

METHODS = {
    "cpo": ("cpo", {}),
    "simpo": ("cpo", {"cpo.loss_type": "simpo", "cpo.beta": 2.0, "cpo.simpo_gamma": 1.0, "cpo.alpha": 0.0}),
    "orpo": ("orpo", {}),
}
LAYOUTS = (layouts.SeparateRows(max_length=20), layouts.SharedRows(max_length=20),
           layouts.SharedRows(max_length=20, packing=True))


def losses_in_every_layout(task, pairs, per_pair):
  model = opt.OPTForCausalLM(TINY, rngs=nnx.Rngs(4))
  results = []
  for layout in LAYOUTS:
    examples = layout.examples(pairs)
    batch = layout.collate(examples, np.arange(len(examples)), layout.row_limit, 1, per_pair=per_pair)
    results.append(task.loss(model, on_device(batch)))
  return results


@pytest.mark.parametrize("task", [tasks.CPOTask(), tasks.CPOTask(loss_type="simpo", beta=2.0, simpo_gamma=1.0,
                                                                 alpha=0.0),
                                  tasks.CPOTask(loss_type="ipo"), tasks.ORPOTask(),
                                  tasks.KTOTask(desirable_weight=1.3)], ids=["cpo", "simpo", "cpo-ipo", "orpo", "kto"])
def test_every_layout_gives_the_same_loss_and_metrics(task):
  """Separate, prefix-shared and packed rows: each method's loss and its TRL metrics agree (fp32); KTO with its
  labels and precomputed reference log-probs gathered by example."""
  pairs = random_pairs(8, seed=8)
  rng = np.random.default_rng(0)
  per_pair = {"desirable": np.array([1, 0, 1, 1, 0, 0, 1, 0], np.int32),
              "reference_chosen_logps": rng.normal(-20, 3, 8).astype(np.float32),
              "reference_rejected_logps": rng.normal(-20, 3, 8).astype(np.float32)}
  (want_loss, want_metrics), *others = losses_in_every_layout(task, pairs, per_pair)
  assert np.isfinite(want_loss) and "rewards/accuracies" in want_metrics
  for loss, metrics in others:
    np.testing.assert_allclose(loss, want_loss, atol=1e-5)
    assert metrics.keys() == want_metrics.keys()
    for key in want_metrics:
      np.testing.assert_allclose(metrics[key], want_metrics[key], atol=1e-5, err_msg=key)


def test_tasks_pass_their_options_and_token_counts_to_the_loss():
  """The task's loss is `losses.cpo_loss` / `orpo_loss` / `kto_loss` of the layout's log-probs and token counts."""
  model = opt.OPTForCausalLM(TINY, rngs=nnx.Rngs(1))
  pairs = random_pairs(6, seed=2)
  batch = on_device(LAYOUTS[0].collate(pairs, np.arange(6), 20, 1))
  logps = tasks.pair_logprobs(model, batch)
  counts = dict(chosen_lengths=logps.chosen_tokens, rejected_lengths=logps.rejected_tokens)
  got, _ = tasks.CPOTask(loss_type="simpo", beta=2.0, simpo_gamma=1.0, alpha=0.0).loss(model, batch)
  want, _ = losses.simpo_loss(logps.chosen, logps.rejected, beta=2.0, gamma=1.0, **counts)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  got, metrics = tasks.ORPOTask(beta=0.2).loss(model, batch)
  want, want_metrics = losses.orpo_loss(logps.chosen, logps.rejected, beta=0.2, **counts)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert {"nll_loss", "log_odds_ratio", "log_odds_chosen"} <= metrics.keys()
  # KTO: chosen side = the completion, rejected side = the mismatched completion (the KL point's).
  desirable = np.array([1, 1, 0, 0, 1, 0], np.int32)
  reference = opt.OPTForCausalLM(TINY, rngs=nnx.Rngs(2))
  ref = tasks.pair_logprobs(reference, batch)
  batch.extras = {"desirable": desirable}
  got, metrics = tasks.KTOTask(beta=0.3, undesirable_weight=1.2).loss(model, batch, reference=reference)
  want, want_metrics = losses.kto_loss(logps.chosen, ref.chosen, desirable, kl_policy_logps=logps.rejected,
                                       kl_reference_logps=ref.rejected, beta=0.3, undesirable_weight=1.2)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(metrics["kl"], want_metrics["kl"], rtol=1e-6)
  logratio, kl = np.asarray(logps.chosen - ref.chosen), float(want_metrics["kl"])
  correct = np.where(desirable == 1, logratio > kl, logratio < kl)
  assert float(metrics["rewards/accuracies"]) == pytest.approx(correct.mean())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_reference_free_methods_prepare_and_run_no_reference(method, cache_dir, monkeypatch):
  passes = []
  monkeypatch.setattr(reference_lib, "compute_logps", lambda *args, **kwargs: passes.append(args))
  task_name, fields = METHODS[method]
  config = tiny_config(cache_dir, task_name, **fields, **{"dpo.reference": "precomputed", "data.eval_pairs": 0})
  task, model, data, reference, _ = prepared(config)
  assert not task.uses_reference
  assert reference.mode == "none" and reference.state is None and not reference.logps and not passes


@pytest.fixture(scope="module")
def live_dpo_step_flops(cache_dir):
  return step_flops(tiny_config(cache_dir, "dpo", **{"data.eval_pairs": 0, "dpo.reference": "model"}))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_compiled_step_of_a_reference_free_method_has_no_reference_forward(method, cache_dir,
                                                                                live_dpo_step_flops):
  task_name, fields = METHODS[method]
  flops = step_flops(tiny_config(cache_dir, task_name, **fields, **{"data.eval_pairs": 0}))
  assert flops < 0.85 * live_dpo_step_flops  # a forward of the same rows is about a third of forward + backward


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simpo", "orpo", "kto"])
def test_methods_train_with_lora_on_packed_rows(method, cache_dir, tmp_path):
  task_name, fields = METHODS.get(method, ("kto", {}))
  config = tiny_config(cache_dir, task_name, **fields, **{
      "lora.enabled": True, "data.prefix_sharing": True, "data.packing": True, "training.max_steps": 3,
      "optimizer.lr": 1e-2, "data.eval_pairs": 8})
  trainer.run(config, str(tmp_path))
  assert all(np.isfinite(loss) for loss in losses_by_step(str(tmp_path)).values())
  names = exported(str(tmp_path)).keys()
  assert not any("lora" in n for n in names) and "model.decoder.layers.0.self_attn.q_proj.weight" in names


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simpo", "kto"])
def test_kill_and_resume_is_bit_identical(method, cache_dir, tmp_path):
  task_name, fields = METHODS.get(method, ("kto", {}))
  assert_kill_and_resume_is_bit_identical(tiny_config(cache_dir, task_name, **fields), tmp_path, steps=60)


@pytest.mark.parametrize("module", [cpo, simpo, orpo, ipo, kto, methods, quickstart_methods])
def test_method_configs_validate(module):
  config_lib.validate(module.get_config())


def test_papers_defaults_in_the_stage_configs():
  assert (simpo.get_config().cpo.beta, simpo.get_config().cpo.simpo_gamma, simpo.get_config().cpo.alpha) == (2.0, 1.0,
                                                                                                             0.0)
  assert (cpo.get_config().cpo.beta, cpo.get_config().cpo.alpha) == (0.1, 1.0)
  assert orpo.get_config().orpo.beta == 0.1 and kto.get_config().kto.beta == 0.1
  assert ipo.get_config().dpo.loss_type == "ipo"
  study = methods.get_config()
  assert study.stage_configs.orpo.init_from == study.stage_configs.dpo.init_from  # ORPO from the base model


@pytest.mark.parametrize("module", [methods, quickstart_methods])
def test_online_stages_of_the_studies_start_from_sft_against_a_study_reward_model(module):
  study = module.get_config()
  for name in ("grpo", "rloo", "online_dpo"):
    stage = study.stage_configs[name]
    assert (stage.task, stage.init_from) == (name, "stage:sft")
    (spec,) = config_lib.parse_named(stage.online.rewards, "online.rewards").values()
    assert spec.startswith("stage:") and spec.removeprefix("stage:") in study.stages


def test_quickstart_methods_judge_is_not_the_online_stages_reward():
  study = quickstart_methods.get_config()
  judge = quickstart_methods_eval.get_config().judge
  assert judge.split(os.sep)[-2] == "reward"
  assert all(study.stage_configs[n].online.rewards == "rm=stage:rm" for n in ("grpo", "rloo", "online_dpo"))
  assert study.stage_configs.sft_dpo.init_from == "stage:sft"


@pytest.mark.parametrize("field, value", [("cpo.loss_type", "dpo"), ("cpo.beta", 0.0), ("cpo.alpha", -1.0),
                                          ("orpo.beta", 0.0), ("kto.loss_type", "sigmoid"),
                                          ("kto.desirable_weight", 0.0), ("task", "ppo")])
def test_bad_method_fields_fail_with_their_name(field, value, tmp_path):
  config = tiny_config(str(tmp_path), "cpo", **{field: value})
  with pytest.raises(config_lib.ConfigError, match=f"config.{field}"):
    trainer.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
