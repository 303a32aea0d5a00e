"""A packed batch through OPT gives every example exactly the logits it gets alone: no attention across examples."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.data import layouts, tokenize
from jaxalign.models import opt

# opt-350m's quirks in miniature: post-LayerNorm blocks and a narrower embedding projected in and out.
TINY = opt.OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                     word_embed_proj_dim=16, do_layer_norm_before=False, max_position_embeddings=64)


def test_packed_forward_equals_separate_forwards():
  rng = np.random.default_rng(0)
  lengths = [5, 9, 3, 7, 11, 2, 6, 4]
  examples = tokenize.SFTExamples([rng.integers(3, 128, n).astype(np.int32) for n in lengths],
                                  [np.r_[0.0, np.ones(n - 1)].astype(np.float32) for n in lengths])
  packed = tokenize.pack_examples(examples, seq_len=16)
  iterator = layouts.SFTRows(max_length=16).iterator(packed, pad_id=1, global_batch_size=len(packed), seed=0)
  batch = layouts.named_arrays(next(iterator))
  model = opt.OPTForCausalLM(TINY, rngs=nnx.Rngs(0))
  logits = model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                 segment_ids=jnp.asarray(batch["segment_ids"]), positions=jnp.asarray(batch["positions"]))
  # Reference: every example alone in its own right-padded row (default positions 0, 1, 2, …).
  alone = tokenize.SFTExamples(examples.input_ids, examples.loss_mask)
  single = layouts.named_arrays(layouts.SFTRows(max_length=16).collate(alone, np.arange(len(lengths)), max(lengths),
                                                                       pad_id=1))
  reference = model(jnp.asarray(single["input_ids"]), jnp.asarray(single["attention_mask"]))
  checked = 0
  for row in range(len(packed)):
    for segment in range(1, batch["segment_ids"][row].max() + 1):
      where = batch["segment_ids"][row] == segment
      tokens = batch["input_ids"][row][where].tolist()
      match = next(i for i, ids in enumerate(examples.input_ids) if ids.tolist() == tokens)
      np.testing.assert_allclose(np.asarray(logits[row][where]), np.asarray(reference[match, :lengths[match]]),
                                 atol=1e-5, rtol=1e-5)
      checked += 1
  assert checked == len(lengths)
