"""The online batch source (the `sources.Source` protocol) of GRPO, RLOO and online DPO: training prompts in a
seeded, resumable order -> `num_generations` completions each from the CURRENT policy (`sampling.Sampler`, the
prompt prefilled once per group, sharded over the mesh like the step) -> rewards (`rewards.py`, each logged by name)
-> the task's advantages -> a `layouts.RolloutBatch` per step.

TRL's buffering: a generation batch of `steps_per_generation` steps' prompts is sampled every
`steps_per_generation x num_iterations` steps and handed out a slice (one step's prompts) at a time, slice
`step % steps_per_generation`; its sampling-time per-token log-probs are the "old" policy of the ratio. With
`dynamic_sampling` (DAPO), groups whose rewards are all equal are dropped and refilled from further prompts (more
generation rounds, at most `dynamic_sampling_max_rounds`; if still short, dropped groups fill the batch), counted in
the metrics. The reference's log-probs (a KL term) are computed once per generation, with the reference of
`reference.py` (a frozen copy, or the LoRA base with adapters off); none when the loss has no KL.

Resumable: `state()` holds the prompt order's position, how many steps were served and sampler rounds run (each
round's key is fold_in(sampling key, round)), and the unserved part of the generation batch (its host arrays), so
a run killed mid-generation and resumed trains on the same batches. Every log step, the generation's completions
(prompt, completion, each reward, advantage) are appended to `<workdir>/completions.jsonl` and handed to the logger
(`tables`), which shows them in TensorBoard and W&B when those are on.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import math
import os
import time

import jax
import numpy as np

from jaxalign import config_lib, parallel, rewards as rewards_lib, sampling, shapes, tasks
from jaxalign.data import batches as batches_lib, layouts, tokenize
from jaxalign.data.prompts import PromptRecord

log = logging.getLogger(__name__)

COMPLETIONS_FILE = "completions.jsonl"
COMPLETIONS_TABLE = "completions"  # its name in TensorBoard / W&B (under train/)
SAMPLING_STREAM = 0x5A4D  # the sampler's keys: fold_in(key(seed), SAMPLING_STREAM), then the round


# ----------------------------------------------------------------------------------------------- prompt order


class PromptOrder:
  """Prompt indices in a fresh seeded permutation each epoch, taken n at a time across epoch boundaries."""

  def __init__(self, count: int, seed: int):
    self.count, self.seed, self.epoch, self.position = count, seed, 0, 0

  def permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.count)

  def take(self, n: int) -> list[int]:
    out: list[int] = []
    while len(out) < n:
      k = min(n - len(out), self.count - self.position)
      out.extend(int(i) for i in self.permutation(self.epoch)[self.position:self.position + k])
      self.position += k
      if self.position == self.count:
        self.epoch, self.position = self.epoch + 1, 0
    return out

  def state(self) -> dict:
    return {"epoch": self.epoch, "position": self.position}

  def restore(self, state: dict) -> None:
    self.epoch, self.position = int(state["epoch"]), int(state["position"])


# ------------------------------------------------------------------------------------------ generated groups


@dataclasses.dataclass
class Generated:
  """Sampled and scored prompt groups on the host: P prompts, G completions each, C token slots."""

  records: list[PromptRecord]
  prompt_ids: list[np.ndarray]  # P, as sampled (cut to their last max_prompt_length tokens)
  prompt_texts: list[str]  # P, as the model saw them
  tokens: np.ndarray  # [P, G, C] int32
  lengths: np.ndarray  # [P, G] int32
  finished: np.ndarray  # [P, G] bool: ended by EOS or a stop sequence
  logps: np.ndarray  # [P, G, C] float32: the sampling-time log-probs
  texts: list[list[str]]  # [P][G] completion texts given to the rewards
  per_reward: np.ndarray  # [P, G, rewards] float32 (NaN: no reward)

  def take(self, indices) -> Generated:
    pick = lambda values: [values[i] for i in indices]
    return Generated(pick(self.records), pick(self.prompt_ids), pick(self.prompt_texts), self.tokens[indices],
                     self.lengths[indices], self.finished[indices], self.logps[indices], pick(self.texts),
                     self.per_reward[indices])

  @staticmethod
  def concat(parts: list[Generated]) -> Generated:
    lists = lambda name: [x for part in parts for x in getattr(part, name)]
    arrays = lambda name: np.concatenate([getattr(part, name) for part in parts])
    return Generated(lists("records"), lists("prompt_ids"), lists("prompt_texts"), arrays("tokens"),
                     arrays("lengths"), arrays("finished"), arrays("logps"), lists("texts"), arrays("per_reward"))

  def completion_ids(self, p: int) -> list[np.ndarray]:
    return [self.tokens[p, g, :self.lengths[p, g]] for g in range(self.tokens.shape[1])]


def varied_groups(combined: np.ndarray) -> np.ndarray:
  """[P] bool: the groups ([P, G] combined rewards) whose scored rewards are not all equal (a learning signal)."""
  low, high = np.nanmin(np.where(np.isnan(combined), np.inf, combined), 1), np.nanmax(
      np.where(np.isnan(combined), -np.inf, combined), 1)
  return np.isfinite(low) & (high > low)


def completion_metrics(lengths: np.ndarray, finished: np.ndarray) -> dict[str, float]:
  """TRL's completions/* metrics of completion lengths (and of the terminated ones, those that ended)."""
  lengths, finished = lengths.reshape(-1).astype(np.float64), finished.reshape(-1)
  ended = lengths[finished]
  stat = lambda values, f: float(f(values)) if values.size else 0.0
  return {"completions/mean_length": lengths.mean(), "completions/min_length": lengths.min(),
          "completions/max_length": lengths.max(), "completions/clipped_ratio": float(1 - finished.mean()),
          "completions/mean_terminated_length": stat(ended, np.mean),
          "completions/min_terminated_length": stat(ended, np.min),
          "completions/max_terminated_length": stat(ended, np.max)}


