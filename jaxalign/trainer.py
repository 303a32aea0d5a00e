"""The one training loop, shared by SFT, DPO and reward modelling; and studies that chain several stages.

A stage: validate the config, build the mesh, data, model and optimizer, restore the newest checkpoint of the
workdir (or start), then run a jit-compiled, sharded step (parameters and optimizer state donated) over
static-shape batches, logging and checkpointing as it goes, and export the model in Hugging Face format.
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
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from jaxalign import (checkpoint, config_lib, curves, dry_run, flops, hub_push, parallel, reference as reference_lib,
                      runguard, tasks, trackers)
from jaxalign.data import pipeline
from jaxalign.logger import MetricLogger
from jaxalign.models import hub, lora, registry, reward
from jaxalign.tokenizer import check_vocabulary, embedding_rows, load_tokenizer
from jaxalign.workdirs import EXPORT_DIR, resolve_init_path

log = logging.getLogger(__name__)

DONE_FILE = "done.json"


# ------------------------------------------------------------------------------------------------------ entry


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
    trackers.apply_study_settings(config, stage, name, workdir)
    exports[name] = train(stage, os.path.join(workdir, name))
  if jax.process_index() == 0:
    curves.write_study_summary(workdir, list(config.stages))
  return exports[config.stages[-1]]


# ------------------------------------------------------------------------------------------------------ model


def compute_options(config) -> dict[str, Any]:
  options = dict(dtype=config.model.dtype, remat=config.model.remat, attention_impl=config.model.attention_impl)
  if config.model.dropout >= 0:
    options["dropout"] = config.model.dropout
  return options


def model_hf_config(config) -> dict[str, Any]:
  """The Hugging Face config dict of the model a stage starts from (only config.json is read or fetched)."""
  if not config.init_from:
    return registry.preset(config.model.preset, **config.model.arch.to_dict()).to_hf_dict()
  path = resolve_init_path(config.init_from)
  if os.path.isdir(path):
    return hub.load_config(path)
  from huggingface_hub import hf_hub_download

  try:
    return hub.load_config(os.path.dirname(hf_hub_download(path, hub.CONFIG_FILE)))
  except Exception as e:  # not on the Hub, offline, gated: all say the same to the user
    raise config_lib.ConfigError(
        f"config.init_from = {config.init_from!r} is neither an existing local folder nor a model found on the "
        f"Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the path, or the "
        "Hub id and network access") from e


def check_inputs(config, tokenizer) -> None:
  """Checks the tokenizer, the starting model and the devices against each other and the config, before any data is
  tokenized or anything compiles (config_lib.check_inputs says what is compared)."""
  # A pad token the tokenizer needed gets a new embedding row (build_model), so it is not an id past the table.
  added_pad = 1 if embedding_rows(tokenizer) else 0
  config_lib.check_inputs(config, tokenizer_size=len(tokenizer) - added_pad, model_config=model_hf_config(config),
                          devices=jax.device_count())


def build_model(config, mesh, vocab_size: int = 0) -> nnx.Module:
  """The model the task trains, its parameters placed on the mesh by the FSDP rule; with at least `vocab_size`
  token rows (`tokenizer.embedding_rows`: a pad token the tokenizer needed; new rows start at the mean)."""
  compute = compute_options(config)
  shardings_fn = lambda abstract: parallel.tree_shardings(nnx.state(abstract), mesh, config.mesh.min_fsdp_size)
  if config.init_from:
    path = resolve_init_path(config.init_from)
    if config.task == "reward":
      model = reward.from_pretrained(path, heads=tuple(config.reward.heads), seed=config.seed,
                                     shardings_fn=shardings_fn, vocab_size=vocab_size, **compute)
    else:
      model = hub.from_pretrained(path, shardings_fn=shardings_fn, vocab_size=vocab_size, **compute)
  else:
    arch = registry.preset(config.model.preset, **config.model.arch.to_dict()).replace(**compute)
    arch, _ = hub.with_vocab_size(arch, vocab_size)
    if config.task == "reward":
      make = lambda: reward.RewardModel(arch, tuple(config.reward.heads), rngs=nnx.Rngs(config.seed))
    else:
      make = lambda: registry.build_causal_lm(arch, rngs=nnx.Rngs(config.seed))
    graphdef, abstract_state = nnx.split(nnx.eval_shape(make))
    shardings = parallel.tree_shardings(abstract_state, mesh, config.mesh.min_fsdp_size)
    state = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)()
    model = nnx.merge(graphdef, state)
  if config.lora.enabled:
    model = lora.apply_lora(model, targets=tuple(config.lora.targets), rank=config.lora.rank,
                            alpha=config.lora.alpha, dropout=config.lora.dropout, seed=config.seed)
  return model


def export_model(model: nnx.Module, out_dir: str, dtype: str = "", pad_token_id: int | None = None) -> None:
  """The trained model as a Hugging Face folder (a reward model scored at the last token that is not
  `pad_token_id`)."""
  if isinstance(model, reward.RewardModel):
    reward.save_pretrained(model, out_dir, pad_token_id=pad_token_id)
  else:
    hub.save_pretrained(lora.merge_lora(model) if lora.has_lora(model) else model, out_dir, dtype=dtype or None)


# -------------------------------------------------------------------------------------------------- optimizer


def learning_rate_schedule(opt_config, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0, then linear decay to 0 at `total_steps`, cosine decay, or constant."""
  lr, warmup = opt_config.lr, opt_config.warmup_steps
  decay_steps = max(total_steps - warmup, 1)
  if opt_config.schedule == "linear":
    after = optax.linear_schedule(lr, 0.0, decay_steps)
  elif opt_config.schedule == "cosine":
    after = optax.cosine_decay_schedule(lr, decay_steps)
  else:
    after = optax.constant_schedule(lr)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(opt_config, total_steps: int) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(opt_config, total_steps)
  # Like transformers' Trainer: no weight decay on biases and LayerNorm parameters (the 1-D ones).
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  if opt_config.name == "adamw":
    update = optax.adamw(schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
                         weight_decay=opt_config.weight_decay, mask=decay_mask)
  else:
    update = optax.chain(optax.scale_by_rms(decay=opt_config.b2, eps=opt_config.eps),
                         optax.add_decayed_weights(opt_config.weight_decay, decay_mask),
                         optax.scale_by_learning_rate(schedule))
  if opt_config.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(opt_config.grad_clip), update)
  return update


