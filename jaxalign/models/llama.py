"""The RoPE decoder of Llama (Touvron et al., 2023) and its descendants Qwen2, Qwen3, Mistral, Phi-3, SmolLM3 and
Granite, as one Flax NNX module: token embeddings, pre-RMSNorm blocks of grouped-query attention with rotary position
embeddings and a SwiGLU feed-forward network, a final RMSNorm and a tied or untied LM head.

The families differ only in options of `LlamaConfig`, read from their transformers `config.json`:
- `llama` (SmolLM2, TinyLlama, Llama 3.x): `attention_bias` (q, k, v and o), `mlp_bias`, `rope_scaling`
  (linear, llama3, yarn), explicit `head_dim`;
- `qwen2` (Qwen2 / Qwen2.5): biases on q, k and v only;
- `qwen3`: RMSNorm over each head of q and k before RoPE, explicit `head_dim` (≠ hidden / heads);
- `mistral`: sliding-window attention (a query sees the `sliding_window` most recent slots, itself included);
- `phi3` (Phi-3 mini, Phi-4-mini): a sliding window, RoPE over part of each head (`partial_rotary_factor`); its
  checkpoints fuse q, k, v (`qkv_proj`) and gate, up (`gate_up_proj`), split here on import (registry `fused`);
- `smollm3`: no RoPE in the layers `no_rope_layers` marks 0 (every fourth), a window only on `layer_types`' sliding
  layers;
- `granite`: `embedding_multiplier`, `attention_multiplier` (the attention scale), `residual_multiplier`,
  `logits_scaling`.
OLMo 2 / 3 (olmo.py) use this config and these attention and MLP modules in blocks of their own.

Computes the same function as transformers' `LlamaForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`,
`MistralForCausalLM` (tests/test_llama_parity.py), `Phi3ForCausalLM`, `SmolLM3ForCausalLM` and `GraniteForCausalLM`
(tests/test_olmo_phi3_smollm3_granite.py). RoPE angles come from the positions input, so packed and prefix-shared rows
restart them per segment. Parameters in `param_dtype`, matmuls in `dtype`, RoPE, norms and logits in fp32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
from flax import nnx

from jaxalign.models import layers
from jaxalign.models.layers import dropout, project

MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "smollm3", "granite", "olmo2", "olmo3")
ARCHITECTURES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral", "phi3": "Phi3",
                 "smollm3": "SmolLM3", "granite": "Granite", "olmo2": "Olmo2", "olmo3": "Olmo3"}

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
    "phi3": dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                 num_attention_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 rope_theta=10000.0, bos_token_id=1, eos_token_id=32000),
    "smollm3": dict(vocab_size=128256, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                    num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                    tie_word_embeddings=True, rope_theta=2000000.0, bos_token_id=128000, eos_token_id=128001,
                    no_rope_layer_interval=4),
    "granite": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
                    tie_word_embeddings=False, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
                    embedding_multiplier=1.0, attention_multiplier=1.0, residual_multiplier=1.0, logits_scaling=1.0),
    "olmo2": dict(vocab_size=50304, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  rope_theta=10000.0, pad_token_id=1, bos_token_id=None, eos_token_id=50279),
    "olmo3": dict(vocab_size=50304, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  rope_theta=500000.0, sliding_window=4096, pad_token_id=1, bos_token_id=None, eos_token_id=50279),
}
# Fields only some families' config.json files have.
_EXTRA_HF_FIELDS = {
    "smollm3": ("no_rope_layers", "layer_types"),
    "olmo3": ("layer_types",),
    "granite": ("embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling"),
}
# What each family's architecture fixes (its config.json has no field for it, or transformers ignores the field).
_FIXED = {
    "qwen2": dict(attention_bias=False, mlp_bias=False, qkv_bias=True),
    "qwen3": dict(qk_norm="head", mlp_bias=False),
    "mistral": dict(attention_bias=False, mlp_bias=False),
    "phi3": dict(attention_bias=False, mlp_bias=False),
    "olmo2": dict(qk_norm="projection", mlp_bias=False),
    "olmo3": dict(qk_norm="projection", mlp_bias=False),
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
  rope_type: str = "default"  # default | linear | llama3 | yarn
  rope_scaling: tuple = ()  # the rope type's parameters as sorted (name, value) pairs, e.g. (("factor", 8.0), …)
  tie_word_embeddings: bool = False
  attention_bias: bool = False  # biases on q, k, v and o (Llama, Qwen3)
  qkv_bias: bool = False  # biases on q, k and v only (Qwen2)
  mlp_bias: bool = False
  # RMSNorm of q and k before RoPE: "head" over each head (Qwen3), "projection" over all heads at once (OLMo).
  qk_norm: str = "none"
  sliding_window: int | None = None  # Mistral, Phi-3: attend only to this many most recent slots
  # Per layer, "full_attention" or "sliding_attention" (only those use `sliding_window`); None: all alike.
  layer_types: tuple[str, ...] | None = None
  # RoPE of the sliding layers where it differs from the others' (OLMo 3: plain RoPE there, YaRN on full layers).
  sliding_rope_theta: float | None = None
  sliding_rope_type: str = "default"
  sliding_rope_scaling: tuple = ()
  partial_rotary_factor: float = 1.0  # rotary embedding on this fraction of each head (Phi-4-mini: 0.75)
  no_rope_layers: tuple[int, ...] | None = None  # SmolLM3: per layer, 1 with rotary embedding, 0 without (NoPE)
  # Granite's scalars (the defaults are Llama's function): the embeddings times `embedding_multiplier`, attention
  # scores times `attention_multiplier` (None: 1/sqrt(head_dim)), each block's output times `residual_multiplier`
  # before it joins the residual stream, logits divided by `logits_scaling`.
  embedding_multiplier: float = 1.0
  attention_multiplier: float | None = None
  residual_multiplier: float = 1.0
  logits_scaling: float = 1.0
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
    layers.check_choice("rope_type", self.rope_type, layers.ROPE_TYPES)
    layers.check_choice("sliding_rope_type", self.sliding_rope_type, layers.ROPE_TYPES)
    layers.check_choice("qk_norm", self.qk_norm, ("none", "head", "projection"))
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
    for field in ("layer_types", "no_rope_layers"):
      value = getattr(self, field)
      if value is not None and len(value) != self.num_hidden_layers:
        raise ValueError(f"{field} has {len(value)} entries; expected one per layer ({self.num_hidden_layers})")
    for kind in self.layer_types or ():
      layers.check_choice("layer_types entry", kind, ("full_attention", "sliding_attention"))

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
    fields = layers.fields_from_hf(hf, _HF_FIELDS + _EXTRA_HF_FIELDS.get(model_type, ()))
    if model_type not in ("mistral", "phi3", "smollm3", "olmo3"):
      fields.pop("sliding_window", None)  # Qwen configs carry it unused (use_sliding_window is False)
    if model_type == "smollm3":
      fields.update(_smollm3_layers(hf))
    if model_type == "olmo3":
      fields.update(_olmo3_layers(hf))
    fields.update(_FIXED.get(model_type, {}))
    rope = layers.rope_from_hf(_full_layers_rope(hf), default_theta=hf["rope_theta"])
    if model_type == "phi3" and rope["rope_type"] != "default":
      raise ValueError(f"phi3: rope type {rope['rope_type']!r} (longrope; 'su' and 'yarn' in older configs, the "
                       "128k-context checkpoints) is not supported; the 4k-context checkpoints use plain RoPE")
    if rope["partial_rotary_factor"] != 1.0 and model_type != "phi3":
      raise ValueError(f"{model_type}: partial_rotary_factor other than 1 is not supported")
    fields.update(model_type=model_type, **rope)
    fields.update(overrides)
    return cls(**fields)

  def to_hf_dict(self) -> dict[str, Any]:
    """The transformers `config.json` contents, with RoPE in both forms (transformers 5 reads `rope_parameters`,
    transformers 4 `rope_theta` / `rope_scaling`)."""
    hf = layers.hf_fields(self, _HF_FIELDS + _EXTRA_HF_FIELDS.get(self.model_type, ()))
    extra = dict(partial_rotary_factor=self.partial_rotary_factor) if self.model_type == "phi3" else {}
    hf.update(model_type=self.model_type, architectures=[f"{ARCHITECTURES[self.model_type]}ForCausalLM"],
              rope_theta=self.rope_theta,
              **layers.rope_to_hf(self.rope_theta, self.rope_type, self.rope_scaling, **extra))
    if self.model_type == "olmo3":  # transformers 5 reads each kind's RoPE; 4's rope_scaling is the full layers'
      sliding = layers.rope_to_hf(*self.rope_of("sliding_attention"))["rope_parameters"]
      hf["rope_parameters"] = {"full_attention": hf["rope_parameters"], "sliding_attention": sliding}
    if self.model_type in ("qwen2", "phi3"):
      del hf["attention_bias"], hf["mlp_bias"]  # fixed by the architecture
    if self.model_type in ("qwen2", "qwen3"):
      hf.update(use_sliding_window=False, sliding_window=None)
    if self.model_type == "smollm3":
      hf.update(use_sliding_window=self.sliding_window is not None,
                layer_types=list(self.layer_types or ["full_attention"] * self.num_hidden_layers))
    return hf

  def replace(self, **changes) -> LlamaConfig:
    """A copy with `changes`; a new `num_hidden_layers` repeats the per-layer patterns (`layer_types`,
    `no_rope_layers`) to the new depth unless they are changed too (a 4-layer SmolLM3 keeps its NoPE 4th layer)."""
    count = changes.get("num_hidden_layers", self.num_hidden_layers)
    for field in ("layer_types", "no_rope_layers"):
      pattern = getattr(self, field)
      if field not in changes and pattern is not None and len(pattern) != count:
        changes[field] = tuple(pattern[i % len(pattern)] for i in range(count))
    return dataclasses.replace(self, **changes)

  def rope_of(self, layer_type: str) -> tuple[float, str, tuple]:
    """(theta, type, scaling) of the RoPE of a kind of layer."""
    if layer_type == "sliding_attention" and self.sliding_rope_theta is not None:
      return self.sliding_rope_theta, self.sliding_rope_type, self.sliding_rope_scaling
    return self.rope_theta, self.rope_type, self.rope_scaling



def _smollm3_layers(hf: dict[str, Any]) -> dict[str, Any]:
  """SmolLM3's per-layer settings as transformers derives them: without `no_rope_layers`, every
  `no_rope_layer_interval`-th layer has no rotary embedding; with `use_sliding_window`, the layers `layer_types`
  names (by default those without rotary embedding) slide, and no window applies otherwise."""
  count = hf["num_hidden_layers"]
  no_rope = hf.get("no_rope_layers") or [int((i + 1) % hf["no_rope_layer_interval"] != 0) for i in range(count)]
  if not (hf.get("use_sliding_window") and hf.get("sliding_window")):
    return dict(no_rope_layers=tuple(no_rope), sliding_window=None, layer_types=None)
  kinds = hf.get("layer_types") or ["full_attention" if rope else "sliding_attention" for rope in no_rope]
  return dict(no_rope_layers=tuple(no_rope), layer_types=tuple(kinds))


def _full_layers_rope(hf: dict[str, Any]) -> dict[str, Any]:
  """The config.json with the RoPE of the full-attention layers where OLMo 3 gives one per kind of layer."""
  nested = hf.get("rope_parameters") or {}
  return {**hf, "rope_parameters": nested["full_attention"]} if "full_attention" in nested else hf


def _olmo3_layers(hf: dict[str, Any]) -> dict[str, Any]:
  """OLMo 3's kinds of layer (by default three sliding, then one full) and the sliding layers' RoPE: their own
  `rope_parameters` entry, or in transformers 4's form plain RoPE of `rope_theta` (`rope_scaling` is the full
  layers')."""
  count = hf["num_hidden_layers"]
  kinds = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(count)]
  nested = hf.get("rope_parameters") or {}
  sliding = {"rope_parameters": nested["sliding_attention"]} if "sliding_attention" in nested else {}
  rope = layers.rope_from_hf(sliding, default_theta=hf["rope_theta"])
  return dict(layer_types=tuple(kinds), sliding_rope_theta=rope["rope_theta"], sliding_rope_type=rope["rope_type"],
              sliding_rope_scaling=rope["rope_scaling"])


