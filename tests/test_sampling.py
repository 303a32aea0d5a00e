"""Generation: greedy equals transformers' generate token for token; sampling is seeded; filters, EOS, stop strings;
the Sampler's log-probs equal a teacher-forced forward's, its shared prefill equals separate ones, new parameters
need no new program, a mesh gives what one device gives."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import parallel, sampling
from jaxalign.models import hub
from jaxalign.sampling import SamplingOptions

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

NEW_TOKENS = 12
VOCAB = 384  # the tiny tokenizer's vocabulary (tests/conftest.py)
PROMPT_LENGTHS = [9, 4, 6, 9]  # one batch, left-padded to 9


def random_opt(folder, spread: float):
  """A random post-LN OPT with opt-350m's embedding projection, in transformers and in ours (same weights), each
  weight moved by `spread` x N(0, 1) from its initial value."""
  torch.manual_seed(0)
  config = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  ffn_dim=64, word_embed_proj_dim=16, do_layer_norm_before=False,
                                  max_position_embeddings=64, dropout=0.0)
  torch_model = transformers.OPTForCausalLM(config).eval()
  with torch.no_grad():
    for p in torch_model.parameters():
      p.add_(torch.randn_like(p) * spread)
  torch_model.save_pretrained(folder)
  return torch_model, hub.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def torch_and_flax(tmp_path_factory):
  # Far from init, so greedy outputs vary instead of repeating one token (logits up to about 23).
  return random_opt(tmp_path_factory.mktemp("tiny_opt"), 0.5)


@pytest.fixture(scope="module")
def moderate_model(tmp_path_factory):
  """Logits within about ±4 for the log-prob comparisons of two fp32 programs (a cached decode and a full forward):
  their rounding differences grow with the logits (up to 3e-5 at `model`'s ±23)."""
  return random_opt(tmp_path_factory.mktemp("moderate_opt"), 0.2)[1]


@pytest.fixture(scope="module")
def model(torch_and_flax):
  return torch_and_flax[1]


def left_padded_prompts(lengths=PROMPT_LENGTHS, seed=0):
  rng = np.random.default_rng(seed)
  width = max(lengths)
  ids = np.ones((len(lengths), width), np.int64)
  mask = np.zeros((len(lengths), width), np.int64)
  for row, n in enumerate(lengths):
    ids[row, width - n:] = np.concatenate([[2], rng.integers(4, VOCAB, n - 1)])  # OPT's leading </s>
    mask[row, width - n:] = 1
  return ids, mask


def greedy(model, ids, mask, **options):
  out = sampling.generate_ids(model, ids, mask, options=SamplingOptions(max_new_tokens=NEW_TOKENS, **options))
  return np.asarray(out.tokens), np.asarray(out.lengths)


def torch_greedy(torch_model, ids, mask, eos_id):
  with torch.no_grad():
    out = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                               max_new_tokens=NEW_TOKENS, eos_token_id=eos_id, pad_token_id=1).numpy()
  new = out[:, ids.shape[1]:]
  # transformers stops when every row has ended; we always return max_new_tokens columns.
  return np.pad(new, ((0, 0), (0, NEW_TOKENS - new.shape[1])), constant_values=1)


def eos_ending_row_early(free: np.ndarray, row: int) -> int:
  """A token that `row` generates at step >= 2 and another row never does: as EOS it ends `row` early (at its first
  appearance) while that other row runs to max_new_tokens."""
  others = [set(other.tolist()) for i, other in enumerate(free) if i != row]
  return next(int(t) for t in free[row, 2:] if any(t not in other for other in others))


def first_stop(row: np.ndarray, token: int) -> int:
  """The length of a row generated with `token` as EOS: up to and including its first occurrence."""
  hits = np.flatnonzero(row == token)
  return int(hits[0]) + 1 if hits.size else len(row)


@pytest.mark.parametrize("lengths", [[9, 9, 9, 9], PROMPT_LENGTHS], ids=["no_padding", "left_padding"])
def test_greedy_matches_transformers_generate(torch_and_flax, lengths):
  torch_model, model = torch_and_flax
  ids, mask = left_padded_prompts(lengths)
  free, _ = greedy(model, ids, mask, eos_id=None)
  eos = eos_ending_row_early(free, 0)  # so that early endings are compared as well
  expected = torch_greedy(torch_model, ids, mask, eos)
  tokens, new_lengths = greedy(model, ids, mask, eos_id=eos)
  np.testing.assert_array_equal(tokens, expected)
  assert new_lengths.tolist() == [first_stop(row, eos) for row in free]
  assert new_lengths[0] < NEW_TOKENS and new_lengths.max() == NEW_TOKENS


