"""The Sampler: batched generation with the KV cache (greedy, temperature, top-k, top-p, EOS and stop sequences)
that returns the sampled tokens' log-probs, for the evaluator, `chat` and online training.

A `Sampler` is one shape bucket (prompt batch, prompt length, completions per prompt, options) of one model
architecture (its nnx graphdef). Each call takes the parameters to sample with, so a training loop hands it the
current weights every step: they are arguments of the compiled program, not constants baked into it, and are
checked against the bucket's template (tree, shapes, dtypes) so a mismatch fails with its path instead of compiling
a new program. Programs live in one jit cache: every sampler of the same architecture, bucket and options (and every
checkpoint) shares one. A call prefills the left-padded prompts once, repeats each prompt's KV cache for its
`num_generations` completions (each with its own key), then a `lax.while_loop` decodes one token per step for every
row and exits as soon as every row has ended (EOS or a stop sequence) or `max_new_tokens` are out.

`generate` / `generate_texts` are what the evaluator calls: tokenize (keeping the end of over-long prompts), sort
by length and cut into batches padded to a few bucket shapes (so 100 prompts compile a couple of programs), decode
the continuation, cut it at the first stop string and strip it (the paper's response rule).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import logging
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign import shapes
from jaxalign.parallel import host_numpy

log = logging.getLogger(__name__)

# HH conversations continue with the next human turn; a response ends where the model starts writing one.
DEFAULT_STOP_STRINGS = ("\n\nHuman:",)

# Which distribution the returned per-token log-probs are of (SamplingOptions.logprobs).
LOGPROBS_MODES = ("temperature", "processed", "raw")


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  """How to pick tokens, when a row ends and which log-probs to return. Hashable: a static argument of the program.

  temperature 0 is greedy decoding (top_k and top_p then do nothing); top_k 0 and top_p 1.0 switch those filters
  off. eos_id None never ends a row on a token (benchmarks use it to generate exactly max_new_tokens).
  stop_sequences are token-id sequences that end a row once generated (the token form of the stop strings).
  logprobs: the distribution whose log-probs of the sampled tokens are returned, all fp32 over the full vocabulary:
    "temperature" (default) log_softmax(logits / temperature), top-k / top-p ignored: what TRL's GRPOTrainer
      computes for the policy in training (`_get_per_token_logps_and_entropies`), so these are GRPO's "old" log-probs;
    "processed" the distribution the token was drawn from (temperature, then top-k and top-p; filtered tokens have
      probability 0), vLLM's `processed_logprobs`;
    "raw" the model's own distribution, log_softmax(logits) (temperature 1).
    Greedy decoding (temperature 0) returns the raw log-probs whatever the mode.
  """

  max_new_tokens: int = 50
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  eos_id: int | None = 2
  pad_id: int = 1
  stop_sequences: tuple[tuple[int, ...], ...] = ()
  logprobs: str = "temperature"

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
    if any(len(seq) == 0 for seq in self.stop_sequences):
      raise ValueError("stop_sequences must not contain an empty sequence")
    if self.logprobs not in LOGPROBS_MODES:
      raise ValueError(f"logprobs must be one of {LOGPROBS_MODES}, got {self.logprobs!r}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0

  def program_key(self) -> SamplingOptions:
    """The part the compiled program depends on: what greedy decoding ignores reset (so greedy runs share one
    program) and no eos_id (a run-time argument, so models with different EOS ids share programs too)."""
    key = dataclasses.replace(self, eos_id=None)
    return dataclasses.replace(key, top_k=0, top_p=1.0, logprobs="raw") if self.greedy else key


class FinishReason(enum.IntEnum):
  """Why a row ended (`Samples.finish_reasons`), with vLLM's / TRL's names."""

  STOP = 0  # an EOS token or a stop sequence was generated (and is included in the row)
  LENGTH = 1  # cut at max_new_tokens


class Samples(NamedTuple):
  """What a Sampler returns, one row per completion: row b * num_generations + g is prompt b's g-th completion.

  tokens [R, max_new_tokens] int32: the generated tokens, the EOS / stop sequence included, then `pad_id`.
  lengths [R] int32: how many tokens each row generated (EOS / stop sequence included); 0 for a filler row (a prompt
    of padding only).
  finish_reasons [R] int32: a `FinishReason` (filler rows: STOP).
  logprobs [R, max_new_tokens] float32: each generated token's log-probability under `SamplingOptions.logprobs`'
    distribution; 0 after the row's end.
  """

  tokens: jax.Array
  lengths: jax.Array
  finish_reasons: jax.Array
  logprobs: jax.Array


# ---------------------------------------------------------------------------------------------------------------
# Token selection: pure functions on fp32 logits [..., vocab].


def apply_temperature(logits: jax.Array, temperature: float) -> jax.Array:
  """Divides logits by the temperature (> 0): below 1 sharpens the distribution, above 1 flattens it."""
  return logits / temperature


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
  """Keeps the k largest logits of each row (and any tied with the k-th), sets the rest to -inf. k=0 keeps all."""
  if k == 0 or k >= logits.shape[-1]:
    return logits
  kth_largest = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth_largest, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
  """Nucleus filter: keeps the most probable tokens until their total probability reaches p, sets the rest to -inf.

  A token is kept when the tokens more probable than it hold less than p of the mass, so the most probable token
  always stays. p=1 keeps all. Same rule as transformers' TopPLogitsWarper.
  """
  if p >= 1.0:
    return logits
  descending = -jnp.sort(-logits, axis=-1)
  probs = jax.nn.softmax(descending, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  smallest_kept = jnp.min(jnp.where(mass_before < p, descending, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < smallest_kept, -jnp.inf, logits)


def processed_logits(logits: jax.Array, options: SamplingOptions) -> jax.Array:
  """The logits tokens are drawn from (sampling only): temperature, then top-k, then top-p, as transformers does."""
  logits = apply_temperature(logits, options.temperature)
  return top_p_filter(top_k_filter(logits, options.top_k), options.top_p)


def select_tokens(logits: jax.Array, keys: jax.Array, options: SamplingOptions) -> jax.Array:
  """Next token per row from logits [B, vocab]: argmax when greedy, else a draw (key per row) after the filters."""
  return select_with_logprobs(logits, keys, options)[0]


def select_with_logprobs(logits: jax.Array, keys: jax.Array,
                         options: SamplingOptions) -> tuple[jax.Array, jax.Array]:
  """(next token [B] int32, its log-prob [B] fp32 under `options.logprobs`' distribution) from logits [B, vocab]."""
  if options.greedy:
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return tokens, _logprob_of(logits, tokens)
  drawn_from = processed_logits(logits, options)
  tokens = jax.vmap(jax.random.categorical)(keys, drawn_from).astype(jnp.int32)
  scored = {"temperature": apply_temperature(logits, options.temperature), "processed": drawn_from,
            "raw": logits}[options.logprobs]
  return tokens, _logprob_of(scored, tokens)


def _logprob_of(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  return jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), tokens[:, None], axis=-1)[:, 0]


