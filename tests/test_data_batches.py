"""Batches: bucket shapes, DPO/SFT contents, (seed, epoch) order, exact resume, per-host slices, global arrays."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxalign import shapes
from jaxalign.data import batches, layouts, tokenize

PAD = 1


def make_pairs(n=22, seed=0):
  """Tokenized pairs with varied lengths (prompt 2..40, responses 1..30 tokens), built directly."""
  rng = np.random.default_rng(seed)
  ids = lambda lo, hi: rng.integers(3, 300, rng.integers(lo, hi)).astype(np.int32)  # noqa: E731
  flags = np.zeros(n, bool)
  return tokenize.TokenizedPairs([ids(2, 40) for _ in range(n)], [ids(1, 30) for _ in range(n)],
                                 [ids(1, 30) for _ in range(n)], flags, flags, flags)


def dpo_iter(pairs, max_length=80, **kwargs):
  settings = dict(pad_id=PAD, global_batch_size=4, seed=3)
  return layouts.SeparateRows(max_length=max_length, buckets=(16, 32, 64)).iterator(pairs, **{**settings, **kwargs})


def take(iterator, n):
  return [layouts.named_arrays(next(iterator)) for _ in range(n)]


def assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_dpo_batches_have_bucket_shapes_and_response_targets():
  pairs = make_pairs()
  iterator = dpo_iter(pairs)
  for _ in range(2 * iterator.batches_per_epoch):
    indices = iterator.global_indices(iterator.epoch, iterator.position)
    batch = layouts.named_arrays(next(iterator))
    length = batch["chosen_input_ids"].shape[1]
    assert length in (16, 32, 64, 80) and length == shapes.fit(int(pairs.lengths[indices].max()), iterator.buckets)
    for side, responses in (("chosen", pairs.chosen_ids), ("rejected", pairs.rejected_ids)):
      assert batch[f"{side}_input_ids"].shape == (4, length) and batch[f"{side}_input_ids"].dtype == np.int32
      assert batch[f"{side}_target_mask"].dtype == np.float32
      for row, i in enumerate(indices):
        n_prompt, n_response = len(pairs.prompt_ids[i]), len(responses[i])
        n = n_prompt + n_response
        ids = batch[f"{side}_input_ids"][row]
        assert ids[:n].tolist() == pairs.prompt_ids[i].tolist() + responses[i].tolist()
        assert np.all(ids[n:] == PAD)
        assert batch[f"{side}_attention_mask"][row].tolist() == [1] * n + [0] * (length - n)
        # Scored: exactly the response tokens.
        scored = batch[f"{side}_targets"][row][batch[f"{side}_target_mask"][row] == 1]
        assert scored.tolist() == list(range(n_prompt, n))


def test_order_is_a_fresh_permutation_per_epoch_and_drops_the_remainder():
  pairs = make_pairs(n=22)
  iterator = dpo_iter(pairs)
  assert (iterator.batches_per_epoch, iterator.dropped_per_epoch) == (5, 2)
  epochs = [np.concatenate([iterator.global_indices(e, p) for p in range(5)]) for e in range(2)]
  for order in epochs:
    assert len(set(order.tolist())) == 20
  assert epochs[0].tolist() != epochs[1].tolist()
  assert dpo_iter(pairs).global_indices(1, 2).tolist() == iterator.global_indices(1, 2).tolist()
  assert dpo_iter(pairs, seed=4).global_indices(0, 0).tolist() != iterator.global_indices(0, 0).tolist()


def test_restored_iterator_continues_with_exactly_the_uninterrupted_batches():
  pairs = make_pairs()
  reference = take(dpo_iter(pairs), 13)  # crosses two epoch boundaries (5 batches per epoch)
  for stop in (3, 5, 7):
    first = dpo_iter(pairs)
    take(first, stop)
    state = json.loads(json.dumps(first.state()))  # as a checkpoint would store it
    resumed = dpo_iter(pairs)
    resumed.restore(state)
    assert_same(take(resumed, 13 - stop), reference[stop:])


def test_restore_refuses_a_state_from_another_run():
  state = dpo_iter(make_pairs()).state()
  with pytest.raises(ValueError, match="global_batch_size"):
    dpo_iter(make_pairs(), global_batch_size=2).restore(state)
  with pytest.raises(ValueError, match="num_examples"):
    dpo_iter(make_pairs(n=30)).restore(state)


def test_two_hosts_together_see_each_global_batch_exactly_once():
  pairs = make_pairs()
  single = take(dpo_iter(pairs), 7)
  hosts = [take(dpo_iter(pairs, process_index=p, process_count=2), 7) for p in range(2)]
  for step, batch in enumerate(single):
    for key, value in batch.items():
      joined = np.concatenate([hosts[0][step][key], hosts[1][step][key]])
      np.testing.assert_array_equal(joined, value, err_msg=key)
  with pytest.raises(ValueError, match="not divisible by the 3 hosts"):
    dpo_iter(pairs, process_count=3, process_index=0)


def test_sft_batches_of_packed_rows_pad_segments_and_positions():
  rng = np.random.default_rng(0)
  lengths = [5, 9, 3, 7, 11, 2, 6, 4]
  examples = tokenize.SFTExamples([rng.integers(3, 300, n).astype(np.int32) for n in lengths],
                                  [np.r_[0.0, np.ones(n - 1)].astype(np.float32) for n in lengths])
  packed = tokenize.pack_examples(examples, seq_len=16)
  iterator = layouts.SFTRows(max_length=16, buckets=(8,)).iterator(packed, pad_id=PAD, global_batch_size=2, seed=0)
  batch = layouts.named_arrays(next(iterator))
  assert set(batch) == {"input_ids", "attention_mask", "segment_ids", "positions", "targets", "target_mask"}
  assert batch["input_ids"].shape == (2, 16)
  pad = batch["attention_mask"] == 0
  assert np.array_equal(pad, batch["segment_ids"] == 0)
  scored_pad = [pad[row][batch["targets"][row][batch["target_mask"][row] == 1]] for row in range(2)]
  assert np.all(batch["input_ids"][pad] == PAD) and not np.concatenate(scored_pad).any()
  assert np.all(batch["positions"][pad] == 0)


def test_examples_longer_than_max_length_are_an_error():
  with pytest.raises(ValueError, match="longer than max_length=10"):
    dpo_iter(make_pairs(), max_length=10)


def test_to_global_builds_batch_sharded_arrays():
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  n = jax.device_count()
  batch = next(dpo_iter(make_pairs(n=4 * n), global_batch_size=2 * n))
  arrays = layouts.named_arrays(batches.to_global(batch, sharding))
  for key, value in layouts.named_arrays(batch).items():
    assert arrays[key].sharding == sharding and arrays[key].shape == value.shape
    np.testing.assert_array_equal(np.asarray(arrays[key]), value)


def test_length_grouping_keeps_every_example_and_cuts_padding():
  lengths = np.random.default_rng(0).integers(10, 1000, 1000)
  plain = batches.epoch_order(lengths, 8, seed=1, epoch=0)
  grouped = batches.epoch_order(lengths, 8, seed=1, epoch=0, group_by_length=True)
  assert sorted(grouped) == list(range(1000))
  np.testing.assert_array_equal(grouped, batches.epoch_order(lengths, 8, seed=1, epoch=0, group_by_length=True))
  padded = lambda order: lengths[order].reshape(-1, 8).max(axis=1).sum() * 8
  assert padded(grouped) < 0.7 * padded(plain)
  assert not np.array_equal(grouped, batches.epoch_order(lengths, 8, seed=1, epoch=1, group_by_length=True))


def test_fixed_shape_batches_all_take_the_longest_examples_shape():
  pairs = make_pairs()
  varied = dpo_iter(pairs, group_by_length=True)
  fixed = dpo_iter(pairs, group_by_length=True, fixed_shape=True)
  varied_shapes = {tuple(b["chosen_targets"].shape) + b["chosen_input_ids"].shape for b in take(varied, 5)}
  fixed_batches = take(fixed, 5)
  assert len(varied_shapes) > 1
  longest = shapes.fit(int(pairs.lengths.max()), fixed.buckets)
  most_targets = max(max(len(c), len(r)) for c, r in zip(pairs.chosen_ids, pairs.rejected_ids))
  width = shapes.target_width(most_targets, longest)
  assert {tuple(b["chosen_targets"].shape) + b["chosen_input_ids"].shape for b in fixed_batches} == {
      (4, width, 4, longest)}
  for a, b in zip(take(dpo_iter(pairs, group_by_length=True), 5), fixed_batches):  # the same pairs, padded further
    n = a["chosen_input_ids"].shape[1]
    np.testing.assert_array_equal(b["chosen_input_ids"][:, :n], a["chosen_input_ids"])


def test_first_of_each_shape_finds_every_upcoming_shape_without_moving():
  pairs = make_pairs(40, seed=2)
  iterator = dpo_iter(pairs, group_by_length=True)
  next(iterator)  # mid-epoch, so the look-ahead crosses into the next epoch
  state = iterator.state()
  count = 2 * iterator.batches_per_epoch
  firsts = iterator.first_of_each_shape(count)
  assert iterator.state() == state
  looked_up = [layouts.named_arrays(iterator.batch_at(epoch, position)) for epoch, position in firsts]
  upcoming = take(iterator, count)
  shape = lambda b: (b["chosen_input_ids"].shape[1], b["chosen_targets"].shape[1])  # noqa: E731
  assert len({shape(b) for b in looked_up}) == len(looked_up) > 1
  assert {shape(b) for b in looked_up} == {shape(b) for b in upcoming}
  for (epoch, position), batch in zip(firsts, looked_up):  # each is the batch the iterator then yields there
    offset = (epoch - state["epoch"]) * iterator.batches_per_epoch + position - state["position"]
    assert_same([batch], [upcoming[offset]])
