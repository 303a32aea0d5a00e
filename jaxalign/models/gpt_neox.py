"""GPT-NeoX (Black et al., 2022; the Pythia suite of the DPO paper's HH experiments) as a Flax NNX module: token
embeddings, pre-LayerNorm blocks of multi-head attention with partial rotary embeddings (the first `rotary_pct` of
each head's features) and a GELU feed-forward network, a final LayerNorm and an untied head (`embed_out`).

Quirks, where they occur: q, k and v come from one fused `query_key_value` projection whose output is laid out per
head as [q | k | v]; with `use_parallel_residual` (Pythia) attention and MLP both read the block's input,
x + attn(ln1(x)) + mlp(ln2(x)); without it the MLP reads the attention's output, as in GPT-2.

Computes the same function as transformers' `GPTNeoXForCausalLM` (tests/test_gpt_neox_parity.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.models import layers
from jaxalign.models.layers import dropout, project

_HF_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "max_position_embeddings", "layer_norm_eps", "tie_word_embeddings", "use_parallel_residual", "attention_bias",
    "attention_dropout", "initializer_range", "pad_token_id", "bos_token_id", "eos_token_id",
)


@dataclasses.dataclass(frozen=True)
class GPTNeoXConfig:
  """Architecture (the fields of transformers' GPTNeoXConfig) plus how to compute it."""

  vocab_size: int = 50432
  hidden_size: int = 6144
  num_hidden_layers: int = 44
  num_attention_heads: int = 64
  intermediate_size: int = 24576
  hidden_act: str = "gelu"
  rotary_pct: float = 0.25
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_scaling: tuple = ()
  max_position_embeddings: int = 2048
  layer_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  use_parallel_residual: bool = True
  attention_bias: bool = True
  attention_dropout: float = 0.0
  dropout: float = 0.0  # transformers' hidden_dropout (embeddings and each residual branch)
  initializer_range: float = 0.02
  pad_token_id: int | None = None
  bos_token_id: int | None = 0
  eos_token_id: int | tuple | None = 2
  # How to compute (never exported).
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  attention_impl: str = "auto"

  model_type = "gpt_neox"

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                       f"({self.num_attention_heads})")
    layers.check_choice("hidden_act", self.hidden_act, layers.ACTIVATIONS)
    layers.check_choice("attention_impl", self.attention_impl, layers.ATTENTION_IMPLS)
    layers.check_choice("rope_type", self.rope_type, ("default", "linear", "llama3"))

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.rotary_pct)

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], **overrides) -> GPTNeoXConfig:
    """From a transformers config.json in transformers 4's form (`rotary_pct`, `rotary_emb_base`) or 5's
    (`rope_parameters` with `partial_rotary_factor`); `overrides` win."""
    if hf.get("model_type") != "gpt_neox":
      raise ValueError(f"Expected a GPT-NeoX config (model_type 'gpt_neox'), got {hf.get('model_type')!r}")
    fields = layers.fields_from_hf(hf, _HF_FIELDS)
    rope = layers.rope_from_hf(hf, default_theta=10000.0, theta_key="rotary_emb_base", partial_key="rotary_pct",
                               default_partial=0.25)
    fields["rotary_pct"] = rope.pop("partial_rotary_factor")
    if hf.get("hidden_dropout") is not None:
      fields["dropout"] = hf["hidden_dropout"]
    fields.update(rope, **overrides)
    return cls(**fields)

  def to_hf_dict(self) -> dict[str, Any]:
    """The config.json contents, RoPE in transformers 5's form and 4's (`rotary_pct`, `rotary_emb_base`)."""
    hf = layers.hf_fields(self, _HF_FIELDS)
    hf.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"], hidden_dropout=self.dropout,
              rotary_pct=self.rotary_pct, rotary_emb_base=self.rope_theta,
              **layers.rope_to_hf(self.rope_theta, self.rope_type, self.rope_scaling,
                                  partial_rotary_factor=self.rotary_pct))
    return hf

  def replace(self, **changes) -> GPTNeoXConfig:
    return dataclasses.replace(self, **changes)



