"""Evaluate models: python evaluate.py --config configs/eval.py --workdir runs/eval --config.models="base=...,sft=..."

Generates answers to the harmful and helpful prompt sets, judges them, and writes results.json, results.md,
responses-<model>.jsonl, annotate.html and PNG plots into the workdir; prints the HmR / HpR / CAS table.
With configs/score_pairs.py (task "score_pairs") it scores a data set's preference pairs with the judge instead.
"""

import logging

from absl import app, flags
from ml_collections import config_flags

from jaxalign import cli, evaluator, pair_scores

config_flags.DEFINE_config_file("config", None, "Path to an evaluation config (configs/eval.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for the reports.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.WARNING)
  logging.getLogger("jaxalign").setLevel(logging.INFO)
  config = flags.FLAGS.config
  run = pair_scores.run if config.get("task") == "score_pairs" else evaluator.run
  with cli.input_errors():
    run(config, flags.FLAGS.workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
