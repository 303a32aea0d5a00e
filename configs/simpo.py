"""SimPO (Meng et al. 2024, arXiv 2405.14734) of OPT-350M on HH pairs: the logistic loss on beta times the
difference of mean token log-probs minus a margin gamma; no reference, no NLL. TRL runs it as CPO with loss_type
simpo and cpo_alpha 0. beta 2.0 and gamma 1.0 (gamma / beta 0.5) are the SimPO authors' defaults; the learning rate
of the DPO recipe (the paper sweeps 3e-7 to 1e-6)."""

from configs import cpo


def get_config():
  c = cpo.get_config()
  c.cpo.loss_type = "simpo"
  c.cpo.beta = 2.0
  c.cpo.simpo_gamma = 1.0
  c.cpo.alpha = 0.0
  return c
