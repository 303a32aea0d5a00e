"""GPT-2 (Radford et al., 2019) as a Flax NNX module: token + learned position embeddings, pre-LayerNorm blocks of
multi-head attention and a GELU (tanh approximation) feed-forward network, a final LayerNorm and a head tied to the
token embeddings.

Quirks, where they occur: transformers stores GPT-2's projections as `Conv1D` weights, already [in, out] (so they
load untransposed), and q, k and v as one `c_attn` projection laid out [q | k | v]; `scale_attn_by_inverse_layer_idx`
divides layer i's attention scores by i + 1. Config fields keep transformers' GPT-2 names (`n_embd`, `n_layer`…);
the protocol's names (`hidden_size`, `num_hidden_layers`, `max_position_embeddings`…) are properties.

Computes the same function as transformers' `GPT2LMHeadModel` given the positions it is given (tests/
test_gpt2_parity.py): positions count real tokens, so a left-padded row starts at position 0, as in `generate`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.models import layers
from jaxalign.models.layers import dropout, project

_HF_FIELDS = (
    "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
    "layer_norm_epsilon", "attn_pdrop", "initializer_range", "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx", "tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id",
)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """Architecture (the fields of transformers' GPT2Config) plus how to compute it."""

  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  n_inner: int | None = None  # None: 4 * n_embd
  activation_function: str = "gelu_new"
  layer_norm_epsilon: float = 1e-5
  dropout: float = 0.1  # transformers' resid_pdrop and embd_pdrop
  attn_pdrop: float = 0.1
  initializer_range: float = 0.02
  scale_attn_weights: bool = True
  scale_attn_by_inverse_layer_idx: bool = False
  tie_word_embeddings: bool = True
  pad_token_id: int | None = None
  bos_token_id: int | None = 50256
  eos_token_id: int | tuple | None = 50256
  # How to compute (never exported).
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  attention_impl: str = "auto"

  model_type = "gpt2"

  def __post_init__(self):
    if self.n_embd % self.n_head:
      raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
    layers.check_choice("activation_function", self.activation_function, layers.ACTIVATIONS)
    layers.check_choice("attention_impl", self.attention_impl, layers.ATTENTION_IMPLS)

  hidden_size = property(lambda self: self.n_embd)
  num_hidden_layers = property(lambda self: self.n_layer)
  num_attention_heads = property(lambda self: self.n_head)
  max_position_embeddings = property(lambda self: self.n_positions)
  head_dim = property(lambda self: self.n_embd // self.n_head)
  intermediate_size = property(lambda self: self.n_inner or 4 * self.n_embd)

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], **overrides) -> GPT2Config:
    if hf.get("model_type") != "gpt2":
      raise ValueError(f"Expected a GPT-2 config (model_type 'gpt2'), got {hf.get('model_type')!r}")
    if hf.get("add_cross_attention"):
      raise ValueError("GPT-2 configs with add_cross_attention=True (encoder-decoder use) are not supported")
    fields = layers.fields_from_hf(hf, _HF_FIELDS)
    if hf.get("resid_pdrop") is not None:
      fields["dropout"] = hf["resid_pdrop"]
    return cls(**{**fields, **overrides})

  def to_hf_dict(self) -> dict[str, Any]:
    hf = layers.hf_fields(self, _HF_FIELDS)
    hf.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], resid_pdrop=self.dropout,
              embd_pdrop=self.dropout)
    return hf

  def replace(self, **changes) -> GPT2Config:
    return dataclasses.replace(self, **changes)



