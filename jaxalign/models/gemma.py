"""Gemma 2 (Gemma Team, 2024) and Gemma 3's text decoder (Gemma Team, 2025) as one Flax NNX module: token embeddings
scaled by √hidden, blocks of grouped-query attention with RoPE and a GeGLU feed-forward network, each branch between
a pre-norm and a post-norm, a final norm and a head tied to the embeddings.

Gemma's quirks, where they occur:
- `layer_types`: sliding-window layers ("sliding_attention", a query sees the `sliding_window` most recent slots)
  between global ones ("full_attention"): Gemma 2 alternates them, Gemma 3 has five local layers to one global.
  Gemma 3 gives each kind its own rotary base (`rope_local_base_freq` for the local layers, `rope_theta` and any
  scaling for the global ones); Gemma 2 shares one.
- Scores are scaled by `query_pre_attn_scalar`^-0.5, not head_dim^-0.5.
- Soft-capping (Gemma 2): cap · tanh(x / cap) on the attention scores and on the final logits. transformers' Gemma 3
  reads `attn_logit_softcapping` but never applies it; neither do we.
- RMSNorm scales by (1 + weight) in fp32 (weights stored as offsets from 1); Gemma 3 also normalises each head of q
  and k before RoPE.
- The embedding scale √hidden is rounded to the compute dtype first (transformers rounds it to the weights' dtype:
  55.4256 becomes 55.5 in bf16), as the released models were trained.

Computes the same function as transformers' `Gemma2ForCausalLM` and `Gemma3ForCausalLM` (tests/test_gemma_parity.py).
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

MODEL_TYPES = ("gemma2", "gemma3_text")
ARCHITECTURES = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
SEQUENCE_CLASSIFIERS = {"gemma2": "Gemma2ForSequenceClassification",
                        "gemma3_text": "Gemma3TextForSequenceClassification"}
SLIDING, FULL = "sliding_attention", "full_attention"

# Fields read from and written back to a transformers config.json as they are.
_HF_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_activation", "max_position_embeddings", "rms_norm_eps",
    "tie_word_embeddings", "attention_bias", "attention_dropout", "query_pre_attn_scalar", "sliding_window",
    "layer_types", "final_logit_softcapping", "attn_logit_softcapping", "initializer_range", "pad_token_id",
    "bos_token_id", "eos_token_id",
)
# What transformers' Gemma2Config / Gemma3TextConfig default to where a config.json leaves a field out.
_COMMON_DEFAULTS = dict(
    hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
    head_dim=256, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, tie_word_embeddings=True,
    attention_bias=False, attention_dropout=0.0, query_pre_attn_scalar=256, sliding_window=4096,
    initializer_range=0.02, pad_token_id=0, eos_token_id=1, bos_token_id=2,
)
_HF_DEFAULTS = {
    "gemma2": dict(_COMMON_DEFAULTS, vocab_size=256000, max_position_embeddings=8192, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0),
    "gemma3_text": dict(_COMMON_DEFAULTS, vocab_size=262208, max_position_embeddings=131072,
                        final_logit_softcapping=None, attn_logit_softcapping=None),
}
# Rotary bases when a config.json gives none: Gemma 2 one for all; Gemma 3 (global, local).
_DEFAULT_THETA = {"gemma2": (10000.0, None), "gemma3_text": (1_000_000.0, 10000.0)}


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  """Architecture (the fields of transformers' Gemma2Config / Gemma3TextConfig) plus how to compute it."""

  model_type: str = "gemma3_text"
  vocab_size: int = 262208
  hidden_size: int = 2304
  intermediate_size: int = 9216
  num_hidden_layers: int = 26
  num_attention_heads: int = 8
  num_key_value_heads: int = 4
  head_dim: int = 256
  hidden_activation: str = "gelu_pytorch_tanh"
  max_position_embeddings: int = 131072
  rms_norm_eps: float = 1e-6
  rope_theta: float | None = None  # the global layers' base (every layer's in Gemma 2); None: the model type's
  rope_type: str = "default"  # the global layers' scaling: default | linear
  rope_scaling: tuple = ()
  rope_local_base_freq: float | None = None  # Gemma 3's sliding layers' base; None: the model type's
  tie_word_embeddings: bool = True
  attention_bias: bool = False
  attention_dropout: float = 0.0
  query_pre_attn_scalar: float = 256
  sliding_window: int = 4096
  layer_types: tuple = ()  # SLIDING / FULL per layer; () means the model type's pattern
  final_logit_softcapping: float | None = None
  attn_logit_softcapping: float | None = None
  initializer_range: float = 0.02
  pad_token_id: int | None = 0
  bos_token_id: int | None = 2
  eos_token_id: int | tuple | None = 1
  # How to compute (never exported). `dropout` is residual dropout, which Gemma does not have (0 keeps
  # transformers' function); the trainer's model.dropout sets it.
  dropout: float = 0.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  attention_impl: str = "auto"

  def __post_init__(self):
    layers.check_choice("model_type", self.model_type, MODEL_TYPES)
    layers.check_choice("hidden_activation", self.hidden_activation, layers.ACTIVATIONS)
    layers.check_choice("attention_impl", self.attention_impl, layers.ATTENTION_IMPLS)
    layers.check_choice("rope_type", self.rope_type, ("default", "linear"))
    object.__setattr__(self, "layer_types",
                       tuple(self.layer_types) or default_layer_types(self.model_type, self.num_hidden_layers))
    default_global, default_local = _DEFAULT_THETA[self.model_type]
    object.__setattr__(self, "rope_theta", self.rope_theta or default_global)
    if self.model_type == "gemma2" and self.rope_local_base_freq is not None:
      raise ValueError("gemma2 has one rotary base for all layers (rope_theta); rope_local_base_freq must be None")
    object.__setattr__(self, "rope_local_base_freq", self.rope_local_base_freq or default_local)
    if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - {SLIDING, FULL}:
      raise ValueError(f"layer_types must give {SLIDING!r} or {FULL!r} for each of the {self.num_hidden_layers} "
                       f"layers; got {self.layer_types}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                       f"num_key_value_heads ({self.num_key_value_heads})")

  @property
  def qk_norm(self) -> bool:
    return self.model_type == "gemma3_text"

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], **overrides) -> GemmaConfig:
    """From a transformers config.json in transformers 4's form (`rope_theta`, `rope_local_base_freq`,
    `rope_scaling`, `sliding_window_pattern`) or 5's (`rope_parameters`, per layer type for Gemma 3, and
    `layer_types`); `overrides` (dtype, remat, dropout…) win."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
      hint = " (a multimodal Gemma 3: load its text model, model_type 'gemma3_text')" if model_type == "gemma3" else ""
      raise ValueError(f"Expected a config of model_type {MODEL_TYPES}, got {model_type!r}{hint}")
    if hf.get("use_bidirectional_attention"):
      raise ValueError(f"{model_type} configs with use_bidirectional_attention=True (an encoder) are not supported")
    # A null field means the default, except special-token ids and soft-caps (null there means "none").
    hf = {**_HF_DEFAULTS[model_type],
          **{k: v for k, v in hf.items() if v is not None or k.endswith(("token_id", "softcapping"))}}
    fields = layers.fields_from_hf(hf, _HF_FIELDS)
    if "layer_types" not in hf and "sliding_window_pattern" in hf:
      fields["layer_types"] = default_layer_types(model_type, hf["num_hidden_layers"], hf["sliding_window_pattern"])
    fields.update(model_type=model_type, **_rope_from_hf(model_type, hf), **overrides)
    return cls(**fields)

  def to_hf_dict(self) -> dict[str, Any]:
    """The transformers config.json contents, RoPE in transformers 5's form (`rope_parameters`) and 4's."""
    hf = layers.hf_fields(self, _HF_FIELDS)
    hf.update(model_type=self.model_type, architectures=[ARCHITECTURES[self.model_type]], rope_theta=self.rope_theta,
              use_bidirectional_attention=False)
    rope = layers.rope_to_hf(self.rope_theta, self.rope_type, self.rope_scaling)
    if self.model_type == "gemma2":
      return {**hf, **rope}
    local = {"rope_type": "default", "rope_theta": self.rope_local_base_freq}
    return {**hf, "rope_scaling": rope["rope_scaling"], "rope_local_base_freq": self.rope_local_base_freq,
            "rope_parameters": {FULL: rope["rope_parameters"], SLIDING: local}}

  def replace(self, **changes) -> GemmaConfig:
    return dataclasses.replace(self, **changes)


def default_layer_types(model_type: str, num_layers: int, pattern: int | None = None) -> tuple[str, ...]:
  """transformers' default: every `pattern`-th layer global, the others sliding (Gemma 2: 2, Gemma 3: 6)."""
  pattern = pattern or (2 if model_type == "gemma2" else 6)
  return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(num_layers))


