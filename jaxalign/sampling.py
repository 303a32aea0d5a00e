"""Batched text generation with the KV cache: greedy, temperature, top-k, top-p, EOS and stop strings.

`generate_ids` is one jit-compiled program per (batch, prompt length, options): prefill the left-padded prompts,
then a `lax.while_loop` decodes one token per step for every row and exits as soon as every row has ended (EOS or
a stop sequence) or `max_new_tokens` are out. The model's parameters are arguments of that program (nnx.split), not
constants baked into it, so one compilation serves every checkpoint of the same architecture.

`generate` / `generate_texts` are what the evaluator calls: tokenize (keeping the end of over-long prompts), sort
by length and cut into batches padded to a few bucket shapes (so 100 prompts compile a couple of programs), decode
the continuation, cut it at the first stop string and strip it (the paper's response rule).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign import shapes
from jaxalign.parallel import host_numpy

log = logging.getLogger(__name__)

# HH conversations continue with the next human turn; a response ends where the model starts writing one.
DEFAULT_STOP_STRINGS = ("\n\nHuman:",)


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  """How to pick tokens and when a row ends. Hashable: it is a static argument of the compiled program.

  temperature 0 is greedy decoding (top_k and top_p then do nothing); top_k 0 and top_p 1.0 switch those filters
  off. eos_id None never ends a row on a token (benchmarks use it to generate exactly max_new_tokens).
  stop_sequences are token-id sequences that end a row once generated (the token form of the stop strings).
  """

  max_new_tokens: int = 50
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  eos_id: int | None = 2
  pad_id: int = 1
  stop_sequences: tuple[tuple[int, ...], ...] = ()

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

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0

  def program_key(self) -> SamplingOptions:
    """The part the compiled program depends on: unused filters reset (so greedy runs share one program) and no
    eos_id (a run-time argument, so models with different EOS ids share programs too)."""
    key = dataclasses.replace(self, eos_id=None)
    return dataclasses.replace(key, top_k=0, top_p=1.0) if self.greedy else key


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


def select_tokens(logits: jax.Array, keys: jax.Array, options: SamplingOptions) -> jax.Array:
  """Next token per row from logits [B, vocab]: argmax when greedy, else a draw (key per row) after the filters."""
  if options.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  # Same order as transformers: temperature, then top-k, then top-p.
  logits = apply_temperature(logits, options.temperature)
  logits = top_p_filter(top_k_filter(logits, options.top_k), options.top_p)
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------------------------
# The compiled generation program.


def _ends_with_stop_sequence(tokens: jax.Array, step: jax.Array, stop_sequences) -> jax.Array:
  """[B] bool: the tokens generated up to and including `step` end with one of the stop sequences."""
  hit = jnp.zeros(tokens.shape[0], bool)
  for seq in stop_sequences:
    if len(seq) > tokens.shape[1]:
      continue
    window = jax.lax.dynamic_slice_in_dim(tokens, jnp.maximum(step - len(seq) + 1, 0), len(seq), axis=1)
    hit |= (step >= len(seq) - 1) & jnp.all(window == jnp.asarray(seq, jnp.int32), axis=1)
  return hit


def _record(carry, token, step, eos_id, options: SamplingOptions):
  """Writes step's token (pad for rows already done), extends unfinished rows' lengths, marks newly ended rows."""
  tokens, lengths, done = carry
  token = jnp.where(done, options.pad_id, token)
  tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], step, axis=1)
  lengths = jnp.where(done, lengths, step + 1)
  done |= (token == eos_id) | _ends_with_stop_sequence(tokens, step, options.stop_sequences)
  return tokens, lengths, done


@functools.partial(jax.jit, static_argnames=("graphdef", "options", "sharding"))
def _generate(graphdef, state, input_ids, attention_mask, row_keys, eos_id, options: SamplingOptions, sharding):
  model = nnx.merge(graphdef, state)
  batch, prompt_length = input_ids.shape
  steps = options.max_new_tokens

  def step_keys(step):
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)

  # The last generated token is never fed back: the cache needs one slot less than prompt + new tokens.
  cache = model.init_cache(batch, prompt_length + steps - 1)
  if sharding is not None:
    # Every cache array but the scalar fill index has the batch first: keep each row's cache beside its row.
    cache = jax.tree.map(lambda x: x if x.ndim == 0 else jax.lax.with_sharding_constraint(x, sharding), cache)
  hidden, cache = model.hidden_states(input_ids, attention_mask, cache=cache)
  # Left padding puts every row's last prompt token in the last column: only that position needs logits.
  first = select_tokens(model.logits(hidden[:, -1:])[:, 0], step_keys(0), options)
  # Rows with no prompt token at all are batch padding: done before they start.
  done = ~jnp.any(attention_mask.astype(bool), axis=1)
  record = (jnp.full((batch, steps), options.pad_id, jnp.int32), jnp.zeros(batch, jnp.int32), done)
  record = _record(record, first, 0, eos_id, options)

  def not_finished(carry):
    step, (_, _, done), _ = carry
    return (step < steps) & ~jnp.all(done)

  def decode_step(carry):
    step, record, cache = carry
    previous = jax.lax.dynamic_slice_in_dim(record[0], step - 1, 1, axis=1)
    hidden, cache = model.hidden_states(previous, jnp.ones_like(previous), cache=cache)
    token = select_tokens(model.logits(hidden)[:, 0], step_keys(step), options)
    return step + 1, _record(record, token, step, eos_id, options), cache

  _, (tokens, lengths, _), _ = jax.lax.while_loop(not_finished, decode_step, (jnp.int32(1), record, cache))
  return tokens, lengths


def compiled_program_count() -> int:
  """How many generation programs have been compiled in this process (one per shape and options)."""
  return _generate._cache_size()


def generate_ids(
    model: nnx.Module, input_ids, attention_mask, *, key: jax.Array | None = None,
    options: SamplingOptions = SamplingOptions(), sharding: jax.sharding.Sharding | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Generates continuations of left-padded prompts; returns (tokens [B, max_new_tokens] int32, lengths [B] int32).

  input_ids / attention_mask [B, P]: prompts padded on the left (1 = real token); a row of all padding is a filler
    row that generates nothing. P + max_new_tokens must fit the model's position table.
  key: a PRNG key (split over rows) or one key per row [B] (then a row's draws do not depend on its batch); needed
    only when sampling.
  tokens: each row's generated tokens, the EOS / stop sequence included, then `pad_id`; lengths: how many tokens each
    row generated (EOS / stop sequence included).
  sharding: a batch sharding (e.g. `parallel.batch_sharding(mesh)`) for the inputs, cache and outputs; B must
    divide over it. Without one everything stays on the default device.
  """
  input_ids, attention_mask = np.asarray(input_ids, np.int32), np.asarray(attention_mask, bool)
  if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
    raise ValueError(f"input_ids and attention_mask must both be [batch, length]; got {input_ids.shape} and "
                     f"{attention_mask.shape}")
  if np.any(attention_mask[:, :-1] & ~attention_mask[:, 1:]):
    raise ValueError("prompts must be padded on the left: a row's attention_mask may not go from 1 back to 0")
  needed = input_ids.shape[1] + options.max_new_tokens
  if needed > model.config.max_position_embeddings:
    raise ValueError(f"prompt length {input_ids.shape[1]} + max_new_tokens {options.max_new_tokens} = {needed} "
                     f"exceeds the model's max_position_embeddings ({model.config.max_position_embeddings})")
  batch = input_ids.shape[0]
  if key is None:
    if not options.greedy:
      raise ValueError("sampling (temperature > 0) needs a PRNG key: pass key=jax.random.key(seed)")
    key = jax.random.key(0)  # unused by greedy decoding, but the program takes one
  if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    raise ValueError("key must be a typed PRNG key (jax.random.key(seed)), not a raw uint32 jax.random.PRNGKey")
  row_keys = key if key.shape == (batch,) else jax.random.split(key, batch)
  inputs = (input_ids, attention_mask, row_keys)
  if sharding is not None:
    inputs = jax.device_put(inputs, sharding)
  # -1 matches no token: rows then end only on stop sequences or after max_new_tokens.
  eos_id = jnp.int32(-1 if options.eos_id is None else options.eos_id)
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, *inputs, eos_id, options=options.program_key(), sharding=sharding)


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


