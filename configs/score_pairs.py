"""Scores every preference pair of a data set with a judge and reports the pairs it thinks inverted.

python evaluate.py --config configs/score_pairs.py --workdir runs/pairs \
  --config.data.source=Anthropic/hh-rlhf --config.judge=runs/study/reward

Writes runs/pairs/scored-train.jsonl (the pairs with their scores; train.py's data.pair_scores), pair_report.md /
.json and margins.png. Then, e.g., train on the pairs the judge agrees with:
python train.py --config configs/dpo.py --workdir runs/dpo-clean \
  --config.data.pair_filter=drop --config.data.pair_scores=runs/pairs/scored-train.jsonl
"""

import ml_collections

from jaxalign import judges, pair_scores


def get_config():
  c = ml_collections.ConfigDict()
  c.task = "score_pairs"  # evaluate.py runs jaxalign.pair_scores instead of the model evaluation
  c.seed = 0  # the synthetic data set's seed, as in train.py
  c.judge = judges.DEFAULT_JUDGE  # or one of our reward models (a training workdir or its model/ folder)
  c.judge_heads = "harmful=harmless,helpful=helpful"  # a two-head reward model: the head for each kind of pair
  c.judge_batch_size = 16
  c.model_dtype = "float32"  # bfloat16 on accelerators

  c.data = ml_collections.ConfigDict()
  c.data.source = "Anthropic/hh-rlhf"  # any data.source train.py reads (Hub id, folder, .jsonl[.gz], synthetic)
  c.data.subsets = ""  # comma-separated HH subsets; "" = all four
  c.data.split = "train"  # the split train.py trains on (data.train_split)
  c.data.cache_dir = ""  # "" = ~/.cache/jaxalign (JAXALIGN_CACHE); the scores are cached in <cache>/pair-scores
  c.data.synthetic_pairs = 2000  # as in configs/common.py, when source = "synthetic"

  c.report = ml_collections.ConfigDict()
  c.report.margins = pair_scores.REPORT_MARGINS  # count the pairs whose margin is below -m, for each m
  c.report.worst = 20  # how many of the most inverted pairs the report shows
  return c
