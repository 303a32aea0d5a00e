"""The one training loop, shared by every task (`tasks.TASKS`); and studies that chain several stages.

A stage is `setup` (validate, build the mesh, the model, the reference, the batch source and the optimizer, restore
the newest checkpoint of the workdir or start), `loop` (a jit-compiled, sharded step with the state donated, over the
source's batches, logging, evaluating and checkpointing as it goes) and `finish` (export the model in Hugging Face
format, write done.json and the curves, push to the Hub).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any

import jax
import ml_collections

from jaxalign import (checkpoint, config_lib, curves, hub_push, parallel, reference as reference_lib, runguard,
                      sources, stage_model, step as step_lib, tasks, trackers)
from jaxalign.data import pipeline
from jaxalign.logger import MetricLogger
from jaxalign.tokenizer import check_vocabulary, embedding_rows, load_tokenizer
from jaxalign.workdirs import EXPORT_DIR

log = logging.getLogger(__name__)

DONE_FILE = "done.json"


# ------------------------------------------------------------------------------------------------------ entry


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Runs a single stage or a study of stages; returns the final stage's exported model folder."""
  config_lib.validate(config)
  hub_push.check_config(config)
  parallel.initialize_distributed(config.mesh.distributed)
  parallel.enable_compilation_cache(config.compilation_cache, pipeline.cache_dir(config))
  if config.stages:
    return run_study(config, workdir)
  return train(config, workdir)


def run_study(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Runs `config.stages` in order, each in `<workdir>/<name>`; "stage:<name>" refers to an earlier export.

  Finished stages (their workdir holds `done.json`) are skipped, so a rerun continues where the study stopped.
  At the end, `<workdir>/study.md` summarises the stages (see `curves.write_study_summary`).
  """
  exports: dict[str, str] = {}
  for name in config.stages:
    stage = config_lib.resolve_stage(config, name, exports)
    trackers.apply_study_settings(config, stage, name, workdir)
    exports[name] = train(stage, os.path.join(workdir, name))
  if jax.process_index() == 0:
    curves.write_study_summary(workdir, list(config.stages))
  return exports[config.stages[-1]]


def train(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Trains one stage in `workdir` (resuming if it has checkpoints) and returns its exported model folder.

  Holds the workdir's run lock throughout (a second run there fails at once). SIGTERM / SIGINT save a checkpoint
  after the current step and raise `runguard.Preempted` (exit status 75); rerunning resumes.
  """
  config_lib.validate(config)
  export_dir = os.path.join(workdir, EXPORT_DIR)
  if os.path.exists(os.path.join(workdir, DONE_FILE)):
    log.info("stage in %s already finished; skipping (delete %s to rerun)", workdir, DONE_FILE)
    return export_dir
  os.makedirs(workdir, exist_ok=True)
  with runguard.lock_workdir(workdir):
    stage = setup(config, workdir)
    final_eval = loop(stage)
    return finish(stage, final_eval)


# ------------------------------------------------------------------------------------------------------ setup


@dataclasses.dataclass
class Stage:
  """A stage ready to train: what `setup` built, `loop` runs and `finish` closes."""

  config: ml_collections.ConfigDict
  workdir: str
  tokenizer: Any
  source: sources.Source
  steps: step_lib.StepFunctions
  state: step_lib.TrainState
  checkpointer: checkpoint.Checkpointer
  logger: MetricLogger
  started: float  # time.perf_counter() at the start of setup
  seconds: dict[str, float]  # wall time of the stage's parts, for done.json


def setup(config: ml_collections.ConfigDict, workdir: str) -> Stage:
  """Everything a stage's loop needs, restored from the workdir's newest checkpoint when there is one."""
  started = time.perf_counter()
  tokenizer = load_tokenizer(pipeline.tokenizer_path(config, workdir))
  stage_model.check_inputs(config, tokenizer)
  devices = jax.devices()[:config.mesh.num_devices] if config.mesh.num_devices > 0 else None
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, devices)
  task = tasks.make_task(config)
  data = pipeline.load(config, tokenizer, task.batch_kind, mesh)
  model = stage_model.build_model(config, mesh, embedding_rows(tokenizer))
  check_vocabulary(tokenizer, model.config.vocab_size)
  # Before the source: precomputed reference log-probs travel with the batches.
  reference = reference_lib.prepare(task, model, data, config, mesh, tokenizer.pad_token_id)
  graphdef, params, rest = step_lib.split_model(model, config.lora.enabled)
  rest = parallel.shard_tree(rest, mesh, config.mesh.min_fsdp_size)
  source = sources.build(config, data, mesh, tokenizer, reference, graphdef=graphdef, rest=rest, workdir=workdir)
  tx = step_lib.make_optimizer(config.optimizer, source.total_steps)
  state, shardings = step_lib.initial_state(params, tx, mesh, config.mesh.min_fsdp_size)
  checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                         save_every_steps=config.checkpoint.every_steps, keep=config.checkpoint.keep,
                                         async_save=config.checkpoint.async_save)
  state = _restore(config, workdir, checkpointer, state, shardings, source)
  steps = step_lib.StepFunctions(task, graphdef, rest, tx, jax.random.key(config.seed),
                                 accum=config.training.grad_accum, reference=reference)
  logger = MetricLogger(workdir, config, total_steps=source.total_steps, start_step=int(state.step),
                        step_flops=step_lib.training_flops(model, reference), num_devices=mesh.size)
  stage = Stage(config, workdir, tokenizer, source, steps, state, checkpointer, logger, started,
                {"setup": time.perf_counter() - started})  # data, model, reference pass, restore
  if config.training.precompile:
    _precompile(stage)
  return stage


