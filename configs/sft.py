"""Supervised fine-tuning of OPT-350M on the chosen HH conversations."""

from configs import common


def get_config():
  c = common.get_config()
  c.task = "sft"
  c.optimizer.lr = 2e-5
  c.training.batch_size = 8
  return c
