"""KTO (Ethayarajh et al. 2024, arXiv 2402.01306; TRL's KTOTrainer) of OPT-350M: HH pairs split into unpaired
examples (chosen desirable, rejected undesirable; or point data.source at unpaired {prompt, completion, label} JSON
lines), against the starting model as the reference, KL point z from mismatched completions of the batch. The
paper's beta 0.1 and weights 1.0 (balanced labels); its learning rate 5e-7 for full fine-tuning with a batch of at
least 16 examples (the KL estimate needs several per step), here 64 examples (32 pairs) per step."""

from configs import dpo


def get_config():
  c = dpo.get_config()
  c.task = "kto"
  c.kto.beta = 0.1
  c.kto.desirable_weight = 1.0
  c.kto.undesirable_weight = 1.0
  c.optimizer.lr = 5e-7
  c.training.batch_size = 64  # examples (each pair gives two)
  return c