def _restore(config, workdir: str, checkpointer: checkpoint.Checkpointer, state: step_lib.TrainState, shardings,
             source: sources.Source) -> step_lib.TrainState:
  """The newest checkpoint's state (the source moved to where it was), or `state` when there is none."""
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
  restored = checkpointer.restore_latest(abstract) if config.resume else None
  if not config.resume and checkpointer.steps():
    raise ValueError(f"{workdir} already has checkpoints {checkpointer.steps()} and resume=False: "
                     "use another --workdir, or drop --config.resume=False to continue that run")
  if restored is None:
    return state
  source.restore(restored.extra["data"])
  log.info("resumed from step %d", restored.step)
  return restored.state


def _precompile(stage: Stage) -> None:
  start = time.perf_counter()
  train_examples = stage.source.precompile_batches(stage.source.total_steps - int(stage.state.step))
  eval_examples = stage.source.held_out[:1]  # held-out batches share one shape
  stage.steps.precompile(stage.state, train_examples, eval_examples)
  stage.seconds["precompile"] = time.perf_counter() - start
  log.info("compiled %d train and %d eval program(s) in %.1f s", len(train_examples), len(eval_examples),
           stage.seconds["precompile"])


# ------------------------------------------------------------------------------------------------------- loop


def _finite_or_raise(metrics: dict, step: int, last_checkpoint: int | None) -> None:
  loss = float(metrics["loss"])
  if not math.isfinite(loss):
    kept = (f"the last checkpoint, step {last_checkpoint}, was verified (checksums recorded, all values finite)"
            if last_checkpoint is not None else "no verified checkpoint exists")
    raise FloatingPointError(f"non-finite loss ({loss}) at step {step}; stopping. {kept}. Lower optimizer.lr, "
                             "check the data, or use model.dtype=float32.")


def loop(stage: Stage) -> dict[str, float]:
  """Trains from the state's step to the source's total, logging (each step's metrics read one step late, so the
  host never stalls), evaluating and checkpointing; returns the final held-out metrics."""
  config, source, steps, checkpointer, logger = (stage.config, stage.source, stage.steps, stage.checkpointer,
                                                  stage.logger)
  total_steps, eval_every = source.total_steps, config.training.eval_every
  start = time.perf_counter()
  step, pending = int(stage.state.step), None  # pending: the previous step's (step, metrics, batch shape)
  try:
    with runguard.StopSignals(check_every=config.training.log_every) as stop_signals:
      while step < total_steps:
        stage.state, metrics = steps.train(stage.state, source.next(stage.state))
        metrics = {**metrics, **source.metrics()}
        step += 1
        if pending is not None:
          logger.train_step(*pending)
        pending = (step, metrics, source.last_shape)
        stopping = stop_signals.should_stop(step)
        save = checkpointer.should_save(step) or step == total_steps or stopping
        if save or step % config.training.log_every == 0:
          _finite_or_raise(jax.device_get(metrics), step, checkpointer.last_verified_step)
        if save:  # every record up to a checkpoint is written before it, so a resumed run logs each step once
          logger.train_step(*pending)
          pending = None
        if eval_every and step % eval_every == 0 and step < total_steps:
          logger.write(step, steps.evaluate(stage.state.params, source.held_out))
        if save:
          checkpointer.save(step, state=stage.state, extra={"data": source.state(), "config": config.to_dict()},
                            force=True)
        if stopping and step < total_steps:
          checkpointer.wait()
          message = (f"stopped by {stop_signals.received} after step {step} of {total_steps}: checkpoint step {step} "
                     f"saved in {checkpointer.directory}; rerun the same command to resume")
          log.warning(message)
          raise runguard.Preempted(message)
    if pending is not None:
      logger.train_step(*pending)
    stage.seconds["loop"] = time.perf_counter() - start  # the steps and their checkpoints
    final_eval = steps.evaluate(stage.state.params, source.held_out)
    logger.write(step, final_eval)
    checkpointer.wait()
  finally:
    checkpointer.close()
    logger.close()
  return final_eval


# ----------------------------------------------------------------------------------------------------- finish


def finish(stage: Stage, final_eval: dict[str, float]) -> str:
  """Exports the model, writes done.json and the curves, pushes to the Hub when configured; returns the export."""
  config, workdir, steps, logger = stage.config, stage.workdir, stage.steps, stage.logger
  export_dir = os.path.join(workdir, EXPORT_DIR)
  summary = {"task": config.task, "init_from": config.init_from, "steps": int(stage.state.step),
             "compilations": steps.compilations, **final_eval, "train_shapes": sorted(logger.shapes)}
  log.info("compiled the train step %d time(s) for %d batch shape(s)", steps.compilations["train"],
           len(logger.shapes))
  if config.export.enabled:
    stage_model.export_model(steps.model(stage.state.params), export_dir, config.export.dtype,
                             stage.tokenizer.pad_token_id)
  stage.seconds["stage"] = time.perf_counter() - stage.started
  summary["seconds"] = {k: round(v, 2) for k, v in stage.seconds.items()}
  if jax.process_index() == 0:
    if config.export.enabled:
      stage.tokenizer.save_pretrained(export_dir)  # the folder is then all evaluate.py needs
    with open(os.path.join(workdir, DONE_FILE), "w") as f:
      json.dump(summary, f, indent=2)
    curves_path = curves.write_stage_curves(workdir, config.task)
    if config.export.push_to_hub:
      hub_push.push_stage(config, workdir, export_dir, summary)
    if logger.tracker is not None:
      logger.tracker.finish(summary, [os.path.join(workdir, DONE_FILE), curves_path or ""])
  return export_dir
