"""DeBERTa-v2/v3 (He et al., 2021) sequence classifier as a Flax NNX module: the paper's judge,
OpenAssistant/reward-model-deberta-v3-large-v2, is one of these with a single output (the reward).

Computes the same function as transformers' `DebertaV2ForSequenceClassification` at inference (see
tests/test_deberta.py): embeddings, post-LayerNorm encoder blocks with disentangled attention (content-to-content plus
content-to-position "c2p" and position-to-content "p2c" terms over log-bucketed relative distances), the optional
convolution after the first block (DeBERTa-v2), and a pooler + classifier on the first token. There is no dropout at
all: this module only ever scores text.

Numerics: parameters are stored in `param_dtype` (fp32); matmuls run in `dtype` (bf16 on accelerators) with fp32
accumulation for attention scores; softmax, LayerNorm statistics and the output logits are fp32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.models import hub

# transformers' ACT2FN names: "gelu" is the exact (erf) GELU, the "*new"/"*tanh" variants its tanh approximation.
_ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}
_POS_ATT_TYPES = ("c2p", "p2c")

# Fields of a transformers DebertaV2Config that define the function (dropout rates do not: we never drop).
_HF_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "relative_attention", "max_relative_positions",
    "position_buckets", "pos_att_type", "share_att_key", "norm_rel_ebd", "position_biased_input", "embedding_size",
    "attention_head_size", "pooler_hidden_size", "pooler_hidden_act", "conv_kernel_size", "conv_groups", "conv_act",
    "initializer_range", "pad_token_id",
)


@dataclasses.dataclass(frozen=True)
class DebertaConfig:
  """Architecture (transformers' DebertaV2Config, with its getattr defaults) plus how to compute it (dtypes).

  Defaults are transformers' defaults, so a config.json that omits a field means the same thing here as there.
  """

  vocab_size: int = 128100
  hidden_size: int = 1536
  num_hidden_layers: int = 24
  num_attention_heads: int = 24
  intermediate_size: int = 6144
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 0
  layer_norm_eps: float = 1e-7
  relative_attention: bool = False
  max_relative_positions: int = -1  # < 1 means max_position_embeddings
  position_buckets: int = -1  # <= 0: no log-bucketing, distances clipped at max_relative_positions
  pos_att_type: tuple[str, ...] = ()
  share_att_key: bool = False  # relative embeddings projected by the content query/key projections
  norm_rel_ebd: str = "none"  # "layer_norm": LayerNorm the relative embedding table before use
  position_biased_input: bool = True  # add absolute position embeddings to the input (v3: no)
  embedding_size: int | None = None  # None: hidden_size; otherwise projected to hidden_size
  attention_head_size: int | None = None  # None: hidden_size // num_attention_heads
  pooler_hidden_size: int | None = None  # None: hidden_size (the only value transformers can run)
  pooler_hidden_act: str = "gelu"
  conv_kernel_size: int = 0  # > 0: DeBERTa-v2's convolution beside the first block
  conv_groups: int = 1
  conv_act: str = "tanh"
  initializer_range: float = 0.02
  pad_token_id: int = 0
  num_labels: int = 2
  # How to compute (not part of the architecture).
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    for name in ("hidden_act", "pooler_hidden_act", "conv_act"):
      if getattr(self, name) not in _ACTIVATIONS:
        raise ValueError(f"{name} {getattr(self, name)!r} not supported; one of {sorted(_ACTIVATIONS)}")
    unknown = set(self.pos_att_type) - set(_POS_ATT_TYPES)
    if unknown:
      raise ValueError(f"pos_att_type {list(self.pos_att_type)} has unknown entries {sorted(unknown)}; "
                       f"allowed: {list(_POS_ATT_TYPES)}")
    if self.attention_head_size is None and self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})")
    if self.pooler_hidden_size not in (None, self.hidden_size):
      raise ValueError(f"pooler_hidden_size ({self.pooler_hidden_size}) must equal hidden_size ({self.hidden_size}): "
                       "the pooler reads hidden states and the classifier reads hidden_size features")
    if self.conv_kernel_size > 0 and self.conv_kernel_size % 2 == 0:
      raise ValueError(f"conv_kernel_size ({self.conv_kernel_size}) must be odd: padding (k - 1) // 2 on both sides "
                       "keeps the length only for odd kernels (transformers fails on even ones too)")
    unknown = self._rel_norms - {"none", "layer_norm"}
    if unknown:
      raise ValueError(f"norm_rel_ebd {self.norm_rel_ebd!r}: unknown entries {sorted(unknown)}; "
                       "use 'layer_norm' or 'none'")

  @property
  def head_dim(self) -> int:
    return self.attention_head_size or self.hidden_size // self.num_attention_heads

  @property
  def rel_span(self) -> int:
    """Relative distances are embedded in [-rel_span, rel_span): position_buckets or max_relative_positions."""
    return self.position_buckets if self.position_buckets > 0 else self.max_relative

  @property
  def max_relative(self) -> int:
    return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_position_embeddings

  @property
  def _rel_norms(self) -> set[str]:
    return {x.strip() for x in self.norm_rel_ebd.lower().split("|")}  # transformers' "a|b" syntax

  @property
  def normalize_rel_embeddings(self) -> bool:
    return "layer_norm" in self._rel_norms

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], **compute) -> DebertaConfig:
    """Builds a config from a transformers `config.json` dict; `compute` sets dtype/param_dtype."""
    if hf.get("model_type") != "deberta-v2":
      raise ValueError(f"Expected a DeBERTa-v2/v3 config (model_type 'deberta-v2'), got {hf.get('model_type')!r}; "
                       "DeBERTa-v1 ('deberta') has a different attention and is not supported")
    fields = {k: hf[k] for k in _HF_FIELDS if hf.get(k) is not None}
    pos_att_type = fields.get("pos_att_type", ())
    if isinstance(pos_att_type, str):  # older configs write "p2c|c2p"
      pos_att_type = pos_att_type.lower().split("|")
    fields["pos_att_type"] = tuple(x.strip() for x in pos_att_type)
    # transformers writes the number of outputs as id2label; num_labels appears only in configs written by hand.
    fields["num_labels"] = hf.get("num_labels") or len(hf.get("id2label") or {}) or cls.num_labels
    return cls(**fields, **compute)

  def replace(self, **changes) -> DebertaConfig:
    return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------------------------------------ relative positions


def log_bucket_positions(relative: np.ndarray, bucket_size: int, max_position: int) -> np.ndarray:
  """DeBERTa's log buckets: distances below bucket_size // 2 kept exact, longer ones compressed logarithmically so
  that max_position - 1 lands near bucket_size - 1.

  Computed in float32 like transformers (torch's default dtype); float64 puts a few distances in the neighbouring
  bucket because `ceil` sees the rounding.
  """
  sign = np.sign(relative)
  mid = bucket_size // 2
  abs_pos = np.where((relative < mid) & (relative > -mid), mid - 1, np.abs(relative)).astype(np.float32)
  log_pos = np.ceil(np.log(abs_pos / np.float32(mid)) / np.log(np.float32((max_position - 1) / mid))
                    * np.float32(mid - 1)) + mid
  return np.where(abs_pos <= mid, relative, log_pos * sign).astype(np.int64)


def relative_positions(length: int, config: DebertaConfig) -> np.ndarray:
  """[length, length] relative distance query - key, log-bucketed when the config says so (a trace-time constant)."""
  ids = np.arange(length)
  relative = ids[:, None] - ids[None, :]
  if config.position_buckets > 0:
    relative = log_bucket_positions(relative, config.position_buckets, config.max_relative)
  return relative


# ---------------------------------------------------------------------------------------------------------- layers


def _linear(config: DebertaConfig, d_in: int, d_out: int, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=config.dtype, param_dtype=config.param_dtype,
                    kernel_init=nnx.initializers.normal(config.initializer_range), rngs=rngs)


def _layer_norm(config: DebertaConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Two-pass variance as in torch: with DeBERTa's epsilon of 1e-7 the one-pass E[x²] - E[x]² can lose the variance
  # of rows with a large mean to cancellation.
  return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, use_fast_variance=False,
                       dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)


def _embed(config: DebertaConfig, num: int, features: int, rngs: nnx.Rngs) -> nnx.Embed:
  return nnx.Embed(num, features, dtype=config.dtype, param_dtype=config.param_dtype,
                   embedding_init=nnx.initializers.normal(config.initializer_range), rngs=rngs)


class DebertaEmbeddings(nnx.Module):
  """Word embeddings (+ absolute positions, + token types, each if configured), projected, normalised, and zeroed on
  padding. v3 uses neither absolute positions nor token types: position enters only through relative attention."""

  def __init__(self, config: DebertaConfig, *, rngs: nnx.Rngs):
    self.config = config
    width = config.embedding_size or config.hidden_size
    self.word_embeddings = _embed(config, config.vocab_size, width, rngs)
    self.position_embeddings = (_embed(config, config.max_position_embeddings, width, rngs)
                                if config.position_biased_input else None)
    self.token_type_embeddings = (_embed(config, config.type_vocab_size, width, rngs)
                                  if config.type_vocab_size > 0 else None)
    self.embed_proj = (_linear(config, width, config.hidden_size, rngs, use_bias=False)
                       if width != config.hidden_size else None)
    self.layer_norm = _layer_norm(config, rngs)

  def __call__(self, input_ids, mask, token_type_ids):
    x = self.word_embeddings(input_ids)
    if self.position_embeddings is not None:
      length = input_ids.shape[1]
      if length > self.config.max_position_embeddings:
        raise ValueError(f"Sequence length {length} exceeds max_position_embeddings "
                         f"({self.config.max_position_embeddings}) of a model with absolute position embeddings")
      # Positions count slots, not real tokens, as in transformers: pad on the right.
      x = x + self.position_embeddings(jnp.arange(length))[None]
    if self.token_type_embeddings is not None:
      x = x + self.token_type_embeddings(token_type_ids)
    if self.embed_proj is not None:
      x = self.embed_proj(x)
    return self.layer_norm(x) * mask[:, :, None].astype(x.dtype)


class DisentangledSelfAttention(nnx.Module):
  """Attention scores = content·content + content·position (c2p) + position·content (p2c), all over
  sqrt(head_dim · (1 + number of pos_att_type terms)).

  c2p[i, j] = q_i · Kr[δ(i, j)] and p2c[i, j] = k_j · Qr[δ(i, j)], with δ(i, j) = clip(bucket(i - j) + span) the row
  of the relative embedding table (transformers writes p2c's index as -bucket(j - i): the same number, as buckets are
  odd-symmetric). Kr/Qr are the table projected by the key/query projections (share_att_key) or by their own
  pos_key_proj/pos_query_proj.
  """

  def __init__(self, config: DebertaConfig, *, rngs: nnx.Rngs):
    self.config = config
    inner = config.num_attention_heads * config.head_dim
    self.query_proj = _linear(config, config.hidden_size, inner, rngs)
    self.key_proj = _linear(config, config.hidden_size, inner, rngs)
    self.value_proj = _linear(config, config.hidden_size, inner, rngs)
    separate = config.relative_attention and not config.share_att_key
    self.pos_key_proj = (_linear(config, config.hidden_size, inner, rngs)
                         if separate and "c2p" in config.pos_att_type else None)
    self.pos_query_proj = (_linear(config, config.hidden_size, inner, rngs)
                           if separate and "p2c" in config.pos_att_type else None)

  def _heads(self, x):
    return x.reshape(*x.shape[:-1], self.config.num_attention_heads, self.config.head_dim)

  def __call__(self, x, mask, rel_embeddings, rel_index):
    cfg = self.config
    q, k, v = self._heads(self.query_proj(x)), self._heads(self.key_proj(x)), self._heads(self.value_proj(x))
    # transformers counts the pos_att_type terms in the scale even without relative attention.
    scale = np.sqrt(cfg.head_dim * (1 + len(cfg.pos_att_type)), dtype=np.float32)
    scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
    if cfg.relative_attention and "c2p" in cfg.pos_att_type:
      pos_key = self._heads((self.key_proj if cfg.share_att_key else self.pos_key_proj)(rel_embeddings))
      by_distance = jnp.einsum("bthd,rhd->bhtr", q, pos_key, preferred_element_type=jnp.float32)
      scores += jnp.take_along_axis(by_distance, rel_index[None, None], axis=-1)
    if cfg.relative_attention and "p2c" in cfg.pos_att_type:
      pos_query = self._heads((self.query_proj if cfg.share_att_key else self.pos_query_proj)(rel_embeddings))
      by_distance = jnp.einsum("bshd,rhd->bhsr", k, pos_query, preferred_element_type=jnp.float32)
      # by_distance[j, r] = k_j · Qr[r] is gathered per key row j at δ(i, j) = δᵀ[j, i], then turned to [query, key].
      scores += jnp.take_along_axis(by_distance, rel_index.T[None, None], axis=-1).swapaxes(-1, -2)
    scores = jnp.where(mask, scores / scale, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhts,bshd->bthd", probs, v)
    return out.reshape(*out.shape[:2], -1)


class DebertaLayer(nnx.Module):
  """Post-LayerNorm block: x = LN(x + attn(x)); x = LN(x + ffn(x))."""

  def __init__(self, config: DebertaConfig, *, rngs: nnx.Rngs):
    self.config = config
    inner = config.num_attention_heads * config.head_dim
    self.attention = DisentangledSelfAttention(config, rngs=rngs)
    self.attention_output = _linear(config, inner, config.hidden_size, rngs)
    self.attention_norm = _layer_norm(config, rngs)
    self.intermediate = _linear(config, config.hidden_size, config.intermediate_size, rngs)
    self.output = _linear(config, config.intermediate_size, config.hidden_size, rngs)
    self.output_norm = _layer_norm(config, rngs)

  def __call__(self, x, mask, rel_embeddings, rel_index):
    x = self.attention_norm(x + self.attention_output(self.attention(x, mask, rel_embeddings, rel_index)))
    act = _ACTIVATIONS[self.config.hidden_act]
    return self.output_norm(x + self.output(act(self.intermediate(x))))


class DebertaConvLayer(nnx.Module):
  """DeBERTa-v2's n-gram convolution: LN(first block's output + act(conv(embeddings))), zeroed on padding."""

  def __init__(self, config: DebertaConfig, *, rngs: nnx.Rngs):
    self.config = config
    pad = (config.conv_kernel_size - 1) // 2
    self.conv = nnx.Conv(config.hidden_size, config.hidden_size, config.conv_kernel_size, padding=[(pad, pad)],
                         feature_group_count=config.conv_groups, dtype=config.dtype, param_dtype=config.param_dtype,
                         kernel_init=nnx.initializers.normal(config.initializer_range), rngs=rngs)
    self.layer_norm = _layer_norm(config, rngs)

  def __call__(self, embeddings, residual, token_mask):
    keep = token_mask[:, :, None]
    out = _ACTIVATIONS[self.config.conv_act](jnp.where(keep, self.conv(embeddings), 0))
    return self.layer_norm(residual + out) * keep.astype(residual.dtype)


class DebertaEncoder(nnx.Module):
  """The block stack, the shared relative-position embedding table (normalised once, used by every block) and the
  optional convolution."""

  def __init__(self, config: DebertaConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.layers = nnx.List([DebertaLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)])
    self.rel_embeddings = (_embed(config, 2 * config.rel_span, config.hidden_size, rngs)
                           if config.relative_attention else None)
    self.rel_norm = (_layer_norm(config, rngs)
                     if config.relative_attention and config.normalize_rel_embeddings else None)
    self.conv = DebertaConvLayer(config, rngs=rngs) if config.conv_kernel_size > 0 else None

  def __call__(self, x, token_mask):
    cfg = self.config
    mask = token_mask[:, None, :, None] & token_mask[:, None, None, :]  # [B, 1, T, S]: both ends real
    rel_embeddings = rel_index = None
    if cfg.relative_attention:
      table = self.rel_embeddings.embedding[...]
      # Normalise the fp32 table (LayerNorm returns the compute dtype); round it only when it is used as is.
      rel_embeddings = self.rel_norm(table) if self.rel_norm is not None else table.astype(cfg.dtype)
      span = cfg.rel_span
      rel_index = jnp.asarray(np.clip(relative_positions(x.shape[1], cfg) + span, 0, 2 * span - 1))
    embeddings = x
    for i, layer in enumerate(self.layers):
      x = layer(x, mask, rel_embeddings, rel_index)
      if i == 0 and self.conv is not None:
        x = self.conv(embeddings, x, token_mask)
    return x


class DebertaForSequenceClassification(nnx.Module):
  """DeBERTa encoder, pooler (first token → dense → activation) and a linear classifier: fp32 logits [B, labels]."""

  def __init__(self, config: DebertaConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embeddings = DebertaEmbeddings(config, rngs=rngs)
    self.encoder = DebertaEncoder(config, rngs=rngs)
    self.pooler = _linear(config, config.hidden_size, config.hidden_size, rngs)
    self.classifier = _linear(config, config.hidden_size, config.num_labels, rngs)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None) -> jax.Array:
    """input_ids [B, T] right-padded; attention_mask [B, T] (1 = real token, default all); token_type_ids [B, T]
    (segment A/B of a text pair, default 0; ignored when the config has no token types)."""
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, bool)
    if token_type_ids is None:
      token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
    token_mask = attention_mask.astype(bool)
    x = self.embeddings(input_ids, token_mask, token_type_ids)
    x = self.encoder(x, token_mask)
    pooled = _ACTIVATIONS[self.config.pooler_hidden_act](self.pooler(x[:, 0]))
    return self.classifier(pooled).astype(jnp.float32)


# -------------------------------------------------------------------------------------------------------- importer


def param_map(config: DebertaConfig) -> hub.ParamMap:
  """Our parameter paths -> transformers' DebertaV2ForSequenceClassification tensor names."""
  mapping: hub.ParamMap = {}

  def linear(path: tuple, hf: str, bias: bool = True):
    mapping[(*path, "kernel")] = (f"{hf}.weight", "transpose")
    if bias:
      mapping[(*path, "bias")] = (f"{hf}.bias", "copy")

  def norm(path: tuple, hf: str):
    mapping[(*path, "scale")] = (f"{hf}.weight", "copy")
    mapping[(*path, "bias")] = (f"{hf}.bias", "copy")

  def embed(path: tuple, hf: str):
    mapping[(*path, "embedding")] = (f"{hf}.weight", "copy")

  e = "deberta.embeddings"
  embed(("embeddings", "word_embeddings"), f"{e}.word_embeddings")
  if config.position_biased_input:
    embed(("embeddings", "position_embeddings"), f"{e}.position_embeddings")
  if config.type_vocab_size > 0:
    embed(("embeddings", "token_type_embeddings"), f"{e}.token_type_embeddings")
  if (config.embedding_size or config.hidden_size) != config.hidden_size:
    linear(("embeddings", "embed_proj"), f"{e}.embed_proj", bias=False)
  norm(("embeddings", "layer_norm"), f"{e}.LayerNorm")

  enc = "deberta.encoder"
  if config.relative_attention:
    embed(("encoder", "rel_embeddings"), f"{enc}.rel_embeddings")
    if config.normalize_rel_embeddings:
      norm(("encoder", "rel_norm"), f"{enc}.LayerNorm")
  if config.conv_kernel_size > 0:
    # torch Conv1d weight [out, in/groups, k] reversed is flax's [k, in/groups, out]: what "transpose" (w.T) does.
    linear(("encoder", "conv", "conv"), f"{enc}.conv.conv")
    norm(("encoder", "conv", "layer_norm"), f"{enc}.conv.LayerNorm")
  separate = config.relative_attention and not config.share_att_key
  for i in range(config.num_hidden_layers):
    ours, hf = ("encoder", "layers", i), f"{enc}.layer.{i}"
    for name in ("query_proj", "key_proj", "value_proj"):
      linear((*ours, "attention", name), f"{hf}.attention.self.{name}")
    if separate and "c2p" in config.pos_att_type:
      linear((*ours, "attention", "pos_key_proj"), f"{hf}.attention.self.pos_key_proj")
    if separate and "p2c" in config.pos_att_type:
      linear((*ours, "attention", "pos_query_proj"), f"{hf}.attention.self.pos_query_proj")
    linear((*ours, "attention_output"), f"{hf}.attention.output.dense")
    norm((*ours, "attention_norm"), f"{hf}.attention.output.LayerNorm")
    linear((*ours, "intermediate"), f"{hf}.intermediate.dense")
    linear((*ours, "output"), f"{hf}.output.dense")
    norm((*ours, "output_norm"), f"{hf}.output.LayerNorm")
  linear(("pooler",), "pooler.dense")
  linear(("classifier",), "classifier")
  return mapping


# Tensors some checkpoints carry that the function does not use: the position-id buffer older transformers saved,
# and absolute position tables kept in checkpoints of models that do not add them (transformers skips these too).
_IGNORED_TENSORS = ("deberta.embeddings.position_ids", "deberta.embeddings.position_embeddings.weight")


def abstract_model(config: DebertaConfig) -> DebertaForSequenceClassification:
  """A model with shapes and dtypes but no memory behind its parameters (fill it with `hub.load_into`)."""
  return nnx.eval_shape(lambda: DebertaForSequenceClassification(config, rngs=nnx.Rngs(0)))


def from_pretrained(name_or_path: str, *, revision: str | None = None, shardings: Any = None,
                    **compute) -> DebertaForSequenceClassification:
  """Loads a DeBERTa-v2/v3 sequence classifier from a Hub id (e.g. "OpenAssistant/reward-model-deberta-v3-large-v2")
  or a local HF folder. `compute` sets dtype/param_dtype; `shardings` (a State-shaped tree) places parameters."""
  model_dir = hub.resolve_model_dir(name_or_path, revision=revision)
  config = DebertaConfig.from_hf_dict(hub.load_config(model_dir), **compute)
  return hub.load_into(abstract_model(config), hub.CheckpointReader(model_dir), param_map(config), shardings,
                       ignore=_IGNORED_TENSORS)
