"""The train state and the jit-compiled steps of a stage: the optimizer and its schedule, the train step (gradient
accumulation over micro-batches, the state donated), the eval step and held-out evaluation, and compiling them
ahead of the loop.

The step is the same for every task: it merges the model from its graph, the trained parameters and the rest, asks
the task for its loss and the reference for its model (`reference.Reference.model`: a model, or None when there is
none or its log-probs travel with the batch), and applies the averaged gradients.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxalign import flops, parallel


@dataclasses.dataclass
class TrainState:
  """What changes during training; all of it is checkpointed."""

  step: jax.Array
  params: nnx.State  # the trained parameters (all of them, or only the LoRA adapters)
  opt_state: Any


jax.tree_util.register_dataclass(TrainState, data_fields=["step", "params", "opt_state"], meta_fields=[])


def initial_state(params, tx, mesh, min_fsdp_size: int) -> tuple[TrainState, TrainState]:
  """The train state at step 0 and its shardings (parameters and optimizer state by the FSDP rule)."""
  param_shardings = parallel.tree_shardings(params, mesh, min_fsdp_size)
  opt_shardings = parallel.tree_shardings(jax.eval_shape(tx.init, params), mesh, min_fsdp_size)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  shardings = TrainState(parallel.replicated(mesh), param_shardings, opt_shardings)
  # Every input committed to its sharding up front, so the first step compiles the same program as the rest.
  return jax.device_put(TrainState(jnp.zeros((), jnp.int32), params, opt_state), shardings), shardings


def split_model(model: nnx.Module, use_lora: bool):
  """(graphdef, trained parameters, everything else)."""
  return nnx.split(model, nnx.LoRAParam if use_lora else nnx.Param, ...)


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


def micro_batches(batch, accum: int):
  """[B, ...] -> [accum, B/accum, ...], keeping each device's rows on that device (rows are interleaved)."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)


def _accumulated(loss_fn, params, micro, key, accum: int):
  """Gradients and metrics of `loss_fn(params, micro_batch, key)` averaged over the micro-batches (a scan)."""

  def accumulate(carry, inputs):
    grads_sum, metrics_sum = carry
    index, micro_batch = inputs
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, micro_batch,
                                                                    jax.random.fold_in(key, index))
    return (jax.tree.map(jnp.add, grads_sum, grads), jax.tree.map(jnp.add, metrics_sum, metrics)), None

  zeros_metrics = jax.eval_shape(lambda: loss_fn(params, jax.tree.map(lambda x: x[0], micro), key)[1])
  init = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros_metrics))
  (grads, metrics), _ = jax.lax.scan(accumulate, init, (jnp.arange(accum), micro))
  return jax.tree.map(lambda g: g / accum, grads), jax.tree.map(lambda m: m / accum, metrics)


class StepFunctions:
  """The jit-compiled train and eval steps of one stage, with a count of how often each was compiled.

  Holds what the steps read but never change, passed to the compiled programs as arguments (not baked in as
  constants): `rest`, the model's variables that are not trained, and the reference's arrays
  (`reference.arrays`). Callers hand over only the train state (or its parameters) and a batch.
  """

  def __init__(self, task, graphdef, rest, tx, root_key, *, accum: int, reference):
    self.graphdef, self.rest, self.reference = graphdef, rest, reference
    self.compilations = {"train": 0, "eval": 0}

    def loss_fn(params, rest, reference_arrays, batch, key):
      model = nnx.merge(graphdef, params, rest)
      return task.loss(model, batch, dropout_key=key,
                       reference=reference.model(graphdef, params, rest, reference_arrays))

    def train_step(state: TrainState, rest, reference_arrays, batch):
      self.compilations["train"] += 1  # runs only while tracing
      key = jax.random.fold_in(root_key, state.step)
      grads, metrics = _accumulated(lambda p, b, k: loss_fn(p, rest, reference_arrays, b, k), state.params,
                                    micro_batches(batch, accum), key, accum)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(g.astype(jnp.float32) ** 2) for g in jax.tree.leaves(grads)))
      metrics["tokens"] = task.tokens(batch).astype(jnp.float32)
      metrics["scored_tokens"] = task.scored_tokens(batch).astype(jnp.float32)
      return TrainState(state.step + 1, params, opt_state), metrics

    def eval_step(params, rest, reference_arrays, batch):
      self.compilations["eval"] += 1
      return loss_fn(params, rest, reference_arrays, batch, None)[1]

    self._train = jax.jit(train_step, donate_argnums=(0,))
    self._eval = jax.jit(eval_step)

  def model(self, params) -> nnx.Module:
    """The trained model with `params` (e.g. the train state's, to export or to sample from)."""
    return nnx.merge(self.graphdef, params, self.rest)

  def train(self, state: TrainState, batch) -> tuple[TrainState, dict]:
    """One optimizer step on a global batch; `state` is donated (do not use it after)."""
    return self._train(state, self.rest, self.reference.arrays, batch)

  def eval(self, params, batch) -> dict:
    """The task's metrics of a held-out global batch."""
    return self._eval(params, self.rest, self.reference.arrays, batch)

  def lower_train(self, state: TrainState, batch):
    """The train step lowered for `batch`'s shapes (e.g. to compile, or to read XLA's cost analysis)."""
    return self._train.lower(state, self.rest, self.reference.arrays, batch)

  def precompile(self, state: TrainState, train_batches: list, eval_batches: list) -> None:
    """Compiles the train step for each of `train_batches`' shapes and the eval step for `eval_batches`', all at
    once on parallel threads, so the loop's first step of each shape does not stop to compile."""
    lowered = [self.lower_train(state, batch) for batch in train_batches]
    lowered += [self._eval.lower(state.params, self.rest, self.reference.arrays, batch) for batch in eval_batches]
    parallel.compile_all(lowered)

  def evaluate(self, params, batches: list) -> dict[str, float]:
    """Metrics averaged over the held-out batches (each batch weighted equally; all have the same size)."""
    totals: dict[str, float] = {}
    for batch in batches:
      for k, v in jax.device_get(self.eval(params, batch)).items():
        totals[k] = totals.get(k, 0.0) + float(v)
    return {f"eval/{k}": v / len(batches) for k, v in totals.items()} if batches else {}


def training_flops(model: nnx.Module, reference):
  """Training FLOPs of a step as a function of (row length, tokens, scored tokens); a reference run in the step
  adds a forward."""
  arch = model.config
  extra = 1 if reference.runs_forward else 0
  return lambda seq_len, tokens, scored: flops.training_flops(arch, seq_len, tokens, scored, extra_forwards=extra)
