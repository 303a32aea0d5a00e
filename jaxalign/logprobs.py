"""Token log-probs and entropies under an LM head without a [rows, positions, vocab] buffer (`head_logprobs`).

The vocabulary-sized logits of every scored token, in float32 and with their gradient, are the largest buffer of an
alignment step once the vocabulary is large (Qwen2.5's 151,936 tokens: 2.3 GiB per 4,096 scored positions, several
times over in the backward pass). Two ways around it, used when those logits would exceed `Chunks.above_bytes`
(config model.logprob_chunk_above_mib, 1 GiB by default; below it the unchunked computation, the fastest, runs):

- `fused_head` (config model.logprob_vocab_chunk, 8,192 by default), for families whose head is a plain product
  (`model.head()`): a custom VJP that walks the head's vocabulary in slices, forward as an online log-sum-exp
  (keeping per position only the running max, sum, the target's logit and, for the entropy, the logit-weighted sum),
  backward recomputing each slice's logits from the saved log-sum-exp and writing that slice's weight gradient once.
  Neither [positions, vocab] logits nor per-chunk [vocab, width] partials exist: the gradient of Qwen2.5-0.5B's
  log-probs (8 x 512 positions, bf16) has 0.27 GiB of temporaries at 8,192 columns a slice, against 5.14
  unchunked (BENCHMARKS.md "Memory"). Its price is one more head matmul in the backward pass (the recomputed
  logits): 4 head matmuls a step instead of 3.
- `over_chunks` (config model.logprob_chunk, 32 by default), for any head (`model.logits`, e.g. Gemma 2's
  soft-cap): the head on `chunk_size` positions of each row at a time inside a `jax.lax.scan` whose body is
  `jax.checkpoint`ed, so one chunk's logits exist at a time in both passes; what remains is [vocab, width]-sized
  (the head's gradient summed over chunks, each chunk's share, XLA:CPU's fp32 copies of the bf16 weight): 1.33 GiB
  in the same measurement at 32 positions (a plain scan without the checkpoint: 3.93 GiB, it saves every chunk's
  logits). Each chunk re-reads and re-writes those [vocab, width] arrays, so many small chunks of a narrow model
  cost time (~40% on a width-256 model on CPU at chunk 32).

Chunks and slices run along positions or the vocabulary, all rows at once, so a batch sharded over rows stays
sharded. A size of 0 turns that way off; both off (or a chunk at least as long as the rows) is the unchunked
computation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign import losses

Head = Callable[[jax.Array], jax.Array]  # hidden [rows, T, D] -> fp32 logits [rows, T, vocab]


class Chunks(NamedTuple):
  """How the LM head's log-probs are chunked: `positions` scored positions of each row at a time (a checkpointed
  scan over `model.logits`), or, where the family's head is a plain product (`model.head()`), `vocabulary` columns
  of the head at a time (`fused_head`, which then wins); 0 and 0 = unchunked. Either only when the unchunked
  float32 logits of the traced batch ([rows, scored, vocab], all devices together) would take more than
  `above_bytes`."""

  positions: int = 0
  vocabulary: int = 0
  above_bytes: int = 0

  def for_logits(self, rows: int, length: int, vocab: int) -> Chunks:
    """These chunks where float32 logits [rows, length, vocab] exceed `above_bytes`, else `UNCHUNKED`."""
    return self if rows * length * vocab * 4 > self.above_bytes else UNCHUNKED


UNCHUNKED = Chunks()


def configured(model_config) -> Chunks:
  """The chunking of config.model (`logprob_chunk`, `logprob_vocab_chunk`, `logprob_chunk_above_mib`)."""
  return Chunks(model_config.logprob_chunk, model_config.logprob_vocab_chunk,
                model_config.logprob_chunk_above_mib * 2**20)


def head_logprobs(model, hidden: jax.Array, targets: jax.Array, chunks: Chunks, *, with_entropies: bool = False,
                  temperature: float = 1.0) -> jax.Array | tuple[jax.Array, jax.Array]:
  """log p(targets) [rows, S] (fp32) at hidden states [rows, S, D] under the model's LM head with its logits divided
  by `temperature`, and with `with_entropies` the entropy [rows, S], chunked as `chunks` says."""
  rows, length = targets.shape
  head = model.head() if chunks.vocabulary else None
  chunks = chosen_way(chunks, rows, length, model.config.vocab_size, plain_head=head is not None)
  if chunks.vocabulary:
    weight, vocab_first = head
    if temperature != 1.0:  # the fused head is linear (no bias): logits(h / T) = logits(h) / T
      hidden = (hidden.astype(jnp.float32) / temperature).astype(hidden.dtype)
    out = fused_head(hidden.reshape(rows * length, -1), weight, targets.reshape(-1), model.config.dtype,
                     vocab_first, chunks.vocabulary, with_entropies)
    return jax.tree.map(lambda x: x.reshape(rows, length), out)
  logits = model.logits if temperature == 1.0 else lambda h: model.logits(h).astype(jnp.float32) / temperature
  if with_entropies:
    return chunked_logprobs_and_entropy(logits, hidden, targets, chunk_size=chunks.positions)
  return chunked_logprobs(logits, hidden, targets, chunk_size=chunks.positions)


def chosen_way(chunks: Chunks, rows: int, length: int, vocab: int, *, plain_head: bool) -> Chunks:
  """The one way `head_logprobs` takes for targets [rows, length] under `chunks`: vocabulary slices (the fused
  head, where the head is a plain product), position chunks, or `UNCHUNKED`."""
  chunks = chunks.for_logits(rows, length, vocab)
  if chunks.vocabulary and plain_head:
    return Chunks(vocabulary=chunks.vocabulary)
  return Chunks(positions=chunks.positions) if 0 < chunks.positions < length else UNCHUNKED


def describe(chunks: Chunks, model, rows: int, length: int) -> str:
  """In words, what `head_logprobs` computes for targets [rows, length] of `model` under `chunks`."""
  vocab = model.config.vocab_size
  size = f"{rows * length * vocab * 4 / 2**30:.2f} GiB of float32 logits [{rows}, {length}, {vocab}]"
  chunks = chosen_way(chunks, rows, length, vocab, plain_head=bool(chunks.vocabulary) and _has_plain_head(model))
  if chunks.vocabulary:
    return f"fused LM head, {min(chunks.vocabulary, vocab)} vocabulary columns a slice (instead of {size})"
  if chunks.positions:
    return f"{chunks.positions} scored positions per row a chunk (instead of {size})"
  return f"unchunked, {size}"


def _has_plain_head(model) -> bool:
  """Whether `model.head()` gives a weight; traced abstractly, so `model` may hold shapes only (nnx.eval_shape)."""
  graphdef, state = nnx.split(model)
  return jax.eval_shape(lambda s: (nnx.merge(graphdef, s).head() or (None,))[0], state) is not None


def over_chunks(per_position: Callable, head: Head, hidden: jax.Array, targets: jax.Array,
                chunk_size: int) -> tuple[jax.Array, ...]:
  """`per_position(logits, targets)` (a tuple of [rows, T] arrays) over hidden [rows, S, D] and targets [rows, S],
  with the logits of `chunk_size` positions per row at a time (see the module docstring). Returns [rows, S] arrays."""
  rows, length = targets.shape
  if chunk_size <= 0 or chunk_size >= length:
    return per_position(head(hidden), targets)
  chunks = -(-length // chunk_size)
  pad = chunks * chunk_size - length
  hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)))
  # [chunks, rows, chunk_size, ...]: the scan walks along the positions, every row in each step.
  hidden = hidden.reshape(rows, chunks, chunk_size, -1).swapaxes(0, 1)
  targets = targets.reshape(rows, chunks, chunk_size).swapaxes(0, 1)

  @jax.checkpoint
  def chunk(hidden_chunk, target_chunk):
    return per_position(head(hidden_chunk), target_chunk)

  _, outputs = jax.lax.scan(lambda carry, xs: (carry, chunk(*xs)), None, (hidden, targets))
  return tuple(out.swapaxes(0, 1).reshape(rows, -1)[:, :length] for out in outputs)


def chunked_logprobs(head: Head, hidden: jax.Array, targets: jax.Array, *, chunk_size: int) -> jax.Array:
  """log p(targets) [rows, S] (fp32) from hidden states [rows, S, D] under `head`, chunk by chunk."""
  return over_chunks(lambda logits, t: (losses.selected_logprobs(logits, t),), head, hidden, targets, chunk_size)[0]


def chunked_logprobs_and_entropy(head: Head, hidden: jax.Array, targets: jax.Array, *,
                                 chunk_size: int) -> tuple[jax.Array, jax.Array]:
  """log p(targets) and the entropy, [rows, S] each, from one pass of the head over each chunk (the online methods
  log the entropy beside the log-probs they train on)."""
  both = lambda logits, t: (losses.selected_logprobs(logits, t), losses.token_entropies(logits))
  return over_chunks(both, head, hidden, targets, chunk_size)


def _vocab_slices(weight: jax.Array, vocab_axis: int, size: int):
  """(number of slices, slice(i) -> (the weight's columns [start, start + size), a [size] mask of the columns not in
  an earlier slice)): the last slice starts at vocab - size (dynamic slices stay in bounds) and masks its overlap."""
  vocab = weight.shape[vocab_axis]
  size = min(size, vocab)
  count = -(-vocab // size)

  def piece(i):
    nominal = i * size
    start = jnp.minimum(nominal, vocab - size)
    columns = jax.lax.dynamic_slice_in_dim(weight, start, size, axis=vocab_axis)
    return columns, start, start + jnp.arange(size) >= nominal

  return count, size, piece


def _slice_logits(hidden, columns, dtype, vocab_first):
  spec = "nd,vd->nv" if vocab_first else "nd,dv->nv"
  return jnp.einsum(spec, hidden.astype(dtype), columns.astype(dtype), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def fused_head(hidden, weight, targets, dtype, vocab_first: bool, vocab_chunk: int, with_entropy: bool):
  """log p(targets) [N], and with `with_entropy` the entropy [N] beside it, under logits = hidden [N, D] x weight
  ([V, D] when `vocab_first`, else [D, V]) in `dtype` with fp32 accumulation, walking the vocabulary `vocab_chunk`
  columns at a time: an online log-sum-exp forward and a backward that writes each slice of the weight's gradient
  once, so no [N, V] buffer and no per-chunk [V, D] partial exist."""
  return _fused_forward(hidden, weight, targets, dtype, vocab_first, vocab_chunk, with_entropy)[0]


def _fused_forward(hidden, weight, targets, dtype, vocab_first, vocab_chunk, with_entropy):
  vocab_axis = 0 if vocab_first else 1
  count, size, piece = _vocab_slices(weight, vocab_axis, vocab_chunk)
  n = hidden.shape[0]

  def step(carry, i):
    top, total, weighted, picked = carry
    columns, start, fresh = piece(i)
    logits = jnp.where(fresh, _slice_logits(hidden, columns, dtype, vocab_first), -jnp.inf)
    new_top = jnp.maximum(top, logits.max(-1))
    scale = jnp.exp(top - new_top)
    e = jnp.exp(logits - new_top[:, None])
    total = total * scale + e.sum(-1)
    if with_entropy:
      weighted = weighted * scale + jnp.where(fresh, e * logits, 0.0).sum(-1)
    hit = (start + jnp.arange(size))[None, :] == targets[:, None]
    picked = picked + jnp.where(hit & fresh, logits, 0.0).sum(-1)
    return (new_top, total, weighted, picked), None

  zeros = jnp.zeros((n,), jnp.float32)
  (top, total, weighted, picked), _ = jax.lax.scan(step, (zeros - jnp.inf, zeros, zeros, zeros), jnp.arange(count))
  lse = top + jnp.log(total)
  mean_logit = weighted / total
  out = (picked - lse, lse - mean_logit) if with_entropy else picked - lse
  return out, (hidden, weight, targets, lse, mean_logit)


def _fused_backward(dtype, vocab_first, vocab_chunk, with_entropy, residuals, cotangents):
  hidden, weight, targets, lse, mean_logit = residuals
  d_logps, d_entropy = cotangents if with_entropy else (cotangents, None)
  vocab_axis = 0 if vocab_first else 1
  count, size, piece = _vocab_slices(weight, vocab_axis, vocab_chunk)

  def step(carry, i):
    d_hidden, d_weight = carry
    columns, start, fresh = piece(i)
    logits = _slice_logits(hidden, columns, dtype, vocab_first)
    p = jnp.where(fresh, jnp.exp(logits - lse[:, None]), 0.0)
    hit = ((start + jnp.arange(size))[None, :] == targets[:, None]) & fresh
    d_logits = d_logps[:, None] * (hit - p)  # d log p_t / d l = onehot - p
    if with_entropy:  # d H / d l = -p (l - E_p[l])
      d_logits = d_logits - d_entropy[:, None] * p * (logits - mean_logit[:, None])
    d_logits = d_logits.astype(dtype)
    spec_h = "nv,vd->nd" if vocab_first else "nv,dv->nd"
    d_hidden = d_hidden + jnp.einsum(spec_h, d_logits, columns.astype(dtype), preferred_element_type=jnp.float32)
    spec_w = "nv,nd->vd" if vocab_first else "nv,nd->dv"
    d_columns = jnp.einsum(spec_w, d_logits, hidden.astype(dtype), preferred_element_type=jnp.float32)
    current = jax.lax.dynamic_slice_in_dim(d_weight, start, size, axis=vocab_axis)
    d_weight = jax.lax.dynamic_update_slice_in_dim(d_weight, current + d_columns, start, axis=vocab_axis)
    return (d_hidden, d_weight), None

  init = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros(weight.shape, jnp.float32))
  (d_hidden, d_weight), _ = jax.lax.scan(step, init, jnp.arange(count))
  return d_hidden.astype(hidden.dtype), d_weight.astype(weight.dtype), None


fused_head.defvjp(lambda *args: _fused_forward(*args), _fused_backward)
