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
import os
import time
from typing import Any

import jax
import ml_collections

from jaxalign import (checkpoint, config_lib, curves, dry_run, hub_push, parallel, reference as reference_lib,
                      runguard, sources, stage_model, step as step_lib, tasks, trackers)
from jaxalign.data import pipeline
from jaxalign.logger import MetricLogger
from jaxalign.tokenizer import check_vocabulary, embedding_rows, load_tokenizer
from jaxalign.workdirs import CHECKPOINT_DIR, DONE_FILE, EXPORT_DIR, finished_config

log = logging.getLogger(__name__)


def run(config: ml_collections.ConfigDict, workdir: str) -> str | list[dry_run.StepMemory]:
  """Runs a single stage or a study of stages; returns the final stage's exported model folder (with
  `config.dry_run`: prints and returns each stage's step memory, trains nothing)."""
  config_lib.validate(config)
  hub_push.check_config(config)
  parallel.initialize_distributed(config.mesh.distributed)
  parallel.enable_compilation_cache(config.compilation_cache, pipeline.cache_dir(config))
  if config.dry_run:
    return dry_run.run(config)
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
    log.info(config_lib.stage_header(config, name, stage))
    trackers.apply_study_settings(config, stage, name, workdir)
    exports[name] = train(stage, os.path.join(workdir, name))
  if jax.process_index() == 0:
    log.info("study summary: %s", curves.write_study_summary(workdir, list(config.stages)))
  return exports[config.stages[-1]]


