"""`python train.py` on conversational preference data written here, rendered with the tokenizer's ChatML template:
SFT (loss on assistant turns), DPO (full, prefix-shared and packed; and LoRA) and a reward model, from a Hugging Face
folder, with every record counted. Parametrized by model family (add Llama in chat_data.MODEL_FOLDERS)."""

import json
import math
import os
import re

import numpy as np
import pytest

from chat_data import (BAD_COUNTS, BAD_RECORDS, IM_END, MODEL_FOLDERS, conversational_records, write_chat_tokenizer,
                       write_jsonl)
from configs import common
from jaxalign import trainer
from jaxalign.data import formats, tokenize
from jaxalign.tokenizer import load_tokenizer
from helpers import config_file, losses_by_step, train_cli

N_TRAIN, N_TEST = 48, 16


@pytest.fixture(scope="module")
def chat_data_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("conversational")
  write_jsonl(str(folder / "train.jsonl"), conversational_records(N_TRAIN) + BAD_RECORDS)
  write_jsonl(str(folder / "test.jsonl"), conversational_records(N_TEST))
  return str(folder)


def stage(task: str, init_from: str, cache: str, data: str, **fields):
  c = common.get_config()
  c.task, c.init_from, c.tokenizer = task, init_from, init_from
  c.data.update(source=data, format="conversational", chat_template="tokenizer", cache_dir=cache, eval_pairs=8,
                max_length=128, max_prompt_length=96, buckets=(128,))
  c.model.dropout = 0.0
  c.training.update(batch_size=8, max_steps=3, log_every=1, progress_bar=False)
  c.checkpoint.update(every_steps=0, async_save=False)
  c.logging.tensorboard = False
  for name, value in fields.items():
    section, leaf = name.split(".")
    c[section][leaf] = value
  return c


def test_rendered_pairs_keep_exact_boundaries_on_the_written_data(chat_data_dir, tmp_path):
  model_dir = MODEL_FOLDERS["opt"](str(tmp_path / "model"), write_chat_tokenizer(str(tmp_path / "tok")))
  tokenizer = load_tokenizer(model_dir)
  conversations, report = formats.load_examples(chat_data_dir, chat=True)
  assert (report.total, report.used, dict(report.skipped)) == (N_TRAIN + len(BAD_RECORDS), N_TRAIN, BAD_COUNTS)
  pairs, _ = tokenize.render_pairs(conversations, tokenizer)
  tokenized = tokenize.tokenize_pairs(pairs, tokenizer, max_length=None, max_prompt_length=None, rendered=True)
  im_end = tokenizer.convert_tokens_to_ids(IM_END)
  for i, pair in enumerate(pairs):
    whole = tokenizer(pair.prompt + pair.chosen, add_special_tokens=False).input_ids
    assert tokenized.prompt_ids[i].tolist() + tokenized.chosen_ids[i].tolist() == whole
    assert tokenized.chosen_ids[i][-1] == tokenized.rejected_ids[i][-1] == im_end
  assert tokenized.counts()["boundary_adjusted"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(MODEL_FOLDERS))
def test_train_py_runs_sft_dpo_lora_and_reward_on_chat_data(family, chat_data_dir, tmp_path):
  model_dir = MODEL_FOLDERS[family](str(tmp_path / "model"), write_chat_tokenizer(str(tmp_path / "tok")))
  cache = str(tmp_path / "cache")
  c = common.get_config()
  c.stages = ("sft", "dpo", "dpo_lora", "reward")
  c.stage_configs.sft = stage("sft", model_dir, cache, chat_data_dir, **{
      "data.loss_on": "assistant", "training.max_steps": 6, "optimizer.lr": 3e-3})
  c.stage_configs.dpo = stage("dpo", "stage:sft", cache, chat_data_dir, **{
      "data.prefix_sharing": True, "data.packing": True, "optimizer.lr": 1e-3})
  c.stage_configs.dpo_lora = stage("dpo", model_dir, cache, chat_data_dir, **{
      "lora.enabled": True, "optimizer.lr": 1e-2, "data.eval_pairs": 0})
  c.stage_configs.reward = stage("reward", model_dir, cache, chat_data_dir, **{"optimizer.lr": 1e-3,
                                                                              "data.eval_pairs": 0})
  run = train_cli(config_file(tmp_path, c), str(tmp_path / "run"))
  output = run.stdout.read()
  assert run.wait(timeout=600) == 0, output[-4000:]

  skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(BAD_COUNTS.items()))
  assert f"train.jsonl (conversational): {N_TRAIN + len(BAD_RECORDS)} records: {N_TRAIN} used" in output
  assert f"{len(BAD_RECORDS)} skipped ({skipped})" in output
  # Every tokenization (SFT examples, pairs of each split and stage) logs its count of moved boundaries: none.
  adjusted = re.findall(r"'boundary_adjusted': (\d+)", output)
  assert len(adjusted) >= 4 and set(adjusted) == {"0"}, adjusted
  workdirs = {name: str(tmp_path / "run" / name) for name in c.stages}
  sft_losses = losses_by_step(workdirs["sft"])
  assert sft_losses[6] < sft_losses[1], sft_losses
  for name in ("dpo", "dpo_lora"):  # policy == reference at the first step (the SFT model / adapters at zero)
    assert losses_by_step(workdirs[name])[1] == pytest.approx(math.log(2), abs=1e-5)
  assert all(math.isfinite(loss) for loss in losses_by_step(workdirs["reward"]).values())

  # The exported folder carries the template, and a pad token that is not EOS.
  exported = load_tokenizer(os.path.join(workdirs["sft"], trainer.EXPORT_DIR))
  assert exported.chat_template and exported.pad_token_id != exported.eos_token_id
  done = json.load(open(os.path.join(workdirs["sft"], trainer.DONE_FILE)))
  assert np.all(np.array(done["train_shapes"])[:, 1] == 128)