# ---------------------------------------------------------------------------------------------------------------
# The compiled programs: prefill once per prompt, decode a token per step for every completion row.


class _Progress(NamedTuple):
  """The rows' state during decoding."""

  tokens: jax.Array  # [R, max_new_tokens] int32, pad_id where nothing was generated (yet)
  logprobs: jax.Array  # [R, max_new_tokens] float32, 0 there
  lengths: jax.Array  # [R] int32
  done: jax.Array  # [R] bool: ended by EOS / a stop sequence (or a filler row)


def _ends_with_stop_sequence(tokens: jax.Array, step: jax.Array, stop_sequences) -> jax.Array:
  """[B] bool: the tokens generated up to and including `step` end with one of the stop sequences."""
  hit = jnp.zeros(tokens.shape[0], bool)
  for seq in stop_sequences:
    if len(seq) > tokens.shape[1]:
      continue
    window = jax.lax.dynamic_slice_in_dim(tokens, jnp.maximum(step - len(seq) + 1, 0), len(seq), axis=1)
    hit |= (step >= len(seq) - 1) & jnp.all(window == jnp.asarray(seq, jnp.int32), axis=1)
  return hit


def _record(progress: _Progress, logits, row_keys, step, eos_id, options: SamplingOptions) -> _Progress:
  """Picks step's token from the logits [R, vocab] and writes it (pad for rows already done) with its log-prob;
  extends unfinished rows' lengths, marks newly ended rows."""
  step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)
  token, logprob = select_with_logprobs(logits, step_keys, options)
  token = jnp.where(progress.done, options.pad_id, token)
  logprob = jnp.where(progress.done, 0.0, logprob)
  tokens = jax.lax.dynamic_update_slice_in_dim(progress.tokens, token[:, None], step, axis=1)
  logprobs = jax.lax.dynamic_update_slice_in_dim(progress.logprobs, logprob[:, None], step, axis=1)
  lengths = jnp.where(progress.done, progress.lengths, step + 1)
  done = progress.done | (token == eos_id) | _ends_with_stop_sequence(tokens, step, options.stop_sequences)
  return _Progress(tokens, logprobs, lengths, done)


