"""GRPO (TRL's GRPOTrainer) on HH prompts against a reward model, with TRL 1.16's GRPOConfig defaults unless noted.

Set the reward, e.g. `--config.online.rewards=rm=<reward model folder or training workdir>` (a two-head model of
ours: add `--config.online.reward_set_heads=harmful=harmless,helpful=helpful`), and `--config.init_from` (an SFT
model). DAPO: grpo.loss_type dapo (default), grpo.epsilon_high 0.28, online.mask_truncated_completions True,
online.dynamic_sampling True; Dr. GRPO: grpo.loss_type dr_grpo, grpo.scale_rewards none; GSPO:
grpo.importance_sampling_level sequence (its paper: epsilon 3e-4, epsilon_high 4e-4).
"""

from configs import common


def get_config():
  c = common.get_config()
  c.task = "grpo"
  c.online.rewards = "rm=reward-model"  # a placeholder path: override with your reward model
  c.online.num_generations = 8  # TRL: 8
  c.online.max_completion_length = 128  # TRL: 512; HH answers are short (the evaluator reads 50 tokens)
  c.online.temperature = 1.0  # TRL: 1.0
  c.online.steps_per_generation = 1  # TRL: = gradient_accumulation_steps
  c.online.num_iterations = 1  # TRL: 1
  c.data.max_prompt_length = 256  # prompts keep their end
  c.data.max_length = 384  # prompt + completion, for the input checks
  c.grpo.loss_type = "dapo"  # TRL: dapo
  c.grpo.beta = 0.0  # TRL: 0.0 (no reference)
  c.grpo.epsilon = 0.2  # TRL: 0.2
  c.grpo.scale_rewards = "group"  # TRL: group
  c.optimizer.lr = 1e-6  # TRL: 1e-6
  c.optimizer.schedule = "linear"  # TRL: linear decay, no warmup
  c.training.batch_size = 64  # completions per step: 8 prompts x 8 (TRL: 8 per device x devices x accumulation)
  c.training.max_steps = 500
  c.data.eval_pairs = 0  # no held-out pairs: evaluate the export with evaluate.py
  return c
