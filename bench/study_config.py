"""configs/study.py on a local HH file, from a random OPT-350M: the real training loop, timed (bench/gpu.sh).

  python train.py --config bench/study_config.py:.benchdata --workdir /tmp/study

FOLDER (after the colon) holds `harmless-base/test.jsonl.gz` (the HH file in ../shared; its path names the reward
head it trains) and `tokenizer/` (the OPT tokenizer). Every stage trains one epoch of that file's 2,308 pairs with
the study's recipe (packing, prefix sharing, bf16, precomputed reference); stages that start from the Hub start from
a random OPT-350M instead. The stage times in each workdir's log, scaled by 160,800 / 2,308 pairs, are the study's.
"""

import os

from configs import study


def get_config(folder: str):
  c = study.get_config()
  for name in c.stages:
    stage = c.stage_configs[name]
    if stage.init_from == "facebook/opt-350m":
      stage.init_from = ""
      stage.model.preset = "opt-350m"
    stage.tokenizer = os.path.join(folder, "tokenizer")
    stage.data.source = os.path.join(folder, "harmless-base", "test.jsonl.gz")
    stage.data.eval_pairs = 256
    stage.checkpoint.every_steps = 10_000  # one checkpoint, at the end
    stage.training.progress_bar = False
  return c