def test_eos_ends_a_row_while_the_others_continue(model):
  ids, mask = left_padded_prompts()
  free, _ = greedy(model, ids, mask, eos_id=None)
  eos = eos_ending_row_early(free, 1)
  tokens, lengths = greedy(model, ids, mask, eos_id=eos)
  for row, length in zip(range(len(ids)), lengths):
    assert length == first_stop(free[row], eos)
    np.testing.assert_array_equal(tokens[row, :length], free[row, :length])
    assert np.all(tokens[row, length:] == 1)  # padding after the end
  assert lengths[1] < NEW_TOKENS and lengths.max() == NEW_TOKENS


def test_stop_sequence_ends_a_row_in_token_space(model):
  ids, mask = left_padded_prompts()
  free, _ = greedy(model, ids, mask, eos_id=None)
  stop = tuple(int(t) for t in free[2, 5:7])
  _, lengths = greedy(model, ids, mask, eos_id=None, stop_sequences=(stop,))
  for row, length in zip(free, lengths):
    ends = [i + 2 for i in range(NEW_TOKENS - 1) if tuple(row[i:i + 2]) == stop]
    assert length == (ends[0] if ends else NEW_TOKENS)
  assert lengths[2] <= 7


def test_temperature_0_is_greedy_whatever_the_filters(model):
  ids, mask = left_padded_prompts()
  expected, _ = greedy(model, ids, mask, eos_id=None)
  before = sampling.compiled_program_count()
  options = SamplingOptions(max_new_tokens=NEW_TOKENS, eos_id=None, temperature=0.0, top_k=5, top_p=0.5)
  tokens = sampling.generate_ids(model, ids, mask, key=jax.random.key(3), options=options).tokens
  np.testing.assert_array_equal(tokens, expected)
  assert sampling.compiled_program_count() == before  # shares the plain greedy program


def test_sharded_batch_equals_single_device(model):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (tests/conftest.py forces 8 CPU devices)")
  ids, mask = left_padded_prompts()
  expected, _ = greedy(model, ids, mask, eos_id=None)
  ids, mask, expected = np.tile(ids, (2, 1)), np.tile(mask, (2, 1)), np.tile(expected, (2, 1))
  sharding = parallel.batch_sharding(parallel.make_mesh(data=4, fsdp=2))
  options = SamplingOptions(max_new_tokens=NEW_TOKENS, eos_id=None)
  tokens = sampling.generate_ids(model, ids, mask, options=options, sharding=sharding).tokens
  assert tokens.sharding.is_equivalent_to(sharding, 2)
  assert sampling.batch_shards(sharding) == 8 and sampling.batch_shards(None) == 1
  np.testing.assert_array_equal(np.asarray(tokens), expected)


# ---------------------------------------------------------------------------------------------------------------
# The Sampler: log-probs, finish reasons, shared prefill, new parameters, a mesh.

SAMPLED = dict(temperature=0.8, top_k=40, top_p=0.9)


def teacher_forced_logprobs(model, ids, mask, out, options: SamplingOptions) -> np.ndarray:
  """The log-probs of the sampled tokens from one forward over prompt + completion (no cache), in the distribution
  `options.logprobs` names; 0 after each row's end."""
  new_mask = np.arange(options.max_new_tokens)[None] < np.asarray(out.lengths)[:, None]
  logits = model(np.concatenate([ids, np.asarray(out.tokens)], 1), np.concatenate([mask, new_mask], 1))
  logits = logits[:, ids.shape[1] - 1:-1]  # position P - 1 + t predicts completion token t
  if not options.greedy and options.logprobs != "raw":
    logits = logits / options.temperature
    if options.logprobs == "processed":
      logits = sampling.top_p_filter(sampling.top_k_filter(logits, options.top_k), options.top_p)
  logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), jnp.asarray(out.tokens)[..., None], -1)[..., 0]
  return np.where(new_mask, np.asarray(logprobs), 0.0)


@pytest.mark.parametrize("settings", [dict(), dict(SAMPLED), dict(SAMPLED, logprobs="processed"),
                                      dict(SAMPLED, logprobs="raw"), dict(temperature=1.3)],
                         ids=["greedy", "temperature", "processed", "raw", "temperature_only"])