def _constrain(tree, sharding):
  """Keeps each row's arrays beside its row: every array with a batch dimension (all but the cache's scalar fill
  index) gets the batch sharding, where its batch divides over it."""
  if sharding is None:
    return tree
  shards = batch_shards(sharding)
  return jax.tree.map(lambda x: x if x.ndim == 0 or x.shape[0] % shards
                      else jax.lax.with_sharding_constraint(x, sharding), tree)


def _prefill(graphdef, states, input_ids, attention_mask, row_keys, eos_id, *, options: SamplingOptions,
             num_generations: int, sharding):
  """Runs the prompts [B, P] once and repeats each one's cache for its completions; returns the first tokens'
  progress (rows [B * num_generations]) and the cache."""
  model = nnx.merge(graphdef, *states)
  batch, prompt_length = input_ids.shape
  # The last generated token is never fed back: the cache needs one slot less than prompt + new tokens.
  cache = _constrain(model.init_cache(batch, prompt_length + options.max_new_tokens - 1), sharding)
  hidden, cache = model.hidden_states(input_ids, attention_mask, cache=cache)
  # Left padding puts every row's last prompt token in the last column: only that position needs logits.
  logits = model.logits(hidden[:, -1:])[:, 0]
  # Rows with no prompt token at all are batch padding: done before they start.
  done = ~jnp.any(attention_mask.astype(bool), axis=1)
  repeat = functools.partial(jnp.repeat, repeats=num_generations, axis=0)
  logits, done = repeat(logits), repeat(done)
  cache = _constrain(jax.tree.map(lambda x: x if x.ndim == 0 else repeat(x), cache), sharding)
  rows, steps = logits.shape[0], options.max_new_tokens
  progress = _Progress(jnp.full((rows, steps), options.pad_id, jnp.int32), jnp.zeros((rows, steps), jnp.float32),
                       jnp.zeros(rows, jnp.int32), done)
  return _record(progress, logits, row_keys, 0, eos_id, options), cache


def _decode_step(graphdef, states, progress: _Progress, cache, row_keys, step, eos_id, *, options: SamplingOptions):
  """Feeds each row's previous token through the model (one cache slot) and records the next one."""
  model = nnx.merge(graphdef, *states)
  previous = jax.lax.dynamic_slice_in_dim(progress.tokens, step - 1, 1, axis=1)
  hidden, cache = model.hidden_states(previous, jnp.ones_like(previous), cache=cache)
  return _record(progress, model.logits(hidden)[:, 0], row_keys, step, eos_id, options), cache


