"""Train with a config: python train.py --config configs/sft.py --workdir runs/sft [--config.optimizer.lr=1e-5 ...]

Runs one stage (SFT, DPO or a reward model) or a study of stages. A workdir with checkpoints resumes.
"""

import logging

from absl import app, flags
from ml_collections import config_flags

from jaxalign import cli, trainer

config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and the exported model.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.WARNING)  # quiet libraries (Orbax logs every save at INFO)
  logging.getLogger("jaxalign").setLevel(logging.INFO)
  with cli.input_errors():
    trainer.run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
