"""Token log-probs and entropies under an LM head, over chunks of positions: no [rows, positions, vocab] buffer.

The vocabulary-sized logits of every scored token, in float32 and with their gradient, are the largest buffer of an
alignment step once the vocabulary is large (Qwen2.5's 151,936 tokens: 2.3 GiB per 4,096 scored positions, several
times over in the backward pass). Here the head runs on `chunk_size` positions of each row at a time inside a
`jax.lax.scan` whose body is `jax.checkpoint`ed: the forward keeps only each chunk's results (a few floats per
position), and the backward recomputes one chunk's logits, turns them into the gradient of its hidden states and
adds its share to the head's gradient, so one chunk's logits exist at a time in both passes.

Why scan + checkpoint (measured with XLA's memory analysis on CPU, Qwen2.5-0.5B head, 8 rows x 512 scored
positions, bf16 compute; BENCHMARKS.md "Memory"): the gradient of the log-probs alone has 5.14 GiB of temporaries
unchunked, 3.93 GiB as a plain scan of 64-position chunks (the scan saves every chunk's logits for the backward
pass: the whole buffer again, stacked) and 1.62 / 1.33 / 1.19 GiB with the body checkpointed at 64 / 32 / 16
positions. Python-unrolled checkpointed chunks were worse than no chunking in the whole DPO step (XLA merged them
back), and a checkpoint policy keeping the head's bf16 weight cast out of the recomputation added 0.2 GiB. A custom
VJP was not built: it would keep the same buffers (one chunk's logits, the head's gradient summed over chunks) but
needs each head form's gradient written by hand (tied embeddings, a kernel, OPT's projection), while
`jax.checkpoint` recomputes whatever head the family gives (`model.logits`) at the same cost a custom VJP pays:
one more head matmul per chunk. Chunks run along each row's positions, all rows at once, so a batch sharded over
rows stays sharded.

What remains vocabulary-sized is [vocab, width]: the head's gradient, summed over the chunks in float32, and (XLA:CPU
only) float32 copies of the bf16 weight for its dots. The price is time: each chunk re-reads and re-writes such
[vocab, width] arrays, so many small chunks of a narrow model are slower (BENCHMARKS.md: ~40% on a width-256 model
on CPU at chunk 32); chunk_size 0 restores the unchunked speed.

`chunk_size` 0, or a chunk at least as long as the rows, is the unchunked computation.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxalign import losses

Head = Callable[[jax.Array], jax.Array]  # hidden [rows, T, D] -> fp32 logits [rows, T, vocab]


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