# ------------------------------------------------------------------------------------------------------- step


@dataclasses.dataclass
class TrainState:
  """What changes during training; all of it is checkpointed."""

  step: jax.Array
  params: nnx.State  # the trained parameters (all of them, or only the LoRA adapters)
  opt_state: Any


def split_model(model: nnx.Module, use_lora: bool):
  """(graphdef, trained parameters, everything else)."""
  return nnx.split(model, nnx.LoRAParam if use_lora else nnx.Param, ...)


def _micro_batches(batch: dict, accum: int) -> dict:
  """[B, ...] -> [accum, B/accum, ...], keeping each device's rows on that device (rows are interleaved)."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)


class StepFunctions:
  """The jit-compiled train and eval steps of one stage, with a count of how often each was compiled."""

  def __init__(self, task, graphdef, tx, root_key, *, accum: int, reference: reference_lib.Reference):
    self.compilations = {"train": 0, "eval": 0}
    self.shapes: set[tuple] = set()

    def reference_model(params, rest, reference_state):
      if reference.mode == "lora_off":
        return nnx.merge(graphdef, jax.tree.map(jnp.zeros_like, params), rest)
      if reference.mode == "model":
        return nnx.merge(reference.graphdef, reference_state)
      return None  # none, or precomputed: the log-probs come with the batch

    def loss_fn(params, rest, reference_state, batch, key):
      model = nnx.merge(graphdef, params, rest)
      return task.loss(model, batch, dropout_key=key, reference=reference_model(params, rest, reference_state))

    def train_step(state: TrainState, rest, reference_state, batch):
      self.compilations["train"] += 1  # runs only while tracing
      key = jax.random.fold_in(root_key, state.step)
      micro = _micro_batches(batch, accum)

      def accumulate(carry, inputs):
        grads_sum, metrics_sum = carry
        index, micro_batch = inputs
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, rest, reference_state, micro_batch, jax.random.fold_in(key, index))
        return (jax.tree.map(jnp.add, grads_sum, grads), jax.tree.map(jnp.add, metrics_sum, metrics)), None

      zeros_metrics = jax.eval_shape(lambda: loss_fn(state.params, rest, reference_state,
                                                     jax.tree.map(lambda x: x[0], micro), key)[1])
      init = (jax.tree.map(jnp.zeros_like, state.params),
              jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros_metrics))
      (grads, metrics), _ = jax.lax.scan(accumulate, init, (jnp.arange(accum), micro))
      grads = jax.tree.map(lambda g: g / accum, grads)
      metrics = jax.tree.map(lambda m: m / accum, metrics)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(g.astype(jnp.float32) ** 2) for g in jax.tree.leaves(grads)))
      metrics["tokens"] = task.tokens(batch).astype(jnp.float32)
      metrics["scored_tokens"] = task.scored_tokens(batch).astype(jnp.float32)
      return TrainState(state.step + 1, params, opt_state), metrics

    def eval_step(params, rest, reference_state, batch):
      self.compilations["eval"] += 1
      return loss_fn(params, rest, reference_state, batch, None)[1]

    self.train = jax.jit(train_step, donate_argnums=(0,))
    self.eval = jax.jit(eval_step)

  def precompile(self, state: TrainState, rest, reference_state, train_batches: list, eval_batches: list) -> None:
    """Compiles the train step for each of `train_batches`' shapes and the eval step for `eval_batches`', all at
    once on parallel threads, so the loop's first step of each shape does not stop to compile."""
    lowered = [self.train.lower(state, rest, reference_state, batch) for batch in train_batches]
    lowered += [self.eval.lower(state.params, rest, reference_state, batch) for batch in eval_batches]
    parallel.compile_all(lowered)


