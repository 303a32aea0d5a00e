"""SFT then DPO from the SFT model, as a two-stage study."""

from configs import dpo, sft, common


def get_config():
  c = common.get_config()
  c.stages = ("sft", "sft_dpo")
  c.stage_configs.sft = sft.get_config()
  c.stage_configs.sft_dpo = dpo.get_config()
  c.stage_configs.sft_dpo.init_from = "stage:sft"
  return c