def _rms_norm(config: LlamaConfig, size: int) -> layers.RMSNorm:
  return layers.RMSNorm(size, eps=config.rms_norm_eps, dtype=config.dtype, param_dtype=config.param_dtype)


class LlamaAttention(nnx.Module):
  """Grouped-query attention: num_attention_heads query heads share num_key_value_heads K/V heads; RoPE on q, k
  (but in SmolLM3's NoPE layers), after q/k RMSNorm where the family has one."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    c, qkv_bias = config, config.attention_bias or config.qkv_bias
    q_width, kv_width = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    self.q_proj = layers.linear(c, rngs, c.hidden_size, q_width, qkv_bias)
    self.k_proj = layers.linear(c, rngs, c.hidden_size, kv_width, qkv_bias)
    self.v_proj = layers.linear(c, rngs, c.hidden_size, kv_width, qkv_bias)
    self.o_proj = layers.linear(c, rngs, q_width, c.hidden_size, c.attention_bias)
    widths = {"head": (c.head_dim, c.head_dim), "projection": (q_width, kv_width)}.get(c.qk_norm)
    self.q_norm = _rms_norm(c, widths[0]) if widths else None
    self.k_norm = _rms_norm(c, widths[1]) if widths else None

  def __call__(self, x, mask, rope, layer_cache=None, cache_index=None, dropout_key=None):
    cfg = self.config
    batch, length, _ = x.shape
    keys = layers.split_key(dropout_key, 5)
    q, k = project(self.q_proj, x, keys[0]), project(self.k_proj, x, keys[1])
    if cfg.qk_norm == "projection":
      q, k = self.q_norm(q), self.k_norm(k)
    q = q.reshape(batch, length, cfg.num_attention_heads, cfg.head_dim)
    k = k.reshape(batch, length, cfg.num_key_value_heads, cfg.head_dim)
    v = project(self.v_proj, x, keys[2]).reshape(batch, length, cfg.num_key_value_heads, cfg.head_dim)
    if cfg.qk_norm == "head":
      q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:  # None in SmolLM3's NoPE layers
      q, k = layers.apply_rope(q, rope), layers.apply_rope(k, rope)
    out, new_cache = layers.cached_attention(q, k, v, mask, layer_cache, cache_index,
                                             attention_impl=cfg.attention_impl, dropout_rate=cfg.attention_dropout,
                                             dropout_key=keys[3], scale=cfg.attention_multiplier)
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
  """x + attn(norm(x)), then x + mlp(norm(x)); each branch times `residual_multiplier` (Granite) first."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.input_layernorm = _rms_norm(config, config.hidden_size)
    self.self_attn = LlamaAttention(config, rngs=rngs)
    self.post_attention_layernorm = _rms_norm(config, config.hidden_size)
    self.mlp = LlamaMLP(config, rngs=rngs)

  def __call__(self, x, mask, rope, layer_cache=None, cache_index=None, dropout_key=None):
    keys = layers.split_key(dropout_key, 4)
    h, new_cache = self.self_attn(self.input_layernorm(x), mask, rope, layer_cache, cache_index, keys[0])
    x = x + dropout(_scaled(h, self.config.residual_multiplier), self.config.dropout, keys[1])
    h = self.mlp(self.post_attention_layernorm(x), keys[2])
    x = x + dropout(_scaled(h, self.config.residual_multiplier), self.config.dropout, keys[3])
    return x, new_cache