def batch_shards(sharding: jax.sharding.Sharding | None) -> int:
  """Into how many pieces the sharding splits the batch dimension."""
  if sharding is None:
    return 1
  devices = len(sharding.device_set)
  return devices // sharding.shard_shape((devices, 1))[0]


def encode_prompts(tokenizer, prompts: Sequence[str], max_prompt_length: int,
                   add_special_tokens: bool = True) -> tuple[list[list[int]], int]:
  """Token ids per prompt (with the tokenizer's special tokens, e.g. OPT's leading </s>, unless the prompts are
  chat-template text that places its own), each cut to its last max_prompt_length tokens; and how many were cut."""
  encoded = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
  truncated = sum(len(ids) > max_prompt_length for ids in encoded)
  return [ids[-max_prompt_length:] for ids in encoded], truncated


def _left_padded(rows: list[list[int]], batch: int, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
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
  root = jax.random.key(seed)
  texts, num_new = [""] * len(encoded), [0] * len(encoded)
  for chunk in shapes.sorted_chunks([len(ids) for ids in encoded], batch, longest_first=True):
    ids, mask = _left_padded([encoded[i] for i in chunk], batch,
                             shapes.fit(max(len(encoded[i]) for i in chunk), ladder), options.pad_id)
    # Filler rows get keys too (the program takes one per row); they generate nothing.
    indices = np.concatenate([chunk, np.full(batch - len(chunk), len(encoded))]).astype(np.uint32)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(root, indices)
    tokens, new_lengths = generate_ids(model, ids, mask, key=keys, options=options, sharding=sharding)
    tokens, new_lengths = host_numpy(tokens), host_numpy(new_lengths)
    for row, i in enumerate(chunk):
      text = tokenizer.decode(tokens[row, :new_lengths[row]], skip_special_tokens=True)
      texts[i], num_new[i] = trim_response(text, stop_strings), int(new_lengths[row])
  return Generations(texts=texts, num_new_tokens=num_new, num_truncated_prompts=truncated)


def generate_texts(model: nnx.Module, tokenizer, prompts: Sequence[str], **kwargs) -> list[str]:
  """The responses only; keyword arguments as in `generate`."""
  return generate(model, tokenizer, prompts, **kwargs).texts
