"""The RoPE decoder of Llama (Touvron et al., 2023) and its descendants Qwen2, Qwen3 and Mistral, as one Flax NNX
module: token embeddings, pre-RMSNorm blocks of grouped-query attention with rotary position embeddings and a
SwiGLU feed-forward network, a final RMSNorm and a tied or untied LM head.

The families differ only in options of `LlamaConfig`, read from their transformers `config.json`:
- `llama` (SmolLM2, TinyLlama, Llama 3.x): `attention_bias` (q, k, v and o), `mlp_bias`, `rope_scaling`
  (linear, llama3), explicit `head_dim`;
- `qwen2` (Qwen2 / Qwen2.5): biases on q, k and v only;
- `qwen3`: RMSNorm over each head of q and k before RoPE, explicit `head_dim` (≠ hidden / heads);
- `mistral`: sliding-window attention (a query sees the `sliding_window` most recent slots, itself included).

Computes the same function as transformers' `LlamaForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM` and
`MistralForCausalLM` (tests/test_llama_parity.py). RoPE angles come from the positions input, so packed and
prefix-shared rows restart them per segment. Parameters in `param_dtype`, matmuls in `dtype`, RoPE, norms and logits
in fp32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
from flax import nnx

from jaxalign.models import layers
from jaxalign.models.layers import dropout, project

MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
ARCHITECTURES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}

# Fields read from and written back to a transformers config.json as they are.
_HF_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
    "attention_bias", "mlp_bias", "sliding_window", "hidden_act", "attention_dropout", "initializer_range",
    "pad_token_id", "bos_token_id", "eos_token_id",
)
# What transformers' config class of each family defaults to where a config.json leaves a field out.
_HF_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  rope_theta=10000.0, bos_token_id=1, eos_token_id=2),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, rope_theta=10000.0),
    "qwen3": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, head_dim=128, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, rope_theta=10000.0),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                    rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0, sliding_window=4096,
                    bos_token_id=1, eos_token_id=2),
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture (the fields of transformers' Llama / Qwen2 / Qwen3 / Mistral configs) plus how to compute it."""

  model_type: str = "llama"
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None  # None: as many as query heads (no grouping)
  head_dim: int | None = None  # None: hidden_size // num_attention_heads
  max_position_embeddings: int = 2048
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_type: str = "default"  # default | linear | llama3
  rope_scaling: tuple = ()  # the rope type's parameters as sorted (name, value) pairs, e.g. (("factor", 8.0), …)
  tie_word_embeddings: bool = False
  attention_bias: bool = False  # biases on q, k, v and o (Llama, Qwen3)
  qkv_bias: bool = False  # biases on q, k and v only (Qwen2)
  mlp_bias: bool = False
  qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k
  sliding_window: int | None = None  # Mistral: attend only to this many most recent slots
  hidden_act: str = "silu"
  attention_dropout: float = 0.0
  initializer_range: float = 0.02
  pad_token_id: int | None = None
  bos_token_id: int | None = 1
  eos_token_id: int | tuple | None = 2
  # How to compute (not part of the architecture, never exported). `dropout` is residual dropout, which these
  # architectures do not have (0 keeps transformers' function); the trainer's model.dropout sets it.
  dropout: float = 0.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  attention_impl: str = "auto"

  def __post_init__(self):
    layers.check_choice("model_type", self.model_type, MODEL_TYPES)
    layers.check_choice("hidden_act", self.hidden_act, layers.ACTIVATIONS)
    layers.check_choice("attention_impl", self.attention_impl, layers.ATTENTION_IMPLS)
    layers.check_choice("rope_type", self.rope_type, ("default", "linear", "llama3"))
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      if self.hidden_size % self.num_attention_heads:
        raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                         f"({self.num_attention_heads}) unless head_dim is given")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                       f"num_key_value_heads ({self.num_key_value_heads})")

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], **overrides) -> LlamaConfig:
    """Builds a config from a transformers `config.json` dict, in transformers 4's form (`rope_theta`,
    `rope_scaling`) or 5's (`rope_parameters`); `overrides` (dtype, remat, dropout…) win."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
      raise ValueError(f"Expected a config of model_type {MODEL_TYPES}, got {model_type!r}")
    # A null field means the default, except special-token ids (null there means "none").
    hf = {**_HF_DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None or k.endswith("token_id")}}
    if hf.get("use_sliding_window") and model_type in ("qwen2", "qwen3"):
      raise ValueError(f"{model_type} configs with use_sliding_window=True (sliding attention in some layers) are "
                       "not supported")
    fields = layers.fields_from_hf(hf, _HF_FIELDS)
    if model_type != "mistral":
      fields.pop("sliding_window", None)  # Qwen configs carry it unused (use_sliding_window is False)
    if model_type == "qwen2":
      fields.update(attention_bias=False, mlp_bias=False, qkv_bias=True)
    if model_type == "qwen3":
      fields.update(qk_norm=True, mlp_bias=False)
    if model_type == "mistral":
      fields.update(attention_bias=False, mlp_bias=False)
    rope = layers.rope_from_hf(hf, default_theta=hf["rope_theta"])
    if rope.pop("partial_rotary_factor") != 1.0:
      raise ValueError(f"{model_type}: partial_rotary_factor other than 1 is not supported")
    fields.update(model_type=model_type, **rope)
    fields.update(overrides)
    return cls(**fields)

  def to_hf_dict(self) -> dict[str, Any]:
    """The transformers `config.json` contents, with RoPE in both forms (transformers 5 reads `rope_parameters`,
    transformers 4 `rope_theta` / `rope_scaling`)."""
    hf = layers.hf_fields(self, _HF_FIELDS)
    hf.update(model_type=self.model_type, architectures=[f"{ARCHITECTURES[self.model_type]}ForCausalLM"],
              rope_theta=self.rope_theta, **layers.rope_to_hf(self.rope_theta, self.rope_type, self.rope_scaling))
    if self.model_type == "qwen2":
      del hf["attention_bias"], hf["mlp_bias"]  # Qwen2's biases are fixed by the architecture
    if self.model_type in ("qwen2", "qwen3"):
      hf.update(use_sliding_window=False, sliding_window=None)
    return hf

  def replace(self, **changes) -> LlamaConfig:
    return dataclasses.replace(self, **changes)



def _rms_norm(config: LlamaConfig, size: int) -> layers.RMSNorm:
  return layers.RMSNorm(size, eps=config.rms_norm_eps, dtype=config.dtype, param_dtype=config.param_dtype)


class LlamaAttention(nnx.Module):
  """Grouped-query attention: num_attention_heads query heads share num_key_value_heads K/V heads; RoPE on q, k."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    c, qkv_bias = config, config.attention_bias or config.qkv_bias
    self.q_proj = layers.linear(c, rngs, c.hidden_size, c.num_attention_heads * c.head_dim, qkv_bias)
    self.k_proj = layers.linear(c, rngs, c.hidden_size, c.num_key_value_heads * c.head_dim, qkv_bias)
    self.v_proj = layers.linear(c, rngs, c.hidden_size, c.num_key_value_heads * c.head_dim, qkv_bias)
    self.o_proj = layers.linear(c, rngs, c.num_attention_heads * c.head_dim, c.hidden_size, c.attention_bias)
    if config.qk_norm:
      self.q_norm, self.k_norm = _rms_norm(c, c.head_dim), _rms_norm(c, c.head_dim)
    else:
      self.q_norm = self.k_norm = None

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
                                             dropout_key=keys[3])
    return project(self.o_proj, out, keys[4]), new_cache