def _scaled(x: jax.Array, multiplier: float) -> jax.Array:
  return x if multiplier == 1.0 else x * multiplier


class LlamaForCausalLM(layers.CausalLM):
  """The decoder with its LM head (tied to the embeddings, or its own `lm_head`); the template of layers.CausalLM.

  `lm_head=False` leaves an untied head out (a reward model's backbone needs only the hidden states). The KV cache
  holds num_key_value_heads per slot: grouped-query attention caches less.
  """

  kv_heads_field = "num_key_value_heads"
  decoder_layer = LlamaDecoderLayer

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, lm_head: bool = True):
    self.config = config
    self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=config.dtype,
                                  param_dtype=config.param_dtype,
                                  embedding_init=nnx.initializers.normal(config.initializer_range), rngs=rngs)
    self.layers = nnx.List([self.decoder_layer(config, rngs=rngs) for _ in range(config.num_hidden_layers)])
    self.norm = _rms_norm(config, config.hidden_size)
    untied = lm_head and not config.tie_word_embeddings
    self.lm_head = layers.linear(config, rngs, config.hidden_size, config.vocab_size, False) if untied else None

  def embed(self, input_ids: jax.Array, positions: jax.Array, dropout_key=None) -> jax.Array:
    return _scaled(self.embed_tokens(input_ids), self.config.embedding_multiplier)

  def layer_kinds(self) -> tuple[str, ...]:
    """Each layer's `layer_types` entry ("full_attention" by default), "_no_rope" appended for SmolLM3's NoPE
    layers."""
    cfg = self.config
    types = cfg.layer_types or ("full_attention",) * cfg.num_hidden_layers
    rope = cfg.no_rope_layers or (1,) * cfg.num_hidden_layers
    return tuple(kind if uses_rope else f"{kind}_no_rope" for kind, uses_rope in zip(types, rope, strict=True))

  def attention_kinds(self) -> dict[str, layers.AttentionKind]:
    return {name: _attention_kind(self.config, name) for name in dict.fromkeys(self.layer_kinds())}

  def final_norm(self, x: jax.Array) -> jax.Array:
    return self.norm(x)

  def head(self) -> tuple[jax.Array, bool] | None:
    if self.config.logits_scaling != 1.0:  # Granite divides the logits: `logits` only
      return None
    return layers.head_weight(self.lm_head, self.embed_tokens, self.config)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """fp32 logits from the compute-dtype product with the head (the embedding table when tied), divided by
    `logits_scaling` (Granite)."""
    logits = layers.head_logits(hidden, self.lm_head, self.embed_tokens, self.config)
    return logits if self.config.logits_scaling == 1.0 else logits / self.config.logits_scaling


@functools.lru_cache(maxsize=None)
def _attention_kind(config: LlamaConfig, name: str) -> layers.AttentionKind:
  """The window and RoPE of a kind of layer (see `LlamaForCausalLM.layer_kinds`): without `layer_types` the window
  (Mistral, Phi-3) is every layer's, with them only the sliding layers'; RoPE over the first
  `partial_rotary_factor` of each head, none in "_no_rope" layers."""
  layer_type = name.removesuffix("_no_rope")
  window = config.sliding_window if layer_type == "sliding_attention" or not config.layer_types else None
  if name.endswith("_no_rope"):
    return layers.AttentionKind(window=window)
  theta, rope_type, scaling = config.rope_of(layer_type)
  rotary_dim = int(config.head_dim * config.partial_rotary_factor)
  return layers.AttentionKind(window=window,
                              inv_freq=layers.rope_inverse_frequencies(rotary_dim, theta, rope_type, dict(scaling)),
                              rope_attention_factor=layers.rope_attention_factor(rope_type, dict(scaling)))
