"""The RoPE decoder (llama.py) computes transformers' Llama, Qwen2, Qwen3 and Mistral (random weights, fp32); its
exports load back bit-exact; packed and prefix-shared rows give the rows' own log-probs; a data 4 x fsdp 2 mesh
gives the single-device forward and gradient; a reward model exports as LlamaForSequenceClassification."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import family_parity as fp
from jaxalign.models import hub, llama, registry, reward

torch, transformers = fp.torch, fp.transformers

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8}
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None)
CONFIGS = {
    # GQA 4/2, Llama 3 rope scaling, tied head.
    "llama_gqa_llama3_tied": ("llama", dict(SMALL, num_key_value_heads=2, tie_word_embeddings=True,
                                             rope_parameters={"rope_theta": 500.0, **LLAMA3_SCALING})),
    # Untied head, biases on attention and MLP, explicit head_dim != hidden / heads, linear rope scaling.
    "llama_untied_bias_head_dim": ("llama", dict(SMALL, num_key_value_heads=4, head_dim=24, attention_bias=True,
                                                  mlp_bias=True, tie_word_embeddings=False,
                                                  rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                   "rope_theta": 1000.0})),
    "qwen2_qkv_bias": ("qwen2", dict(SMALL, num_key_value_heads=2, tie_word_embeddings=False)),
    # YaRN (Qwen2.5's long-context setting): interpolated low frequencies, attention temperature 0.1 ln(4) + 1.
    "qwen2_yarn": ("qwen2", dict(SMALL, num_key_value_heads=2, tie_word_embeddings=True,
                                 rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1000.0,
                                                  "original_max_position_embeddings": 16})),
    # q/k RMSNorm per head, head_dim 32 != 64 / 4.
    "qwen3_qk_norm_head_dim": ("qwen3", dict(SMALL, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)),
    # Sliding window of 4 slots, shorter than the 11-token rows.
    "mistral_sliding_window": ("mistral", dict(SMALL, num_key_value_heads=2, sliding_window=4, head_dim=16,
                                                tie_word_embeddings=False)),
}


def pair(name, tmp_path, seed=0):
  return fp.torch_and_flax(*CONFIGS[name], tmp_path / "in", seed=seed)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers_left_and_right_padding(name, tmp_path):
  torch_model, model = pair(name, tmp_path)
  assert model.config.model_type == CONFIGS[name][0]
  for side in ("right", "left"):
    fp.assert_logits_match(torch_model, model, side)


@pytest.mark.parametrize("name", ["llama_gqa_llama3_tied", "mistral_sliding_window", "qwen3_qk_norm_head_dim"])
def test_cached_decoding_equals_full_forward(name, tmp_path):
  _, model = pair(name, tmp_path, seed=1)
  fp.assert_cached_decoding_matches(model)


def test_greedy_generation_equals_transformers_generate(tmp_path):
  torch_model, model = pair("llama_gqa_llama3_tied", tmp_path, seed=2)
  fp.assert_greedy_matches_generate(torch_model, model)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_loads_in_transformers_bit_exact(name, tmp_path):
  torch_model, model = pair(name, tmp_path, seed=3)
  config = fp.assert_export_is_bit_exact(torch_model, model, tmp_path / "out")
  assert config["architectures"] == [f"{llama.ARCHITECTURES[config['model_type']]}ForCausalLM"]
  assert hub.from_pretrained(str(tmp_path / "out")).config == model.config


def test_transformers_4_config_form_reads_as_transformers_5_form():
  v5 = {"model_type": "llama", "rope_parameters": {"rope_theta": 500000.0, **LLAMA3_SCALING}, **SMALL}
  v4 = {"model_type": "llama", "rope_theta": 500000.0, "rope_scaling": {**LLAMA3_SCALING}, **SMALL}
  v4["rope_scaling"]["type"] = v4["rope_scaling"].pop("rope_type")  # the oldest spelling
  assert llama.LlamaConfig.from_hf_dict(v4) == llama.LlamaConfig.from_hf_dict(v5)
  config = llama.LlamaConfig.from_hf_dict(v5)
  assert config.rope_type == "llama3" and dict(config.rope_scaling)["factor"] == 8.0
  written = config.to_hf_dict()
  assert llama.LlamaConfig.from_hf_dict(written) == config
  assert written["rope_scaling"]["rope_type"] == "llama3" and written["rope_parameters"]["rope_theta"] == 500000.0


def test_sharded_checkpoint_loads(tmp_path):
  torch_model = fp.make_torch(*CONFIGS["qwen2_qkv_bias"][:1], **CONFIGS["qwen2_qkv_bias"][1])
  torch_model.save_pretrained(tmp_path, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  fp.assert_logits_match(torch_model, hub.from_pretrained(str(tmp_path)), "right")


def test_reward_export_scores_the_same_in_transformers(tmp_path):
  torch_model, _ = pair("llama_untied_bias_head_dim", tmp_path, seed=4)
  model = reward.from_pretrained(str(tmp_path / "in"), heads=("harmless", "helpful"), seed=1)
  assert model.backbone.lm_head is None  # a reward model has no LM head
  pad = 1
  reward.save_pretrained(model, str(tmp_path / "rm"), pad_token_id=pad)
  theirs = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm")).eval()
  assert type(theirs).__name__ == "LlamaForSequenceClassification"
  ids, mask = fp.padded_batch("right", pad_id=pad)
  ids[ids == pad] = 2  # only padding is the pad token
  ids[mask == 0] = pad
  with torch.no_grad():
    expected = theirs(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  np.testing.assert_allclose(got, expected, atol=1e-4)
  assert json.load(open(tmp_path / "rm" / "config.json"))["id2label"] == {"0": "harmless", "1": "helpful"}
  again = reward.from_pretrained(str(tmp_path / "rm"))
  np.testing.assert_array_equal(np.asarray(again(jnp.asarray(ids), jnp.asarray(mask))), got)


# ---------------------------------------------------------------------- packing, prefix sharing, sharding


TINY = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rope_theta=100.0, tie_word_embeddings=False)


def token_logprobs(model, ids, **kwargs):
  logp = jax.nn.log_softmax(fp.forward(model, ids, **kwargs)[:, :-1], axis=-1)
  return jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[0, :, 0]


def test_packed_rows_give_each_sequence_its_own_logprobs():
  model = llama.LlamaForCausalLM(TINY, rngs=nnx.Rngs(0))
  a, b = jnp.array([[5, 6, 7, 8, 9]]), jnp.array([[10, 11, 12, 13]])
  packed = jnp.concatenate([a, b, jnp.array([[0, 0]])], axis=1)
  segments = jnp.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0]])
  positions = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0]])
  out = token_logprobs(model, packed, attention_mask=segments > 0, segment_ids=segments, positions=positions)
  np.testing.assert_allclose(out[:4], token_logprobs(model, a), atol=1e-5)
  np.testing.assert_allclose(out[5:8], token_logprobs(model, b), atol=1e-5)


def test_prefix_shared_row_gives_the_separate_rows_logprobs():
  """prompt + chosen + rejected in one row, rejected attending to the prompt only and its positions continuing the
  prompt's: both responses score as in their own rows."""
  model = llama.LlamaForCausalLM(TINY, rngs=nnx.Rngs(1))
  prompt, chosen, rejected = [5, 6, 7], [8, 9, 10], [11, 12]
  p, c, r = len(prompt), len(chosen), len(rejected)
  row = jnp.array([prompt + chosen + rejected])
  positions = jnp.array([list(range(p + c)) + list(range(p, p + r))])
  allowed = np.ones((1, p + c + r, p + c + r), bool)
  allowed[0, p + c:, p:p + c] = False  # rejected does not see chosen
  logp = jax.nn.log_softmax(fp.forward(model, row, positions=positions, mask=jnp.asarray(allowed)), axis=-1)[0]
  separate_c = token_logprobs(model, jnp.array([prompt + chosen]))
  separate_r = token_logprobs(model, jnp.array([prompt + rejected]))
  shared_c = logp[np.arange(p - 1, p + c - 1), chosen]
  # The first rejected token is predicted from the prompt's last token, the others from rejected's own.
  predecessors = [p - 1] + list(range(p + c, p + c + r - 1))
  shared_r = logp[np.array(predecessors), rejected]
  np.testing.assert_allclose(shared_c, separate_c[p - 1:], atol=1e-5)
  np.testing.assert_allclose(shared_r, separate_r[p - 1:], atol=1e-5)


@fp.needs_8
def test_sharded_forward_and_grad_equal_single_device():
  fp.assert_sharded_matches_single_device(llama.LlamaForCausalLM(TINY, rngs=nnx.Rngs(2)), TINY.vocab_size)


def test_remat_and_bf16_keep_the_function():
  model = llama.LlamaForCausalLM(TINY, rngs=nnx.Rngs(3))
  ids = jnp.array([[5, 6, 7, 8, 9, 10]])
  graphdef, state = nnx.split(model)
  remat = nnx.merge(nnx.split(llama.LlamaForCausalLM(TINY.replace(remat=True), rngs=nnx.Rngs(3)))[0], state)
  np.testing.assert_allclose(fp.forward(remat, ids), fp.forward(model, ids), atol=1e-6)
  bf16 = nnx.merge(nnx.split(llama.LlamaForCausalLM(TINY.replace(dtype="bfloat16"), rngs=nnx.Rngs(3)))[0], state)
  out = fp.forward(bf16, ids)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, fp.forward(model, ids), atol=5e-2)
  assert registry.family_of(TINY).hf_causal_lm == "LlamaForCausalLM"
