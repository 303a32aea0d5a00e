"""Our tuned recipe, all stages, sized for one H100 in about half an hour:

  sft      1 epoch on the chosen conversations, bf16 compute, packed into rows of 512 tokens (segment masks keep
           conversations apart), 10 rows a step (~33 conversations on HH), lr 2e-5 with 100 warmup steps
  dpo      full-parameter DPO from the base model with the reference-DPO defaults: lr 1e-6, 150 warmup steps,
           beta 0.1; the reference log-probs precomputed once (no second model in memory); each pair's prompt,
           chosen and rejected in one prefix-shared sequence (the prompt computed once), whole pairs packed into
           rows of 1024 tokens, 12 rows a step (~62 pairs on HH, for the reference recipe's 64)
  sft_dpo  the same DPO from the SFT model
  reward   a two-head (harmless, helpful) reward model, each head trained on its HH subsets (the paper's future
           work), usable as an offline judge by evaluate.py; pairs prefix-shared (each response scored at its last
           token) and packed into rows of 512 tokens, 16 rows a step (~39 pairs on HH)

Training FLOPs on HH's lengths (bench/study_estimate.py, harmless-base test split scaled to the train split), with
length-grouped batches -> with prefix sharing and packing: SFT 75,918 -> 56,058 TFLOP; each DPO stage, with its
reference pass, 237,350 -> 107,814; reward 151,323 -> 70,071. The padding packing saves outweighs the longer rows'
attention (see BENCHMARKS.md).
"""

from configs import common, dpo

STAGES = ("sft", "dpo", "sft_dpo", "reward")


def _accelerated(c):
  c.init_from = "facebook/opt-350m"
  c.data.group_by_length = True
  c.data.buckets = (128, 256, 384, 512, 768, 1024)
  c.model.dtype = "bfloat16"
  c.checkpoint.every_steps = 1000
  return c


def _dpo(init_from: str):
  c = _accelerated(dpo.get_config())  # the reference-DPO defaults: lr 1e-6, batch 64, 150 warmup steps, beta 0.1
  c.init_from = init_from
  c.dpo.reference = "precomputed"
  c.data.prefix_sharing = True
  c.data.packing = True
  c.training.batch_size = 12  # rows of ~5 pairs
  return c


def get_config():
  c = common.get_config()
  c.stages = STAGES

  sft = _accelerated(common.get_config())
  sft.task = "sft"
  sft.data.max_length = 512
  sft.optimizer.lr = 2e-5
  sft.optimizer.warmup_steps = 100
  sft.data.packing = True
  sft.training.batch_size = 10  # rows of ~3.3 conversations

  reward = _accelerated(common.get_config())
  reward.task = "reward"
  reward.reward.heads = ("harmless", "helpful")
  reward.data.max_length = 512
  reward.optimizer.lr = 1e-5
  reward.optimizer.warmup_steps = 50
  reward.data.prefix_sharing = True
  reward.data.packing = True
  reward.training.batch_size = 16  # rows of ~2.4 pairs

  c.stage_configs.sft = sft
  c.stage_configs.dpo = _dpo("facebook/opt-350m")
  c.stage_configs.sft_dpo = _dpo("stage:sft")
  c.stage_configs.reward = reward
  return c
