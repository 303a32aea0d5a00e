"""Response log-probs: the scored-positions path equals a full-logits computation, and every pair layout (separate
rows, prefix-shared rows, packed prefix-shared rows) gives the same log-probs, token counts and losses."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign import tasks
from jaxalign.data import layouts, tokenize
from jaxalign.models import opt, reward
from helpers import TINY, on_device, random_pairs


def separate(pairs, indices, length, scored=True):
  return on_device(layouts.SeparateRows(max_length=length, scored=scored).collate(pairs, indices, length, 1))


def shared(pairs, indices, length, scored=True):
  return on_device(layouts.SharedRows(max_length=length, scored=scored).collate(pairs, indices, length, 1))


def test_shared_rows_give_the_concatenated_logprobs():
  model = opt.OPTForCausalLM(TINY, rngs=nnx.Rngs(0))
  pairs = random_pairs(6)
  indices = np.arange(6)
  rows, one_row = separate(pairs, indices, 20), shared(pairs, indices, 32)
  want = tasks.pair_logprobs(model, rows)
  got = tasks.pair_logprobs(model, one_row)
  for got_field, want_field in zip(got, want):  # chosen, rejected, and their scored-token counts
    np.testing.assert_allclose(np.asarray(got_field)[:, 0], want_field, atol=1e-5)
  np.testing.assert_array_equal(want.chosen_tokens, [len(c) for c in pairs.chosen_ids])
  np.testing.assert_array_equal(want.rejected_tokens, [len(r) for r in pairs.rejected_ids])
  assert int(tasks.pair_tokens(one_row)) < int(tasks.pair_tokens(rows))  # the prompt is counted once


def test_shared_row_layout():
  pairs = random_pairs(1, seed=3)
  p, c, r = (len(x[0]) for x in (pairs.prompt_ids, pairs.chosen_ids, pairs.rejected_ids))
  row = layouts.SharedRows(max_length=p + c + r + 2).collate(pairs, np.array([0]), p + c + r + 2, 1)
  np.testing.assert_array_equal(row.positions[0, p + c:p + c + r], p + np.arange(r))
  assert row.predecessor[0, p + c] == p - 1 and row.predecessor[0, p + c + 1] == p + c
  assert list(row.response_side[0, -2:]) == [layouts.PAD_SIDE] * 2


def test_scored_positions_equal_the_full_logits_computation():
  model = opt.OPTForCausalLM(TINY, rngs=nnx.Rngs(1))
  pairs = random_pairs(5, seed=2)
  batch = separate(pairs, np.arange(5), 20)
  got = tasks.pair_logprobs(model, batch)
  for side, responses, want_side in zip(("chosen", "rejected"), (pairs.chosen_ids, pairs.rejected_ids), got):
    ids = getattr(batch, f"{side}_input_ids")
    # The response tokens of each row, from the pairs themselves.
    mask = np.zeros(ids.shape, np.float32)
    for row, (prompt, response) in enumerate(zip(pairs.prompt_ids, responses)):
      mask[row, len(prompt):len(prompt) + len(response)] = 1
    logp = jax.nn.log_softmax(model(ids, getattr(batch, f"{side}_attention_mask"))[:, :-1], axis=-1)
    token = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(want_side, (token * mask[:, 1:]).sum(axis=-1), atol=1e-4)


def packed_batch(pairs, capacity: int, length: int, scored=True) -> tuple[tokenize.PackedPairs, layouts.SharedPairBatch]:
  layout = layouts.SharedRows(max_length=capacity, packing=True, scored=scored)
  packed = layout.examples(pairs)
  return packed, on_device(layout.collate(packed, np.arange(len(packed)), length, 1))


def test_pack_pairs_keeps_every_pair_once_and_gives_long_ones_their_own_row():
  pairs = random_pairs(12, seed=4)
  lengths = pairs.shared_lengths
  capacity = int(lengths.max()) - 1  # the longest pairs do not fit: a row of their own each
  longest = np.flatnonzero(lengths > capacity)
  packed = tokenize.pack_pairs(pairs, capacity=capacity)
  assert sorted(np.concatenate(packed.rows).tolist()) == list(range(12))
  assert packed.counts["oversize"] == len(longest) >= 1
  assert all([i] in [r.tolist() for r in packed.rows] for i in longest)
  assert all(packed.lengths[r] <= capacity for r, row in enumerate(packed.rows) if len(row) > 1)
  assert len(packed) < 12  # short pairs share rows
  np.testing.assert_array_equal((packed.pair_index >= 0).sum(axis=1), [len(r) for r in packed.rows])


def test_packed_row_layout():
  pairs = random_pairs(2, seed=5)
  packed, batch = packed_batch(pairs, capacity=200, length=80)
  assert packed.rows[0].tolist() in ([0, 1], [1, 0])
  first, second = packed.rows[0]
  n = int(pairs.shared_lengths[first])
  p = len(pairs.prompt_ids[second])
  c = len(pairs.chosen_ids[second])
  segment = np.asarray(batch.segment_ids[0])
  assert (segment[:n] == 1).all() and (segment[n:n + int(pairs.shared_lengths[second])] == 2).all()
  positions = np.asarray(batch.positions[0])
  np.testing.assert_array_equal(positions[n:n + p + c], np.arange(p + c))  # restart at the second pair
  predecessor = np.asarray(batch.predecessor[0])
  assert predecessor[n] == n and predecessor[n + p + c] == n + p - 1 and predecessor[n + 1] == n
  np.testing.assert_array_equal(batch.pair_mask, [[1, 1]])
  np.testing.assert_array_equal(packed.pair_index, [packed.rows[0]])


def test_packed_rows_give_each_pairs_logprobs_and_the_same_dpo_loss():
  model = opt.OPTForCausalLM(TINY, rngs=nnx.Rngs(2))
  pairs = random_pairs(9, seed=6)
  packed, batch = packed_batch(pairs, capacity=60, length=64)
  assert packed.max_pairs_per_row > 1 and int(batch.pair_mask.sum()) == 9
  got = tasks.pair_logprobs(model, batch)
  alone = separate(pairs, np.arange(9), 20)
  want = tasks.pair_logprobs(model, alone)
  index = packed.pair_index
  present = index >= 0
  for got_field, want_field in zip(got, want):  # chosen, rejected, and their scored-token counts
    np.testing.assert_allclose(np.asarray(got_field)[present], np.asarray(want_field)[index[present]], atol=1e-5)
    assert np.all(np.asarray(got_field)[~present] == 0)

  rng = np.random.default_rng(0)
  reference = rng.normal(-30, 3, (9, 2)).astype(np.float32)
  per_pair = dict(zip(("reference_chosen_logps", "reference_rejected_logps"), reference.T))
  layout = layouts.SharedRows(max_length=60, packing=True)
  packed_with_reference = on_device(layout.collate(packed, np.arange(len(packed)), 64, 1, per_pair=per_pair))
  alone_with_reference = on_device(layouts.SeparateRows(max_length=20).collate(pairs, np.arange(9), 20, 1,
                                                                               per_pair=per_pair))
  task = tasks.DPOTask(beta=0.1)
  packed_loss, packed_metrics = task.loss(model, packed_with_reference)
  alone_loss, alone_metrics = task.loss(model, alone_with_reference)
  np.testing.assert_allclose(packed_loss, alone_loss, atol=1e-5)
  for key in ("rewards/accuracies", "rewards/margins", "logps/chosen"):
    np.testing.assert_allclose(packed_metrics[key], alone_metrics[key], atol=1e-4)


def test_every_layout_gives_the_same_dpo_loss_as_the_concatenated_forward():
  """Separate, prefix-shared and packed rows: the same loss and metrics (fp32), for a live reference model."""
  model, reference_model = (opt.OPTForCausalLM(TINY, rngs=nnx.Rngs(seed)) for seed in (4, 5))
  pairs = random_pairs(8, seed=8)
  task = tasks.DPOTask(beta=0.1)
  results = []
  for layout in (layouts.SeparateRows(max_length=20), layouts.SharedRows(max_length=20),
                 layouts.SharedRows(max_length=20, packing=True)):
    examples = layout.examples(pairs)
    batch = on_device(layout.collate(examples, np.arange(len(examples)), layout.row_limit, 1))
    results.append(task.loss(model, batch, reference=reference_model))
  (want_loss, want_metrics), *others = results
  for loss, metrics in others:
    np.testing.assert_allclose(loss, want_loss, atol=1e-5)
    for key in want_metrics:
      np.testing.assert_allclose(metrics[key], want_metrics[key], atol=1e-5, err_msg=key)


def test_reward_model_on_shared_and_packed_rows_equals_separate_rows():
  model = reward.RewardModel(TINY, ("harmless", "helpful"), rngs=nnx.Rngs(3))
  pairs = random_pairs(9, seed=7)
  rows = separate(pairs, np.arange(9), 20, scored=False)
  one_row = shared(pairs, np.arange(9), 32, scored=False)
  assert rows.chosen_targets is None and one_row.targets is None  # a reward model reads no LM-head positions
  want = tasks.RewardTask.pair_rewards(model, rows)
  for got_side, want_side in zip(tasks.RewardTask.pair_rewards(model, one_row), want):
    np.testing.assert_allclose(got_side[:, 0], want_side, atol=1e-5)

  packed_pairs, packed = packed_batch(pairs, capacity=60, length=64, scored=False)
  index = packed_pairs.pair_index
  present = index >= 0
  for got_side, want_side in zip(tasks.RewardTask.pair_rewards(model, packed), want):
    np.testing.assert_allclose(np.asarray(got_side)[present], np.asarray(want_side)[index[present]], atol=1e-5)

  heads = {"head": (np.arange(9) % 2).astype(np.int32)}  # each pair trains its own head
  task = tasks.RewardTask()
  want_loss, want_metrics = task.loss(model, dataclasses.replace(rows, extras=heads))
  got_loss, got_metrics = task.loss(model, dataclasses.replace(packed, extras=layouts.gather_per_pair(heads, index)))
  np.testing.assert_allclose(got_loss, want_loss, atol=1e-5)
  np.testing.assert_allclose(got_metrics["accuracy"], want_metrics["accuracy"], atol=1e-6)