def test_logprobs_equal_a_teacher_forced_forward(moderate_model, settings):
  model = moderate_model
  ids, mask = left_padded_prompts()
  options = SamplingOptions(max_new_tokens=NEW_TOKENS, eos_id=None, **settings)  # every row runs to the limit
  out = sampling.generate_ids(model, ids, mask, key=jax.random.key(5), options=options)
  assert out.logprobs.dtype == jnp.float32
  expected = teacher_forced_logprobs(model, ids, mask, out, options)
  np.testing.assert_allclose(np.asarray(out.logprobs), expected, atol=1e-5, rtol=0)
  assert np.all(np.asarray(out.logprobs) < 0)
  if settings.get("logprobs") == "processed":  # filtered tokens never drawn: the filters remove probability mass
    raw = teacher_forced_logprobs(model, ids, mask, out, dataclasses.replace(options, logprobs="temperature"))
    assert np.all(np.asarray(out.logprobs) >= raw - 1e-6) and np.any(np.asarray(out.logprobs) > raw + 1e-3)


def test_finish_reasons_and_lengths(model):
  ids, mask = left_padded_prompts()
  free = greedy(model, ids, mask, eos_id=None)[0]
  eos = eos_ending_row_early(free, 1)
  out = sampling.generate_ids(model, ids, mask, options=SamplingOptions(max_new_tokens=NEW_TOKENS, eos_id=eos))
  lengths, reasons = np.asarray(out.lengths), np.asarray(out.finish_reasons)
  for row in range(len(ids)):
    hit = first_stop(free[row], eos) < NEW_TOKENS or free[row, -1] == eos
    assert lengths[row] == first_stop(free[row], eos)
    assert reasons[row] == (sampling.FinishReason.STOP if hit else sampling.FinishReason.LENGTH)
    assert np.all(np.asarray(out.logprobs)[row, lengths[row]:] == 0)
  assert reasons[1] == sampling.FinishReason.STOP and lengths[1] < NEW_TOKENS
  assert sampling.FinishReason.LENGTH in reasons  # a row cut at the limit
  stop = tuple(int(t) for t in free[2, 5:7])  # a stop sequence ends a row too
  out = sampling.generate_ids(model, ids, mask, options=SamplingOptions(max_new_tokens=NEW_TOKENS, eos_id=None,
                                                                        stop_sequences=(stop,)))
  assert out.finish_reasons[2] == sampling.FinishReason.STOP and out.lengths[2] <= 7


def make_sampler(model, options, *, batch=4, num_generations=1, sharding=None):
  graphdef, state = nnx.split(model)
  return sampling.Sampler(graphdef, state, batch_size=batch, prompt_length=max(PROMPT_LENGTHS), options=options,
                          num_generations=num_generations, sharding=sharding), state


def test_shared_prefill_equals_separate_prefills(moderate_model):
  model = moderate_model
  ids, mask = left_padded_prompts()
  options = SamplingOptions(max_new_tokens=NEW_TOKENS, eos_id=None, **SAMPLED)
  group = 3
  keys = jax.random.split(jax.random.key(11), len(ids) * group)
  shared, state = make_sampler(model, options, num_generations=group)
  separate, _ = make_sampler(model, options, batch=len(ids) * group)
  a = shared(state, ids, mask, keys)
  b = separate(state, np.repeat(ids, group, 0), np.repeat(mask, group, 0), keys)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  np.testing.assert_array_equal(np.asarray(a.lengths), np.asarray(b.lengths))
  np.testing.assert_array_equal(np.asarray(a.finish_reasons), np.asarray(b.finish_reasons))
  np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-5, rtol=0)
  tokens = np.asarray(a.tokens).reshape(len(ids), group, NEW_TOKENS)
  assert all(len({row.tobytes() for row in completions}) > 1 for completions in tokens)  # each has its own key


def perturbed(state, seed):
  keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(state))))
  return jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape, x.dtype), state)


def test_new_parameters_are_used_without_recompiling(model):
  ids, mask = left_padded_prompts()
  options = SamplingOptions(max_new_tokens=NEW_TOKENS, eos_id=None, **SAMPLED)
  sampler, state = make_sampler(model, options, num_generations=2)
  key = jax.random.key(2)
  first = sampler(state, ids, mask, key)
  before = sampling.compiled_program_count()
  new_state = perturbed(state, 1)
  second = sampler(new_state, ids, mask, key)
  assert sampling.compiled_program_count() == before
  new_model = nnx.merge(sampler.graphdef, new_state)
  expected = sampling.generate_ids(new_model, ids, mask, key=key, options=options, num_generations=2)
  np.testing.assert_array_equal(np.asarray(second.tokens), np.asarray(expected.tokens))
  np.testing.assert_array_equal(np.asarray(second.logprobs), np.asarray(expected.logprobs))
  assert not np.array_equal(np.asarray(second.tokens), np.asarray(first.tokens))
  wrong = jax.tree.map(lambda x: x.astype(jnp.bfloat16), new_state)
  with pytest.raises(ValueError, match=r"state .*bfloat16.*built for float32"):
    sampler(wrong, ids, mask, key)
  with pytest.raises(ValueError, match=r"\[batch_size, prompt_length\] = \[4, 9\]"):
    sampler(state, ids[:, 1:], mask[:, 1:], key)


