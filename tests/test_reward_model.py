"""The OPT reward model exports as transformers' OPTForSequenceClassification and scores identically."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.models import opt, reward

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = opt.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                     word_embed_proj_dim=16, do_layer_norm_before=False, max_position_embeddings=32)


@pytest.mark.parametrize("heads", [("reward",), ("harmless", "helpful")])
def test_export_matches_transformers_sequence_classifier(heads, tmp_path):
  model = reward.RewardModel(TINY, heads, rngs=nnx.Rngs(0))
  ids = np.array([[2, 5, 6, 7, 8], [2, 9, 10, 1, 1]])
  mask = (ids != 1).astype(np.int64)
  ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  reward.save_pretrained(model, str(tmp_path))
  theirs = transformers.OPTForSequenceClassification.from_pretrained(str(tmp_path)).eval()
  with torch.no_grad():
    expected = theirs(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  np.testing.assert_allclose(ours, expected, atol=1e-5)
  reloaded = reward.from_pretrained(str(tmp_path))
  assert reloaded.heads == heads
  np.testing.assert_array_equal(np.asarray(reloaded(jnp.asarray(ids), jnp.asarray(mask))), ours)


def test_reward_read_at_last_real_token_with_left_padding():
  model = reward.RewardModel(TINY, rngs=nnx.Rngs(1))
  right = model(jnp.array([[2, 5, 6, 1, 1]]), jnp.array([[1, 1, 1, 0, 0]]))
  left = model(jnp.array([[1, 1, 2, 5, 6]]), jnp.array([[0, 0, 1, 1, 1]]))
  np.testing.assert_allclose(right, left, atol=1e-5)
