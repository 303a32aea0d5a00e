"""RLOO (TRL's RLOOTrainer) on HH prompts against a reward model, with TRL 1.16's RLOOConfig defaults unless noted.
Set `--config.online.rewards` and `--config.init_from` as for configs/grpo.py."""

from configs import grpo


def get_config():
  c = grpo.get_config()
  c.task = "rloo"
  c.online.num_generations = 2  # TRL: 2
  c.rloo.beta = 0.05  # TRL: 0.05 (the KL in the reward; a frozen reference copy is run once per generation)
  c.rloo.epsilon = 0.2  # TRL: 0.2
  c.rloo.normalize_advantages = False  # TRL: False
  c.training.batch_size = 16  # completions per step: 8 prompts x 2
  return c