def _finished(progress: _Progress) -> Samples:
  reasons = jnp.where(progress.done, FinishReason.STOP, FinishReason.LENGTH).astype(jnp.int32)
  return Samples(progress.tokens, progress.lengths, reasons, progress.logprobs)


@functools.partial(jax.jit, static_argnames=("graphdef", "options", "num_generations", "sharding"))
def _sample(graphdef, states, input_ids, attention_mask, row_keys, eos_id, *, options: SamplingOptions,
            num_generations: int, sharding) -> Samples:
  """The whole generation as one program: prefill, then decode until every row has ended or the steps are out."""
  progress, cache = _prefill(graphdef, states, input_ids, attention_mask, row_keys, eos_id, options=options,
                             num_generations=num_generations, sharding=sharding)

  def not_finished(carry):
    step, progress, _ = carry
    return (step < options.max_new_tokens) & ~jnp.all(progress.done)

  def decode_step(carry):
    step, progress, cache = carry
    progress, cache = _decode_step(graphdef, states, progress, cache, row_keys, step, eos_id, options=options)
    return step + 1, progress, cache

  _, progress, _ = jax.lax.while_loop(not_finished, decode_step, (jnp.int32(1), progress, cache))
  return _finished(progress)


# The same two halves as separate programs, for streaming a token at a time (chat).
_prefill_program = jax.jit(_prefill, static_argnames=("graphdef", "options", "num_generations", "sharding"))
_decode_program = jax.jit(_decode_step, static_argnames=("graphdef", "options"), donate_argnames=("progress", "cache"))


def compiled_program_count() -> int:
  """How many whole-generation programs have been compiled in this process (one per architecture, shape bucket and
  options)."""
  return _sample._cache_size()


# ---------------------------------------------------------------------------------------------------------------
# The Sampler: one shape bucket, the parameters at call time.


def batch_shards(sharding: jax.sharding.Sharding | None) -> int:
  """Into how many pieces the sharding splits the batch dimension."""
  if sharding is None:
    return 1
  devices = len(sharding.device_set)
  return devices // sharding.shard_shape((devices, 1))[0]


def _as_tuple(states) -> tuple:
  return states if isinstance(states, tuple) else (states,)


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


