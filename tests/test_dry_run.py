"""The dry run (jaxalign/dry_run.py): its figures are the memory analysis of the step training compiles, for a batch
at least as large as any the stage's data makes; the batch-size search and the memory sizes it reads."""

import jax
import jax.numpy as jnp
import pytest

from jaxalign import config_lib, dry_run, parallel, sources, step as step_lib, trainer
from jaxalign.data import pipeline
from jaxalign.tokenizer import load_tokenizer
from helpers import prepared, tiny_config

# (task, fields, how the step computes its log-probs): the tiny SFT step's logits are far below the chunking size;
# the DPO stage chunks at any size, so its figures are the fused head's.
STAGES = {"sft": ("sft", {}, "log-probs: unchunked, 0.00 GiB"),
          "dpo-shared-live-reference": ("dpo", {"data.prefix_sharing": True, "dpo.reference": "model",
                                                "model.logprob_chunk_above_mib": 0},
                                        "log-probs: fused LM head, ")}


@pytest.mark.parametrize("name", STAGES)
def test_dry_run_figures_equal_the_training_steps_memory_analysis(cache_dir, name, capsys):
  task_name, fields, logprob_path = STAGES[name]
  config = tiny_config(cache_dir, task_name, **fields, **{"dry_run": True, "mesh.num_devices": 1})
  [figures] = trainer.run(config, "unused-workdir")
  out = capsys.readouterr().out
  assert "total per device" in out and logprob_path in out

  # What training builds: real weights, optimizer state, reference and data.
  task, model, data, reference, mesh = prepared(config)
  stream = pipeline.streams(config, data, mesh, 1, reference.per_pair()).train
  host_batch = dry_run.largest_batch(config, task, reference, config.training.batch_size)
  for batch in stream.shape_examples(10**6):  # every shape of the stage: never larger than the dry run's
    for real, planned in zip(jax.tree.leaves(batch), jax.tree.leaves(host_batch), strict=True):
      assert real.ndim == planned.ndim and all(r <= p for r, p in zip(real.shape, planned.shape))
  graphdef, params, rest = step_lib.split_model(model, config.lora.enabled)
  tx = step_lib.make_optimizer(config.optimizer, total_steps=4)
  state = step_lib.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  steps = step_lib.StepFunctions(task, graphdef, rest, tx, jax.random.key(0), accum=1, reference=reference)
  batch = jax.device_put(host_batch, parallel.batch_sharding(mesh))
  analysis = steps.lower_train(state, batch).compile().memory_analysis()
  assert figures.temporaries == analysis.temp_size_in_bytes > 0
  assert figures.arguments == analysis.argument_size_in_bytes
  assert figures.outputs == analysis.output_size_in_bytes - analysis.alias_size_in_bytes
  assert figures.parameters == sum(x.nbytes for x in jax.tree.leaves(params))
  assert figures.optimizer == sum(x.nbytes for x in jax.tree.leaves(state.opt_state))


def test_an_online_stage_dry_run_compiles_the_batch_its_rollout_source_precompiles(cache_dir, capsys):
  """GRPO (a KL term: reference log-probs in the batch): the dry run's batch has the shapes of the one the rollout
  source precompiles for training (its longest rows), and its figures are that step's memory analysis."""
  config = tiny_config(cache_dir, "grpo", **{
      "online.rewards": "even=tests.reward_functions:even_token_share", "online.num_generations": 4,
      "online.max_completion_length": 8, "training.batch_size": 8, "grpo.beta": 0.04, "data.eval_pairs": 0,
      "model.logprob_chunk_above_mib": 0, "dry_run": True, "mesh.num_devices": 1})
  [figures] = trainer.run(config, "unused-workdir")
  out = capsys.readouterr().out
  assert "2 rows of" in out and "log-probs: fused LM head" in out  # 8 completions = 2 prompt groups of 4
  assert "reference model beside the step" in out and "sampler's key-value cache" in out

  task, model, data, reference, mesh = prepared(config)
  graphdef, params, rest = step_lib.split_model(model, config.lora.enabled)
  tokenizer = load_tokenizer(pipeline.tokenizer_path(config, ""))
  source = sources.build(config, data, mesh, tokenizer, reference, graphdef=graphdef, rest=rest, workdir="")
  [batch] = source.precompile_batches(10)
  planned = dry_run.largest_batch(config, task, reference, config.training.batch_size)
  assert jax.tree.structure(batch) == jax.tree.structure(planned)
  assert [x.shape for x in jax.tree.leaves(batch)] == [x.shape for x in jax.tree.leaves(planned)]
  tx = step_lib.make_optimizer(config.optimizer, total_steps=4)
  state = step_lib.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  steps = step_lib.StepFunctions(task, graphdef, rest, tx, jax.random.key(0), accum=1, reference=reference)
  analysis = steps.lower_train(state, batch).compile().memory_analysis()
  assert figures.temporaries == analysis.temp_size_in_bytes > 0
  assert figures.beside == sum(x.nbytes for x in jax.tree.leaves(reference.state)) > 0  # the source runs it


def test_the_largest_batch_that_fits_is_found_and_printed(cache_dir, capsys):
  config = tiny_config(cache_dir, "sft", **{"dry_run": True, "mesh.num_devices": 1})
  [at_eight] = trainer.run(config, "unused-workdir")
  capsys.readouterr()
  config.dry_run_memory = f"{at_eight.total + 1}B"  # the step at 8 rows fits; at more rows it does not
  trainer.run(config, "unused-workdir")
  assert "whose step fits" in (out := capsys.readouterr().out) and ": 8 (in steps of 1" in out
  assert dry_run.largest_fitting(lambda n: n <= 8, 1) == 8


@pytest.mark.parametrize("start", [1, 5, 8, 9, 64])
def test_largest_fitting_searches_both_ways(start):
  assert dry_run.largest_fitting(lambda n: n <= 37, start) == 37
  assert dry_run.largest_fitting(lambda n: False, start) == 0
  assert dry_run.largest_fitting(lambda n: True, start, limit=100) >= 50


def test_memory_sizes_and_their_config_checks():
  assert config_lib.parse_bytes("80GB") == 80 * 10**9
  assert config_lib.parse_bytes("1.5GiB") == 3 * 2**29
  assert config_lib.parse_bytes("1e6") == 10**6
  with pytest.raises(ValueError, match="not a memory size"):
    config_lib.parse_bytes("80 gigs")
  config = tiny_config("", "sft", **{"dry_run_memory": "80GB"})
  with pytest.raises(config_lib.ConfigError, match="config.dry_run_memory.*unless config.dry_run = True"):
    config_lib.validate(config)
  config.dry_run, config.dry_run_memory = True, "lots"
  with pytest.raises(config_lib.ConfigError, match="config.dry_run_memory = 'lots'"):
    config_lib.validate(config)
