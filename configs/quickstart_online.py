"""The online quickstart: from the quickstart's SFT model (configs/quickstart.py's tiny OPT, tokenizer and synthetic
HH pairs), GRPO against a reward model trained for it ("rm", one head, its own seed), then judged by the
quickstart's two-head reward model ("reward"), which GRPO never saw: a reward that was optimised is not an
independent measure. A few minutes on 2 CPU cores.

  python train.py --config=configs/quickstart_online.py --workdir=runs/quickstart_online
  python evaluate.py --config=configs/quickstart_online_eval.py --workdir=runs/quickstart_online/eval

Measured (2 shared CPU cores at a load of 5-6, warm compilation cache: training 2 min 59 s wall, 2 min 51 s of CPU
time, evaluation 17 s; earlier, at a load of ~16, 16 min 39 s wall for 2 min 44 s of CPU): GRPO's mean training
reward rose from 2.68 (steps 1-10, 96 completions) to 3.19 (steps 91-100, 64 completions), +0.51 [0.21, 0.85] (95%
bootstrap over completions, 2000 draws), KL to SFT 0.057 at the end. The judge GRPO never saw: HmR / HpR 100 / 100
for both SFT and GRPO (saturated at threshold 0); its mean score rose from 1.61 to 1.71 (harmful prompts) and 2.45
to 2.80 (helpful prompts).
"""

from configs import quickstart

STAGES = ("base", "sft", "reward", "rm", "grpo")


def reward_model(stages):
  """The training reward: the quickstart's reward stage with one head and another seed (not the judge)."""
  rm = quickstart._tiny(quickstart.common.get_config())
  rm.update(stages.reward.to_dict())
  rm.seed = 1  # another initialisation of the head and another order of the pairs than the judge's
  rm.reward.heads = ("reward",)  # one score for every prompt
  return rm


def grpo_stage():
  """GRPO (DAPO loss, a small KL) from the SFT stage against stage "rm", 100 steps of 8 prompts x 4 completions."""
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
  return grpo


def get_config():
  c = quickstart.get_config()  # base, sft, dpo, sft_dpo, reward
  c.stages = STAGES
  c.stage_configs.rm = reward_model(c.stage_configs)
  c.stage_configs.grpo = grpo_stage()
  return c
