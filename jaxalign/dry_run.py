"""Will it fit? The memory a stage's train step needs per device, from XLA, before any weight or data is loaded.

`train.py --config.dry_run=True` builds the model abstractly (shapes only: the starting model's config.json is all
that is read), compiles the stage's train step for its largest batch (`training.batch_size` rows of the layout's
longest row, every position scored) on this machine's devices and the configured mesh, and prints XLA's memory
analysis: parameters, optimizer state, other inputs (frozen parameters, a reference copy, the batch), temporaries
and the per-device total. With `dry_run_memory` (e.g. "80GB") it also searches the largest batch size whose step
fits that budget. Nothing is trained or written.

On a GPU host the figure is what the card needs. XLA:CPU has no fused attention: it keeps every layer's full
[heads, length, length] score matrices for the backward pass, so on CPU the figure is an upper bound of what a
GPU with flash attention needs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign import (config_lib, logprobs, parallel, reference as reference_lib, rollout, stage_model,
                      step as step_lib, tasks)
from jaxalign.data import layouts, pipeline, tokenize
from jaxalign.models import lora, registry, reward

CPU_NOTE = ("XLA:CPU attention keeps each layer's full [heads, length, length] score matrices, so on CPU this is an "
            "upper bound: a GPU with fused (flash) attention needs less")
GENERATION_NOTE = ("an online stage also samples its completions between steps: the sampler's key-value cache (rows x "
                   "tokens x layers x 2 x key-value width) comes and goes beside these figures and is not in them")


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """Bytes per device of one compiled train step (XLA's memory analysis; the state is donated, so the new state
  reuses the old one's buffers)."""

  parameters: int  # the trained parameters' shards
  optimizer: int  # the optimizer state's shards
  arguments: int  # every input: the two above, frozen parameters, a reference copy, the batch
  outputs: int  # outputs not written over a donated input
  temporaries: int
  beside: int = 0  # held on the device beside the step: an online stage's reference model (it scores completions)

  @property
  def other_inputs(self) -> int:
    return self.arguments - self.parameters - self.optimizer

  @property
  def total(self) -> int:
    return self.arguments + self.outputs + self.temporaries + self.beside


def shard_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def step_memory(compiled, state, beside: int = 0) -> StepMemory:
  """The memory of a compiled train step whose (abstract, sharded) state is `state`, with `beside` bytes held next
  to it."""
  analysis = compiled.memory_analysis()
  return StepMemory(parameters=shard_bytes(state.params), optimizer=shard_bytes(state.opt_state),
                    arguments=analysis.argument_size_in_bytes,
                    outputs=analysis.output_size_in_bytes - analysis.alias_size_in_bytes,
                    temporaries=analysis.temp_size_in_bytes, beside=beside)


def held_beside_the_step(config, task, reference: reference_lib.Reference, mesh) -> int:
  """Bytes per device of an online stage's reference model: the rollout source runs it on the completions, so the
  step (which reads their log-probs from the batch) never takes it as an input."""
  if task.batch_kind != "prompts" or reference.state is None:
    return 0
  return shard_bytes(abstract(reference.state, parallel.tree_shardings(reference.state, mesh,
                                                                       config.mesh.min_fsdp_size)))


def abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_model(config) -> nnx.Module:
  """The stage's model with shapes and dtypes only (the starting model's config.json, no weights)."""
  compute = stage_model.compute_options(config)
  arch = (registry.config_from_hf(stage_model.model_hf_config(config), **compute) if config.init_from else
          registry.preset(config.model.preset, **config.model.arch.to_dict()).replace(**compute))

  def make():
    if tasks.spec(config.task).reward_model:
      model = reward.RewardModel(arch, tuple(config.reward.heads), rngs=nnx.Rngs(0))
    else:
      model = registry.build_causal_lm(arch, rngs=nnx.Rngs(0))
    if config.lora.enabled:
      model = lora.apply_lora(model, targets=tuple(config.lora.targets), rank=config.lora.rank,
                              alpha=config.lora.alpha, dropout=config.lora.dropout, seed=config.seed)
    return model

  return nnx.eval_shape(make)


def _full_pairs(config, rows: int) -> tokenize.TokenizedPairs:
  """`rows` pairs as long as the data config allows: a max_prompt_length prompt and two responses filling
  max_length."""
  prompt, response = config.data.max_prompt_length, config.data.max_length - config.data.max_prompt_length
  ids = lambda n: np.full(n, 3, np.int32)
  flags = np.zeros(rows, bool)
  return tokenize.TokenizedPairs([ids(prompt)] * rows, [ids(response)] * rows, [ids(response)] * rows, flags, flags,
                                 flags)


def largest_batch(config, task, reference: reference_lib.Reference, batch_size: int):
  """A host batch of the stage's largest shape: `batch_size` rows of the layout's longest row, each position
  scored, with the per-pair arrays the step reads (precomputed reference log-probs, KTO labels, reward heads)."""
  if task.batch_kind == "prompts":  # online: prompt groups of the longest row (what the rollout source compiles)
    layout = rollout.group_layout(config)
    return rollout.zero_batch(layout, batch_size // layout.num_generations, layout.ladder[-1],
                              with_reference=task.uses_reference)
  layout = pipeline.layout_for(config, task.batch_kind)
  pairs = _full_pairs(config, 1)
  examples = layout.examples(tokenize.sft_examples(pairs, max_length=config.data.max_length)
                             if task.batch_kind == "sft" else pairs)
  per_pair = {}
  if reference.mode == "precomputed":
    per_pair = {name: np.zeros(1, np.float32) for name in reference_lib.PER_PAIR_NAMES}
  if task.batch_kind == "unpaired":
    per_pair["desirable"] = np.ones(1, np.int32)
  if tasks.spec(config.task).reward_model:
    per_pair["head"] = np.zeros(1, np.int32)
  length = layout.row_limit
  return layout.collate(examples, np.zeros(batch_size, np.int64), length, 0, width=length, per_pair=per_pair or None)


def abstract_reference(config, task, model: nnx.Module) -> reference_lib.Reference:
  """The reference the step will be given, as shapes (reference.prepare without computing anything)."""
  if not task.uses_reference:
    return reference_lib.Reference("none")
  if config.dpo.reference == "precomputed":
    return reference_lib.Reference("precomputed")
  if config.lora.enabled:
    return reference_lib.Reference("lora_off")
  graphdef, state = nnx.split(model)
  return reference_lib.Reference("model", graphdef,
                                 jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, config.dpo.reference_dtype),
                                              state))