def train(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Trains one stage in `workdir` (resuming if it has checkpoints) and returns its exported model folder. Holds the
  workdir's run lock (a second run there fails at once); SIGTERM / SIGINT anywhere in the stage raise
  `runguard.Preempted` (exit 75), in the loop after saving the current step; rerunning resumes."""
  config_lib.validate(config)
  export_dir = os.path.join(workdir, EXPORT_DIR)
  if os.path.exists(os.path.join(workdir, DONE_FILE)):
    config_lib.check_unchanged(config, finished_config(workdir), f"the finished stage in {workdir} ({DONE_FILE})")
    log.info("stage in %s already finished; skipping (delete %s to rerun)", workdir, DONE_FILE)
    return export_dir
  os.makedirs(workdir, exist_ok=True)
  kept = lambda: checkpoint.describe_saved(os.path.join(workdir, CHECKPOINT_DIR))
  with runguard.lock_workdir(workdir), runguard.StopSignals(config.training.log_every, kept) as stop_signals:
    stage = setup(config, workdir, stop_signals)
    final_eval = loop(stage)
    return finish(stage, final_eval)


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
  stop_signals: runguard.StopSignals  # installed for the whole stage; `phase` says what a signal interrupts
  started: float  # time.perf_counter() at the start of setup
  seconds: dict[str, float]  # wall time of the stage's parts, for done.json


def setup(config: ml_collections.ConfigDict, workdir: str, stop_signals: runguard.StopSignals) -> Stage:
  """Everything a stage's loop needs, restored from the workdir's newest checkpoint when there is one."""
  started = time.perf_counter()
  checkpoint.check_writable(os.path.join(workdir, CHECKPOINT_DIR))  # before minutes of data and model loading
  stop_signals.phase = "loading the tokenizer and checking the inputs"
  tokenizer = load_tokenizer(pipeline.tokenizer_path(config, workdir))
  stage_model.check_inputs(config, tokenizer)
  mesh = parallel.config_mesh(config.mesh)
  task = tasks.make_task(config)
  stop_signals.phase = "loading and tokenizing the data"
  data = pipeline.load(config, tokenizer, task.batch_kind, mesh)
  stop_signals.phase = "loading the model"
  model = stage_model.build_model(config, mesh, embedding_rows(tokenizer))
  check_vocabulary(tokenizer, model.config.vocab_size)
  # Before the source: precomputed reference log-probs travel with the batches.
  stop_signals.phase = "preparing the reference model"
  reference = reference_lib.prepare(task, model, data, config, mesh, tokenizer.pad_token_id)
  graphdef, params, rest = step_lib.split_model(model, config.lora.enabled)
  rest = parallel.shard_tree(rest, mesh, config.mesh.min_fsdp_size)
  source = sources.build(config, data, mesh, tokenizer, reference, graphdef=graphdef, rest=rest, workdir=workdir)
  tx = step_lib.make_optimizer(config.optimizer, source.total_steps)
  state, shardings = step_lib.initial_state(params, tx, mesh, config.mesh.min_fsdp_size)
  checkpointer = checkpoint.Checkpointer.from_config(os.path.join(workdir, CHECKPOINT_DIR), config.checkpoint)
  stop_signals.phase = "restoring the checkpoint"
  state = _restore(config, workdir, checkpointer, state, shardings, source)
  steps = step_lib.StepFunctions(task, graphdef, rest, tx, jax.random.key(config.seed),
                                 accum=config.training.grad_accum, reference=reference)
  logger = MetricLogger(workdir, config, total_steps=source.total_steps, start_step=int(state.step),
                        step_flops=step_lib.training_flops(model, reference), num_devices=mesh.size)
  stage = Stage(config, workdir, tokenizer, source, steps, state, checkpointer, logger, stop_signals, started,
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
  config_lib.check_unchanged(config, restored.extra.get("config"),
                             f"checkpoint step {restored.step} in {checkpointer.directory}")
  source.restore(restored.extra["data"])
  log.info("resumed from step %d", restored.step)
  return restored.state


def _precompile(stage: Stage) -> None:
  stage.stop_signals.phase = "compiling the train step"
  start = time.perf_counter()
  train_examples = stage.source.precompile_batches(stage.source.total_steps - int(stage.state.step))
  eval_examples = stage.source.held_out[:1]  # held-out batches share one shape
  stage.steps.precompile(stage.state, train_examples, eval_examples)
  stage.seconds["precompile"] = time.perf_counter() - start
  log.info("compiled %d train and %d eval program(s) in %.1f s", len(train_examples), len(eval_examples),
           stage.seconds["precompile"])


def loop(stage: Stage) -> dict[str, float]:
  """Trains from the state's step to the source's total, logging (each step's metrics read one step late, so the
  host never stalls), evaluating and checkpointing; returns the final held-out metrics."""
  config, source, steps, checkpointer, logger, stop_signals = (stage.config, stage.source, stage.steps,
                                                                stage.checkpointer, stage.logger, stage.stop_signals)
  total_steps, eval_every = source.total_steps, config.training.eval_every
  start = time.perf_counter()
  step, pending = int(stage.state.step), None  # pending: the previous step's (step, metrics, batch shape)
  try:
    with stop_signals.polling("training"):
      while step < total_steps:
        stage.state, metrics = steps.train(stage.state, source.next(stage.state))
        checkpointer.check_saves()  # a background save that failed is reported now, not at the next save
        metrics = {**metrics, **source.metrics()}
        logger.add_tables(source.tables())
        step += 1
        if pending is not None:
          logger.train_step(*pending)
        pending = (step, metrics, source.last_shape)
        stopping = stop_signals.should_stop(step)
        save = checkpointer.should_save(step) or step == total_steps or stopping
        if save or step % config.training.log_every == 0:
          step_lib.check_finite(jax.device_get(metrics), step, checkpointer.last_verified_step)
        if save:  # every record up to a checkpoint is written before it, so a resumed run logs each step once
          logger.train_step(*pending)
          pending = None
          if stopping:  # the stop step's record too, so the first record after the resume covers only later steps
            logger.flush(step)
        if eval_every and step % eval_every == 0 and step < total_steps:
          logger.write(step, steps.evaluate(stage.state.params, source.held_out))
        if save:
          checkpointer.save(step, state=stage.state, extra={"data": source.state(), "config": config.to_dict()},
                            force=True)
        if stopping and step < total_steps:
          checkpointer.wait()
          stop_signals.stop_after(step, total_steps, checkpointer.directory)
    if pending is not None:
      logger.train_step(*pending)
    stage.seconds["loop"] = time.perf_counter() - start  # the steps and their checkpoints
    stop_signals.phase = "the final evaluation"
    final_eval = steps.evaluate(stage.state.params, source.held_out)
    logger.write(step, final_eval)
    checkpointer.wait()
  except checkpoint.CheckpointSaveError as error:  # Orbax's threads of the failed save never end: see exit_now
    logger.close()
    runguard.exit_now(str(error), runguard.SAVE_FAILED_EXIT_CODE)
  finally:
    checkpointer.close()
    logger.close()
  return final_eval


def finish(stage: Stage, final_eval: dict[str, float]) -> str:
  """Exports the model, writes done.json and the curves, pushes to the Hub when configured; returns the export."""
  config, workdir, steps, logger = stage.config, stage.workdir, stage.steps, stage.logger
  export_dir = os.path.join(workdir, EXPORT_DIR)
  summary = {"task": config.task, "init_from": config.init_from, "steps": int(stage.state.step),
             "compilations": steps.compilations, **final_eval, "train_shapes": sorted(logger.shapes),
             "config": config.to_dict()}
  log.info("compiled the train step %d time(s) for %d batch shape(s)", steps.compilations["train"],
           len(logger.shapes))
  stage.stop_signals.phase = "exporting the model"
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
    written = [DONE_FILE, "metrics.jsonl"] + ([f"{EXPORT_DIR}/ (the model)"] if config.export.enabled else [])
    log.info("stage done: %s in %s", ", ".join(written + [os.path.basename(curves_path)] * bool(curves_path)), workdir)
    if config.export.push_to_hub:
      hub_push.push_stage(config, workdir, export_dir, summary)
    if logger.tracker is not None:
      logger.tracker.finish(summary, [os.path.join(workdir, DONE_FILE), curves_path or ""])
  return export_dir