class Sampler:
  """Generation for one shape bucket of one model architecture, with whatever parameters each call brings.

  Sampler(graphdef, states, *, batch_size, prompt_length, options, num_generations=1, sharding=None)
    graphdef, states: a split model, `nnx.split(model)` or e.g. a trainer's `nnx.split(model, nnx.Param, ...)`;
      `states` (one State or a tuple of them; arrays or jax.ShapeDtypeStruct) is only the template later calls'
      states are checked against.
    batch_size, prompt_length: the prompts' shape [batch_size, prompt_length], padded on the left.
    options: SamplingOptions (max_new_tokens, temperature, top-k, top-p, EOS, stop sequences, which log-probs).
    num_generations: completions per prompt (G); the prompt is prefilled once and its KV cache repeated G times.
    sharding: a batch sharding (`parallel.batch_sharding(mesh)`) for the rows, the cache and the outputs;
      batch_size * num_generations must divide over it. The states keep the shardings they come with (e.g. FSDP).
  sampler(states, input_ids, attention_mask, key=None) -> Samples, rows [batch_size * num_generations]
    states: the parameters to sample with, same tree, shapes and dtypes as the template.
    input_ids / attention_mask [batch_size, prompt_length]: left-padded prompts (1 = real token); a row of padding
      only is a filler row that generates nothing.
    key: one typed PRNG key per completion row [batch_size * num_generations] (row b * G + g: prompt b's g-th
      completion; a row's draws then depend on its key only), or one key split over the rows; greedy needs none.
      A row draws step t's token with fold_in(row key, t).
  """

  def __init__(self, graphdef, states, *, batch_size: int, prompt_length: int, options: SamplingOptions,
               num_generations: int = 1, sharding: jax.sharding.Sharding | None = None):
    self.graphdef, self.template = graphdef, _abstract(_as_tuple(states))
    self.batch_size, self.prompt_length, self.num_generations = batch_size, prompt_length, num_generations
    self.options, self.sharding = options, sharding
    self.rows = batch_size * num_generations
    if min(batch_size, prompt_length, num_generations) < 1:
      raise ValueError(f"batch_size, prompt_length and num_generations must be >= 1; got {batch_size}, "
                       f"{prompt_length}, {num_generations}")
    if self.rows % batch_shards(sharding):
      raise ValueError(f"batch_size x num_generations = {self.rows} rows do not divide over the sharding's "
                       f"{batch_shards(sharding)} batch shards")
    max_positions = nnx.merge(graphdef, *self.template).config.max_position_embeddings
    if prompt_length + options.max_new_tokens > max_positions:
      raise ValueError(f"prompt length {prompt_length} + max_new_tokens {options.max_new_tokens} = "
                       f"{prompt_length + options.max_new_tokens} exceeds the model's max_position_embeddings "
                       f"({max_positions})")

  def check_states(self, states) -> tuple:
    """The states as a tuple, after checking they fit the template (a mismatch would compile another program)."""
    states = _as_tuple(states)
    if jax.tree.structure(states) != jax.tree.structure(self.template):
      raise ValueError("the states' tree differs from the sampler's template: build a Sampler for this model")
    for (path, x), t in zip(jax.tree.leaves_with_path(states), jax.tree.leaves(self.template)):
      if (x.shape, x.dtype) != (t.shape, t.dtype):
        raise ValueError(f"state {jax.tree_util.keystr(path)}: {x.dtype}{list(x.shape)}, the sampler was built for "
                         f"{t.dtype}{list(t.shape)}")
    return states

  def _inputs(self, input_ids, attention_mask, key) -> tuple:
    """The program's run-time inputs, checked and placed: prompts, a key per row, the EOS id."""
    input_ids, attention_mask = _checked_prompts(input_ids, attention_mask, (self.batch_size, self.prompt_length))
    if key is None:
      if not self.options.greedy:
        raise ValueError("sampling (temperature > 0) needs a PRNG key: pass key=jax.random.key(seed)")
      key = jax.random.key(0)  # unused by greedy decoding, but the program takes one
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
      raise ValueError("key must be a typed PRNG key (jax.random.key(seed)), not a raw uint32 jax.random.PRNGKey")
    if key.shape not in ((), (self.rows,)):
      raise ValueError(f"key: one key or one per completion row ({self.rows} = batch_size x num_generations); got "
                       f"keys of shape {key.shape}")
    row_keys = key if key.shape == (self.rows,) else jax.random.split(key, self.rows)
    if self.sharding is not None:
      row_keys = jax.device_put(row_keys, self.sharding)
      if self.batch_size % batch_shards(self.sharding) == 0:
        input_ids, attention_mask = jax.device_put((input_ids, attention_mask), self.sharding)
    # -1 matches no token: rows then end only on stop sequences or after max_new_tokens.
    eos_id = jnp.int32(-1 if self.options.eos_id is None else self.options.eos_id)
    return input_ids, attention_mask, row_keys, eos_id

  def __call__(self, states, input_ids, attention_mask, key: jax.Array | None = None) -> Samples:
    return _sample(self.graphdef, self.check_states(states), *self._inputs(input_ids, attention_mask, key),
                   options=self.options.program_key(), num_generations=self.num_generations, sharding=self.sharding)

  def stream(self, states, input_ids, attention_mask, key: jax.Array | None = None) -> Iterator[np.ndarray]:
    """The same generation a step at a time: yields each step's tokens [rows] (pad_id for rows already ended) on
    the host, until every row has ended or max_new_tokens are out (the caller may stop earlier)."""
    states, (input_ids, attention_mask, row_keys, eos_id) = (self.check_states(states),
                                                              self._inputs(input_ids, attention_mask, key))
    options = self.options.program_key()
    progress, cache = _prefill_program(self.graphdef, states, input_ids, attention_mask, row_keys, eos_id,
                                       options=options, num_generations=self.num_generations, sharding=self.sharding)
    for step in range(options.max_new_tokens):
      if step:
        progress, cache = _decode_program(self.graphdef, states, progress, cache, row_keys, jnp.int32(step), eos_id,
                                          options=options)
      yield host_numpy(progress.tokens[:, step])
      if bool(jnp.all(progress.done)):
        return


