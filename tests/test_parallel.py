"""Sharded forward and gradient on a data=4 x fsdp=2 mesh of 8 CPU devices equal the single-device results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import parallel
from jaxalign.models import opt

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py forces 8 CPU devices)")

TINY = opt.OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                     word_embed_proj_dim=16, do_layer_norm_before=False, max_position_embeddings=64)


def test_mesh_shape_inference_and_errors():
  assert parallel.mesh_shape(8) == (8, 1)
  assert parallel.mesh_shape(8, fsdp=2) == (4, 2)
  assert parallel.mesh_shape(8, data=2, fsdp=-1) == (2, 4)
  with pytest.raises(ValueError, match="does not use the 8 devices"):
    parallel.mesh_shape(8, data=3, fsdp=1)
  with pytest.raises(ValueError, match="at most one"):
    parallel.mesh_shape(8, data=-1, fsdp=-1)


def test_fsdp_rule_splits_the_largest_divisible_dim():
  assert parallel.fsdp_spec((1000, 64), 2, min_size=0) == jax.sharding.PartitionSpec("fsdp", None)
  assert parallel.fsdp_spec((64, 1000), 2, min_size=0) == jax.sharding.PartitionSpec(None, "fsdp")
  assert parallel.fsdp_spec((999, 64), 2, min_size=0) == jax.sharding.PartitionSpec(None, "fsdp")
  assert parallel.fsdp_spec((7, 9), 2, min_size=0) == jax.sharding.PartitionSpec()
  assert parallel.fsdp_spec((1000, 64), 2, min_size=10**6) == jax.sharding.PartitionSpec()
  assert parallel.fsdp_spec((1000, 64), 1, min_size=0) == jax.sharding.PartitionSpec()


def loss_fn(model, ids, mask):
  logp = jax.nn.log_softmax(model(ids, mask)[:, :-1])
  target = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  return -(target * mask[:, 1:]).sum() / mask[:, 1:].sum()


@needs_8
def test_sharded_forward_and_grad_equal_single_device():
  model = opt.OPTForCausalLM(TINY, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(3, 128, (8, 12)), jnp.int32)
  mask = jnp.asarray(np.arange(12)[None] < rng.integers(4, 13, (8, 1)), jnp.int32)

  @nnx.jit
  def forward_and_grad(model, ids, mask):
    return model(ids, mask), nnx.grad(loss_fn)(model, ids, mask)

  ref_logits, ref_grads = forward_and_grad(model, ids, mask)

  mesh = parallel.make_mesh(data=4, fsdp=2)
  graphdef, state = nnx.split(model)
  sharded_state = parallel.shard_tree(state, mesh, min_size=0)
  sharded_model = nnx.merge(graphdef, sharded_state)
  batch = parallel.batch_sharding(mesh)
  logits, grads = forward_and_grad(sharded_model, jax.device_put(ids, batch), jax.device_put(mask, batch))

  fc1 = sharded_model.layers[0].fc1.kernel[...]
  assert fc1.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert fc1.addressable_shards[0].data.shape == (32, 32)  # half of the 64 columns per fsdp shard
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(got, want, atol=1e-5)


@needs_8
def test_from_pretrained_places_each_parameter_on_its_fsdp_sharding(tmp_path):
  from jaxalign.models import hub

  model = opt.OPTForCausalLM(TINY, rngs=nnx.Rngs(0))
  hub.save_pretrained(model, str(tmp_path))
  mesh = parallel.make_mesh(data=4, fsdp=2)
  loaded = hub.from_pretrained(str(tmp_path), shardings_fn=lambda abstract: parallel.tree_shardings(
      nnx.state(abstract), mesh, min_size=0))
  kernel = loaded.layers[1].fc2.kernel[...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  assert {s.data.shape for s in kernel.addressable_shards} == {(32, 32)}
  ids = jnp.array([[5, 6, 7, 8, 9, 10, 11, 12]] * 8)
  np.testing.assert_allclose(loaded(ids), model(ids), atol=1e-5)
