"""Shared checks of a model family against transformers' PyTorch model (random weights, fp32): logits over padded
batches, cached decoding, greedy generation, import -> export -> transformers bit-exact, and a data 4 x fsdp 2 mesh
giving the single-device forward and gradient."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import parallel, sampling
from jaxalign.models import hub

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 99
LENGTHS = (11, 7, 3, 11)


@nnx.jit
def forward(model, ids, attention_mask=None, **kwargs):
  """fp32 logits, compiled (one program per shape: much faster than op-by-op on a busy CPU)."""
  return model(ids, attention_mask, **kwargs)


@nnx.jit
def decode_step(model, ids, mask, cache):
  hidden, cache = model.hidden_states(ids, mask, cache=cache)
  return model.logits(hidden), cache


def make_torch(model_type: str, seed: int = 0, **arch):
  """A transformers causal LM with random weights, every parameter perturbed (biases and norms off their init)."""
  torch.manual_seed(seed)
  config = transformers.AutoConfig.for_model(model_type, vocab_size=VOCAB, **arch)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model


def to_flax(torch_model, folder, **compute):
  torch_model.save_pretrained(folder)
  return hub.from_pretrained(str(folder), **compute)


def torch_and_flax(model_type: str, arch: dict, folder, seed: int = 0):
  """(transformers' random model of `arch`, the same weights imported into ours through `folder`)."""
  torch_model = make_torch(model_type, seed=seed, **arch)
  return torch_model, to_flax(torch_model, folder)


def padded_batch(padding_side: str, pad_id: int = 0, seed: int = 0):
  rng = np.random.default_rng(seed)
  width = max(LENGTHS)
  ids = np.full((len(LENGTHS), width), pad_id, np.int64)
  mask = np.zeros((len(LENGTHS), width), np.int64)
  for row, n in enumerate(LENGTHS):
    span = slice(0, n) if padding_side == "right" else slice(width - n, width)
    ids[row, span] = rng.integers(3, VOCAB, n)
    mask[row, span] = 1
  return ids, mask


def torch_logits(torch_model, ids, mask):
  """transformers' logits with positions counted over real tokens (as `generate` and our default do)."""
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    out = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                      position_ids=torch.tensor(positions))
  return out.logits.numpy()


def assert_logits_match(torch_model, model, padding_side: str, atol: float = 1e-4):
  ids, mask = padded_batch(padding_side)
  expected = torch_logits(torch_model, ids, mask)
  got = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask)))
  diff = np.abs(got - expected)[mask.astype(bool)].max()
  assert diff <= atol, f"max abs logit diff on non-pad positions {diff}"


def assert_cached_decoding_matches(model, prefill: int = 5, atol: float = 1e-5):
  """Prefill `prefill` slots of a left-padded batch (some rows still all padding), then decode one token at a time:
  the same logits as the full forward."""
  ids, mask = (jnp.asarray(a) for a in padded_batch("left"))
  full = np.asarray(forward(model, ids, mask))
  cache = model.init_cache(ids.shape[0], ids.shape[1], dtype=jnp.float32)
  logits, cache = decode_step(model, ids[:, :prefill], mask[:, :prefill], cache)
  steps = [logits]
  for t in range(prefill, ids.shape[1]):
    logits, cache = decode_step(model, ids[:, t:t + 1], mask[:, t:t + 1], cache)
    steps.append(logits)
  cached = np.asarray(jnp.concatenate(steps, axis=1))
  assert np.abs(cached - full)[np.asarray(mask).astype(bool)].max() <= atol


def assert_greedy_matches_generate(torch_model, model, new_tokens: int = 12):
  """Our greedy decoding (sampling.generate_ids) gives transformers' `generate` tokens, token for token."""
  ids, mask = padded_batch("left")
  options = sampling.SamplingOptions(max_new_tokens=new_tokens, eos_id=None, pad_id=0)
  out = sampling.generate_ids(model, ids, mask, options=options)
  ours = out.tokens
  assert np.all(np.asarray(out.lengths) == new_tokens)
  with torch.no_grad():
    theirs = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
  np.testing.assert_array_equal(np.asarray(ours), theirs[:, ids.shape[1]:].numpy())


def assert_export_is_bit_exact(torch_model, model, out_dir):
  """Our export loads in transformers' AutoModelForCausalLM as the model we imported, tensor for tensor."""
  hub.save_pretrained(model, str(out_dir))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out_dir)).eval()
  assert type(reloaded) is type(torch_model)
  original, again = torch_model.state_dict(), reloaded.state_dict()
  assert set(again) == set(original)
  for name, tensor in again.items():
    assert torch.equal(tensor, original[name]), name
  return json.load(open(out_dir / "config.json"))


needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py forces 8 CPU devices)")


def _loss(model, ids, mask):
  logp = jax.nn.log_softmax(model(ids, mask)[:, :-1])
  target = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  return -(target * mask[:, 1:]).sum() / mask[:, 1:].sum()


@nnx.jit
def _forward_and_grad(model, ids, mask):
  return model(ids, mask), nnx.grad(_loss)(model, ids, mask)


def assert_sharded_matches_single_device(model, vocab_size: int, length: int = 12):
  """On a data 4 x fsdp 2 mesh (parameters split over fsdp, rows over data) the model gives the single-device
  logits and gradient of a next-token loss over right-padded rows."""
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(3, vocab_size, (8, length)), jnp.int32)
  mask = jnp.asarray(np.arange(length)[None] < rng.integers(4, length + 1, (8, 1)), jnp.int32)
  ref_logits, ref_grads = _forward_and_grad(model, ids, mask)
  mesh = parallel.make_mesh(data=4, fsdp=2)
  graphdef, state = nnx.split(model)
  sharded = nnx.merge(graphdef, parallel.shard_tree(state, mesh, min_size=0))
  batch = parallel.batch_sharding(mesh)
  logits, grads = _forward_and_grad(sharded, jax.device_put(ids, batch), jax.device_put(mask, batch))
  gate = sharded.layers[0].mlp.gate_proj.kernel[...]
  assert "fsdp" in gate.sharding.spec  # parameters really are split over the fsdp axis
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(got, want, atol=1e-5)
