"""The online methods end to end: the online source's batch equals one assembled by hand from the Sampler, the rewards
and the advantages; GRPO, RLOO and online DPO stages train through `trainer.run` (loss finite, reward logged,
completions table and curves written; the table in TensorBoard and W&B); bad online config values fail with their
dotted names; DAPO's dynamic sampling drops and refills groups without signal; a GRPO run SIGKILLed mid-generation
resumes bit for bit; 8 devices (4 data x 2 fsdp) train as one."""

import glob
import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import config_lib, logger, losses, rewards, rollout, sampling, shapes, sources, step, tasks, trainer
from jaxalign.data import layouts, pipeline
from jaxalign.tokenizer import load_tokenizer
from helpers import (assert_kill_and_resume_is_bit_identical, exported, prepared, tensorboard_events, tiny_config,
                     wandb_records)

EVEN = "tests.reward_functions:even_token_share"


def online_config(cache_dir, task="grpo", **fields):
  """A tiny online stage: 2 prompts x 4 completions of at most 8 tokens per step, rewarded for even token ids."""
  defaults = {"online.rewards": f"even={EVEN}", "online.num_generations": 4, "online.max_completion_length": 8,
              "training.batch_size": 8, "data.eval_pairs": 0, "checkpoint.every_steps": 0,
              "mesh.num_devices": 1}
  if task in ("online_dpo", "rloo"):
    defaults.update({"online.num_generations": 2, "training.batch_size": 4})
  return tiny_config(cache_dir, task, **{**defaults, **fields})


def _records(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.mark.parametrize("field, value, task", [
    ("online.rewards", "", "grpo"),
    ("online.rewards", "a=x:y,a=x:z", "grpo"),
    ("online.num_generations", 3, "online_dpo"),
    ("online.num_generations", 1, "rloo"),
    ("online.temperature", 0.0, "grpo"),
    ("online.top_p", 0.0, "grpo"),
    ("online.steps_per_generation", 0, "grpo"),
    ("training.batch_size", 6, "grpo"),
    ("grpo.loss_type", "ppo", "grpo"),
    ("grpo.importance_sampling_level", "segment", "grpo"),
    ("grpo.scale_rewards", "std", "sft"),  # the loss sections are checked whatever the task
    ("grpo.delta", 0.5, "grpo"),
    ("rloo.reward_clip_range", (1.0, -1.0), "rloo"),
    ("online_dpo.loss_type", "nope", "online_dpo"),
    ("dpo.reference", "precomputed", "grpo"),
])
def test_bad_online_config_fails_with_its_dotted_name(cache_dir, field, value, task):
  config = online_config(cache_dir, task, **{field: value})
  with pytest.raises(config_lib.ConfigError, match=f"config.{field}"):
    config_lib.validate(config)


def test_a_study_stage_rewards_with_an_earlier_stages_reward_model():
  config = importlib.import_module("configs.quickstart_online").get_config()
  config_lib.validate(config)
  resolved = config_lib.resolve_stage(config, "grpo", {"sft": "/runs/sft/model", "rm": "/runs/rm/model"})
  assert (resolved.init_from, resolved.online.rewards) == ("/runs/sft/model", "rm=/runs/rm/model")
  config.stage_configs.grpo.online.rewards = "rm=stage:grpo"  # not an earlier stage
  with pytest.raises(config_lib.ConfigError, match="config.stage_configs.grpo.online.rewards"):
    config_lib.validate(config)


def test_source_batch_equals_hand_assembled_batch(cache_dir, tmp_path):
  """One step's RolloutBatch (beta > 0: with the reference's log-probs) from the source equals the Sampler, the
  rewards, group advantages and the group layout called by hand."""
  config = online_config(cache_dir, "grpo", **{"grpo.beta": 0.1})
  task, model, data, reference, mesh = prepared(config)
  graphdef, params, rest = step.split_model(model, False)
  tokenizer = load_tokenizer(pipeline.tokenizer_path(config, ""))
  source = sources.build(config, data, mesh, tokenizer, reference, graphdef=graphdef, rest=rest,
                         workdir=str(tmp_path))
  batch = jax.device_get(source.next(step.TrainState(jnp.zeros((), jnp.int32), params, None)))

  G, C, prompts = 4, 8, 2
  records = [data.train[i] for i in np.random.default_rng([config.seed, 0]).permutation(len(data.train))[:prompts]]
  ids = [tokenizer(r.prompt)["input_ids"][-config.data.max_prompt_length:] for r in records]
  length = shapes.fit(max(map(len, ids)), shapes.power_ladder(config.data.max_prompt_length))
  input_ids, mask = sampling.left_padded(ids, prompts, length, tokenizer.pad_token_id)
  options = sampling.SamplingOptions(max_new_tokens=C, temperature=1.0, eos_id=tokenizer.eos_token_id,
                                     pad_id=tokenizer.pad_token_id, stop_sequences=(tuple(
                                         tokenizer.encode("\n\nHuman:", add_special_tokens=False)),))
  sampler = sampling.Sampler(graphdef, (params, rest), batch_size=prompts, prompt_length=length, options=options,
                             num_generations=G)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), rollout.SAMPLING_STREAM), 0)
  samples = jax.device_get(sampler((params, rest), input_ids, mask, key))
  completions = [samples.tokens[r, :samples.lengths[r]] for r in range(prompts * G)]
  texts = [sampling.trim_response(tokenizer.decode(c, skip_special_tokens=True), ("\n\nHuman:",))
           for c in completions]
  reward = rewards.make_rewards({"even": EVEN})
  per = rewards.score(reward, [r.prompt for r in records for _ in range(G)], texts, [list(c) for c in completions],
                      num_generations=G)
  combined, _ = rewards.combine(reward, per)
  advantages, _ = losses.group_advantages(combined, G)
  group = layouts.GroupRows(config.data.max_prompt_length, C, G, tuple(config.data.buckets)).collate(
      ids, [completions[p * G:(p + 1) * G] for p in range(prompts)], tokenizer.pad_token_id)
  ref = tasks.group_logprobs(model, jax.tree.map(jnp.asarray, group))

  np.testing.assert_array_equal(batch.group.input_ids, group.input_ids)
  np.testing.assert_array_equal(batch.group.completion_mask.reshape(-1, C), group.completion_mask)
  np.testing.assert_array_equal(batch.rewards.reshape(-1), combined)
  np.testing.assert_allclose(batch.advantages.reshape(-1), advantages, rtol=1e-6)
  np.testing.assert_array_equal(batch.old_logps.reshape(-1, C), samples.logprobs)
  np.testing.assert_allclose(batch.ref_logps.reshape(-1, C), ref, atol=1e-5)
  np.testing.assert_array_equal(batch.truncated.reshape(-1), samples.finish_reasons == sampling.FinishReason.LENGTH)
  assert np.abs(advantages).sum() > 0  # the reward varies within the groups: the check has something to compare


