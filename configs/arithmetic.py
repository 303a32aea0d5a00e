"""The synthetic verifiable task (jaxalign/data/arithmetic.py): a tiny OPT (the quickstart's architecture and
tokenizer), a short SFT on the answer format (" Answer: <integer>", on the task's train problems), then GRPO with
the exact_answer reward (1 for exactly the right number) and a small answer_format reward. Held-out exact-match
accuracy before (sft) and after (grpo), greedy, on the 200 held-out problems:

  python train.py --config=configs/arithmetic.py --workdir=runs/arithmetic
  python bench/arithmetic_accuracy.py runs/arithmetic
"""

from configs import common, quickstart

STAGES = ("sft", "grpo")


def _task(c):
  quickstart._tiny(c)
  c.data.source = "arithmetic"  # SFT: the pairs of arithmetic.sft_records; GRPO: the train problems as prompts
  c.data.subsets = ""
  c.data.max_length = 64
  c.data.max_prompt_length = 32
  c.data.buckets = (32, 64)
  c.data.eval_pairs = 0
  return c


def get_config():
  c = common.get_config()
  c.stages = STAGES
  sft = _task(common.get_config())
  sft.task = "sft"
  sft.data.loss_on = "completion"  # the answer only
  sft.optimizer.lr = 2e-3
  sft.optimizer.warmup_steps = 20
  sft.training.batch_size = 32
  sft.training.max_steps = 400  # ~13 epochs of the 1,000 problems: the format, and some of the sums

  grpo = _task(common.get_config())
  grpo.task = "grpo"
  grpo.init_from = "stage:sft"
  grpo.online.rewards = "correct=exact_answer,format=answer_format"
  grpo.online.reward_weights = (1.0, 0.1)
  grpo.online.num_generations = 8
  grpo.online.max_completion_length = 8  # " Answer: -123" and an end
  grpo.online.temperature = 1.0
  grpo.grpo.loss_type = "dapo"
  grpo.optimizer.lr = 1e-4
  grpo.optimizer.schedule = "constant"
  grpo.training.batch_size = 64  # completions: 8 problems x 8
  grpo.training.max_steps = 150
  grpo.training.log_every = 10
  c.stage_configs.sft = sft
  c.stage_configs.grpo = grpo
  return c
