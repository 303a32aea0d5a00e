"""Chunked log-probs and entropies (jaxalign/logprobs.py): the same values and gradients as the full logits, in
every task and layout, and no [rows, scored, vocab] buffer in the compiled gradient."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import config_lib, logprobs, losses, parallel, tasks
from jaxalign.data import layouts, tokenize
from jaxalign.models import layers, llama, opt
from helpers import TINY, on_device, random_pairs, tiny_config

VOCAB, WIDTH = 50, 8


def tied_head(weight):
  return lambda hidden: layers.lm_logits(hidden, weight, jnp.float32, vocab_first=True)


def random_inputs(rows=3, length=11, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(keys[0], (rows, length, WIDTH)), jax.random.normal(keys[1], (VOCAB, WIDTH)),
          jax.random.randint(keys[2], (rows, length), 0, VOCAB))


def assert_trees_close(got, want, atol=1e-5):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 11])  # 4: the last chunk padded
def test_chunked_logprobs_and_entropy_equal_the_full_softmax_with_gradients(chunk):
  hidden, weight, targets = random_inputs()
  full = jax.nn.log_softmax(hidden @ weight.T, axis=-1)
  want_logps = jnp.take_along_axis(full, targets[..., None], axis=-1)[..., 0]
  want_entropy = -(jnp.exp(full) * full).sum(-1)
  logps, entropy = logprobs.chunked_logprobs_and_entropy(tied_head(weight), hidden, targets, chunk_size=chunk)
  np.testing.assert_allclose(logps, want_logps, atol=1e-5)
  np.testing.assert_allclose(entropy, want_entropy, atol=1e-5)

  def objective(chunk_size):  # both outputs carry gradient, weighted differently per position
    def f(hidden, weight):
      logps, entropy = logprobs.chunked_logprobs_and_entropy(tied_head(weight), hidden, targets,
                                                             chunk_size=chunk_size)
      return (logps * jnp.arange(logps.size).reshape(logps.shape)).sum() + entropy.sum()
    return jax.grad(f, argnums=(0, 1))(hidden, weight)

  assert_trees_close(objective(chunk), objective(0))


@pytest.mark.parametrize("with_entropy", [True, False], ids=["logps+entropy", "logps"])
@pytest.mark.parametrize("vocab_first", [True, False], ids=["tied-table", "kernel"])
@pytest.mark.parametrize("slice_size", [7, 16, 50, 64])  # 7, 16: the last slice overlaps; 64: one slice, clipped
def test_the_fused_head_equals_the_full_softmax_with_gradients(vocab_first, slice_size, with_entropy):
  hidden, weight, targets = random_inputs(rows=1, length=37, seed=3)
  hidden, targets = hidden[0], targets[0]
  weights = jax.random.normal(jax.random.key(4), (2, 37))
  head_weight = weight if vocab_first else weight.T

  def objective(fused):
    def f(hidden, head_weight):
      if fused:
        out = logprobs.fused_head(hidden, head_weight, targets, jnp.float32, vocab_first, slice_size, with_entropy)
        logps, entropy = out if with_entropy else (out, jnp.zeros_like(out))
      else:
        logits = layers.lm_logits(hidden[None], head_weight, jnp.float32, vocab_first=vocab_first)[0]
        logps = losses.selected_logprobs(logits, targets)
        entropy = losses.token_entropies(logits) if with_entropy else jnp.zeros_like(logps)
      return (weights[0] * logps).sum() + (weights[1] * entropy).sum(), (logps, entropy)
    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(hidden, head_weight)

  assert_trees_close(objective(True), objective(False))


def test_grpo_shaped_per_token_logprobs_have_the_unchunked_gradient():
  """G completions of one prompt scored per token, a policy-gradient-like objective (advantage x masked log-prob):
  the gradient through the chunked path equals the unchunked one, for the hidden states and the head."""
  hidden, weight, completions = random_inputs(rows=8, length=13, seed=1)
  advantages = jax.random.normal(jax.random.key(2), (8,))
  mask = (jnp.arange(13)[None, :] < jnp.array([13, 5, 9, 13, 1, 7, 12, 3])[:, None]).astype(jnp.float32)

  def objective(chunk_size):
    def f(hidden, weight):
      logps = logprobs.chunked_logprobs(tied_head(weight), hidden, completions, chunk_size=chunk_size)
      return -(advantages[:, None] * logps * mask).sum() / mask.sum()
    return jax.value_and_grad(f, argnums=(0, 1))(hidden, weight)

  assert_trees_close(objective(4), objective(0))


@pytest.mark.parametrize("chunks", [logprobs.Chunks(positions=4), logprobs.Chunks(vocabulary=24)],
                         ids=["positions", "vocabulary"])
@pytest.mark.parametrize("with_entropies", [False, True], ids=["logps", "logps+entropies"])
def test_group_logprobs_chunked_equal_unchunked_with_gradients(with_entropies, chunks):
  """The online methods' group forward (`tasks.group_logprobs`, 2 prompts x 3 completions): per-token log-probs,
  entropies and the parameters' gradient of an advantage-weighted objective."""
  rng = np.random.default_rng(4)
  ids = lambda n: rng.integers(3, 64, n).astype(np.int32)
  layout = layouts.GroupRows(max_prompt_length=8, max_completion_length=6, num_generations=3)
  batch = on_device(layout.collate([ids(5), ids(7)], [[ids(n) for n in (6, 2, 4)], [ids(n) for n in (1, 6, 5)]],
                                   pad_id=1))
  model = opt.OPTForCausalLM(TINY, rngs=nnx.Rngs(2))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  advantages = jnp.asarray(rng.normal(size=(6, 1)), jnp.float32)

  def objective(chunks):
    def f(params):
      out = tasks.group_logprobs(nnx.merge(graphdef, params, rest), batch, with_entropies=with_entropies,
                                 chunks=chunks)
      logps, entropies = out if with_entropies else (out, jnp.zeros(()))
      return (advantages * logps).sum() + 0.1 * entropies.sum(), out
    return jax.value_and_grad(f, has_aux=True)(params)

  assert_trees_close(objective(chunks), objective(logprobs.UNCHUNKED))


