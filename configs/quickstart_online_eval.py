"""Evaluates the online quickstart (runs/quickstart_online): the SFT model and its GRPO, judged by the quickstart's
two-head reward model (stage "reward"), not by the reward GRPO optimised (stage "rm")."""

import os

from configs import quickstart_eval

WORKDIR = "runs/quickstart_online"


def get_config():
  c = quickstart_eval.get_config()
  c.models = ",".join(f"{name}={os.path.join(WORKDIR, stage)}" for name, stage in (("sft", "sft"), ("grpo", "grpo")))
  c.judge = os.path.join(WORKDIR, "reward", "model")
  c.preference.references = "grpo=sft"  # GRPO's implicit reward against the model it started from
  return c
