"""A Bradley–Terry reward model on HH pairs, from OPT-350M with a scalar head."""

from configs import common


def get_config():
  c = common.get_config()
  c.task = "reward"
  c.optimizer.lr = 1e-5
  c.optimizer.warmup_steps = 50
  c.training.batch_size = 32
  return c
