"""Every shipped config validates, and the paper's recipe says what the paper did."""

import importlib

import pytest

from jaxalign import config_lib

CONFIGS = ["common", "sft", "dpo", "sft_dpo", "reward", "paper", "study", "study_smollm2", "quickstart", "grpo", "rloo",
           "online_dpo", "quickstart_online", "arithmetic"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates(name):
  config_lib.validate(importlib.import_module(f"configs.{name}").get_config())


def test_paper_recipe():
  paper = importlib.import_module("configs.paper").get_config()
  sft, dpo, sft_dpo = (paper.stage_configs[n] for n in ("sft", "dpo", "sft_dpo"))
  assert (sft.training.batch_size, sft.training.grad_accum, sft.training.num_epochs) == (8, 4, 2.0)
  assert (sft.optimizer.lr, sft.data.max_length, sft.model.dtype) == (2e-5, 512, "float32")
  assert dpo.lora.enabled and (dpo.lora.rank, dpo.lora.alpha, dpo.lora.dropout) == (8, 16.0, 0.05)
  assert tuple(dpo.lora.targets) == ("q_proj", "v_proj")
  assert (dpo.dpo.beta, dpo.dpo.loss_type, dpo.data.max_length, dpo.data.max_prompt_length) == (0.1, "sigmoid", 1024,
                                                                                                 512)
  assert dpo.init_from == "facebook/opt-350m" and sft_dpo.init_from == "stage:sft"
