"""The training loop end to end on tiny models and synthetic data: sharding equivalence, exact resume after SIGKILL,
multi-process training, precomputed references, exports, config errors, studies."""

import json
import math
import os
import signal
import socket
import time

import jax
import numpy as np
import pytest

from configs import common
from helpers import (assert_killed_and_resumed_run_equals, assert_same_params, checkpoint_steps, config_file, exported,
                     losses_by_step, run_straight, tiny_config, train_cli)
from jaxalign import config_lib, runguard, trainer


# ----------------------------------------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_sft_trains_and_exports_a_transformers_model(cache_dir, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config = tiny_config(cache_dir, "sft", **{"training.max_steps": 12, "optimizer.lr": 3e-3})
  export = trainer.run(config, str(tmp_path))
  losses = losses_by_step(str(tmp_path))
  assert losses[12] < losses[1] - 0.5, losses
  done = json.load(open(tmp_path / trainer.DONE_FILE))
  # One program per batch shape: one row bucket, and at most four widths of scored positions per row.
  assert done["compilations"]["train"] == len(done["train_shapes"]) <= 4
  assert {tuple(shape[:2]) for shape in done["train_shapes"]} == {(8, 128)}
  seconds = done["seconds"]
  assert seconds["stage"] >= seconds["setup"] + seconds["precompile"] + seconds["loop"] > 0

  from jaxalign.models import hub

  ours = hub.from_pretrained(export)
  theirs = transformers.OPTForCausalLM.from_pretrained(export).eval()
  ids = np.array([[2, 17, 40, 99, 5, 300]])
  with torch.no_grad():
    expected = theirs(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours(ids)), expected, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [{}, {"data.prefix_sharing": True, "data.packing": True}],
                         ids=["separate-rows", "packed"])
def test_first_dpo_step_loss_is_ln2_and_eight_devices_match_one(layout, cache_dir, tmp_path):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (tests/conftest.py forces 8 CPU devices)")
  runs = {}
  for name, mesh in (("one", {"mesh.num_devices": 1}), ("eight", {"mesh.data": 4, "mesh.fsdp": 2})):
    config = tiny_config(cache_dir, "dpo", **{"training.max_steps": 1, "mesh.min_fsdp_size": 0,
                                              "data.eval_pairs": 0}, **mesh, **layout)
    trainer.run(config, str(tmp_path / name))
    runs[name] = (losses_by_step(str(tmp_path / name)), exported(str(tmp_path / name)))
  assert runs["one"][0][1] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0
  assert runs["eight"][0][1] == pytest.approx(runs["one"][0][1], abs=1e-5)
  assert_same_params(runs["eight"][1], runs["one"][1], atol=1e-5)


@pytest.mark.slow
def test_precomputed_reference_equals_live_reference_and_is_cached(tmp_path, caplog):
  cache_dir = str(tmp_path / "cache")  # its own: the session's cache holds other tests' reference log-probs
  results = {}
  for mode in ("model", "precomputed"):
    config = tiny_config(cache_dir, "dpo", **{"dpo.reference": mode, "training.max_steps": 3})
    trainer.run(config, str(tmp_path / mode))
    results[mode] = losses_by_step(str(tmp_path / mode))
  for step in (1, 2, 3):
    assert results["precomputed"][step] == pytest.approx(results["model"][step], abs=1e-5)
  reference_files = os.listdir(os.path.join(cache_dir, "reference"))
  assert len(reference_files) == 2  # train and held-out pairs
  caplog.set_level("INFO", logger="jaxalign")
  config = tiny_config(cache_dir, "dpo", **{"dpo.reference": "precomputed", "training.max_steps": 1})
  trainer.run(config, str(tmp_path / "again"))
  assert "reference log-probs read from" in caplog.text


@pytest.mark.slow
def test_lora_dpo_trains_only_adapters_and_exports_merged(cache_dir, tmp_path):
  config = tiny_config(cache_dir, "dpo", **{"lora.enabled": True, "training.max_steps": 2, "optimizer.lr": 1e-2})
  trainer.run(config, str(tmp_path))
  losses = losses_by_step(str(tmp_path))
  assert losses[1] == pytest.approx(math.log(2), abs=1e-6)  # adapters start at zero: policy == reference
  names = exported(str(tmp_path)).keys()
  assert not any("lora" in n for n in names) and "model.decoder.layers.0.self_attn.q_proj.weight" in names


@pytest.fixture(scope="module")
def uninterrupted_run(cache_dir, tmp_path_factory):
  """(config file, workdir) of a 150-step SFT run straight through, shared by the SIGKILL and SIGTERM tests."""
  return run_straight(tiny_config(cache_dir, "sft"), tmp_path_factory.mktemp("uninterrupted"))


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(uninterrupted_run, tmp_path):
  assert_killed_and_resumed_run_equals(*uninterrupted_run, tmp_path)