def _layer_norm(config: GPTNeoXConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return layers.layer_norm(config.hidden_size, eps=config.layer_norm_eps, dtype=config.dtype,
                           param_dtype=config.param_dtype, rngs=rngs)


class GPTNeoXAttention(nnx.Module):
  """Multi-head attention from the fused `query_key_value` projection, rotary on the first rotary_dim features."""

  def __init__(self, config: GPTNeoXConfig, *, rngs: nnx.Rngs):
    self.config = config
    width, bias = config.hidden_size, config.attention_bias
    self.query_key_value = layers.linear(config, rngs, width, 3 * width, bias)
    self.dense = layers.linear(config, rngs, width, width, bias)

  def __call__(self, x, mask, rope, layer_cache=None, cache_index=None, dropout_key=None):
    cfg = self.config
    batch, length, _ = x.shape
    keys = layers.split_key(dropout_key, 3)
    qkv = project(self.query_key_value, x, keys[0]).reshape(batch, length, cfg.num_attention_heads, 3 * cfg.head_dim)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    q, k = layers.apply_rope(q, rope), layers.apply_rope(k, rope)
    out, new_cache = layers.cached_attention(q, k, v, mask, layer_cache, cache_index,
                                             attention_impl=cfg.attention_impl, dropout_rate=cfg.attention_dropout,
                                             dropout_key=keys[1])
    return project(self.dense, out, keys[2]), new_cache


class GPTNeoXMLP(nnx.Module):

  def __init__(self, config: GPTNeoXConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.dense_h_to_4h = layers.linear(config, rngs, config.hidden_size, config.intermediate_size)
    self.dense_4h_to_h = layers.linear(config, rngs, config.intermediate_size, config.hidden_size)

  def __call__(self, x, dropout_key=None):
    return layers.feed_forward(self.dense_h_to_4h, self.dense_4h_to_h, self.config.hidden_act, x, dropout_key)


class GPTNeoXLayer(nnx.Module):
  """Parallel residual: x + attn(ln1(x)) + mlp(ln2(x)); serial: h = x + attn(ln1(x)), then h + mlp(ln2(h))."""

  def __init__(self, config: GPTNeoXConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.input_layernorm = _layer_norm(config, rngs)
    self.post_attention_layernorm = _layer_norm(config, rngs)
    self.attention = GPTNeoXAttention(config, rngs=rngs)
    self.mlp = GPTNeoXMLP(config, rngs=rngs)

  def __call__(self, x, mask, rope, layer_cache=None, cache_index=None, dropout_key=None):
    rate = self.config.dropout
    keys = layers.split_key(dropout_key, 4)
    attn, new_cache = self.attention(self.input_layernorm(x), mask, rope, layer_cache, cache_index, keys[0])
    attn = dropout(attn, rate, keys[1])
    if self.config.use_parallel_residual:
      return x + attn + dropout(self.mlp(self.post_attention_layernorm(x), keys[2]), rate, keys[3]), new_cache
    h = x + attn
    return h + dropout(self.mlp(self.post_attention_layernorm(h), keys[2]), rate, keys[3]), new_cache


class GPTNeoXForCausalLM(layers.CausalLM):
  """The decoder (`embed_in`, layers, `final_layer_norm`) and its head `embed_out`; the template of layers.CausalLM.

  `lm_head=False` leaves the untied head out (a reward model's backbone).
  """

  embedding_dropout = True

  def __init__(self, config: GPTNeoXConfig, *, rngs: nnx.Rngs, lm_head: bool = True):
    self.config = config
    self.embed_in = nnx.Embed(config.vocab_size, config.hidden_size, dtype=config.dtype,
                              param_dtype=config.param_dtype,
                              embedding_init=nnx.initializers.normal(config.initializer_range), rngs=rngs)
    self.layers = nnx.List([GPTNeoXLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)])
    self.final_layer_norm = _layer_norm(config, rngs)
    untied = lm_head and not config.tie_word_embeddings
    self.embed_out = layers.linear(config, rngs, config.hidden_size, config.vocab_size, False) if untied else None


  def embed(self, input_ids: jax.Array, positions: jax.Array, dropout_key=None) -> jax.Array:
    return dropout(self.embed_in(input_ids), self.config.dropout, dropout_key)

  def attention_kinds(self) -> dict[str, layers.AttentionKind]:
    return {"global": layers.AttentionKind(inv_freq=_inverse_frequencies(self.config))}

  def final_norm(self, x: jax.Array) -> jax.Array:
    return self.final_layer_norm(x)

  def head(self) -> tuple[jax.Array, bool]:
    return layers.head_weight(self.embed_out, self.embed_in, self.config)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """fp32 logits from the compute-dtype product with the head (the embedding table when tied)."""
    return layers.head_logits(hidden, self.embed_out, self.embed_in, self.config)



@functools.lru_cache(maxsize=None)
def _inverse_frequencies(config: GPTNeoXConfig):
  return layers.rope_inverse_frequencies(config.rotary_dim, config.rope_theta, config.rope_type,
                                         dict(config.rope_scaling))
