"""IPO (Azar et al. 2023, arXiv 2310.12036) of OPT-350M on HH pairs: DPO's recipe with dpo.loss_type ipo (the
squared loss on the per-token log-ratio difference, as TRL and the IPO authors normalise it), beta (IPO's tau) 0.1."""

from configs import dpo


def get_config():
  c = dpo.get_config()
  c.dpo.loss_type = "ipo"
  c.dpo.beta = 0.1
  return c