@pytest.mark.slow
def test_sigterm_saves_at_the_current_step_and_the_rerun_matches_an_uninterrupted_run(uninterrupted_run, tmp_path):
  path, straight_dir = uninterrupted_run
  stopped = tmp_path / "stopped"
  victim = train_cli(path, str(stopped))
  deadline = time.time() + 600
  while len(losses_by_step(str(stopped)) if (stopped / "metrics.jsonl").exists() else ()) < 3:
    assert time.time() < deadline and victim.poll() is None, "run ended before the signal"
    time.sleep(0.01)
  victim.send_signal(signal.SIGTERM)
  output = victim.stdout.read()
  assert victim.wait(timeout=600) == runguard.PREEMPTED_EXIT_CODE, output
  (line,) = [line for line in output.splitlines() if "stopped by SIGTERM after step" in line]
  step = int(line.split("after step ")[1].split()[0])
  assert 3 <= step < 150 and f"checkpoint step {step} saved" in line
  assert step in checkpoint_steps(stopped) and not (stopped / trainer.DONE_FILE).exists()

  resumed = train_cli(path, str(stopped))
  output = resumed.stdout.read()
  assert resumed.wait(timeout=600) == 0, output
  assert f"resumed from step {step}" in output
  with open(stopped / "metrics.jsonl") as f:  # each step exactly once, with the uninterrupted run's loss
    assert [json.loads(line)["step"] for line in f] == list(range(1, 151))
  assert losses_by_step(str(stopped)) == losses_by_step(str(straight_dir))
  assert_same_params(exported(str(stopped)), exported(str(straight_dir)))


