"""Token log-probs and entropies under an LM head, over chunks of positions: no [rows, positions, vocab] buffer.

The vocabulary-sized logits of every scored token, in float32 and with their gradient, are the largest buffer of an
alignment step once the vocabulary is large (Qwen2.5's 151,936 tokens: 2.3 GiB per 4,096 scored positions, several
times over in the backward pass). Here the head runs on `chunk_size` positions of each row at a time inside a
`jax.lax.scan` whose body is `jax.checkpoint`ed: the forward keeps only each chunk's results (a few floats per
position), and the backward recomputes one chunk's logits, turns them into the gradient of its hidden states and
adds its share to the head's gradient, so one chunk's logits exist at a time in both passes.

Why scan + checkpoint (measured, BENCHMARKS.md "Memory"): a plain scan saves every chunk's logits for the backward
pass (the full buffer again, stacked); a custom VJP would hold the same one chunk at a time but needs the head's
weight as an explicit argument and a hand-written gradient per head form (tied embeddings, kernel, OPT's
projection), while `jax.checkpoint` recomputes whatever head function the family gives (`model.logits`) and costs
the same one extra head matmul per chunk a custom VJP would. Chunks run along each row's positions, all rows at
once, so a batch sharded over rows stays sharded (no gather of the rows into one device's chunk).

`chunk_size` 0, or a chunk at least as long as the rows, is the unchunked computation.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxalign import losses

# Scored positions per row whose logits exist at once (config model.logprob_chunk), chosen by measurement
# (BENCHMARKS.md "Memory"): 8 rows x 64 positions x 151,936 tokens in fp32 is 0.3 GiB, and the step time on CPU is
# that of the unchunked path.
DEFAULT_CHUNK = 32

Head = Callable[[jax.Array], jax.Array]  # hidden [rows, T, D] -> fp32 logits [rows, T, vocab]


def token_entropy(logits: jax.Array) -> jax.Array:
  """The entropy of each position's next-token distribution, -sum p log p: [..., vocab] -> [...] (fp32)."""
  logits = logits.astype(jnp.float32)
  log_probs = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)


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


def chunked_entropy(head: Head, hidden: jax.Array, *, chunk_size: int) -> jax.Array:
  """The next-token entropy [rows, S] (fp32) at hidden states [rows, S, D] under `head`, chunk by chunk."""
  targets = jnp.zeros(hidden.shape[:2], jnp.int32)
  return over_chunks(lambda logits, t: (token_entropy(logits),), head, hidden, targets, chunk_size)[0]


def chunked_logprobs_and_entropy(head: Head, hidden: jax.Array, targets: jax.Array, *,
                                 chunk_size: int) -> tuple[jax.Array, jax.Array]:
  """log p(targets) and the entropy, [rows, S] each, from one pass of the head over each chunk (the online methods
  log the entropy beside the log-probs they train on)."""
  both = lambda logits, t: (losses.selected_logprobs(logits, t), token_entropy(logits))
  return over_chunks(both, head, hidden, targets, chunk_size)
