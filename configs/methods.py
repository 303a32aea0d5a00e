"""The methods study: from the same base model (OPT-350M) and the same SFT stage, DPO, SFT+DPO, IPO, SimPO, ORPO
(from base, one stage in place of SFT + DPO) and KTO, each with its paper's defaults, in the tuned recipe of
configs/study.py (bf16, length-grouped, prefix-shared and packed pairs), and from the SFT stage the online GRPO, RLOO
and online DPO against the study's two-head reward model (stage "reward"; harmless head for harmful prompts, helpful
for helpful ones). DPO, IPO, SimPO and KTO start from the base model like DPO, so each compares with DPO (ORPO and the
online methods with SFT+DPO); evaluate them together with configs/eval.py (`--config.models=dpo=<workdir>/dpo,...`;
its DeBERTa judge, not the reward the online stages optimised) and bench/methods_table.py for each stage's held-out
accuracy.

  dpo, sft_dpo   configs/study.py's DPO stages (precomputed reference)
  ipo            dpo.loss_type ipo, beta (tau) 0.1                        configs/ipo.py
  simpo          cpo.loss_type simpo, beta 2.0, gamma 1.0, no NLL term     configs/simpo.py
  orpo           NLL + 0.1 * log-odds-ratio term, lr 8e-6 from base        configs/orpo.py
  kto            pairs split into desirable / undesirable examples, beta 0.1, weights 1.0, lr 5e-7, 64 examples
                 (32 pairs) a step, precomputed reference                  configs/kto.py
  reward         configs/study.py's two-head reward model
  grpo           DAPO loss, 8 completions of <= 128 tokens per prompt, 64 a step, no KL, lr 1e-6   configs/grpo.py
  rloo           2 completions per prompt, 16 a step, KL 0.05 in the reward, lr 1e-6            configs/rloo.py
  online_dpo     2 completions per prompt (<= 64 tokens), beta 0.1, lr 5e-7                     configs/online_dpo.py
"""

from configs import grpo, online_dpo, rloo, study

STAGES = ("sft", "dpo", "sft_dpo", "ipo", "simpo", "orpo", "kto", "reward", "grpo", "rloo", "online_dpo")


def _method(task: str, base: str = "facebook/opt-350m"):
  """A reference-free or KTO stage on study.py's DPO recipe (prefix-shared, packed rows of ~5 pairs)."""
  c = study._dpo(base)
  c.task = task
  return c


def _online(online_config):
  """An online stage (configs/grpo.py, rloo.py or online_dpo.py) from the SFT stage against the reward stage, each
  head scoring its own prompts as the evaluator's judge does; bf16 as the other stages."""
  c = online_config.get_config()
  c.init_from = "stage:sft"
  c.online.rewards = "rm=stage:reward"
  c.online.reward_set_heads = "harmful=harmless,helpful=helpful"
  c.model.dtype = "bfloat16"
  return c


def get_config():
  c = study.get_config()
  c.stages = STAGES
  stages = c.stage_configs

  stages.ipo = study._dpo("facebook/opt-350m")
  stages.ipo.dpo.loss_type = "ipo"

  stages.simpo = _method("cpo")
  stages.simpo.cpo.update(loss_type="simpo", beta=2.0, simpo_gamma=1.0, alpha=0.0)

  stages.orpo = _method("orpo")
  stages.orpo.orpo.beta = 0.1
  stages.orpo.optimizer.update(lr=8e-6, schedule="linear", warmup_steps=100)

  stages.kto = _method("kto")
  stages.kto.kto.update(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
  stages.kto.optimizer.lr = 5e-7
  stages.kto.training.batch_size = 2 * stages.dpo.training.batch_size  # rows of ~5 examples; each pair gives two

  stages.grpo = _online(grpo)
  stages.rloo = _online(rloo)
  stages.online_dpo = _online(online_dpo)
  return c


