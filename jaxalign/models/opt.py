"""OPT (Zhang et al., 2022) as a Flax NNX module: token + learned position embeddings, a stack of decoder blocks,
and a language-model head tied to the token embeddings. Every released size is covered by `OPTConfig` presets.

Computes the same function as transformers' `OPTForCausalLM` (see tests/test_opt_parity.py). OPT's quirks are
commented where they occur: the position offset of 2, post-LayerNorm blocks in opt-350m, and the `project_in` /
`project_out` layers when the embedding width differs from the decoder width.

Numerics: parameters are stored in `param_dtype` (fp32); matmuls run in `dtype` (bf16 on accelerators);
logits are always fp32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from jaxalign.models import layers
from jaxalign.models.layers import dropout, project

# OPT's learned position table is indexed by position + 2: fairseq reserved the first two rows (padding_idx + 1).
POSITION_OFFSET = 2
# HF OPT uses torch.nn.LayerNorm's default epsilon (flax's default is 1e-6).
LAYER_NORM_EPS = 1e-5

# Fields of a transformers OPTConfig that we read and write back.
_HF_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim", "max_position_embeddings",
    "word_embed_proj_dim", "do_layer_norm_before", "dropout", "attention_dropout", "activation_function",
    "enable_bias", "layer_norm_elementwise_affine", "init_std", "pad_token_id", "bos_token_id", "eos_token_id",
)


@dataclasses.dataclass(frozen=True)
class OPTConfig:
  """Architecture (the fields of transformers' OPTConfig) plus how to compute it (dtype, remat, attention)."""

  vocab_size: int = 50272
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  ffn_dim: int = 3072
  max_position_embeddings: int = 2048
  word_embed_proj_dim: int = 768
  do_layer_norm_before: bool = True
  dropout: float = 0.1
  attention_dropout: float = 0.0
  activation_function: str = "relu"
  enable_bias: bool = True
  layer_norm_elementwise_affine: bool = True
  init_std: float = 0.02
  pad_token_id: int = 1
  bos_token_id: int = 2
  eos_token_id: int = 2
  # How to compute (not part of the architecture, never exported).
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  attention_impl: str = "auto"  # "xla", "cudnn", or "auto" (cuDNN flash attention on GPU in half precision)

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})")
    layers.check_choice("activation_function", self.activation_function, ("relu", "gelu"))
    layers.check_choice("attention_impl", self.attention_impl, layers.ATTENTION_IMPLS)

  model_type = "opt"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], **overrides) -> OPTConfig:
    """Builds a config from a transformers `config.json` dict; `overrides` (dtype, remat, dropout…) win."""
    if hf.get("model_type", "opt") != "opt":
      raise ValueError(f"Expected an OPT config (model_type 'opt'), got model_type {hf.get('model_type')!r}")
    if hf.get("_remove_final_layer_norm", False):
      raise ValueError("OPT configs with _remove_final_layer_norm=True (pre-2022 OPT conversions) are not supported")
    fields = {k: hf[k] for k in _HF_FIELDS if hf.get(k) is not None}
    fields.setdefault("word_embed_proj_dim", fields.get("hidden_size", cls.hidden_size))
    fields.update(overrides)
    return cls(**fields)

  def to_hf_dict(self) -> dict[str, Any]:
    """The transformers `config.json` contents for this architecture."""
    hf = {k: getattr(self, k) for k in _HF_FIELDS}
    hf.update(model_type="opt", architectures=["OPTForCausalLM"], tie_word_embeddings=True)
    return hf

  def replace(self, **changes) -> OPTConfig:
    return dataclasses.replace(self, **changes)


def _preset(hidden, layers, heads, *, embed=None, pre_ln=True) -> OPTConfig:
  return OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=4 * hidden,
                   word_embed_proj_dim=embed or hidden, do_layer_norm_before=pre_ln)


# The released OPT architectures (facebook/opt-*). 350m is the odd one: post-LN and 512-wide embeddings.
PRESETS: dict[str, OPTConfig] = {
    "opt-125m": _preset(768, 12, 12),
    "opt-350m": _preset(1024, 24, 16, embed=512, pre_ln=False),
    "opt-1.3b": _preset(2048, 24, 32),
    "opt-2.7b": _preset(2560, 32, 32),
    "opt-6.7b": _preset(4096, 32, 32),
    "opt-13b": _preset(5120, 40, 40),
    "opt-30b": _preset(7168, 48, 56),
    "opt-66b": _preset(9216, 64, 72),
}


def preset(name: str, **changes) -> OPTConfig:
  """The architecture of a released OPT size ("opt-350m" or "facebook/opt-350m"), with optional overrides."""
  key = name.removeprefix("facebook/")
  if key not in PRESETS:
    raise ValueError(f"Unknown OPT preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[key].replace(**changes)



class OPTAttention(nnx.Module):
  """Multi-head self-attention. OPT scales queries by head_dim**-0.5 before the dot product."""

  def __init__(self, config: OPTConfig, *, rngs: nnx.Rngs):
    self.config = config
    linear = _linear_factory(config, rngs)
    self.q_proj = linear(config.hidden_size, config.hidden_size)
    self.k_proj = linear(config.hidden_size, config.hidden_size)
    self.v_proj = linear(config.hidden_size, config.hidden_size)
    self.out_proj = linear(config.hidden_size, config.hidden_size)

  def __call__(self, x, mask, layer_cache=None, cache_index=None, dropout_key=None):
    cfg = self.config
    batch, length, _ = x.shape
    keys = layers.split_key(dropout_key, 5)
    split = lambda t: t.reshape(batch, length, cfg.num_attention_heads, cfg.head_dim)
    q = split(project(self.q_proj, x, keys[0]))
    k = split(project(self.k_proj, x, keys[1]))
    v = split(project(self.v_proj, x, keys[2]))
    out, new_cache = layers.cached_attention(q, k, v, mask, layer_cache, cache_index,
                                             attention_impl=cfg.attention_impl, dropout_rate=cfg.attention_dropout,
                                             dropout_key=keys[3])
    return project(self.out_proj, out, keys[4]), new_cache


def _linear_factory(config: OPTConfig, rngs: nnx.Rngs):
  init = nnx.initializers.normal(config.init_std)

  def linear(d_in, d_out, use_bias=config.enable_bias):
    return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=config.dtype, param_dtype=config.param_dtype,
                      kernel_init=init, rngs=rngs)

  return linear


