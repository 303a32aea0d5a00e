"""Response log-probs: the scored-positions path equals a full-logits computation, and prefix-shared DPO rows give
the same log-probs as separate chosen / rejected rows."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign import tasks
from jaxalign.data import batches, tokenize
from jaxalign.models import opt, reward

TINY = opt.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                     word_embed_proj_dim=16, do_layer_norm_before=False, max_position_embeddings=64, dropout=0.0)


def random_pairs(n: int, seed: int = 0) -> tokenize.TokenizedPairs:
  rng = np.random.default_rng(seed)
  ids = lambda lo, hi: np.concatenate([rng.integers(3, 64, rng.integers(lo, hi))]).astype(np.int32)
  prompts = [np.concatenate([[2], ids(1, 9)]).astype(np.int32) for _ in range(n)]
  chosen = [np.concatenate([ids(1, 7), [2]]).astype(np.int32) for _ in range(n)]
  rejected = [np.concatenate([ids(1, 7), [2]]).astype(np.int32) for _ in range(n)]
  flags = np.zeros(n, bool)
  return tokenize.TokenizedPairs(prompts, chosen, rejected, flags, flags, flags)


def test_shared_rows_give_the_concatenated_logprobs():
  model = opt.OPTForCausalLM(TINY, rngs=nnx.Rngs(0))
  pairs = random_pairs(6)
  indices = np.arange(6)
  separate = {k: jnp.asarray(v) for k, v in batches.collate_dpo(pairs, indices, 20, 1).items()}
  shared = {k: jnp.asarray(v) for k, v in batches.collate_dpo_shared(pairs, indices, 32, 1).items()}
  want = tasks.dpo_logprobs(model, separate)
  got = tasks.dpo_logprobs(model, shared)
  np.testing.assert_allclose(got[0], want[0], atol=1e-4)
  np.testing.assert_allclose(got[1], want[1], atol=1e-4)
  assert int(tasks.pair_tokens(shared)) < int(tasks.pair_tokens(separate))  # the prompt is counted once


def test_shared_row_layout():
  pairs = random_pairs(1, seed=3)
  p, c, r = (len(x[0]) for x in (pairs.prompt_ids, pairs.chosen_ids, pairs.rejected_ids))
  row = batches.collate_dpo_shared(pairs, np.array([0]), p + c + r + 2, 1)
  np.testing.assert_array_equal(row["positions"][0, p + c:p + c + r], p + np.arange(r))
  assert row["predecessor"][0, p + c] == p - 1 and row["predecessor"][0, p + c + 1] == p + c
  assert list(row["response_side"][0, -2:]) == [batches.PAD_SIDE] * 2


def test_scored_positions_equal_the_full_logits_computation():
  model = opt.OPTForCausalLM(TINY, rngs=nnx.Rngs(1))
  pairs = random_pairs(5, seed=2)
  batch = {k: jnp.asarray(v) for k, v in batches.collate_dpo(pairs, np.arange(5), 20, 1).items()}
  got = tasks.pair_logprobs(model, batch)
  for side, want_side in zip(("chosen", "rejected"), got):
    ids, mask = batch[f"{side}_input_ids"], batch[f"{side}_loss_mask"]
    logp = jax.nn.log_softmax(model(ids, batch[f"{side}_attention_mask"])[:, :-1], axis=-1)
    token = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(want_side, (token * mask[:, 1:]).sum(axis=-1), atol=1e-4)


def test_target_width_is_one_of_four_per_length():
  assert [batches.target_width(n, 256) for n in (0, 32, 33, 64, 65, 128, 129, 256)] == [32, 32, 64, 64, 128, 128,
                                                                                         256, 256]


def packed_batch(pairs, capacity: int, length: int, rows=None) -> tuple[tokenize.PackedPairs, dict]:
  packed = tokenize.pack_pairs(pairs, capacity=capacity)
  rows = np.arange(len(packed)) if rows is None else rows
  return packed, {k: jnp.asarray(v) for k, v in batches.collate_packed_pairs(packed, rows, length, 1).items()}


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
  segment = np.asarray(batch["segment_ids"][0])
  assert (segment[:n] == 1).all() and (segment[n:n + int(pairs.shared_lengths[second])] == 2).all()
  positions = np.asarray(batch["positions"][0])
  np.testing.assert_array_equal(positions[n:n + p + c], np.arange(p + c))  # restart at the second pair
  predecessor = np.asarray(batch["predecessor"][0])
  assert predecessor[n] == n and predecessor[n + p + c] == n + p - 1 and predecessor[n + 1] == n
  np.testing.assert_array_equal(batch["pair_mask"], [[1, 1]])
  np.testing.assert_array_equal(batch["pair_index"], [packed.rows[0]])


def test_packed_rows_give_each_pairs_logprobs_and_the_same_dpo_loss():
  model = opt.OPTForCausalLM(TINY, rngs=nnx.Rngs(2))
  pairs = random_pairs(9, seed=6)
  packed, batch = packed_batch(pairs, capacity=60, length=64)
  assert packed.max_pairs_per_row > 1 and int(batch["pair_mask"].sum()) == 9
  chosen, rejected = tasks.dpo_logprobs(model, batch)
  alone = {k: jnp.asarray(v) for k, v in batches.collate_dpo(pairs, np.arange(9), 20, 1).items()}
  want_chosen, want_rejected = tasks.dpo_logprobs(model, alone)
  index = np.asarray(batch["pair_index"])
  present = index >= 0
  np.testing.assert_allclose(np.asarray(chosen)[present], np.asarray(want_chosen)[index[present]], atol=1e-4)
  np.testing.assert_allclose(np.asarray(rejected)[present], np.asarray(want_rejected)[index[present]], atol=1e-4)
  assert np.all(np.asarray(chosen)[~present] == 0)

  rng = np.random.default_rng(0)
  reference = rng.normal(-30, 3, (9, 2)).astype(np.float32)
  safe = np.where(present, index, 0)
  task = tasks.DPOTask(beta=0.1)
  packed_loss, packed_metrics = task.loss(model, dict(batch, reference_chosen_logps=reference[safe, 0] * present,
                                                      reference_rejected_logps=reference[safe, 1] * present))
  alone_loss, alone_metrics = task.loss(model, dict(alone, reference_chosen_logps=jnp.asarray(reference[:, 0]),
                                                    reference_rejected_logps=jnp.asarray(reference[:, 1])))
  np.testing.assert_allclose(packed_loss, alone_loss, atol=1e-5)
  for key in ("rewards/accuracies", "rewards/margins", "logps/chosen"):
    np.testing.assert_allclose(packed_metrics[key], alone_metrics[key], atol=1e-4)


def test_reward_model_on_shared_and_packed_rows_equals_separate_rows():
  model = reward.OPTRewardModel(TINY, ("harmless", "helpful"), rngs=nnx.Rngs(3))
  pairs = random_pairs(9, seed=7)
  separate = {k: jnp.asarray(v) for k, v in batches.collate_dpo(pairs, np.arange(9), 20, 1).items()}
  shared = {k: jnp.asarray(v) for k, v in batches.collate_dpo_shared(pairs, np.arange(9), 32, 1).items()}
  want = tasks.RewardTask.pair_rewards(model, separate)
  for got_side, want_side in zip(tasks.RewardTask.pair_rewards(model, shared), want):
    np.testing.assert_allclose(got_side, want_side, atol=1e-5)

  _, packed = packed_batch(pairs, capacity=60, length=64)
  index = np.asarray(packed["pair_index"])
  present = index >= 0
  for got_side, want_side in zip(tasks.RewardTask.pair_rewards(model, packed), want):
    np.testing.assert_allclose(np.asarray(got_side)[present], np.asarray(want_side)[index[present]], atol=1e-5)

  heads = np.arange(9) % 2  # each pair trains its own head
  task = tasks.RewardTask()
  want_loss, want_metrics = task.loss(model, dict(separate, head=jnp.asarray(heads)))
  got_loss, got_metrics = task.loss(model, dict(packed, head=jnp.asarray(np.where(present, heads[index], 0))))
  np.testing.assert_allclose(got_loss, want_loss, atol=1e-5)
  np.testing.assert_allclose(got_metrics["accuracy"], want_metrics["accuracy"], atol=1e-6)