def compile_step(config, task, model: nnx.Module, reference: reference_lib.Reference, host_batch, mesh):
  """The stage's train step (the trainer's own) compiled for batches shaped as `host_batch`, with every input
  abstract and sharded as in training. Returns (the compiled step, its abstract state)."""
  graphdef, params, rest = step_lib.split_model(model, config.lora.enabled)
  tx = step_lib.make_optimizer(config.optimizer, total_steps=1)  # the schedule changes values, not shapes
  shardings = lambda tree: parallel.tree_shardings(tree, mesh, config.mesh.min_fsdp_size)
  params = abstract(params, shardings(params))
  opt_state = jax.eval_shape(tx.init, params)
  state = step_lib.TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=parallel.replicated(mesh)), params,
                              abstract(opt_state, shardings(opt_state)))
  if reference.state is not None:
    reference = dataclasses.replace(reference, state=abstract(reference.state, shardings(reference.state)))
  batch_sharding = parallel.batch_sharding(mesh)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding), host_batch)
  steps = step_lib.StepFunctions(task, graphdef, abstract(rest, shardings(rest)), tx, jax.random.key(config.seed),
                                 accum=config.training.grad_accum, reference=reference)
  return steps.lower_train(state, batch).compile(), state


def scored_shape(host_batch, accum: int) -> tuple[int, int]:
  """(rows, positions) at which one micro-batch of `host_batch` runs the LM head: its target arrays (chosen and
  rejected rows together; a prompt group's completions side by side in its row)."""
  if isinstance(host_batch, layouts.RolloutBatch):
    prompts, groups, width = host_batch.group.targets.shape
    return prompts // accum, groups * width
  shapes = [getattr(host_batch, field.name).shape for field in dataclasses.fields(host_batch)
            if field.name.endswith("targets") and getattr(host_batch, field.name) is not None]
  return sum(shape[0] for shape in shapes) // accum, max(shape[1] for shape in shapes)