def _rope_from_hf(model_type: str, hf: dict[str, Any]) -> dict[str, Any]:
  """rope_theta / rope_type / rope_scaling (global layers) and rope_local_base_freq from either config form."""
  default_global, default_local = _DEFAULT_THETA[model_type]  # (transformers' defaults)
  by_kind = hf.get("rope_parameters") or {}
  if FULL in by_kind:  # transformers 5, Gemma 3: one set of parameters per layer type
    local = dict(by_kind.get(SLIDING) or {})
    if local.get("rope_type", "default") != "default":
      raise ValueError(f"{model_type}: rope scaling of the sliding layers is not supported, got {local}")
    hf = {"rope_parameters": by_kind[FULL]}
    local_theta = local.get("rope_theta", default_local)
  else:
    local_theta = hf.get("rope_local_base_freq", default_local) if default_local else None
  rope = layers.rope_from_hf(hf, default_theta=default_global)
  if rope.pop("partial_rotary_factor") != 1.0:
    raise ValueError(f"{model_type}: partial_rotary_factor other than 1 is not supported")
  return dict(rope, rope_local_base_freq=None if local_theta is None else float(local_theta))


def _norm(config: GemmaConfig, size: int) -> layers.RMSNorm:
  return layers.RMSNorm(size, eps=config.rms_norm_eps, dtype=config.dtype, param_dtype=config.param_dtype,
                        plus_one=True)