# ---------------------------------------------------------------------------------------- buffer (de)coding


def encode_arrays(tree) -> list[dict]:
  """A pytree's leaves (numpy) as JSON-serialisable records (dtype, shape, base64 bytes), in leaf order."""
  return [{"dtype": str(x.dtype), "shape": list(x.shape),
           "data": base64.b64encode(np.ascontiguousarray(x).tobytes()).decode()} for x in jax.tree.leaves(tree)]


def decode_arrays(records: list[dict], treedef):
  """The pytree `encode_arrays` wrote, with the structure `treedef`."""
  leaves = [np.frombuffer(base64.b64decode(r["data"]), dtype=r["dtype"]).reshape(r["shape"]).copy() for r in records]
  return jax.tree.unflatten(treedef, leaves)


def _json_floats(metrics: dict) -> dict:
  return {k: (None if isinstance(v, float) and math.isnan(v) else float(v)) for k, v in metrics.items()}


def _from_json_floats(metrics: dict) -> dict:
  return {k: (math.nan if v is None else v) for k, v in metrics.items()}


# ------------------------------------------------------------------------------------------------- the source


class RolloutSource:
  """Batches sampled from the current policy as training goes (module docstring); the `sources.Source` protocol."""

  def __init__(self, config, records: list[PromptRecord], mesh, tokenizer, reference, *, graphdef, rest,
               workdir: str):
    online = config.online
    self.task, self.records, self.tokenizer = tasks.make_task(config), records, tokenizer
    self.graphdef, self.rest, self.reference, self.workdir = graphdef, rest, reference, workdir
    self.num_generations, self.max_completion_length = online.num_generations, online.max_completion_length
    self.steps_per_generation, self.num_iterations = online.steps_per_generation, online.num_iterations
    self.dynamic_rounds = online.dynamic_sampling_max_rounds if online.dynamic_sampling else 1
    self.accum, self.log_every = config.training.grad_accum, config.training.log_every
    self.prompts_per_step = config.training.batch_size // online.num_generations
    if (self.prompts_per_step // self.accum) % mesh.size:
      raise ValueError(f"config.training.batch_size = {config.training.batch_size} completions are "
                       f"{self.prompts_per_step} prompt groups per step, {self.prompts_per_step // self.accum} per "
                       f"micro-batch, which do not split over {mesh.size} devices: make the groups per micro-batch "
                       f"a multiple of {mesh.size}")
    self.sharding = parallel.batch_sharding(mesh)
    self.max_prompt_length = config.data.max_prompt_length
    self.layout = group_layout(config)
    self.rewards = _make_rewards(config)
    self.chat, self.stop_strings, self.options = _prompt_style(config, tokenizer, records)
    self.samplers: dict[int, sampling.Sampler] = {}
    self.sampling_key = jax.random.fold_in(jax.random.key(config.seed), SAMPLING_STREAM)
    self._ref_logps = _reference_logps(self.task, reference, graphdef) if self.task.uses_reference else None
    self.order = PromptOrder(len(records), config.seed)
    self.total_steps = config.training.max_steps if config.training.max_steps > 0 else math.ceil(
        config.training.num_epochs * len(records) / (self.prompts_per_step * self.steps_per_generation)
    ) * self.steps_per_generation * self.num_iterations
    self.held_out: list = []
    self.served, self.rounds = 0, 0  # steps handed out; sampler rounds run
    self.buffer: list | None = None  # the generation batch's host slices
    self.buffer_metrics: dict[str, float] = {}
    self._metrics: dict[str, float] = {}
    self._tables: dict[str, list[dict]] = {}  # the completions table's rows not yet handed to the logger
    self._last_shape: tuple[int, ...] = ()
    self._handed_out = None  # perf_counter() when the last batch was handed out

  # --- the protocol

  def next(self, state):
    generate_every = self.steps_per_generation * self.num_iterations
    if self.served % generate_every == 0 or self.buffer is None:
      self.buffer, self.buffer_metrics = self._generate(state.params)
      self._metrics = dict(self.buffer_metrics)
    else:
      self._metrics = {k: v for k, v in self.buffer_metrics.items() if not k.startswith("time/")}
    host = self.buffer[self.served % self.steps_per_generation]
    self.served += 1
    self._last_shape = (host.group.input_ids.shape[0], host.group.input_ids.shape[1],
                        self.num_generations * self.max_completion_length)
    self._handed_out = time.perf_counter()
    return batches_lib.to_global(_host_rows(host), self.sharding)

  @property
  def last_shape(self) -> tuple[int, ...]:
    return self._last_shape

  def precompile_batches(self, steps_left: int) -> list:
    """A zero batch of the longest row length, which a step reaches when any of its rows (a prompt with all its
    completions) is long; a shorter length compiles when a batch first needs it (the lengths depend on the samples,
    and compiling the whole ladder cost more than the quickstart's steps)."""
    return [batches_lib.to_global(_host_rows(self.zero_batch(self.layout.ladder[-1])), self.sharding)]

  def metrics(self) -> dict[str, float]:
    return self._metrics

  def tables(self) -> dict[str, list[dict]]:
    tables, self._tables = self._tables, {}
    return tables

  def state(self) -> dict:
    pending = self.served % (self.steps_per_generation * self.num_iterations) != 0
    return {"served": self.served, "rounds": self.rounds, "order": self.order.state(),
            "buffer": [encode_arrays(batch) for batch in self.buffer] if pending and self.buffer else None,
            "buffer_metrics": _json_floats(self.buffer_metrics) if pending else {}}

  def restore(self, state: dict) -> None:
    self.served, self.rounds = int(state["served"]), int(state["rounds"])
    self.order.restore(state["order"])
    treedef = jax.tree.structure(self.zero_batch(self.layout.ladder[0]))
    self.buffer = [decode_arrays(records, treedef) for records in state["buffer"]] if state["buffer"] else None
    self.buffer_metrics = _from_json_floats(state["buffer_metrics"])

  def zero_batch(self, length: int) -> layouts.RolloutBatch:
    """A batch of one step's shape with row length `length` and nothing in it (for compiling)."""
    return zero_batch(self.layout, self.prompts_per_step, length, with_reference=self._ref_logps is not None)

  # --- generating a batch

  def _generate(self, params) -> tuple[list[layouts.RolloutBatch], dict[str, float]]:
    """The next generation batch's slices and metrics: rounds of sampling and scoring (more than one only with
    dynamic sampling, while groups without a signal were dropped), then reference log-probs and advantages."""
    start = time.perf_counter()
    jax.block_until_ready(params)  # the steps before this one: their time is the update's, not generation's
    timing = {"time/update": start - self._handed_out if self._handed_out is not None else 0.0,
              "time/generation": 0.0, "time/scoring": 0.0}
    timing["time/update"] += time.perf_counter() - start
    needed = self.prompts_per_step * self.steps_per_generation
    kept, dropped, rounds = [], [], 0
    while rounds < self.dynamic_rounds and sum(len(part.records) for part in kept) < needed:
      generated = self._round(params, needed, timing)
      rounds += 1
      if self.dynamic_rounds == 1:
        kept.append(generated)
        break
      combined = rewards_lib.combine(self.rewards, generated.per_reward.reshape(-1, len(self.rewards)))[0]
      varied = varied_groups(combined.reshape(needed, -1))
      kept.append(generated.take(np.flatnonzero(varied)))
      dropped.append(generated.take(np.flatnonzero(~varied)))
    short = max(needed - sum(len(part.records) for part in kept), 0)
    generated = Generated.concat(kept + dropped).take(np.arange(needed))
    metrics = {**timing, "generation/tokens_per_second": float(generated.lengths.sum()) / max(
        timing["time/generation"], 1e-9)}
    if self.dynamic_rounds > 1:
      metrics.update({"dynamic_sampling/rounds": float(rounds), "dynamic_sampling/filled_without_signal": float(
          short), "dynamic_sampling/dropped_groups": float(sum(len(part.records) for part in dropped))})
    slices, batch_metrics = self._assemble(params, generated)
    return slices, {**metrics, **batch_metrics}

  def _round(self, params, prompts: int, timing: dict) -> Generated:
    """One sampler call on the next `prompts` prompts, then the rewards of its completions."""
    start = time.perf_counter()
    records = [self.records[i] for i in self.order.take(prompts)]
    prompt_texts, prompt_ids = self._encode(records)
    length = shapes.fit(max(len(ids) for ids in prompt_ids), shapes.power_ladder(self.max_prompt_length))
    input_ids, mask = sampling.left_padded(prompt_ids, prompts, length, self.options.pad_id)
    key = jax.random.fold_in(self.sampling_key, self.rounds)
    self.rounds += 1
    samples = self._sampler(params, prompts, length)((params, self.rest), input_ids, mask, key)
    shape = (prompts, self.num_generations, -1)
    tokens, lengths = parallel.host_numpy(samples.tokens).reshape(shape), parallel.host_numpy(samples.lengths)
    finished = parallel.host_numpy(samples.finish_reasons) == sampling.FinishReason.STOP
    logps = parallel.host_numpy(samples.logprobs).reshape(shape)
    scored = time.perf_counter()
    timing["time/generation"] += scored - start
    lengths, finished = lengths.reshape(shape[:2]), finished.reshape(shape[:2])
    generated = Generated(records, [np.asarray(ids, np.int32) for ids in prompt_ids], prompt_texts, tokens, lengths,
                          finished, logps, [], np.zeros(0))
    generated.texts, generated.per_reward = self._score(generated)
    timing["time/scoring"] += time.perf_counter() - scored
    return generated

  def _encode(self, records: list[PromptRecord]) -> tuple[list[str], list[list[int]]]:
    """The prompts as the model sees them (rendered with the chat template when there is one) and their ids, each
    cut to its last max_prompt_length tokens."""
    if self.chat:
      texts = [tokenize.render(self.tokenizer, r.prompt, generation_prompt=True) if not isinstance(r.prompt, str)
               else tokenize.render_prompts(self.tokenizer, [r.prompt])[0][0] for r in records]
    else:
      texts = [r.prompt for r in records]
    ids, _ = sampling.encode_prompts(self.tokenizer, texts, self.max_prompt_length, add_special_tokens=not self.chat)
    return texts, ids

  def _sampler(self, params, prompts: int, length: int) -> sampling.Sampler:
    """The sampler of this prompt length (built once; every call brings the current parameters)."""
    if length not in self.samplers:
      self.samplers[length] = sampling.Sampler(self.graphdef, (params, self.rest),
                                               batch_size=prompts, prompt_length=length, options=self.options,
                                               num_generations=self.num_generations, sharding=self.sharding)
    return self.samplers[length]

  def _score(self, generated: Generated) -> tuple[list[list[str]], np.ndarray]:
    """The completions' texts (decoded, cut at the first stop string) and every reward of each, [P, G, rewards]."""
    groups = self.num_generations
    texts = [[sampling.trim_response(self.tokenizer.decode(ids, skip_special_tokens=True), self.stop_strings)
              for ids in generated.completion_ids(p)] for p in range(len(generated.records))]
    rows = [(record, p, g) for p, record in enumerate(generated.records) for g in range(groups)]
    conversational = [not isinstance(record.prompt, str) for record, _, _ in rows]
    completions = [[{"role": "assistant", "content": texts[p][g]}] if chat else texts[p][g]
                   for (_, p, g), chat in zip(rows, conversational)]
    names = set.intersection(*(set(record.columns) for record in generated.records))
    columns = {name: [record.columns[name] for record, _, _ in rows] for name in sorted(names)}
    per_reward = rewards_lib.score(self.rewards, [record.prompt for record, _, _ in rows], completions,
                                   [list(map(int, generated.tokens[p, g, :generated.lengths[p, g]]))
                                    for _, p, g in rows], columns, num_generations=groups)
    return texts, per_reward.reshape(len(generated.records), groups, -1)

  def _assemble(self, params, generated: Generated) -> tuple[list[layouts.RolloutBatch], dict[str, float]]:
    """The generation batch's slices (one step's prompt groups each, in the group layout, with the reference's
    log-probs when the loss has a KL term), the advantages over the whole batch, and the batch's metrics."""
    prompts, groups, width = generated.tokens.shape
    per_step = self.prompts_per_step
    combined, metrics = rewards_lib.combine(self.rewards, generated.per_reward.reshape(prompts * groups, -1))
    mask = (np.arange(width) < generated.lengths[..., None]).astype(np.float32)  # [P, G, C]
    group_batches = [self._group(generated, range(s * per_step, (s + 1) * per_step))
                     for s in range(self.steps_per_generation)]
    ref = None
    if self._ref_logps is not None:
      on_mesh = lambda group: batches_lib.to_global(_host_rows(group), self.sharding)
      ref = np.concatenate([parallel.host_numpy(self._ref_logps(params, self.rest, self.reference.arrays,
                                                                on_mesh(group))) for group in group_batches])
    flat = lambda x: None if x is None else x.reshape(prompts * groups, *x.shape[2:])
    used, advantages, advantage_metrics = self.task.advantages(combined, flat(generated.logps), flat(ref), flat(mask),
                                                               flat(generated.finished))
    used, advantages = np.asarray(used).reshape(prompts, groups), np.asarray(advantages).reshape(prompts, groups)
    truncated = (~generated.finished).astype(np.float32)
    loss_tokens = mask.sum() if not self.task.mask_truncated_completions else (mask * (1 - truncated[..., None])).sum()
    num_items = np.full(per_step, loss_tokens / (self.steps_per_generation * self.accum), np.float32)
    rows = lambda x, s: None if x is None else x[s * per_step:(s + 1) * per_step]
    slices = [layouts.RolloutBatch(group, rows(used, s), rows(advantages, s), rows(truncated, s),
                                   rows(generated.logps, s), rows(ref, s), num_items)
              for s, group in enumerate(group_batches)]
    metrics.update(completion_metrics(generated.lengths, generated.finished))
    metrics.update({k: float(v) for k, v in advantage_metrics.items()})
    self._write_completions(generated, combined.reshape(prompts, groups), advantages)
    return slices, metrics

  def _group(self, generated: Generated, indices) -> layouts.GroupBatch:
    """The prompt groups `indices` in the group layout, per-completion arrays grouped by prompt."""
    group = self.layout.collate([generated.prompt_ids[p] for p in indices],
                                [generated.completion_ids(p) for p in indices], self.options.pad_id)
    return _grouped(group, self.num_generations)

  def _write_completions(self, generated: Generated, combined: np.ndarray, advantages: np.ndarray) -> None:
    """Appends the batch's completions to the table (and keeps them for `tables`) when a step it trains is a log
    step (or it is the first)."""
    first = self.served + 1
    steps = range(first, first + self.steps_per_generation * self.num_iterations)
    if jax.process_index() != 0 or not (first == 1 or any(step % self.log_every == 0 for step in steps)):
      return
    names = [reward.name for reward in self.rewards]
    rows = [{"step": first, "prompt": generated.prompt_texts[p], "completion": generated.texts[p][g],
             **{name: _or_none(generated.per_reward[p, g, r]) for r, name in enumerate(names)},
             "reward": _or_none(combined[p, g]), "advantage": float(advantages[p, g])}
            for p in range(len(generated.records)) for g in range(self.num_generations)]
    self._tables.setdefault(COMPLETIONS_TABLE, []).extend(rows)
    if self.workdir:
      with open(os.path.join(self.workdir, COMPLETIONS_FILE), "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


# --------------------------------------------------------------------------------------------------- helpers


def group_layout(config) -> layouts.GroupRows:
  """The prompt-group layout of an online stage's batches."""
  online = config.online
  return layouts.GroupRows(config.data.max_prompt_length, online.max_completion_length, online.num_generations,
                           tuple(config.data.buckets))


def zero_batch(layout: layouts.GroupRows, prompts: int, length: int, *, with_reference: bool) -> layouts.RolloutBatch:
  """A RolloutBatch of `prompts` prompt groups with rows of `length` tokens and nothing in them (for compiling);
  reference log-probs present when `with_reference`."""
  groups, width = layout.num_generations, layout.max_completion_length
  group = _grouped(layout.collate([], [], 0, rows=prompts, length=length), groups)
  zeros = lambda *shape: np.zeros(shape, np.float32)
  return layouts.RolloutBatch(group, zeros(prompts, groups), zeros(prompts, groups), zeros(prompts, groups),
                              zeros(prompts, groups, width), zeros(prompts, groups, width) if with_reference else None,
                              np.ones(prompts, np.float32))


def _or_none(value) -> float | None:
  return None if np.isnan(value) else float(value)


def _grouped(group: layouts.GroupBatch, groups: int) -> layouts.GroupBatch:
  """The GroupBatch with its per-completion arrays [P*G, ...] grouped by prompt, [P, G, ...]."""
  regroup = lambda x: x.reshape(-1, groups, *x.shape[1:])
  return dataclasses.replace(group, targets=regroup(group.targets), predecessors=regroup(group.predecessors),
                             completion_mask=regroup(group.completion_mask), row_mask=regroup(group.row_mask))


def _host_rows(batch):
  """This host's share of a global batch's prompt rows (all of them on one host)."""
  rows = len(jax.tree.leaves(batch)[0]) // jax.process_count()
  return jax.tree.map(lambda x: x[jax.process_index() * rows:(jax.process_index() + 1) * rows], batch)


def _make_rewards(config) -> list[rewards_lib.Reward]:
  """The rewards of config.online.rewards, weighted by online.reward_weights."""
  online = config.online
  specs = config_lib.parse_named(online.rewards, "online.rewards")
  set_heads = config_lib.parse_named(online.reward_set_heads, "online.reward_set_heads") or None
  return rewards_lib.make_rewards(specs, weights=tuple(online.reward_weights) or None,
                                  max_completion_length=online.max_completion_length,
                                  soft_punish_cache=online.soft_punish_cache or None, set_heads=set_heads)


def _prompt_style(config, tokenizer, records: list[PromptRecord]):
  """(chat template or not, the stop strings, the sampling options) of the stage's prompts: plain text prompts end
  at the next "\n\nHuman:" (or EOS); with data.chat_template at the template's end of turn."""
  chat = bool(config.data.chat_template)
  if chat:
    tokenize.set_chat_template(tokenizer, config.data.chat_template)  # saved with the tokenizer on export
    stop_strings = tuple(tokenize.render_prompts(tokenizer, ["Hi"])[1])
  else:
    conversational = next((r for r in records if not isinstance(r.prompt, str)), None)
    if conversational is not None:
      raise ValueError(f"{conversational.source}#{conversational.index}: a conversational prompt (messages) needs "
                       "a chat template: set config.data.chat_template = 'tokenizer' (or a .jinja file)")
    stop_strings = sampling.DEFAULT_STOP_STRINGS
  online = config.online
  options = sampling.SamplingOptions(
      max_new_tokens=online.max_completion_length, temperature=online.temperature, top_k=online.top_k,
      top_p=online.top_p, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
      stop_sequences=tuple(tuple(tokenizer.encode(s, add_special_tokens=False)) for s in stop_strings))
  return chat, stop_strings, options


def _reference_logps(task, reference, graphdef):
  """A compiled function: the reference's per-token log-probs of a group batch (at the sampling temperature) from
  the policy's parameters and rest and the reference's arrays (`reference.Reference.model`)."""

  def logps(params, rest, arrays, group):
    model = reference.model(graphdef, params, rest, arrays)
    return tasks.group_logprobs(model, group, temperature=task.temperature, chunks=task.logprob_chunks)

  return jax.jit(logps)
