"""The study (configs/study.py) on SmolLM2-360M, the current model of OPT-350M's size class, trained as a chat
model: HH's conversations are split into turns and rendered with SmolLM2's own ChatML template, responses end with
its end-of-turn token "<|im_end|>", and SFT scores the assistant turns only.

  sft      1 epoch on the chosen conversations (loss on every assistant turn), bf16, packed rows of 512 tokens
  dpo      full-parameter DPO from the base model: lr 1e-6, 150 warmup steps, beta 0.1, precomputed reference,
           prefix-shared pairs packed into rows of 1024 tokens
  sft_dpo  the same DPO from the SFT model
  reward   a two-head (harmless, helpful) reward model on the same chat rendering

python train.py --config configs/study_smollm2.py --workdir runs/study_smollm2
python evaluate.py --config configs/study_smollm2.py:eval --workdir runs/study_smollm2/eval

The evaluation (":eval") renders each paper prompt's turns with the same template and stops at "<|im_end|>"; the
judge still reads the plain prompt and response text.
"""

from configs import eval as eval_config, study

MODEL = "HuggingFaceTB/SmolLM2-360M"
RUN = "runs/study_smollm2"


def _chat(c):
  c.init_from = c.init_from.replace("facebook/opt-350m", MODEL)
  c.tokenizer = MODEL
  c.data.chat_template = "tokenizer"  # HH turns rendered with SmolLM2's ChatML template
  return c


def train_config():
  c = study.get_config()
  for name in study.STAGES:
    _chat(c.stage_configs[name])
  c.stage_configs.sft.data.loss_on = "assistant"
  return c


def evaluation_config():
  c = eval_config.get_config()
  c.models = f"base={MODEL},sft={RUN}/sft,dpo={RUN}/dpo,sft+dpo={RUN}/sft_dpo"
  c.model_dtype = "bfloat16"
  c.generation.chat_template = "tokenizer"
  return c


def get_config(which: str = "train"):
  """`configs/study_smollm2.py` trains; `configs/study_smollm2.py:eval` evaluates."""
  configs = {"train": train_config, "eval": evaluation_config}
  if which not in configs:
    raise ValueError(f"configs/study_smollm2.py:{which}: expected one of {sorted(configs)}")
  return configs[which]()
