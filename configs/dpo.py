"""DPO of OPT-350M on HH preference pairs, full-parameter, with the reference-DPO defaults."""

from configs import common


def get_config():
  c = common.get_config()
  c.task = "dpo"
  c.data.max_length = 1024
  c.data.max_prompt_length = 512
  c.optimizer.lr = 1e-6
  c.optimizer.warmup_steps = 150
  c.optimizer.schedule = "constant"
  c.training.batch_size = 64
  c.dpo.beta = 0.1
  return c