def _layer_norm(config: GPT2Config, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return layers.layer_norm(config.n_embd, eps=config.layer_norm_epsilon, dtype=config.dtype,
                           param_dtype=config.param_dtype, rngs=rngs)


class GPT2Attention(nnx.Module):

  def __init__(self, config: GPT2Config, layer_index: int, *, rngs: nnx.Rngs):
    self.config = config
    self.c_attn = layers.linear(config, rngs, config.n_embd, 3 * config.n_embd)
    self.c_proj = layers.linear(config, rngs, config.n_embd, config.n_embd)
    scale = 1.0 / np.sqrt(config.head_dim) if config.scale_attn_weights else 1.0
    self.scale = scale / (layer_index + 1) if config.scale_attn_by_inverse_layer_idx else scale

  def __call__(self, x, mask, layer_cache=None, cache_index=None, dropout_key=None):
    cfg = self.config
    batch, length, _ = x.shape
    keys = layers.split_key(dropout_key, 3)
    q, k, v = (t.reshape(batch, length, cfg.n_head, cfg.head_dim)
               for t in jnp.split(project(self.c_attn, x, keys[0]), 3, axis=-1))
    out, new_cache = layers.cached_attention(q, k, v, mask, layer_cache, cache_index,
                                             attention_impl=cfg.attention_impl, dropout_rate=cfg.attn_pdrop,
                                             dropout_key=keys[1], scale=self.scale)
    return project(self.c_proj, out, keys[2]), new_cache


class GPT2MLP(nnx.Module):

  def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
    self.config = config
    self.c_fc = layers.linear(config, rngs, config.n_embd, config.intermediate_size)
    self.c_proj = layers.linear(config, rngs, config.intermediate_size, config.n_embd)

  def __call__(self, x, dropout_key=None):
    return layers.feed_forward(self.c_fc, self.c_proj, self.config.activation_function, x, dropout_key)


class GPT2Block(nnx.Module):
  """x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

  def __init__(self, config: GPT2Config, layer_index: int, *, rngs: nnx.Rngs):
    self.config = config
    self.ln_1 = _layer_norm(config, rngs)
    self.attn = GPT2Attention(config, layer_index, rngs=rngs)
    self.ln_2 = _layer_norm(config, rngs)
    self.mlp = GPT2MLP(config, rngs=rngs)

  def __call__(self, x, mask, context=None, layer_cache=None, cache_index=None, dropout_key=None):
    """One block; `context` is unused (positions are added once, at the embeddings)."""
    rate = self.config.dropout
    keys = layers.split_key(dropout_key, 4)
    h, new_cache = self.attn(self.ln_1(x), mask, layer_cache, cache_index, keys[0])
    x = x + dropout(h, rate, keys[1])
    x = x + dropout(self.mlp(self.ln_2(x), keys[2]), rate, keys[3])
    return x, new_cache


class GPT2LMHeadModel(layers.CausalLM):
  """Embeddings (`wte`, `wpe`), blocks, `ln_f` and the tied head; the template of layers.CausalLM.

  `lm_head=False` leaves an untied head out (a reward model's backbone); GPT-2's own head is tied.
  """

  embedding_dropout = True

  def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs, lm_head: bool = True):
    self.config = config
    init = nnx.initializers.normal(config.initializer_range)
    embed = lambda n: nnx.Embed(n, config.n_embd, dtype=config.dtype, param_dtype=config.param_dtype,
                                embedding_init=init, rngs=rngs)
    self.wte, self.wpe = embed(config.vocab_size), embed(config.n_positions)
    self.layers = nnx.List([GPT2Block(config, i, rngs=rngs) for i in range(config.n_layer)])
    self.ln_f = _layer_norm(config, rngs)
    untied = lm_head and not config.tie_word_embeddings
    self.lm_head = layers.linear(config, rngs, config.n_embd, config.vocab_size, False) if untied else None


  def embed(self, input_ids: jax.Array, positions: jax.Array, dropout_key=None) -> jax.Array:
    # Padding (position -1) reads row 0 of the position table; it is masked out anyway.
    x = self.wte(input_ids) + self.wpe(jnp.maximum(positions, 0))
    return dropout(x, self.config.dropout, dropout_key)

  def final_norm(self, x: jax.Array) -> jax.Array:
    return self.ln_f(x)

  def head(self) -> tuple[jax.Array, bool]:
    return layers.head_weight(self.lm_head, self.wte, self.config)

  def logits(self, hidden: jax.Array) -> jax.Array:
    return layers.head_logits(hidden, self.lm_head, self.wte, self.config)