def _layer_norm(config: OPTConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  affine = config.layer_norm_elementwise_affine
  return nnx.LayerNorm(config.hidden_size, epsilon=LAYER_NORM_EPS, use_bias=affine, use_scale=affine,
                       dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)


class OPTDecoderLayer(nnx.Module):
  """Attention and a ReLU feed-forward network, each in a residual branch with LayerNorm.

  Pre-LN (every OPT but 350m) normalises each branch's input; post-LN (opt-350m) normalises after each residual sum.
  """

  def __init__(self, config: OPTConfig, *, rngs: nnx.Rngs):
    self.config = config
    linear = _linear_factory(config, rngs)
    self.self_attn = OPTAttention(config, rngs=rngs)
    self.self_attn_layer_norm = _layer_norm(config, rngs)
    self.fc1 = linear(config.hidden_size, config.ffn_dim)
    self.fc2 = linear(config.ffn_dim, config.hidden_size)
    self.final_layer_norm = _layer_norm(config, rngs)

  def __call__(self, x, mask, context=None, layer_cache=None, cache_index=None, dropout_key=None):
    """One block; `context` is unused (OPT's positions are added once, at the embeddings)."""
    cfg = self.config
    keys = layers.split_key(dropout_key, 4)
    residual = x
    if cfg.do_layer_norm_before:
      x = self.self_attn_layer_norm(x)
    x, new_cache = self.self_attn(x, mask, layer_cache, cache_index, keys[0])
    x = residual + dropout(x, cfg.dropout, keys[1])
    if not cfg.do_layer_norm_before:
      x = self.self_attn_layer_norm(x)

    residual = x
    if cfg.do_layer_norm_before:
      x = self.final_layer_norm(x)
    x = layers.feed_forward(self.fc1, self.fc2, cfg.activation_function, x, keys[3])
    x = residual + dropout(x, cfg.dropout, keys[2])
    if not cfg.do_layer_norm_before:
      x = self.final_layer_norm(x)
    return x, new_cache


class OPTForCausalLM(layers.CausalLM):
  """The OPT decoder with its tied language-model head.

  Call `model(input_ids, attention_mask)` for fp32 logits; `model.hidden_states(...)` (layers.CausalLM) for the final
  hidden states (what reward heads and chunked log-prob computations use) and, with a cache, incremental decoding.
  `lm_head=False` (a reward model's backbone) changes nothing: the head is the tied embedding table.
  """

  def __init__(self, config: OPTConfig, *, rngs: nnx.Rngs, lm_head: bool = True):
    del lm_head  # tied: there is no separate head to leave out
    self.config = config
    embed_init = nnx.initializers.normal(config.init_std)
    self.embed_tokens = nnx.Embed(config.vocab_size, config.word_embed_proj_dim, dtype=config.dtype,
                                  param_dtype=config.param_dtype, embedding_init=embed_init, rngs=rngs)
    self.embed_positions = nnx.Embed(config.max_position_embeddings + POSITION_OFFSET, config.hidden_size,
                                     dtype=config.dtype, param_dtype=config.param_dtype,
                                     embedding_init=embed_init, rngs=rngs)
    linear = _linear_factory(config, rngs)
    # opt-350m embeds tokens in 512 dims and projects to and from the 1024-wide decoder.
    if config.word_embed_proj_dim != config.hidden_size:
      self.project_in = linear(config.word_embed_proj_dim, config.hidden_size, use_bias=False)
      self.project_out = linear(config.hidden_size, config.word_embed_proj_dim, use_bias=False)
    else:
      self.project_in = self.project_out = None
    self.layers = nnx.List([OPTDecoderLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)])
    # Pre-LN models end with a LayerNorm; post-LN blocks already end normalised.
    self.final_layer_norm = _layer_norm(config, rngs) if config.do_layer_norm_before else None


  def embed(self, input_ids: jax.Array, positions: jax.Array, dropout_key=None) -> jax.Array:
    x = self.embed_tokens(input_ids)
    if self.project_in is not None:
      x = self.project_in(x)
    # Padding gets position -1, i.e. row 1 of the table, as in transformers.
    return x + self.embed_positions(positions + POSITION_OFFSET)

  def final_norm(self, x: jax.Array) -> jax.Array:
    if self.final_layer_norm is not None:
      x = self.final_layer_norm(x)
    return self.project_out(x) if self.project_out is not None else x

  def head(self) -> tuple[jax.Array, bool]:
    return self.embed_tokens.embedding[...], True

  def logits(self, hidden: jax.Array) -> jax.Array:
    """The tied LM head: hidden @ embed_tokens.T, multiplied in the compute dtype and accumulated/returned in fp32."""
    return layers.lm_logits(hidden, self.embed_tokens.embedding[...], self.config.dtype, vocab_first=True)