class GemmaAttention(nnx.Module):
  """Grouped-query attention, scores scaled by query_pre_attn_scalar^-0.5 (and soft-capped in Gemma 2); Gemma 3
  normalises each head of q and k before RoPE."""

  def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs):
    self.config = config
    c, bias = config, config.attention_bias
    self.q_proj = layers.linear(c, rngs, c.hidden_size, c.num_attention_heads * c.head_dim, bias)
    self.k_proj = layers.linear(c, rngs, c.hidden_size, c.num_key_value_heads * c.head_dim, bias)
    self.v_proj = layers.linear(c, rngs, c.hidden_size, c.num_key_value_heads * c.head_dim, bias)
    self.o_proj = layers.linear(c, rngs, c.num_attention_heads * c.head_dim, c.hidden_size, bias)
    if config.qk_norm:
      self.q_norm, self.k_norm = _norm(c, c.head_dim), _norm(c, c.head_dim)
    else:
      self.q_norm = self.k_norm = None
    self.softcap = config.attn_logit_softcapping if config.model_type == "gemma2" else None

  def __call__(self, x, mask, rope, layer_cache=None, cache_index=None, dropout_key=None):
    cfg = self.config
    batch, length, _ = x.shape
    keys = layers.split_key(dropout_key, 5)
    q = project(self.q_proj, x, keys[0]).reshape(batch, length, cfg.num_attention_heads, cfg.head_dim)
    k = project(self.k_proj, x, keys[1]).reshape(batch, length, cfg.num_key_value_heads, cfg.head_dim)
    v = project(self.v_proj, x, keys[2]).reshape(batch, length, cfg.num_key_value_heads, cfg.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = layers.apply_rope(q, rope), layers.apply_rope(k, rope)
    out, new_cache = layers.cached_attention(q, k, v, mask, layer_cache, cache_index,
                                             attention_impl=cfg.attention_impl, dropout_rate=cfg.attention_dropout,
                                             dropout_key=keys[3], scale=cfg.query_pre_attn_scalar ** -0.5,
                                             softcap=self.softcap)
    return project(self.o_proj, out, keys[4]), new_cache


class GemmaMLP(nnx.Module):
  """GeGLU: down(gelu_tanh(gate(x)) · up(x))."""

  def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs):
    self.config = config
    c = config
    self.gate_proj = layers.linear(c, rngs, c.hidden_size, c.intermediate_size, False)
    self.up_proj = layers.linear(c, rngs, c.hidden_size, c.intermediate_size, False)
    self.down_proj = layers.linear(c, rngs, c.intermediate_size, c.hidden_size, False)

  def __call__(self, x, dropout_key=None):
    return layers.gated_feed_forward(self.gate_proj, self.up_proj, self.down_proj, self.config.hidden_activation,
                                     x, dropout_key)


