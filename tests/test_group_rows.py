"""The online methods' group layout: a prompt once per row with its G completions, each attending to the prompt and
to itself only, gives the per-token log-probs of G separate forwards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import losses, rewards, tasks
from jaxalign.data import layouts
from jaxalign.models import llama, opt
from helpers import TINY, on_device

G, MAX_COMPLETION = 3, 6
# Learned positions (OPT, offset 2) and rotary ones with grouped-query attention (Llama).
MODELS = {"opt": lambda: opt.OPTForCausalLM(TINY, rngs=nnx.Rngs(0)),
          "llama": lambda: llama.LlamaForCausalLM(llama.LlamaConfig(
              vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64), rngs=nnx.Rngs(0))}


def _groups(prompts: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  ids = lambda lo, hi: rng.integers(3, 64, rng.integers(lo, hi)).astype(np.int32)
  prompt_ids = [np.concatenate([[2], ids(1, 9)]).astype(np.int32) for _ in range(prompts)]
  completion_ids = [[ids(1, MAX_COMPLETION + 1) for _ in range(G)] for _ in range(prompts)]
  return prompt_ids, completion_ids


def _separate_logprobs(model, prompt_ids, completion_ids) -> list[np.ndarray]:
  """log p of each completion token from its own row, prompt + completion alone (full logits; one padded forward
  over all the rows)."""
  rows = [(prompt, completion) for prompt, group in zip(prompt_ids, completion_ids) for completion in group]
  sequences = [np.concatenate(row) for row in rows]
  length = max(len(s) for s in sequences)
  ids = np.ones((len(rows), length), np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for r, sequence in enumerate(sequences):
    ids[r, :len(sequence)], mask[r, :len(sequence)] = sequence, 1
  logp = jax.nn.log_softmax(nnx.jit(lambda m, i, a: m(i, a))(model, jnp.asarray(ids), jnp.asarray(mask))[:, :-1],
                            axis=-1)
  token = np.asarray(jnp.take_along_axis(logp, jnp.asarray(ids)[:, 1:, None], axis=-1)[..., 0])
  return [token[r, len(prompt) - 1:len(prompt) - 1 + len(completion)] for r, (prompt, completion) in enumerate(rows)]


@pytest.mark.parametrize("family", sorted(MODELS))
def test_group_logprobs_equal_separate_forwards(family):
  model = MODELS[family]()
  prompt_ids, completion_ids = _groups(4)
  layout = layouts.GroupRows(max_prompt_length=10, max_completion_length=MAX_COMPLETION, num_generations=G,
                             buckets=(16, 32))
  batch = layout.collate(prompt_ids, completion_ids, pad_id=1, rows=5)  # one filler row
  # The ladder ends at the row limit, 10 + 3 x 6.
  assert batch.input_ids.shape == (5, 28) and batch.completion_mask.shape == (15, MAX_COMPLETION)
  logps, entropies = nnx.jit(lambda m, b: tasks.group_logprobs(m, b, with_entropies=True))(model, on_device(batch))
  for row, want in enumerate(_separate_logprobs(model, prompt_ids, completion_ids)):  # prompt-major, as the batch
    np.testing.assert_allclose(np.asarray(logps[row, :len(want)]), want, atol=1e-5)
    assert not np.asarray(logps[row, len(want):]).any()
  np.testing.assert_array_equal(batch.row_mask, [1] * 12 + [0] * 3)
  assert not np.asarray(logps[12:]).any() and np.all(np.asarray(entropies[:12])[batch.completion_mask[:12] > 0] > 0)


def test_group_rows_layout():
  prompt_ids, completion_ids = _groups(1, seed=3)
  (prompt,), (group,) = prompt_ids, completion_ids
  layout = layouts.GroupRows(max_prompt_length=10, max_completion_length=MAX_COMPLETION, num_generations=G)
  batch = layout.collate(prompt_ids, completion_ids, pad_id=1, length=40)
  n = len(prompt)
  second = n + len(group[0])
  assert batch.group_member[0, second] == 2 and batch.positions[0, second] == n
  assert batch.predecessors[1, 0] == n - 1 and batch.predecessors[1, 1] == second
  assert batch.group_member[0, -1] == layouts.PAD_MEMBER
  np.testing.assert_array_equal(batch.completion_mask.sum(-1), [len(c) for c in group])


@pytest.mark.parametrize("change,message", [
    (lambda p, c: (p, [g[:2] for g in c]), "num_generations 3"),
    (lambda p, c: ([np.zeros(0, np.int32)] + p[1:], c), "expected 1 to max_prompt_length"),
    (lambda p, c: (p, [[np.arange(9)] + g[1:] for g in c]), "at most 6"),
    (lambda p, c: (p[:1], c), "1 prompts but 2 groups")])
def test_group_rows_refuse_bad_groups(change, message):
  layout = layouts.GroupRows(max_prompt_length=10, max_completion_length=MAX_COMPLETION, num_generations=G)
  with pytest.raises(ValueError, match=message):
    layout.collate(*change(*_groups(2)), pad_id=1)


@pytest.mark.slow
def test_a_grpo_step_through_the_group_forward():
  # The pieces as the online source chains them: rewards of each completion -> group advantages -> one group
  # forward -> the GRPO loss and its gradient. With old = the current policy every ratio is 1, so the dapo loss is
  # minus the mean token advantage.
  model = MODELS["opt"]()
  prompt_ids, completion_ids = _groups(2, seed=5)
  flat = [c for group in completion_ids for c in group]
  length = rewards.Reward("length", lambda prompts, completions, completion_ids, **columns: [
      float(len(ids)) for ids in completion_ids])
  per_reward = rewards.score([length], ["p"] * len(flat), [""] * len(flat), flat, num_generations=G)
  advantages, _ = losses.group_advantages(rewards.combine([length], per_reward)[0], G)
  layout = layouts.GroupRows(max_prompt_length=10, max_completion_length=MAX_COMPLETION, num_generations=G)
  batch = on_device(layout.collate(prompt_ids, completion_ids, pad_id=1))
  graphdef, params = nnx.split(model)

  def loss(params):
    logps = tasks.group_logprobs(nnx.merge(graphdef, params), batch)
    return losses.grpo_loss(logps, None, None, advantages, batch.completion_mask, row_mask=batch.row_mask)[0]

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  mask = np.asarray(batch.completion_mask)
  np.testing.assert_allclose(float(value), -(np.asarray(advantages)[:, None] * mask).sum() / mask.sum(), rtol=1e-5)
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and max(norms) > 0