def test_stream_yields_the_calls_tokens(model):
  ids, mask = left_padded_prompts()
  free = greedy(model, ids, mask, eos_id=None)[0]
  options = SamplingOptions(max_new_tokens=NEW_TOKENS, eos_id=eos_ending_row_early(free, 0), **SAMPLED)
  sampler, state = make_sampler(model, options)
  whole = sampler(state, ids, mask, jax.random.key(4))
  streamed = np.stack(list(sampler.stream(state, ids, mask, jax.random.key(4))), 1)
  np.testing.assert_array_equal(streamed, np.asarray(whole.tokens)[:, :streamed.shape[1]])
  assert streamed.shape[1] == int(np.max(whole.lengths))  # stops once every row has ended


def test_sharded_sampler_equals_one_device(moderate_model):
  model = moderate_model
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (tests/conftest.py forces 8 CPU devices)")
  ids, mask = left_padded_prompts()
  options = SamplingOptions(max_new_tokens=NEW_TOKENS, eos_id=None, **SAMPLED)
  mesh = parallel.make_mesh(data=4, fsdp=2)
  sharding = parallel.batch_sharding(mesh)
  sampler, state = make_sampler(model, options, num_generations=2, sharding=sharding)
  sharded_state = parallel.shard_tree(state, mesh, min_size=1)
  assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(sharded_state))  # FSDP-split
  out = sampler(sharded_state, ids, mask, jax.random.key(9))
  assert out.tokens.sharding.is_equivalent_to(sharding, 2)
  single, _ = make_sampler(model, options, num_generations=2)
  expected = single(state, ids, mask, jax.random.key(9))
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))
  np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(expected.logprobs), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# The filters, on hand-made logits.


def test_temperature_scales_logits():
  np.testing.assert_allclose(sampling.apply_temperature(jnp.array([2.0, -1.0]), 0.5), [4.0, -2.0])


def test_top_k_filter_keeps_the_k_largest_and_ties():
  logits = jnp.array([[1.0, 3.0, 2.0, 0.5], [5.0, 5.0, 1.0, 5.0]])
  out = np.asarray(sampling.top_k_filter(logits, 2))
  np.testing.assert_array_equal(out[0], [-np.inf, 3.0, 2.0, -np.inf])
  np.testing.assert_array_equal(out[1], [5.0, 5.0, -np.inf, 5.0])  # three-way tie at the 2nd place: all kept
  np.testing.assert_array_equal(sampling.top_k_filter(logits, 0), logits)


@pytest.mark.parametrize("p, kept", [(0.4, [0]), (0.75, [0, 1]), (0.85, [0, 1, 2]), (0.99, [0, 1, 2, 3]),
                                     (1.0, [0, 1, 2, 3])])
def test_top_p_filter_keeps_the_smallest_set_reaching_p(p, kept):
  # Probabilities 0.5, 0.3, 0.15, 0.05, shuffled: indices 2, 0, 3, 1 in order of probability.
  probs = np.array([0.3, 0.05, 0.5, 0.15])
  order = [2, 0, 3, 1]
  out = np.asarray(sampling.top_p_filter(jnp.log(jnp.asarray(probs))[None], p))[0]
  expected_kept = sorted(order[i] for i in kept)
  assert np.flatnonzero(np.isfinite(out)).tolist() == expected_kept
  np.testing.assert_allclose(out[expected_kept], np.log(probs[expected_kept]), rtol=1e-6)


def test_top_k_1_is_greedy():
  logits = jax.random.normal(jax.random.key(0), (64, 100))
  keys = jax.random.split(jax.random.key(1), 64)
  select = jax.jit(sampling.select_tokens, static_argnames="options")
  top1 = select(logits, keys, options=SamplingOptions(temperature=0.7, top_k=1))
  drawn = select(logits, keys, options=SamplingOptions(temperature=0.7))
  np.testing.assert_array_equal(top1, jnp.argmax(logits, axis=-1))
  assert not np.array_equal(drawn, top1)  # without the filter the same keys draw other tokens