@pytest.mark.slow
def test_two_processes_train_like_one(cache_dir, tmp_path):
  config = tiny_config(cache_dir, "sft", **{"training.max_steps": 3, "data.eval_pairs": 0,
                                            "checkpoint.every_steps": 0, "mesh.min_fsdp_size": 0, "mesh.fsdp": 2})
  path = config_file(tmp_path, config)
  single = train_cli(path, str(tmp_path / "single"), devices=2)
  assert single.wait(timeout=600) == 0, single.stdout.read()
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = [train_cli(path, str(tmp_path / "multi"), devices=1, env_extra={
      "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i),
      "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}) for i in range(2)]
  for proc in procs:
    assert proc.wait(timeout=600) == 0, proc.stdout.read()
  for step, loss in losses_by_step(str(tmp_path / "single")).items():
    assert losses_by_step(str(tmp_path / "multi"))[step] == pytest.approx(loss, abs=1e-5)
  assert_same_params(exported(str(tmp_path / "multi")), exported(str(tmp_path / "single")), atol=1e-5)


@pytest.mark.slow
def test_corrupted_newest_checkpoint_falls_back_with_a_message(cache_dir, tmp_path, caplog):
  config = tiny_config(cache_dir, "sft", **{"training.max_steps": 4, "data.eval_pairs": 0})
  trainer.run(config, str(tmp_path))
  os.remove(tmp_path / trainer.DONE_FILE)
  newest = tmp_path / "checkpoints" / "4"
  for root, _, files in os.walk(newest / "state"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  caplog.set_level("WARNING")
  trainer.run(config, str(tmp_path))
  assert "checkpoint step 4" in caplog.text and "could not be restored" in caplog.text


@pytest.mark.slow
def test_study_runs_stages_in_order_and_skips_finished_ones(cache_dir, tmp_path, caplog):
  c = common.get_config()
  c.stages = ("sft", "dpo")
  c.stage_configs.sft = tiny_config(cache_dir, "sft", **{"training.max_steps": 2, "data.eval_pairs": 0})
  c.stage_configs.dpo = tiny_config(cache_dir, "dpo", **{"training.max_steps": 2, "data.eval_pairs": 0,
                                                          "init_from": "stage:sft"})
  trainer.run(c, str(tmp_path))
  assert losses_by_step(str(tmp_path / "dpo"))[1] == pytest.approx(math.log(2), abs=1e-6)
  caplog.set_level("INFO", logger="jaxalign")
  trainer.run(c, str(tmp_path))
  assert caplog.text.count("already finished") == 2


@pytest.mark.parametrize("field, value, message", [
    ("task", "ppo", "config.task = 'ppo' is not allowed"),
    ("dpo.loss_type", "kto", "config.dpo.loss_type"),
    ("data.max_prompt_length", 600, "config.data.max_prompt_length"),
    ("training.grad_accum", 3, "a divisor of training.batch_size"),
    ("optimizer.lr", -1.0, "config.optimizer.lr"),
    ("optimizer.schedule", "step", "config.optimizer.schedule"),
    ("model.dtype", "float8", "config.model.dtype"),
    ("lora.targets", ("query",), "config.lora.targets"),
    ("init_from", "stage:sft", "config.init_from"),
    ("data.packing", True, "packing only for task 'sft'"),
])
def test_bad_configs_fail_before_compiling_with_the_field_name(field, value, message, tmp_path):
  overrides = {field: value}
  if field == "lora.targets":
    overrides["lora.enabled"] = True
  task = "dpo" if field == "data.packing" else "sft"
  config = tiny_config(str(tmp_path), task, **overrides)
  with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    trainer.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_study_errors_name_the_stage(tmp_path):
  c = common.get_config()
  c.stages = ("sft",)
  c.stage_configs.sft = tiny_config(str(tmp_path), "sft", **{"dpo.beta": 0.0})
  with pytest.raises(config_lib.ConfigError, match=r"config\.stage_configs\.sft\.dpo\.beta"):
    trainer.run(c, str(tmp_path))


def test_indivisible_batch_is_a_clear_error(cache_dir, tmp_path):
  config = tiny_config(cache_dir, "sft", **{"training.batch_size": 6, "mesh.num_devices": 4})
  with pytest.raises(ValueError, match="training.batch_size"):
    trainer.run(config, str(tmp_path))


@pytest.mark.slow
def test_prefix_shared_dpo_equals_the_concatenated_forward(cache_dir, tmp_path):
  results = {}
  for sharing in (False, True):
    config = tiny_config(cache_dir, "dpo", **{"data.prefix_sharing": sharing, "training.max_steps": 3,
                                              "dpo.reference": "model"})
    trainer.run(config, str(tmp_path / str(sharing)))
    results[sharing] = losses_by_step(str(tmp_path / str(sharing))), exported(str(tmp_path / str(sharing)))
  for step in (1, 2, 3):
    assert results[True][0][step] == pytest.approx(results[False][0][step], abs=1e-5)
  assert_same_params(results[True][1], results[False][1], atol=1e-5)


@pytest.mark.slow
def test_packed_dpo_takes_reference_logps_by_pair_and_matches_the_live_reference(cache_dir, tmp_path):
  results = {}
  for mode in ("model", "precomputed"):
    config = tiny_config(cache_dir, "dpo", **{"data.prefix_sharing": True, "data.packing": True,
                                              "dpo.reference": mode, "training.batch_size": 8,
                                              "training.max_steps": 3})
    trainer.run(config, str(tmp_path / mode))
    results[mode] = losses_by_step(str(tmp_path / mode))
  assert results["model"][1] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0
  for step in (1, 2, 3):  # a reference log-prob attached to the wrong pair would move the loss
    assert results["precomputed"][step] == pytest.approx(results["model"][step], abs=1e-5)
  with open(tmp_path / "precomputed" / "done.json") as f:
    done = json.load(f)
  assert done["compilations"]["train"] == len(done["train_shapes"]) <= 4


@pytest.mark.slow
def test_packed_two_head_reward_model_trains_and_exports(cache_dir, tmp_path):
  config = tiny_config(cache_dir, "reward", **{"data.prefix_sharing": True, "data.packing": True,
                                                "reward.heads": ("harmless", "helpful"), "training.max_steps": 3})
  trainer.run(config, str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert records[0]["train/loss"] == pytest.approx(math.log(2), abs=0.05)  # a random head: rewards near 0
  held_out = [r for r in records if "eval/accuracy" in r]
  assert held_out and 0.0 <= held_out[-1]["eval/accuracy"] <= 1.0
  from jaxalign.models import reward

  assert reward.from_pretrained(str(tmp_path / trainer.EXPORT_DIR)).heads == ("harmless", "helpful")


@pytest.mark.slow
def test_compilation_cache_folder_receives_the_train_step(cache_dir, tmp_path):
  folder = tmp_path / "xla"
  config = tiny_config(cache_dir, "sft", **{"compilation_cache": str(folder), "training.max_steps": 1,
                                            "data.eval_pairs": 0})
  process = train_cli(config_file(tmp_path, config), str(tmp_path / "run"))  # its own process: the cache stays on
  output, _ = process.communicate(timeout=300)
  assert process.returncode == 0, output
  assert any(name.startswith("jit_train_step") for name in os.listdir(folder))


@pytest.mark.slow
def test_each_shape_compiles_once_before_the_loop(cache_dir, tmp_path, caplog):
  caplog.set_level("WARNING", logger="jax")
  caplog.set_level("INFO", logger="jaxalign")
  jax.config.update("jax_log_compiles", True)  # jax logs every XLA compilation
  try:
    trainer.run(tiny_config(cache_dir, "dpo", **{"data.prefix_sharing": True, "training.max_steps": 6,
                                                 "data.buckets": (32, 64, 96, 128)}), str(tmp_path))
  finally:
    jax.config.update("jax_log_compiles", False)
  with open(tmp_path / "done.json") as f:
    done = json.load(f)
  compiled = [r for r in caplog.records if "Finished XLA compilation of jit(train_step)" in r.getMessage()]
  assert len(done["train_shapes"]) > 1
  assert len(compiled) == len(done["train_shapes"])  # all in the parallel precompile: the loop compiled nothing
  assert "compiled %d train and 1 eval program(s)" % len(done["train_shapes"]) in caplog.text