def largest_fitting(fits, start: int, limit: int = 2**16) -> int:
  """The largest n in [1, limit] with fits(n) (assumed monotone: true up to some n, false after), found by
  doubling or halving from `start`, then bisection; 0 when n = 1 does not fit."""
  if fits(start):
    low, high = start, 2 * start
    while high <= limit and fits(high):
      low, high = high, 2 * high
    if high > limit:
      return low
  else:
    low, high = start // 2, start
    while low and not fits(low):
      low, high = low // 2, low
    if not low:
      return 0
  while high - low > 1:  # fits(low), not fits(high)
    middle = (low + high) // 2
    low, high = (middle, high) if fits(middle) else (low, middle)
  return low


def gib(n: int) -> str:
  return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def describe(memory: StepMemory) -> str:
  rows = [("parameters (trained)", memory.parameters), ("optimizer state", memory.optimizer),
          ("other inputs (frozen parameters, reference, batch)", memory.other_inputs),
          ("temporaries", memory.temporaries), ("outputs not donated", memory.outputs),
          *([("reference model beside the step (online)", memory.beside)] if memory.beside else []),
          ("total per device", memory.total)]
  return "\n".join(f"  {name:<52} {gib(value):>14}" for name, value in rows)


def run(config) -> list[StepMemory]:
  """Prints the memory of the stage's train step (of each stage of a study, a stage starting from an earlier one
  having that one's architecture) at its largest batch, and with `dry_run_memory` the largest batch size that fits
  that budget per device; trains nothing. Returns the figures at `training.batch_size`, one per stage."""
  if not config.stages:
    return [run_stage(config, config.dry_run_memory)]
  starts, figures = {}, []
  for name in config.stages:
    stage = config_lib.resolve_stage(config, name, starts)
    starts[name] = stage.init_from
    print(f"stage {name}:")
    figures.append(run_stage(stage, config.dry_run_memory))
  return figures


def run_stage(config, memory_budget: str) -> StepMemory:
  """`run` for one stage."""
  devices = jax.devices()[:config.mesh.num_devices] if config.mesh.num_devices > 0 else None
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, devices)
  task = tasks.make_task(config)
  model = abstract_model(config)
  reference = abstract_reference(config, task, model)

  beside = held_beside_the_step(config, task, reference, mesh)

  def measure(batch) -> StepMemory:
    return step_memory(*compile_step(config, task, model, reference, batch, mesh), beside)

  batch = largest_batch(config, task, reference, config.training.batch_size)
  memory = measure(batch)
  rows, length = jax.tree.leaves(batch)[0].shape  # the (first) input ids
  device = jax.devices()[0]
  print(f"dry run of task {config.task} ({config.model.dtype} compute, {type(model).__name__}): one train step at "
        f"its largest batch, {rows} rows of {length} tokens every position scored, "
        f"{config.training.grad_accum} micro-batch(es), on a {dict(mesh.shape)} mesh of {device.device_kind} "
        f"devices; XLA's memory analysis per device:\n{describe(memory)}")
  if isinstance(task, tasks.ReadsLMHead):
    rows, scored = scored_shape(batch, config.training.grad_accum)
    print(f"  log-probs: {logprobs.describe(task.logprob_chunks, model, rows, scored)}")
  if memory_budget:
    budget = config_lib.parse_bytes(memory_budget)
    # Batch sizes split evenly into micro-batches and devices (online: of whole prompt groups of G completions).
    online = task.batch_kind == "prompts"
    unit = config.training.grad_accum * mesh.size * (config.online.num_generations if online else 1)
    steps = "grad_accum x devices" + (" x online.num_generations" if online else "")
    fits = lambda n: measure(largest_batch(config, task, reference, n * unit)).total <= budget
    best = largest_fitting(fits, max(config.training.batch_size // unit, 1))
    print(f"largest training.batch_size whose step fits {gib(budget)} per device: "
          + (f"{best * unit} (in steps of {unit}: {steps})" if best else "none (not even "
             f"{unit}); lower data.max_length, or use model.remat, mesh.fsdp or LoRA"))
  if task.batch_kind == "prompts":
    print(f"note: {GENERATION_NOTE}")
  if device.platform == "cpu":
    print(f"note: {CPU_NOTE}")
  return memory