ONLINE_TASKS = {"grpo": tasks.GRPOTask(num_generations=3, beta=0.04, temperature=0.7, use_old_logps=True),
                "gspo": tasks.GRPOTask(num_generations=3, importance_sampling_level="sequence", loss_type="grpo"),
                "rloo": tasks.RLOOTask(num_generations=3, beta=0.05)}


@pytest.mark.parametrize("chunks", [logprobs.Chunks(positions=4), logprobs.Chunks(vocabulary=24)],
                         ids=["positions", "vocabulary"])
@pytest.mark.parametrize("task", ONLINE_TASKS.values(), ids=ONLINE_TASKS.keys())
def test_online_tasks_chunked_equal_unchunked_loss_metrics_and_gradients(task, chunks):
  """The online tasks' whole loss on a RolloutBatch (2 prompts x 3 completions; old and reference log-probs; a
  sampling temperature): loss, metrics (the entropy among them) and every parameter's gradient."""
  rng = np.random.default_rng(8)
  ids = lambda n: rng.integers(3, 64, n).astype(np.int32)
  layout = layouts.GroupRows(max_prompt_length=8, max_completion_length=6, num_generations=3)
  group = layout.collate([ids(5), ids(7)], [[ids(n) for n in (6, 2, 4)], [ids(n) for n in (1, 6, 5)]], pad_id=1)
  grouped = lambda x: x.reshape(2, 3, *x.shape[1:])
  group = dataclasses.replace(group, targets=grouped(group.targets), predecessors=grouped(group.predecessors),
                              completion_mask=grouped(group.completion_mask), row_mask=grouped(group.row_mask))
  per_token = lambda: rng.normal(-3.0, 0.3, (2, 3, 6)).astype(np.float32)
  batch = on_device(layouts.RolloutBatch(
      group, rewards=rng.normal(size=(2, 3)).astype(np.float32), advantages=rng.normal(size=(2, 3)).astype(np.float32),
      truncated=np.zeros((2, 3), np.float32), old_logps=per_token(), ref_logps=per_token(),
      num_items=np.full(2, group.completion_mask.sum(), np.float32)))
  model = opt.OPTForCausalLM(TINY, rngs=nnx.Rngs(5))
  assert_chunked_equals_unchunked(task, model, batch, chunks)