def test_options_reject_invalid_values():
  for bad, match in [(dict(temperature=-1.0), "temperature"), (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"),
                     (dict(max_new_tokens=0), "max_new_tokens"), (dict(stop_sequences=((),)), "empty")]:
    with pytest.raises(ValueError, match=match):
      SamplingOptions(**bad)


def test_generate_ids_rejects_right_padding_and_missing_key(model):
  ids, mask = left_padded_prompts()
  with pytest.raises(ValueError, match="padded on the left"):
    sampling.generate_ids(model, ids, mask[:, ::-1])
  with pytest.raises(ValueError, match="needs a PRNG key"):
    sampling.generate_ids(model, ids, mask, options=SamplingOptions(temperature=1.0))
  with pytest.raises(ValueError, match="max_position_embeddings"):
    sampling.generate_ids(model, ids, mask, options=SamplingOptions(max_new_tokens=60))


# ---------------------------------------------------------------------------------------------------------------
# Text in, text out.

PROMPTS = [
    "\n\nHuman: How do I bake bread at home?\n\nAssistant:",
    "\n\nHuman: What is the capital of France?\n\nAssistant:",
    "\n\nHuman: Tell me a joke.\n\nAssistant:",
    "\n\nHuman: Can you help me with my homework? It is about the capital of France.\n\nAssistant:",
    "\n\nHuman: Hi\n\nAssistant:",
]


def test_trim_response_cuts_at_the_first_stop_string_and_strips():
  assert sampling.trim_response("  Paris. \n\nHuman: and Rome?", ["\n\nHuman:"]) == "Paris."
  assert sampling.trim_response("a STOP b END c", ["END", "STOP"]) == "a"
  assert sampling.trim_response(" no stop here \n", ["\n\nHuman:"]) == "no stop here"


# Sampled (with a top-p filter), so the batching test below checks that each prompt's draws are its own;
# max_prompt_length 32 is one length bucket. Shared by two tests, which then share a compiled program.
TEXT_KWARGS = dict(max_new_tokens=NEW_TOKENS, temperature=1.0, top_p=0.9, seed=7, max_prompt_length=32,
                   stop_strings=())


def test_generate_texts_trims_at_stop_strings(model, tiny_tokenizer):
  free = sampling.generate(model, tiny_tokenizer, PROMPTS, batch_size=8, **TEXT_KWARGS)
  assert all(0 < n <= NEW_TOKENS for n in free.num_new_tokens)
  # A stop string taken from the middle of one response cuts that response (and any other containing it) there.
  text = next(t for t in free.texts if len(t) >= 6)
  stop = text[len(text) // 2:len(text) // 2 + 3]
  texts = sampling.generate_texts(model, tiny_tokenizer, PROMPTS, batch_size=8, **{**TEXT_KWARGS,
                                                                                   "stop_strings": (stop,)})
  assert texts == [sampling.trim_response(t, [stop]) for t in free.texts]
  assert texts != free.texts and all(t == t.strip() for t in texts)


def test_sampling_is_reproducible_per_seed_whatever_the_batching(model, tiny_tokenizer):
  before = sampling.compiled_program_count()
  in_pairs = sampling.generate(model, tiny_tokenizer, PROMPTS, batch_size=2, **TEXT_KWARGS)
  assert sampling.compiled_program_count() - before == 1  # three batches (the last padded), one shape
  one_batch = sampling.generate(model, tiny_tokenizer, PROMPTS, batch_size=8, **TEXT_KWARGS)
  assert in_pairs.texts == one_batch.texts
  other_seed = sampling.generate(model, tiny_tokenizer, PROMPTS, batch_size=8, **{**TEXT_KWARGS, "seed": 8})
  assert other_seed.texts != one_batch.texts


def test_long_prompts_keep_their_end(tiny_tokenizer):
  encoded, truncated = sampling.encode_prompts(tiny_tokenizer, PROMPTS, max_prompt_length=10)
  full = tiny_tokenizer(PROMPTS)["input_ids"]
  assert truncated == sum(len(ids) > 10 for ids in full) > 0
  assert encoded == [ids[-10:] for ids in full]


def test_padded_batch_size():
  assert sampling.padded_batch_size(100, 64) == 64
  assert sampling.padded_batch_size(5, 64) == 8
  assert sampling.padded_batch_size(1, 64) == 1
  assert sampling.padded_batch_size(100, 12, multiple=8) == 16