class GemmaDecoderLayer(nnx.Module):
  """x + post_norm(attn(pre_norm(x))), then x + post_norm(mlp(pre_norm(x))): each branch normalised on both ends."""

  def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.input_layernorm = _norm(config, config.hidden_size)
    self.self_attn = GemmaAttention(config, rngs=rngs)
    self.post_attention_layernorm = _norm(config, config.hidden_size)
    self.pre_feedforward_layernorm = _norm(config, config.hidden_size)
    self.mlp = GemmaMLP(config, rngs=rngs)
    self.post_feedforward_layernorm = _norm(config, config.hidden_size)

  def __call__(self, x, mask, rope, layer_cache=None, cache_index=None, dropout_key=None):
    rate = self.config.dropout
    keys = layers.split_key(dropout_key, 4)
    h, new_cache = self.self_attn(self.input_layernorm(x), mask, rope, layer_cache, cache_index, keys[0])
    x = x + dropout(self.post_attention_layernorm(h), rate, keys[1])
    h = self.mlp(self.pre_feedforward_layernorm(x), keys[2])
    return x + dropout(self.post_feedforward_layernorm(h), rate, keys[3]), new_cache


class GemmaForCausalLM(layers.CausalLM):
  """Embeddings, blocks of two kinds (sliding and global), the final norm and the head (tied unless the config says
  otherwise), plugged into the template of layers.CausalLM; final logits soft-capped in Gemma 2.

  `lm_head=False` leaves an untied head out (a reward model's backbone).
  """

  kv_heads_field = "num_key_value_heads"

  def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs, lm_head: bool = True):
    self.config = config
    self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=config.dtype,
                                  param_dtype=config.param_dtype,
                                  embedding_init=nnx.initializers.normal(config.initializer_range), rngs=rngs)
    self.layers = nnx.List([GemmaDecoderLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)])
    self.norm = _norm(config, config.hidden_size)
    untied = lm_head and not config.tie_word_embeddings
    self.lm_head = layers.linear(config, rngs, config.hidden_size, config.vocab_size, False) if untied else None

  def embed(self, input_ids: jax.Array, positions: jax.Array, dropout_key=None) -> jax.Array:
    # √hidden rounded to the compute dtype, as the released models were trained.
    return self.embed_tokens(input_ids) * jnp.asarray(self.config.hidden_size ** 0.5, self.config.dtype)

  def attention_kinds(self) -> dict[str, layers.AttentionKind]:
    cfg = self.config
    return {FULL: layers.AttentionKind(inv_freq=_inverse_frequencies(cfg, FULL)),
            SLIDING: layers.AttentionKind(window=cfg.sliding_window, inv_freq=_inverse_frequencies(cfg, SLIDING))}

  def layer_kinds(self) -> tuple[str, ...]:
    return self.config.layer_types

  def final_norm(self, x: jax.Array) -> jax.Array:
    return self.norm(x)

  def head(self) -> tuple[jax.Array, bool] | None:
    if self.config.final_logit_softcapping is not None:  # Gemma 2 soft-caps the logits: `logits` only
      return None
    return layers.head_weight(self.lm_head, self.embed_tokens, self.config)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """fp32 logits from the compute-dtype product with the head, soft-capped when the config says so (Gemma 2)."""
    logits = layers.head_logits(hidden, self.lm_head, self.embed_tokens, self.config)
    cap = self.config.final_logit_softcapping
    return logits if cap is None else cap * jnp.tanh(logits / cap)


@functools.lru_cache(maxsize=None)
def _inverse_frequencies(config: GemmaConfig, kind: str):
  if kind == SLIDING and config.rope_local_base_freq is not None:
    return layers.rope_inverse_frequencies(config.head_dim, config.rope_local_base_freq)
  return layers.rope_inverse_frequencies(config.head_dim, config.rope_theta, config.rope_type,
                                         dict(config.rope_scaling))