def test_the_compiled_gradient_has_no_rows_by_scored_by_vocab_buffer():
  """XLA's memory analysis of the gradient: the unchunked path's temporaries exceed one [rows, scored, vocab] fp32
  buffer, the chunked path's stay below it."""
  rows, length, vocab, width = 4, 256, 4096, 16
  args = (jax.ShapeDtypeStruct((rows, length, width), jnp.float32), jax.ShapeDtypeStruct((vocab, width), jnp.float32),
          jax.ShapeDtypeStruct((rows, length), jnp.int32))

  def temporaries(chunk_size):
    f = lambda h, w, t: logprobs.chunked_logprobs(tied_head(w), h, t, chunk_size=chunk_size).sum()
    return jax.jit(jax.grad(f, argnums=(0, 1))).lower(*args).compile().memory_analysis().temp_size_in_bytes

  logits_bytes = rows * length * vocab * 4
  assert temporaries(0) > logits_bytes > 4 * temporaries(16)

  fused = lambda h, w, t: logprobs.fused_head(h.reshape(-1, width), w, t.reshape(-1), jnp.float32, True, 256,
                                              False).sum()
  fused_temporaries = jax.jit(jax.grad(fused, argnums=(0, 1))).lower(*args).compile().memory_analysis()
  assert logits_bytes > 4 * fused_temporaries.temp_size_in_bytes


def model_grads(task, model, batch):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  loss = lambda params: task.loss(nnx.merge(graphdef, params, rest), batch)
  return jax.value_and_grad(loss, has_aux=True)(params)


def assert_chunked_equals_unchunked(task, model, batch, chunks):
  """`task`'s loss, metrics and every parameter's gradient are the same with `chunks` as unchunked."""
  (want_loss, want_metrics), want_grads = model_grads(task, model, batch)
  (loss, metrics), grads = model_grads(dataclasses.replace(task, logprob_chunks=chunks), model, batch)
  np.testing.assert_allclose(loss, want_loss, atol=1e-5)
  assert_trees_close(metrics, want_metrics)
  assert_trees_close(grads, want_grads)


PAIR_LAYOUTS = {"separate": layouts.SeparateRows(max_length=20), "shared": layouts.SharedRows(max_length=32),
                "packed": layouts.SharedRows(max_length=40, packing=True)}
PAIR_TASKS = {"dpo": tasks.DPOTask(beta=0.5), "kto": tasks.KTOTask(), "cpo": tasks.CPOTask(), "orpo": tasks.ORPOTask()}


# 3 positions per row; or the vocabulary of 64 in slices of 24 (the last one overlapping the one before).
CHUNKS = {"positions": logprobs.Chunks(positions=3), "vocabulary": logprobs.Chunks(vocabulary=24)}


@pytest.mark.parametrize("chunks", CHUNKS.values(), ids=CHUNKS.keys())
@pytest.mark.parametrize("layout", PAIR_LAYOUTS.values(), ids=PAIR_LAYOUTS.keys())
@pytest.mark.parametrize("task", PAIR_TASKS.values(), ids=PAIR_TASKS.keys())
def test_pair_tasks_chunked_equal_unchunked_loss_metrics_and_gradients(task, layout, chunks):
  """OPT's tied head behind project_out: loss, metrics and every parameter's gradient."""
  model = opt.OPTForCausalLM(TINY, rngs=nnx.Rngs(3))
  pairs = random_pairs(6, seed=5)
  rng = np.random.default_rng(1)
  per_pair = {"desirable": np.array([1, 0, 1, 1, 0, 1], np.int32),
              "reference_chosen_logps": rng.normal(-20, 3, 6).astype(np.float32),
              "reference_rejected_logps": rng.normal(-20, 3, 6).astype(np.float32)}
  examples = layout.examples(pairs)
  batch = on_device(layout.collate(examples, np.arange(len(examples)), layout.row_limit, 1, per_pair=per_pair))
  assert_chunked_equals_unchunked(task, model, batch, chunks)


def test_the_fused_head_on_a_sharded_mesh_equals_one_device():
  """DPO on 4 data x 2 fsdp devices, the tied head's vocabulary rows split over fsdp, walked in slices of 24 (the
  last overlapping): the loss and every gradient equal the unchunked single-device step's."""
  model = opt.OPTForCausalLM(TINY, rngs=nnx.Rngs(3))
  layout = layouts.SharedRows(max_length=32)
  rng = np.random.default_rng(2)
  per_pair = {name: rng.normal(-20, 3, 8).astype(np.float32)
              for name in ("reference_chosen_logps", "reference_rejected_logps")}
  examples = layout.examples(random_pairs(8, seed=6))
  batch = layout.collate(examples, np.arange(8), layout.row_limit, 1, per_pair=per_pair)
  (want_loss, _), want_grads = model_grads(tasks.DPOTask(beta=0.5), model, on_device(batch))

  mesh = parallel.make_mesh(data=4, fsdp=2)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = parallel.shard_tree(params, mesh, min_size=0)
  assert params["embed_tokens"]["embedding"].sharding.spec[0] == "fsdp"  # vocabulary rows split
  task = tasks.DPOTask(beta=0.5, logprob_chunks=logprobs.Chunks(vocabulary=24))
  loss = lambda params, batch: task.loss(nnx.merge(graphdef, params, rest), batch)
  (got_loss, _), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      params, jax.device_put(batch, parallel.batch_sharding(mesh)))
  np.testing.assert_allclose(got_loss, want_loss, atol=1e-5)
  assert_trees_close(grads, want_grads)