class LlamaMLP(nnx.Module):
  """SwiGLU: down(act(gate(x)) · up(x))."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    c = config
    self.gate_proj = layers.linear(c, rngs, c.hidden_size, c.intermediate_size, c.mlp_bias)
    self.up_proj = layers.linear(c, rngs, c.hidden_size, c.intermediate_size, c.mlp_bias)
    self.down_proj = layers.linear(c, rngs, c.intermediate_size, c.hidden_size, c.mlp_bias)

  def __call__(self, x, dropout_key=None):
    return layers.gated_feed_forward(self.gate_proj, self.up_proj, self.down_proj, self.config.hidden_act, x,
                                     dropout_key)


class LlamaDecoderLayer(nnx.Module):
  """x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.input_layernorm = _rms_norm(config, config.hidden_size)
    self.self_attn = LlamaAttention(config, rngs=rngs)
    self.post_attention_layernorm = _rms_norm(config, config.hidden_size)
    self.mlp = LlamaMLP(config, rngs=rngs)

  def __call__(self, x, mask, rope, layer_cache=None, cache_index=None, dropout_key=None):
    keys = layers.split_key(dropout_key, 4)
    h, new_cache = self.self_attn(self.input_layernorm(x), mask, rope, layer_cache, cache_index, keys[0])
    x = x + dropout(h, self.config.dropout, keys[1])
    x = x + dropout(self.mlp(self.post_attention_layernorm(x), keys[2]), self.config.dropout, keys[3])
    return x, new_cache


class LlamaForCausalLM(layers.CausalLM):
  """The decoder with its LM head (tied to the embeddings, or its own `lm_head`); the template of layers.CausalLM.

  `lm_head=False` leaves an untied head out (a reward model's backbone needs only the hidden states). The KV cache
  holds num_key_value_heads per slot: grouped-query attention caches less.
  """

  kv_heads_field = "num_key_value_heads"

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, lm_head: bool = True):
    self.config = config
    self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=config.dtype,
                                  param_dtype=config.param_dtype,
                                  embedding_init=nnx.initializers.normal(config.initializer_range), rngs=rngs)
    self.layers = nnx.List([LlamaDecoderLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)])
    self.norm = _rms_norm(config, config.hidden_size)
    untied = lm_head and not config.tie_word_embeddings
    self.lm_head = layers.linear(config, rngs, config.hidden_size, config.vocab_size, False) if untied else None


  def embed(self, input_ids: jax.Array, positions: jax.Array, dropout_key=None) -> jax.Array:
    return self.embed_tokens(input_ids)

  def attention_kinds(self) -> dict[str, layers.AttentionKind]:
    cfg = self.config
    return {"global": layers.AttentionKind(window=cfg.sliding_window, inv_freq=_inverse_frequencies(cfg))}

  def final_norm(self, x: jax.Array) -> jax.Array:
    return self.norm(x)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """fp32 logits from the compute-dtype product with the head (the embedding table when tied)."""
    return layers.head_logits(hidden, self.lm_head, self.embed_tokens, self.config)



@functools.lru_cache(maxsize=None)
def _inverse_frequencies(config: LlamaConfig):
  return layers.rope_inverse_frequencies(config.head_dim, config.rope_theta, config.rope_type,
                                         dict(config.rope_scaling))
