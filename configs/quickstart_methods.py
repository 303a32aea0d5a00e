"""The offline methods study (configs/methods.py at quickstart size): the quickstart's tiny OPT, tokenizer and
synthetic pairs; from the same base and SFT models, DPO, SFT+DPO, IPO, SimPO, ORPO (from base, one stage) and KTO
(the pairs split into desirable / undesirable examples), from the SFT model the online GRPO, RLOO and online DPO
(30 steps each of 16 completions of at most 16 tokens) against a reward model of their own ("rm":
configs/quickstart_online.py's, one head, another seed), and the quickstart's two-head reward model ("reward"), which
no stage trained against, to judge them (configs/quickstart_methods_eval.py). A few minutes on 2 CPU cores.

  python train.py --config=configs/quickstart_methods.py --workdir=runs/quickstart_methods
  python evaluate.py --config=configs/quickstart_methods_eval.py --workdir=runs/quickstart_methods/eval
  python bench/methods_table.py runs/quickstart_methods   # + each stage's held-out accuracy
"""

from configs import quickstart, quickstart_online

STAGES = ("base", "sft", "dpo", "sft_dpo", "ipo", "simpo", "orpo", "kto", "reward", "rm", "grpo", "rloo",
          "online_dpo")
ONLINE_STEPS = 30  # each online stage: 30 steps of 16 completions of at most 16 tokens


def _online(task: str, num_generations: int):
  """An online stage from the SFT model against stage "rm" (configs/quickstart_online.py's GRPO, made small)."""
  stage = quickstart_online.grpo_stage()
  stage.task = task
  stage.online.num_generations = num_generations
  stage.online.max_completion_length = 16
  stage.training.batch_size = 16
  stage.training.max_steps = ONLINE_STEPS
  return stage


def get_config():
  c = quickstart.get_config()  # base, sft, dpo, sft_dpo, reward
  stages = c.stage_configs
  dpo = stages.dpo

  ipo = quickstart._tiny(quickstart.common.get_config())
  ipo.update(dpo.to_dict())
  ipo.dpo.loss_type = "ipo"

  simpo = quickstart._tiny(quickstart.common.get_config())
  simpo.update(dpo.to_dict())
  simpo.task = "cpo"
  simpo.cpo.loss_type = "simpo"
  simpo.cpo.beta = 2.0  # the SimPO authors' beta and gamma
  simpo.cpo.simpo_gamma = 1.0
  simpo.cpo.alpha = 0.0

  orpo = quickstart._tiny(quickstart.common.get_config())
  orpo.update(dpo.to_dict())
  orpo.task = "orpo"
  orpo.init_from = "stage:base"  # one stage in place of SFT + DPO
  orpo.orpo.beta = 0.1
  orpo.optimizer.lr = stages.sft.optimizer.lr  # it learns the answers too: the SFT stage's rate and steps
  orpo.optimizer.schedule = "linear"
  orpo.training.max_steps = stages.sft.training.max_steps

  kto = quickstart._tiny(quickstart.common.get_config())
  kto.update(dpo.to_dict())
  kto.task = "kto"
  kto.kto.beta = 0.1
  kto.optimizer.lr = 2 * dpo.optimizer.lr  # KTO's bounded per-example loss moves slower: 0.77 -> 0.82 held-out
  kto.training.batch_size = 2 * dpo.training.batch_size  # examples: each pair gives two
  kto.data.eval_pairs = 2 * dpo.data.eval_pairs

  grpo = _online("grpo", 4)
  rloo = _online("rloo", 4)
  rloo.rloo.beta = 0.05  # TRL's: the KL in the reward
  online_dpo = _online("online_dpo", 2)
  online_dpo.online_dpo.beta = 0.1  # TRL's
  online_dpo.optimizer.lr = dpo.optimizer.lr

  c.stages = STAGES
  for name, stage in (("ipo", ipo), ("simpo", simpo), ("orpo", orpo), ("kto", kto),
                      ("rm", quickstart_online.reward_model(stages)), ("grpo", grpo), ("rloo", rloo),
                      ("online_dpo", online_dpo)):
    c.stage_configs[name] = stage
  return c