@pytest.mark.parametrize("chunks", [logprobs.Chunks(positions=5), logprobs.Chunks(vocabulary=24)],
                         ids=["positions", "vocabulary"])
@pytest.mark.parametrize("packing", [False, True], ids=["rows", "packed"])
def test_sft_chunked_equals_unchunked_with_an_untied_head(packing, chunks):
  """A Llama-family model with its own lm_head kernel (not tied, [width, vocab]): SFT loss and gradients."""
  config = llama.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=4, max_position_embeddings=64,
                             tie_word_embeddings=False)
  model = llama.LlamaForCausalLM(config, rngs=nnx.Rngs(0))
  layout = layouts.SFTRows(max_length=40, packing=packing)
  examples = layout.examples(tokenize.sft_examples(random_pairs(6, seed=7), max_length=40))
  batch = on_device(layout.collate(examples, np.arange(len(examples.input_ids)), 40, 1))
  assert model.head()[1] is False  # the kernel's layout, [width, vocab]
  assert_chunked_equals_unchunked(tasks.SFTTask(), model, batch, chunks)


def test_the_chunk_size_comes_from_the_config_and_is_checked():
  # On by default, above 1 GiB of unchunked logits: vocabulary slices where the head allows, else positions.
  assert tasks.make_task(tiny_config("", "sft")).logprob_chunks == logprobs.Chunks(32, 8192, 2**30)
  fields = {"model.logprob_chunk": 7, "model.logprob_vocab_chunk": 512, "model.logprob_chunk_above_mib": 3}
  for task in ("sft", "dpo", "cpo", "orpo", "kto"):
    assert tasks.make_task(tiny_config("", task, **fields)).logprob_chunks == logprobs.Chunks(7, 512, 3 * 2**20)
  assert not hasattr(tasks.make_task(tiny_config("", "reward")), "logprob_chunks")  # no LM head
  for field in ("model.logprob_chunk", "model.logprob_vocab_chunk", "model.logprob_chunk_above_mib"):
    with pytest.raises(config_lib.ConfigError, match=f"config.{field} = -1 is invalid"):
      config_lib.validate(tiny_config("", "sft", **{field: -1}))


def test_chunks_apply_only_above_their_logits_size():
  chunks = logprobs.Chunks(positions=32, vocabulary=8192, above_bytes=1000)
  assert chunks.for_logits(rows=1, length=10, vocab=25) == logprobs.UNCHUNKED  # 1,000 bytes of fp32 logits: not above
  assert chunks.for_logits(rows=1, length=10, vocab=26) == chunks  # 1,040 bytes
  assert logprobs.Chunks(positions=32).for_logits(1, 1, 1) == logprobs.Chunks(positions=32)  # 0 bytes: always


@pytest.mark.parametrize("above_bytes, chunked", [(0, True), (VOCAB * 3 * 11 * 4, False)], ids=["above", "at"])
def test_head_logprobs_below_the_size_is_the_unchunked_program(above_bytes, chunked):
  """At or below `above_bytes` of logits the traced program is the unchunked one (no scan, no custom VJP)."""
  model = opt.OPTForCausalLM(dataclasses.replace(TINY, vocab_size=VOCAB, hidden_size=WIDTH, word_embed_proj_dim=WIDTH),
                             rngs=nnx.Rngs(0))
  hidden, _, targets = random_inputs()
  chunks = logprobs.Chunks(positions=4, vocabulary=16, above_bytes=above_bytes)
  program = str(jax.make_jaxpr(lambda h: logprobs.head_logprobs(model, h, targets, chunks))(hidden))
  unchunked = str(jax.make_jaxpr(lambda h: logprobs.head_logprobs(model, h, targets, logprobs.UNCHUNKED))(hidden))
  assert (program != unchunked) == chunked
  assert ("scan" in program) == chunked
