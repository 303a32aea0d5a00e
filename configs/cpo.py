"""CPO (Xu et al. 2024, arXiv 2401.08417; TRL's CPOTrainer) of OPT-350M on HH pairs: the sigmoid loss on the
policy's own log-probs plus alpha times the chosen responses' NLL, no reference. The paper's beta 0.1, alpha 1.0;
otherwise the DPO recipe (configs/dpo.py)."""

from configs import dpo


def get_config():
  c = dpo.get_config()
  c.task = "cpo"
  c.cpo.loss_type = "sigmoid"
  c.cpo.beta = 0.1
  c.cpo.alpha = 1.0
  return c
