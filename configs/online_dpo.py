"""Online DPO (TRL's experimental OnlineDPOTrainer) on HH prompts judged by a reward model, with TRL 1.16's
OnlineDPOConfig defaults unless noted. Set `--config.online.rewards` and `--config.init_from` as for
configs/grpo.py."""

from configs import grpo


def get_config():
  c = grpo.get_config()
  c.task = "online_dpo"
  c.online.num_generations = 2  # two completions per prompt: the reward picks chosen and rejected
  c.online.max_completion_length = 64  # TRL: max_new_tokens 64
  c.online.temperature = 0.9  # TRL: 0.9
  c.online_dpo.beta = 0.1  # TRL: 0.1
  c.online_dpo.loss_type = "sigmoid"  # TRL: sigmoid (or ipo); any dpo.loss_type here
  c.optimizer.lr = 5e-7  # TRL: 5e-7
  c.training.batch_size = 16  # completions per step: 8 prompts x 2
  return c
