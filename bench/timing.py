"""Helpers shared by the CPU benchmarks: their small OPT, per-step timers, one jaxalign train step over a list of
batches."""

from __future__ import annotations

import statistics
import time


def small_opt_config():
  """The small OPT of the CPU benchmarks: 4 layers, hidden 256, 4 heads, ffn 1024, OPT's vocabulary, no dropout."""
  from jaxalign.models import opt

  return opt.OPTConfig(vocab_size=50272, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, ffn_dim=1024,
                       word_embed_proj_dim=256, dropout=0.0, attention_dropout=0.0)


class Timer:
  """Per-step times, with the examples and real tokens of each step and the alternation round it ran in."""

  def __init__(self):
    self.times: list[float] = []
    self.units: list[float] = []  # examples per step
    self.tokens: list[float] = []
    self.rounds: list[int] = []

  def add(self, seconds: float, examples: int, tokens: int, round_index: int) -> None:
    self.times.append(seconds)
    self.units.append(examples)
    self.tokens.append(tokens)
    self.rounds.append(round_index)

  def per_s(self) -> tuple[float, float]:
    """Median per-step examples/s and tokens/s."""
    return (statistics.median(u / t for u, t in zip(self.units, self.times)),
            statistics.median(k / t for k, t in zip(self.tokens, self.times)))

  def total_rate(self) -> float:
    """Examples/s over all timed steps (total examples / total time)."""
    return sum(self.units) / sum(self.times)

  def round_rate(self, round_index: int) -> float:
    """Examples/s over the steps of one round."""
    picked = [i for i, r in enumerate(self.rounds) if r == round_index]
    return sum(self.units[i] for i in picked) / sum(self.times[i] for i in picked)


class JaxVariant:
  """One jaxalign train step (step.StepFunctions) with its own state, over a list of batches (a layout's batch
  types); `reference`: "model" (a frozen copy run in the step), "precomputed" (log-probs in the batches' extras) or
  "none" (a loss without a reference term)."""

  def __init__(self, name, task, model, batches, tokens, *, reference: str, lr: float):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from configs import common
    from jaxalign import reference as reference_lib, step as step_lib
    from jaxalign.data import layouts

    self.name, self.batches, self.tokens = name, batches, tokens
    copy = lambda tree: jax.tree.map(lambda x: jnp.array(x, copy=True), tree)
    graphdef, params, rest = step_lib.split_model(model, use_lora=False)
    opt_config = common.get_config().optimizer
    opt_config.lr, opt_config.schedule, opt_config.weight_decay, opt_config.grad_clip = lr, "constant", 0.0, 1.0
    tx = step_lib.make_optimizer(opt_config, total_steps=1_000)
    params = copy(params)
    self.state = step_lib.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    self.rest = copy(rest)
    self.reference = reference_lib.Reference(reference)
    if reference == "model":
      reference_graphdef, reference_state = nnx.split(model)
      self.reference = reference_lib.Reference(reference, reference_graphdef, copy(reference_state))
    self.steps = step_lib.StepFunctions(task, graphdef, self.rest, tx, jax.random.key(0), accum=1,
                                        reference=self.reference)
    self._named = layouts.named_arrays
    self.timer = Timer()
    self.compile_s = 0.0

  def step(self, index: int):
    import jax

    self.state, metrics = self.steps.train(self.state, self.batches[index])
    return jax.block_until_ready(metrics)

  def compile(self, indices) -> None:
    """Runs one step per distinct batch shape among `indices` (the compilations), timed as compile_s."""
    seen = set()
    for i in indices:
      shape = tuple(sorted((k, v.shape) for k, v in self._named(self.batches[i]).items()))
      if shape in seen:
        continue
      seen.add(shape)
      start = time.perf_counter()
      self.step(i)
      self.compile_s += time.perf_counter() - start

  def run(self, indices, examples: int, round_index: int) -> None:
    for i in indices:
      start = time.perf_counter()
      self.step(i)
      self.timer.add(time.perf_counter() - start, examples, self.tokens[i], round_index)
