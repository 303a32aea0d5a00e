"""ORPO (Hong et al. 2024, arXiv 2403.07691; TRL's ORPOTrainer) of OPT-350M on HH pairs, from the base model in ONE
stage: the chosen responses' NLL plus lambda (orpo.beta, 0.1 as in the paper's Mistral-ORPO and TRL) times the
log-odds-ratio term; no reference. It replaces SFT + DPO, so it learns at an SFT-like rate (the paper: 8e-6 for
Mistral-ORPO; 2e-5 is our SFT's), with a linear decay and a short warmup."""

from configs import dpo


def get_config():
  c = dpo.get_config()
  c.task = "orpo"
  c.init_from = "facebook/opt-350m"
  c.orpo.beta = 0.1
  c.optimizer.lr = 8e-6
  c.optimizer.schedule = "linear"
  c.optimizer.warmup_steps = 100
  return c
