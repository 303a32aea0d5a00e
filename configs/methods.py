"""The methods study: from the same base model (OPT-350M) and the same SFT stage, DPO, SFT+DPO, IPO, SimPO, ORPO
(from base, one stage in place of SFT + DPO) and KTO, each with its paper's defaults, in the tuned recipe of
configs/study.py (bf16, length-grouped, prefix-shared and packed pairs). DPO, IPO, SimPO and KTO start from the base
model like DPO, so each compares with DPO (and ORPO with SFT+DPO); evaluate them together with configs/eval.py
(`--config.models=dpo=<workdir>/dpo,...`) and bench/methods_table.py for each stage's held-out accuracy.

  dpo, sft_dpo   configs/study.py's DPO stages (precomputed reference)
  ipo            dpo.loss_type ipo, beta (tau) 0.1                        configs/ipo.py
  simpo          cpo.loss_type simpo, beta 2.0, gamma 1.0, no NLL term     configs/simpo.py
  orpo           NLL + 0.1 * log-odds-ratio term, lr 8e-6 from base        configs/orpo.py
  kto            pairs split into desirable / undesirable examples, beta 0.1, weights 1.0, lr 5e-7, 64 examples
                 (32 pairs) a step, precomputed reference                  configs/kto.py
"""

from configs import study

STAGES = ("sft", "dpo", "sft_dpo", "ipo", "simpo", "orpo", "kto")


def _method(task: str, base: str = "facebook/opt-350m"):
  """A reference-free or KTO stage on study.py's DPO recipe (prefix-shared, packed rows of ~5 pairs)."""
  c = study._dpo(base)
  c.task = task
  return c


def get_config():
  c = study.get_config()
  c.stages = STAGES
  del c.stage_configs["reward"]
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
  return c