def _checked_prompts(input_ids, attention_mask, shape: tuple[int, int]):
  """Host prompts as int32 / bool arrays of the bucket's shape, padded on the left (device arrays pass as they are:
  their padding is the caller's to get right)."""
  if np.shape(input_ids) != shape or np.shape(attention_mask) != shape:
    raise ValueError(f"input_ids and attention_mask must both be [batch_size, prompt_length] = {list(shape)}; got "
                     f"{list(np.shape(input_ids))} and {list(np.shape(attention_mask))}")
  if not isinstance(input_ids, jax.Array):
    input_ids, attention_mask = np.asarray(input_ids, np.int32), np.asarray(attention_mask, bool)
    if np.any(attention_mask[:, :-1] & ~attention_mask[:, 1:]):
      raise ValueError("prompts must be padded on the left: a row's attention_mask may not go from 1 back to 0")
  return input_ids, attention_mask


def generate_ids(
    model: nnx.Module, input_ids, attention_mask, *, key: jax.Array | None = None,
    options: SamplingOptions = SamplingOptions(), num_generations: int = 1,
    sharding: jax.sharding.Sharding | None = None,
) -> Samples:
  """One call of a Sampler built for these prompts' shape [B, P] and this model's current parameters (arguments
  as in `Sampler`). P + max_new_tokens must fit the model's position table."""
  if np.ndim(input_ids) != 2:
    raise ValueError(f"input_ids must be [batch, length]; got shape {list(np.shape(input_ids))}")
  graphdef, state = nnx.split(model)
  sampler = Sampler(graphdef, state, batch_size=np.shape(input_ids)[0], prompt_length=np.shape(input_ids)[1],
                    options=options, num_generations=num_generations, sharding=sharding)
  return sampler(state, input_ids, attention_mask, key)


# ---------------------------------------------------------------------------------------------------------------
# Text in, text out.


@dataclasses.dataclass(frozen=True)
class Generations:
  """Responses in prompt order, with what the report needs to know about how they were made."""

  texts: list[str]
  num_new_tokens: list[int]  # tokens generated per prompt (EOS / stop sequence included)
  num_truncated_prompts: int  # prompts longer than max_prompt_length, cut to their last max_prompt_length tokens


def trim_response(text: str, stop_strings: Sequence[str]) -> str:
  """The response proper: the text before the first stop string, stripped of surrounding whitespace."""
  cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
  return text[:cut].strip()


