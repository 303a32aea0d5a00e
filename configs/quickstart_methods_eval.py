"""Evaluates the quickstart methods study (runs/quickstart_methods) like configs/quickstart_eval.py: the study's own
two-head reward model as the judge (stage "reward"; the online stages trained against stage "rm", another reward
model, so the judge is not their training reward), prompts from the synthetic test split. bench/methods_table.py
then adds each stage's held-out accuracy from its done.json."""

import os

from configs import quickstart_eval

WORKDIR = "runs/quickstart_methods"
MODELS = (("base", "base"), ("sft", "sft"), ("dpo", "dpo"), ("sft+dpo", "sft_dpo"), ("ipo", "ipo"),
          ("simpo", "simpo"), ("orpo", "orpo"), ("kto", "kto"), ("grpo", "grpo"), ("rloo", "rloo"),
          ("online_dpo", "online_dpo"))


def get_config():
  c = quickstart_eval.get_config()
  c.models = ",".join(f"{name}={os.path.join(WORKDIR, stage)}" for name, stage in MODELS)
  c.judge = os.path.join(WORKDIR, "reward", "model")
  return c