@pytest.mark.slow
@pytest.mark.parametrize("task, fields", [
    ("grpo", {"grpo.beta": 0.04, "online.steps_per_generation": 2, "online.num_iterations": 2}),
    ("rloo", {}),
    ("online_dpo", {}),
])
def test_online_stage_trains_end_to_end(cache_dir, tmp_path, task, fields):
  config = online_config(cache_dir, task, **{"training.max_steps": 4, **fields})
  trainer.run(config, str(tmp_path))
  logged = [r for r in _records(tmp_path / "metrics.jsonl") if "train/loss" in r]
  assert [r["step"] for r in logged] == [1, 2, 3, 4]
  assert all(np.isfinite(r["train/loss"]) for r in logged)
  assert all(0 <= r["train/rewards/even/mean"] <= 1 and "train/reward" in r for r in logged)
  assert all(r["train/grad_norm"] > 0 for r in logged)  # the rewards varied: the policy moved
  table = _records(tmp_path / rollout.COMPLETIONS_FILE)
  assert {"prompt", "completion", "even", "reward", "advantage"} <= set(table[0])
  spg, mu = config.online.steps_per_generation, config.online.num_iterations
  generations = 4 // (spg * mu)
  assert len(table) == generations * spg * config.training.batch_size  # every generation's completions
  assert os.path.exists(tmp_path / "curves.png")
  if task != "online_dpo":
    assert any(r["advantage"] != 0 for r in table)


