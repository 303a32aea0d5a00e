"""The paper's recipe (arXiv 2509.09055, from its published code), all stages:

  sft      full fine-tune of facebook/opt-350m on the chosen conversations: max length 512, 2 epochs, batch 2 x 4
           accumulation = 8, lr 2e-5, AdamW, linear decay, no warmup, fp32
  dpo      from the base model: LoRA r=8, alpha=16, dropout 0.05 on q_proj/v_proj; lr 2e-5; 1 epoch; batch 8;
           beta 0.1; sigmoid loss; max length 1024, prompt 512 keeping its end; reference = adapters off
  sft_dpo  the same DPO from the SFT model
"""

from configs import common

STAGES = ("sft", "dpo", "sft_dpo")


def _sft():
  c = common.get_config()
  c.task = "sft"
  c.init_from = "facebook/opt-350m"
  c.data.max_length = 512
  c.data.loss_on = "conversation"
  c.optimizer.lr = 2e-5
  c.optimizer.schedule = "linear"
  c.optimizer.warmup_steps = 0
  c.training.batch_size = 8
  c.training.grad_accum = 4
  c.training.num_epochs = 2.0
  return c


def _dpo(init_from: str):
  c = common.get_config()
  c.task = "dpo"
  c.init_from = init_from
  c.data.max_length = 1024
  c.data.max_prompt_length = 512
  c.data.truncation_mode = "keep_end"
  c.lora.enabled = True
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.lora.dropout = 0.05
  c.lora.targets = ("q_proj", "v_proj")
  c.optimizer.lr = 2e-5
  c.optimizer.schedule = "linear"
  c.training.batch_size = 8
  c.training.num_epochs = 1.0
  c.dpo.beta = 0.1
  c.dpo.loss_type = "sigmoid"
  c.dpo.reference = "model"  # with LoRA: the base model with adapters off
  return c


def get_config():
  c = common.get_config()
  c.stages = STAGES
  c.stage_configs.sft = _sft()
  c.stage_configs.dpo = _dpo("facebook/opt-350m")
  c.stage_configs.sft_dpo = _dpo("stage:sft")
  return c
