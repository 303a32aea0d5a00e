"""The online quickstart: from the quickstart's SFT model (configs/quickstart.py's tiny OPT, tokenizer and synthetic
HH pairs), GRPO against a reward model trained for it ("rm", one head, its own seed), then judged by the
quickstart's two-head reward model ("reward"), which GRPO never saw: a reward that was optimised is not an
independent measure. A few minutes on 2 CPU cores.

  python train.py --config=configs/quickstart_online.py --workdir=runs/quickstart_online
  python evaluate.py --config=configs/quickstart_online_eval.py --workdir=runs/quickstart_online/eval
"""

from configs import quickstart

STAGES = ("base", "sft", "reward", "rm", "grpo")


def get_config():
  c = quickstart.get_config()  # base, sft, dpo, sft_dpo, reward
  stages = c.stage_configs

  rm = quickstart._tiny(quickstart.common.get_config())
  rm.update(stages.reward.to_dict())
  rm.seed = 1  # another initialisation of the head and another order of the pairs than the judge's
  rm.reward.heads = ("reward",)  # one score for every prompt

  grpo = quickstart._tiny(quickstart.common.get_config())
  grpo.task = "grpo"
  grpo.init_from = "stage:sft"
  grpo.online.rewards = "rm=stage:rm"
  grpo.online.num_generations = 4
  grpo.online.max_completion_length = 32  # the evaluator reads 32 tokens of each answer
  grpo.online.temperature = 1.0
  grpo.grpo.loss_type = "dapo"
  grpo.grpo.beta = 0.04  # a KL to the SFT model keeps the tiny policy from gaming the tiny reward model
  grpo.optimizer.lr = 2e-5
  grpo.optimizer.schedule = "constant"
  grpo.training.batch_size = 32  # completions: 8 prompts x 4
  grpo.training.max_steps = 100
  grpo.training.log_every = 5
  grpo.data.eval_pairs = 0

  c.stages = STAGES
  c.stage_configs.rm = rm
  c.stage_configs.grpo = grpo
  return c