@pytest.mark.slow
def test_completions_table_reaches_tensorboard_and_wandb(cache_dir, tmp_path, monkeypatch):
  has_wandb = importlib.util.find_spec("wandb") is not None  # the [test] extra installs it
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  config = online_config(cache_dir, **{"training.max_steps": 4, "training.log_every": 2, "logging.tensorboard": True,
                                       "logging.wandb": has_wandb, "logging.wandb_mode": "offline"})
  trainer.run(config, str(tmp_path))
  by_step = {}
  for row in _records(tmp_path / rollout.COMPLETIONS_FILE):
    by_step.setdefault(row["step"], []).append(row)
  assert sorted(by_step) == [1, 2, 4]  # the first step and the log steps
  texts = {event.step: value.tensor.string_val[0].decode() for event in tensorboard_events(str(tmp_path))
           for value in event.summary.value if value.tag == "train/completions/text_summary"}
  assert texts == {at: logger.markdown_table(rows) for at, rows in by_step.items()}
  assert texts[1].splitlines()[0] == "| step | prompt | completion | even | reward | advantage |"
  if not has_wandb:
    return
  (run_dir,) = glob.glob(os.path.join(tmp_path, "wandb", "offline-run-*"))
  logged = {}
  for record in wandb_records(run_dir):
    if record.WhichOneof("record_type") == "history":
      row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
      if "train/completions/path" in row:  # a table is logged as a file in the run's media/
        logged[row["_step"]] = row["train/completions/path"]
  assert sorted(logged) == [2, 4]  # with the records of the log steps; step 1's rows ride with step 2's
  for at, rows in ((2, by_step[1] + by_step[2]), (4, by_step[4])):
    table = json.load(open(os.path.join(run_dir, "files", logged[at])))
    assert table["columns"] == list(rows[0]) and table["data"] == [list(row.values()) for row in rows]


@pytest.mark.slow
def test_dynamic_sampling_drops_and_refills_groups_without_signal(cache_dir, tmp_path):
  config = online_config(cache_dir, "grpo", **{"online.rewards": "first=tests.reward_functions:first_token_even",
                                               "online.dynamic_sampling": True, "training.max_steps": 3,
                                               "online.num_generations": 2, "training.batch_size": 4})
  trainer.run(config, str(tmp_path))
  logged = [r for r in _records(tmp_path / "metrics.jsonl") if "train/loss" in r]
  dropped = sum(r["train/dynamic_sampling/dropped_groups"] for r in logged)
  assert dropped > 0  # two completions agree on a coin flip half the time
  for r in logged:  # every kept group has a signal unless the rounds ran out (then counted as filled)
    assert r["train/frac_reward_zero_std"] * 2 <= r["train/dynamic_sampling/filled_without_signal"]


@pytest.mark.slow
def test_grpo_kill_and_resume_is_bit_identical(cache_dir, tmp_path):
  """Checkpoints every 10 steps fall inside generations (one every 4 steps): the buffered slices ride along."""
  config = online_config(cache_dir, "grpo", **{"online.steps_per_generation": 2, "online.num_iterations": 2,
                                               "grpo.beta": 0.04})
  assert_kill_and_resume_is_bit_identical(config, tmp_path, steps=60)


@pytest.mark.slow
def test_grpo_on_8_devices_equals_one_device(cache_dir, tmp_path):
  fields = {"online.num_generations": 2, "training.batch_size": 16, "training.max_steps": 2,
            "mesh.min_fsdp_size": 0, "grpo.beta": 0.04}
  one = online_config(cache_dir, "grpo", **fields, **{"mesh.num_devices": 1})
  eight = online_config(cache_dir, "grpo", **fields, **{"mesh.num_devices": 8, "mesh.data": 4, "mesh.fsdp": 2})
  trainer.run(one, str(tmp_path / "one"))
  trainer.run(eight, str(tmp_path / "eight"))
  losses_of = lambda d: [r["train/loss"] for r in _records(tmp_path / d / "metrics.jsonl") if "train/loss" in r]
  np.testing.assert_allclose(losses_of("eight"), losses_of("one"), rtol=1e-4, atol=1e-6)
  for name, value in exported(str(tmp_path / "one")).items():
    np.testing.assert_allclose(exported(str(tmp_path / "eight"))[name], value, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_grpo_gradient_accumulation_equals_one_batch(cache_dir, tmp_path):
  """Two micro-batches of a step's prompt groups (each a prompt with its completions) give the one-batch step: DAPO's
  normaliser is the generation batch's tokens, split over the micro-batches."""
  fields = {"training.max_steps": 2, "online.steps_per_generation": 2}
  trainer.run(online_config(cache_dir, "grpo", **fields), str(tmp_path / "one"))
  trainer.run(online_config(cache_dir, "grpo", **fields, **{"training.grad_accum": 2}), str(tmp_path / "two"))
  losses_of = lambda d: [r["train/loss"] for r in _records(tmp_path / d / "metrics.jsonl") if "train/loss" in r]
  np.testing.assert_allclose(losses_of("two"), losses_of("one"), rtol=1e-5, atol=1e-7)
  for name, value in exported(str(tmp_path / "one")).items():
    np.testing.assert_allclose(exported(str(tmp_path / "two"))[name], value, atol=1e-6, err_msg=name)
