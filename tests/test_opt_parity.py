"""Our Flax OPT computes the same function as transformers' PyTorch OPTForCausalLM (random weights, fp32)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.models import hub, layers, opt, registry

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Both layer-norm placements; the post-LN one also has opt-350m's 512-vs-1024 style projection (here 16 vs 32).
TINY_CONFIGS = {
    "pre_ln": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32,
                   do_layer_norm_before=True),
    "post_ln_proj": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, ffn_dim=48,
                         word_embed_proj_dim=16, do_layer_norm_before=False),
}


def make_torch_opt(arch: dict, seed: int = 0):
  """A transformers OPT with random weights, perturbed so biases and LayerNorms are not at their init values."""
  torch.manual_seed(seed)
  config = transformers.OPTConfig(vocab_size=99, max_position_embeddings=40, dropout=0.0, **arch)
  model = transformers.OPTForCausalLM(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model


def torch_to_flax(torch_model, folder) -> opt.OPTForCausalLM:
  torch_model.save_pretrained(folder)
  return hub.from_pretrained(str(folder))


def torch_logits(torch_model, ids, mask):
  with torch.no_grad():
    out = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  return out.logits.numpy()


def padded_batch(padding_side: str):
  rng = np.random.default_rng(0)
  lengths = [11, 7, 3, 11]
  ids = np.full((4, 11), 1, np.int64)
  mask = np.zeros((4, 11), np.int64)
  for row, n in enumerate(lengths):
    span = slice(0, n) if padding_side == "right" else slice(11 - n, 11)
    ids[row, span] = rng.integers(3, 99, n)
    mask[row, span] = 1
  return ids, mask


@pytest.mark.parametrize("arch_name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_logits_match_transformers(arch_name, padding_side, tmp_path):
  torch_model = make_torch_opt(TINY_CONFIGS[arch_name])
  model = torch_to_flax(torch_model, tmp_path)
  ids, mask = padded_batch(padding_side)
  expected = torch_logits(torch_model, ids, mask)
  got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  real = mask.astype(bool)
  diff = np.abs(got - expected)[real].max()
  assert diff <= 1e-4, f"max abs logit diff on non-pad positions {diff}"


def test_export_roundtrip_is_bit_exact(tmp_path):
  torch_model = make_torch_opt(TINY_CONFIGS["post_ln_proj"], seed=1)
  model = torch_to_flax(torch_model, tmp_path / "in")
  hub.save_pretrained(model, str(tmp_path / "out"))
  reloaded = transformers.OPTForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  original = torch_model.state_dict()
  for name, tensor in reloaded.state_dict().items():
    assert torch.equal(tensor, original[name]), name
  assert reloaded.lm_head.weight.data_ptr() == reloaded.model.decoder.embed_tokens.weight.data_ptr()  # still tied
  config = json.load(open(tmp_path / "out" / "config.json"))
  assert config["model_type"] == "opt" and config["word_embed_proj_dim"] == 16


def test_kv_cache_decoding_matches_full_forward(tmp_path):
  torch_model = make_torch_opt(TINY_CONFIGS["post_ln_proj"], seed=2)
  model = torch_to_flax(torch_model, tmp_path)
  ids, mask = padded_batch("left")
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  full = np.asarray(model(ids, mask))
  # Prefill 5 tokens (two rows are still all padding), then decode the rest one token at a time.
  cache = model.init_cache(ids.shape[0], ids.shape[1], dtype=jnp.float32)
  hidden, cache = model.hidden_states(ids[:, :5], mask[:, :5], cache=cache)
  steps = [model.logits(hidden)]
  for t in range(5, ids.shape[1]):
    hidden, cache = model.hidden_states(ids[:, t:t + 1], mask[:, t:t + 1], cache=cache)
    steps.append(model.logits(hidden))
  cached = np.asarray(jnp.concatenate(steps, axis=1))
  real = np.asarray(mask).astype(bool)
  assert np.abs(cached - full)[real].max() <= 1e-5


def test_segment_ids_isolate_packed_examples(tmp_path):
  model = torch_to_flax(make_torch_opt(TINY_CONFIGS["pre_ln"], seed=3), tmp_path)
  a, b = jnp.array([[5, 6, 7, 8, 9]]), jnp.array([[10, 11, 12]])
  packed = jnp.concatenate([a, b, jnp.array([[1, 1]])], axis=1)
  segments = jnp.array([[1, 1, 1, 1, 1, 2, 2, 2, 0, 0]])
  positions = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2, 0, 0]])
  out = model(packed, segments > 0, segment_ids=segments, positions=positions)
  np.testing.assert_allclose(out[:, :5], model(a), atol=1e-5)
  np.testing.assert_allclose(out[:, 5:8], model(b), atol=1e-5)


def test_explicit_mask_restricts_attention(tmp_path):
  model = torch_to_flax(make_torch_opt(TINY_CONFIGS["pre_ln"], seed=4), tmp_path)
  ids = jnp.array([[5, 6, 7, 8]])
  # Token 3 may not see token 2: equal to a forward over [5, 6, 8] with position 3 kept for the last token.
  explicit = jnp.ones((1, 4, 4), bool).at[0, 3, 2].set(False)
  out = model(ids, mask=explicit)
  ref = model(jnp.array([[5, 6, 8]]), positions=jnp.array([[0, 1, 3]]))
  np.testing.assert_allclose(out[:, 3], ref[:, 2], atol=1e-5)
  np.testing.assert_allclose(out[:, :3], model(ids[:, :3]), atol=1e-5)


def test_opt_350m_preset_has_the_real_parameter_count():
  model = registry.abstract_causal_lm(opt.preset("opt-350m"))
  assert layers.count_params(model) == 331_196_416


def test_presets_match_shared_config_if_present():
  path = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "models", "opt-350m", "config.json")
  if not os.path.exists(path):
    pytest.skip(f"real opt-350m config not found at {path} (only on the development machines)")
  from_file = opt.OPTConfig.from_hf_dict(json.load(open(path)))
  assert from_file == opt.preset("opt-350m")


def test_dropout_only_when_a_key_is_given(tmp_path):
  model = torch_to_flax(make_torch_opt(TINY_CONFIGS["pre_ln"], seed=5), tmp_path)
  model = opt.OPTForCausalLM(model.config.replace(dropout=0.5), rngs=nnx.Rngs(0))
  ids = jnp.array([[5, 6, 7, 8]])
  np.testing.assert_array_equal(model(ids), model(ids))
  train_a = model(ids, dropout_key=jax.random.key(0))
  assert not np.allclose(train_a, model(ids))
  np.testing.assert_array_equal(train_a, model(ids, dropout_key=jax.random.key(0)))
