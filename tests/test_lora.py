"""LoRA: starts as the base model, trains only adapters, turns off by zeroing, merges exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.models import hub, lora, opt

TINY = opt.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                     word_embed_proj_dim=16, do_layer_norm_before=False, max_position_embeddings=32,
                     dropout=0.0)  # so only the adapters' own dropout is on
IDS = jnp.array([[5, 6, 7, 8, 9, 10]])


def perturbed_adapters(model):
  """Gives every adapter a nonzero B so the update is visible."""
  graphdef, lora_state, rest = nnx.split(model, nnx.LoRAParam, ...)
  lora_state = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), lora_state)
  return nnx.merge(graphdef, lora_state, rest)


def test_fresh_adapter_is_identity_and_only_adapters_are_lora_params():
  base = opt.OPTForCausalLM(TINY, rngs=nnx.Rngs(0))
  expected = base(IDS)
  model = lora.apply_lora(nnx.clone(base), targets=("q_proj", "v_proj", "fc1"), rank=4, alpha=8)
  np.testing.assert_allclose(model(IDS), expected, atol=1e-6)
  lora_state = nnx.state(model, nnx.LoRAParam)
  assert len(jax.tree.leaves(lora_state)) == 2 * 3 * TINY.num_hidden_layers
  # Kernel paths are unchanged, so the HF name map still covers the wrapped model.
  assert ("layers", 0, "self_attn", "q_proj", "kernel") in dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def test_zeroed_adapters_give_the_base_model_and_merge_is_exact():
  base = opt.OPTForCausalLM(TINY, rngs=nnx.Rngs(0))
  model = perturbed_adapters(lora.apply_lora(nnx.clone(base), rank=4, alpha=16))
  adapted = model(IDS)
  assert not np.allclose(adapted, base(IDS), atol=1e-4)
  graphdef, lora_state, rest = nnx.split(model, nnx.LoRAParam, ...)
  off = nnx.merge(graphdef, jax.tree.map(jnp.zeros_like, lora_state), rest)
  np.testing.assert_allclose(off(IDS), base(IDS), atol=1e-6)
  merged = lora.merge_lora(model)
  assert not lora.has_lora(merged) and lora.has_lora(model)
  np.testing.assert_allclose(merged(IDS), adapted, atol=1e-5)


def test_merged_model_exports_with_the_plain_name_map(tmp_path):
  model = perturbed_adapters(lora.apply_lora(opt.OPTForCausalLM(TINY, rngs=nnx.Rngs(0))))
  hub.save_pretrained(lora.merge_lora(model), str(tmp_path))
  np.testing.assert_allclose(hub.from_pretrained(str(tmp_path))(IDS), model(IDS), atol=1e-5)


def test_lora_dropout_needs_a_key():
  model = perturbed_adapters(lora.apply_lora(opt.OPTForCausalLM(TINY, rngs=nnx.Rngs(0)), dropout=0.5))
  np.testing.assert_array_equal(model(IDS), model(IDS))
  assert not np.allclose(model(IDS, dropout_key=jax.random.key(3)), model(IDS))


def test_unknown_target_is_a_clear_error():
  with pytest.raises(ValueError, match="lora.targets"):
    lora.apply_lora(opt.OPTForCausalLM(TINY, rngs=nnx.Rngs(0)), targets=("query",))