jax.tree_util.register_dataclass(TrainState, data_fields=["step", "params", "opt_state"], meta_fields=[])


# ------------------------------------------------------------------------------------------------------- loop


def _finite_or_raise(metrics: dict, step: int, last_checkpoint: int | None) -> None:
  loss = float(metrics["loss"])
  if not math.isfinite(loss):
    kept = (f"the last checkpoint, step {last_checkpoint}, was verified (checksums recorded, all values finite)"
            if last_checkpoint is not None else "no verified checkpoint exists")
    raise FloatingPointError(f"non-finite loss ({loss}) at step {step}; stopping. {kept}. Lower optimizer.lr, "
                             "check the data, or use model.dtype=float32.")


def evaluate(steps: StepFunctions, params, rest, reference_state, batches) -> dict[str, float]:
  """Metrics averaged over the held-out batches (each batch weighted equally; all have the same size)."""
  totals: dict[str, float] = {}
  for batch in batches:
    for k, v in jax.device_get(steps.eval(params, rest, reference_state, batch)).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  return {f"eval/{k}": v / len(batches) for k, v in totals.items()} if batches else {}


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
    return _train_locked(config, workdir, export_dir)


def _train_locked(config: ml_collections.ConfigDict, workdir: str, export_dir: str) -> str:
  tokenizer = load_tokenizer(pipeline.tokenizer_path(config, workdir))
  check_inputs(config, tokenizer)
  stage_start = time.perf_counter()
  seconds = {}  # wall time of the stage's parts, for done.json
  devices = jax.devices()[:config.mesh.num_devices] if config.mesh.num_devices > 0 else None
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, devices)
  task = tasks.make_task(config)
  stage_data = pipeline.load(config, tokenizer, task.batch_kind, mesh)

  model = build_model(config, mesh, embedding_rows(tokenizer))
  check_vocabulary(tokenizer, model.config.vocab_size)
  # Before the streams: precomputed reference log-probs travel with the batches.
  reference = reference_lib.prepare(task, model, stage_data, config, mesh, tokenizer.pad_token_id)
  reference_state = reference.state
  data = pipeline.streams(config, stage_data, mesh, tokenizer.pad_token_id, reference.per_pair())
  use_lora = config.lora.enabled
  graphdef, params, rest = split_model(model, use_lora)
  total_steps = data.total_steps
  tx = make_optimizer(config.optimizer, total_steps)
  param_shardings = parallel.tree_shardings(params, mesh, config.mesh.min_fsdp_size)
  opt_shardings = parallel.tree_shardings(jax.eval_shape(tx.init, params), mesh, config.mesh.min_fsdp_size)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  state_shardings = TrainState(parallel.replicated(mesh), param_shardings, opt_shardings)
  # Every input committed to its sharding up front, so the first step compiles the same program as the rest.
  state = jax.device_put(TrainState(jnp.zeros((), jnp.int32), params, opt_state), state_shardings)
  rest = parallel.shard_tree(rest, mesh, config.mesh.min_fsdp_size)
  root_key = jax.random.key(config.seed)

  checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                         save_every_steps=config.checkpoint.every_steps, keep=config.checkpoint.keep,
                                         async_save=config.checkpoint.async_save)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings)
  restored = checkpointer.restore_latest(abstract) if config.resume else None
  if not config.resume and checkpointer.steps():
    raise ValueError(f"{workdir} already has checkpoints {checkpointer.steps()} and resume=False: "
                     "use another --workdir, or drop --config.resume=False to continue that run")
  if restored is not None:
    state = restored.state
    data.train.restore(restored.extra["data"])
    log.info("resumed from step %d", restored.step)

  steps = StepFunctions(task, graphdef, tx, root_key, accum=config.training.grad_accum, reference=reference)
  metric_logger = MetricLogger(workdir, config, total_steps=total_steps, start_step=int(state.step),
                               step_flops=_training_flops(model, reference),
                               num_devices=mesh.size)
  seconds["setup"] = time.perf_counter() - stage_start  # data, model, reference pass, restore
  if config.training.precompile:
    start = time.perf_counter()
    train_examples = data.train.shape_examples(total_steps - int(state.step))
    eval_examples = data.eval_batches[:1]  # held-out batches share one shape
    steps.precompile(state, rest, reference_state, train_examples, eval_examples)
    seconds["precompile"] = time.perf_counter() - start
    log.info("compiled %d train and %d eval program(s) in %.1f s", len(train_examples), len(eval_examples),
             seconds["precompile"])
  start = time.perf_counter()
  step, pending = int(state.step), None  # pending: the previous step's metrics, read one step late (no host stall)
  try:
    with runguard.StopSignals(check_every=config.training.log_every) as stop_signals:
      while step < total_steps:
        batch = data.train.next_global()
        state, metrics = steps.train(state, rest, reference_state, batch)
        step += 1
        if pending is not None:
          metric_logger.train_step(*pending)
        pending = (step, metrics, data.train.last_shape)
        stopping = stop_signals.should_stop(step)
        save = checkpointer.should_save(step) or step == total_steps or stopping
        if save or step % config.training.log_every == 0:
          _finite_or_raise(jax.device_get(metrics), step, checkpointer.last_verified_step)
        if save:  # every record up to a checkpoint is written before it, so a resumed run logs each step once
          metric_logger.train_step(*pending)
          pending = None
        if config.training.eval_every and step % config.training.eval_every == 0 and step < total_steps:
          metric_logger.write(step, evaluate(steps, state.params, rest, reference_state, data.eval_batches))
        if save:
          checkpointer.save(step, state=state, extra={"data": data.train.state(), "config": config.to_dict()},
                            force=True)
        if stopping and step < total_steps:
          checkpointer.wait()
          message = (f"stopped by {stop_signals.received} after step {step} of {total_steps}: checkpoint step {step} "
                     f"saved in {checkpointer.directory}; rerun the same command to resume")
          log.warning(message)
          raise runguard.Preempted(message)
    if pending is not None:
      metric_logger.train_step(*pending)
    seconds["loop"] = time.perf_counter() - start  # the steps and their checkpoints
    final_eval = evaluate(steps, state.params, rest, reference_state, data.eval_batches)
    metric_logger.write(step, final_eval)
    checkpointer.wait()
  finally:
    checkpointer.close()
    metric_logger.close()

  summary = {"task": config.task, "init_from": config.init_from, "steps": step, "compilations": steps.compilations,
             **final_eval, "train_shapes": sorted(metric_logger.shapes)}
  log.info("compiled the train step %d time(s) for %d batch shape(s)", steps.compilations["train"],
           len(metric_logger.shapes))
  if config.export.enabled:
    export_model(nnx.merge(graphdef, state.params, rest), export_dir, config.export.dtype, tokenizer.pad_token_id)
  seconds["stage"] = time.perf_counter() - stage_start
  summary["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
  if jax.process_index() == 0:
    if config.export.enabled:
      tokenizer.save_pretrained(export_dir)  # the folder is then all evaluate.py needs
    with open(os.path.join(workdir, DONE_FILE), "w") as f:
      json.dump(summary, f, indent=2)
    curves_path = curves.write_stage_curves(workdir, config.task)
    if config.export.push_to_hub:
      hub_push.push_stage(config, workdir, export_dir, summary)
    if metric_logger.tracker is not None:
      metric_logger.tracker.finish(summary, [os.path.join(workdir, DONE_FILE), curves_path or ""])
  return export_dir


def _training_flops(model, reference: reference_lib.Reference):
  """Training FLOPs of a step as a function of (row length, tokens, scored tokens); a reference run in the step
  adds a forward."""
  arch = model.config
  extra = 1 if reference.runs_forward else 0
  return lambda seq_len, tokens, scored: flops.training_flops(arch, seq_len, tokens, scored, extra_forwards=extra)