def padded_batch_size(num_prompts: int, batch_size: int, multiple: int = 1) -> int:
  """The one batch shape of a run: batch_size, or the power of two that fits all prompts when there are fewer;
  rounded up to a multiple of the batch's shard count. A last, partial batch is filled up to this shape with filler
  rows: they cost far less than compiling a second program."""
  size = min(batch_size, 1 << max(num_prompts - 1, 0).bit_length())
  return -(-size // multiple) * multiple


def encode_prompts(tokenizer, prompts: Sequence[str], max_prompt_length: int,
                   add_special_tokens: bool = True) -> tuple[list[list[int]], int]:
  """Token ids per prompt (with the tokenizer's special tokens, e.g. OPT's leading </s>, unless the prompts are
  chat-template text that places its own), each cut to its last max_prompt_length tokens; and how many were cut."""
  encoded = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
  truncated = sum(len(ids) > max_prompt_length for ids in encoded)
  return [ids[-max_prompt_length:] for ids in encoded], truncated


def left_padded(rows: list[list[int]], batch: int, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  ids = np.full((batch, length), pad_id, np.int32)
  mask = np.zeros((batch, length), bool)
  for i, row in enumerate(rows):
    ids[i, length - len(row):] = row
    mask[i, length - len(row):] = True
  return ids, mask


def generate(
    model: nnx.Module, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 50,
    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
    stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS, batch_size: int = 64, seed: int = 0,
    max_prompt_length: int = 1024, sharding: jax.sharding.Sharding | None = None, add_special_tokens: bool = True,
) -> Generations:
  """Responses to `prompts` (raw text, e.g. "\\n\\nHuman: ...\\n\\nAssistant:"), in order.

  Prompts are sorted by length and generated `batch_size` at a time (rounded up to a multiple of the sharding's
  batch shards); every batch has the same number of rows and a power-of-two prompt length (up to
  max_prompt_length), so a run compiles only a few programs (100 eval prompts: two). Prompt i's
  sampling key is fold_in(key(seed), i): a response does not depend on batch_size or the other prompts.
  Response = the generated tokens decoded without special tokens, cut at the first stop string, stripped.
  add_special_tokens=False for chat-template prompts (`tokenize.render_prompts`; its end-of-turn token then goes in
  stop_strings: a stop string that is one special token stops on that token).
  """
  options = SamplingOptions(
      max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
      eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
      stop_sequences=tuple(tuple(tokenizer.encode(s, add_special_tokens=False)) for s in stop_strings))
  encoded, truncated = encode_prompts(tokenizer, prompts, max_prompt_length, add_special_tokens)
  if truncated:
    log.warning("%d of %d prompts were longer than max_prompt_length=%d tokens and keep only their end",
                truncated, len(encoded), max_prompt_length)
  batch = padded_batch_size(len(encoded), batch_size, batch_shards(sharding))
  ladder = shapes.power_ladder(max_prompt_length)
  graphdef, state = nnx.split(model)
  samplers: dict[int, Sampler] = {}  # one per prompt-length bucket
  root = jax.random.key(seed)
  texts, num_new = [""] * len(encoded), [0] * len(encoded)
  for chunk in shapes.sorted_chunks([len(ids) for ids in encoded], batch, longest_first=True):
    length = shapes.fit(max(len(encoded[i]) for i in chunk), ladder)
    ids, mask = left_padded([encoded[i] for i in chunk], batch, length, options.pad_id)
    if length not in samplers:
      samplers[length] = Sampler(graphdef, state, batch_size=batch, prompt_length=length, options=options,
                                 sharding=sharding)
    # Filler rows get keys too (the program takes one per row); they generate nothing.
    indices = np.concatenate([chunk, np.full(batch - len(chunk), len(encoded))]).astype(np.uint32)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(root, indices)
    samples = samplers[length](state, ids, mask, keys)
    tokens, new_lengths = host_numpy(samples.tokens), host_numpy(samples.lengths)
    for row, i in enumerate(chunk):
      text = tokenizer.decode(tokens[row, :new_lengths[row]], skip_special_tokens=True)
      texts[i], num_new[i] = trim_response(text, stop_strings), int(new_lengths[row])
  return Generations(texts=texts, num_new_tokens=num_new, num_truncated_prompts=truncated)


def generate_texts(model: nnx.Module, tokenizer, prompts: Sequence[str], **kwargs) -> list[str]:
  """The responses only; keyword arguments as in `generate`."""
  return generate(model, tokenizer, prompts, **kwargs).texts
