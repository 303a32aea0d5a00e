"""The offline quickstart: a tiny OPT, a tiny tokenizer and synthetic HH-style pairs; every stage of the study
(SFT, DPO from base, DPO from SFT, a reward model to judge them) in a few minutes on a laptop CPU.
"""

from configs import common

STAGES = ("base", "sft", "dpo", "sft_dpo", "reward")
SYNTHETIC_PAIRS = 2000


def _tiny(c):
  c.init_from = ""
  c.tokenizer = "synthetic"
  c.data.source = "synthetic"
  c.data.synthetic_pairs = SYNTHETIC_PAIRS
  c.data.subsets = "harmless-base,helpful-base"
  c.data.eval_pairs = 128
  c.data.max_length = 128
  c.data.max_prompt_length = 64
  c.data.buckets = (64, 128)
  c.model.preset = "opt-125m"
  c.model.arch.vocab_size = 1024
  c.model.arch.hidden_size = 128
  c.model.arch.ffn_dim = 512
  c.model.arch.num_hidden_layers = 2
  c.model.arch.num_attention_heads = 4
  c.model.arch.word_embed_proj_dim = 128
  c.model.arch.max_position_embeddings = 256
  c.model.dropout = 0.0
  c.training.batch_size = 16
  c.training.log_every = 20
  c.checkpoint.every_steps = 100
  c.logging.tensorboard = False
  return c


def get_config():
  c = common.get_config()
  c.stages = STAGES
  # "base": the pretrained, unaligned model of the study; here a tiny OPT trained briefly on the rejected answers.
  base = _tiny(common.get_config())
  base.task = "sft"
  base.optimizer.lr = 3e-3
  base.optimizer.warmup_steps = 20
  base.training.max_steps = 200
  base.data.sft_responses = "rejected"  # an unaligned model: it learned to comply with harm and to be unhelpful

  sft = _tiny(common.get_config())
  sft.task = "sft"
  sft.init_from = "stage:base"
  sft.optimizer.lr = 2e-3
  sft.data.loss_on = "completion"  # a tiny model learns the answers faster when only they are scored
  sft.training.max_steps = 150

  dpo = _tiny(common.get_config())
  dpo.task = "dpo"
  dpo.init_from = "stage:base"
  dpo.optimizer.lr = 5e-5
  dpo.optimizer.schedule = "constant"
  dpo.training.max_steps = 100
  dpo.dpo.beta = 0.1
  dpo.data.prefix_sharing = True  # the prompt is computed once for both answers

  sft_dpo = _tiny(common.get_config())
  sft_dpo.update(dpo.to_dict())
  sft_dpo.init_from = "stage:sft"

  reward = _tiny(common.get_config())
  reward.task = "reward"
  reward.init_from = "stage:base"
  reward.reward.heads = ("harmless", "helpful")
  reward.data.prefix_sharing = True  # each pair in one row, both answers scored at their last token
  reward.optimizer.lr = 1e-3
  reward.training.max_steps = 100

  for name, stage in zip(STAGES, (base, sft, dpo, sft_dpo, reward)):
    c.stage_configs[name] = stage
  return c
