"""Pieces every decoder family shares: the attention mask, attention itself (grouped-query without repeating K/V),
the KV cache, RMSNorm, rotary position embeddings, dropout, activations and the LM head.

Each family file (opt.py, llama.py, gpt_neox.py, gpt2.py, …) builds its blocks from these and plugs them into
`CausalLM`, the forward template every family shares: `hidden_states(input_ids, attention_mask, *, positions,
segment_ids, mask, cache, dropout_key)`, `logits(hidden)`, `init_cache(batch_size, max_length, dtype)`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Activations by the names transformers' configs use. transformers' "gelu" is the exact (erf) GELU; "gelu_new" and
# "gelu_pytorch_tanh" the tanh approximation.
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}
ATTENTION_IMPLS = ("auto", "xla", "cudnn")


def check_choice(field: str, value, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"{field} {value!r} not supported; one of {sorted(allowed)}")


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout; identity when `key` is None (evaluation) or the rate is 0."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def split_key(key: jax.Array | None, n: int) -> list:
  return list(jax.random.split(key, n)) if key is not None else [None] * n


def layer_key(key: jax.Array | None, i: int) -> jax.Array | None:
  return jax.random.fold_in(key, i) if key is not None else None


def project(linear: nnx.Module, x: jax.Array, dropout_key: jax.Array | None) -> jax.Array:
  """Applies a projection; LoRA-wrapped ones (models/lora.py) also take a key for their input dropout."""
  if isinstance(linear, nnx.Linear):
    return linear(x)
  return linear(x, dropout_key=dropout_key)


def default_positions(attention_mask: jax.Array) -> jax.Array:
  """Positions from a padding mask: 0, 1, 2, … over real tokens (so left padding works), -1 on padding."""
  mask = attention_mask.astype(jnp.int32)
  return jnp.cumsum(mask, axis=1) * mask - 1


def attention_mask_4d(
    query_slots: jax.Array, key_valid: jax.Array, query_segments: jax.Array | None = None,
    key_segments: jax.Array | None = None, explicit: jax.Array | None = None, *, window: int | None = None,
) -> jax.Array:
  """Boolean attention mask [B, 1, T, S]: causal (by slot), keys not padding, same segment, and `explicit`.

  `query_slots` [B, T] are the key-slot indices of the queries (their own slot; with a cache, offset by the cache
  index). `window` (sliding-window attention) keeps only keys fewer than `window` slots back. A query always sees
  its own slot, so padded queries never get an all-masked row (no NaNs).
  """
  num_keys = key_valid.shape[1]
  key_slots = jnp.arange(num_keys)[None, None, :]
  causal = key_slots <= query_slots[:, :, None]
  if window is not None:
    causal &= query_slots[:, :, None] - key_slots < window
  mask = causal & key_valid[:, None, :].astype(bool)
  if query_segments is not None:
    mask &= query_segments[:, :, None] == key_segments[:, None, :]
  if explicit is not None:
    mask &= explicit.astype(bool)
  mask |= key_slots == query_slots[:, :, None]
  return mask[:, None, :, :]


@dataclasses.dataclass(frozen=True)
class AttentionInputs:
  """What every block of one forward pass shares: positions, which key slots hold real tokens, where the cache is
  written, and what builds the masks (one per attention kind: `mask(window)`)."""

  positions: jax.Array  # [B, T], -1 on padding
  query_slots: jax.Array  # [B, T]: the key slot of each query (offset by the cache index with a cache)
  key_valid: jax.Array  # [B, S]
  cache_index: jax.Array | None
  segment_ids: jax.Array | None = None  # [B, T]
  explicit: jax.Array | None = None  # [B, T, S]: an extra boolean mask ANDed in

  def mask(self, window: int | None = None) -> jax.Array:
    """The 4-D boolean mask [B, 1, T, S], sliding over `window` slots when given."""
    return attention_mask_4d(self.query_slots, self.key_valid, self.segment_ids, self.segment_ids, self.explicit,
                             window=window)

  def rolling_mask(self, window: int) -> jax.Array:
    """The mask [B, 1, T, window + T] of a sliding layer whose cache is a rolling buffer (`write_cache`): its keys
    are the buffer's slots (the `window` before the cache index) then this call's."""
    if self.segment_ids is not None or self.explicit is not None:
      raise ValueError("segment_ids and explicit masks are not supported with a rolling (sliding-window) KV cache")
    length = self.query_slots.shape[1]
    before = jnp.pad(self.key_valid, ((0, 0), (window, 0)))  # slots -window … S - 1; the negative ones empty
    key_valid = jax.lax.dynamic_slice_in_dim(before, self.cache_index, window + length, axis=1)
    return attention_mask_4d(self.query_slots - self.cache_index + window, key_valid, window=window)


def attention_inputs(attention_mask, *, positions=None, segment_ids=None, mask=None, cache=None) -> AttentionInputs:
  """Positions (default: counted over real tokens, continuing from the cache) and the mask inputs of a call."""
  batch, length = attention_mask.shape
  real = attention_mask.astype(bool)
  if cache is None:
    if positions is None:
      positions = default_positions(attention_mask)
    slots = jnp.broadcast_to(jnp.arange(length), (batch, length))
    key_valid, cache_index = real, None
  else:
    cache_index = cache["index"]
    if positions is None:
      positions = cache["next_position"][:, None] + default_positions(attention_mask)
    slots = cache_index + jnp.broadcast_to(jnp.arange(length), (batch, length))
    key_valid = jax.lax.dynamic_update_slice_in_dim(cache["key_valid"], real, cache_index, axis=1)
  return AttentionInputs(positions, slots, key_valid, cache_index, segment_ids, mask)


def init_cache(batch_size: int, max_length: int, *, layer_lengths: list[int], kv_heads: int, head_dim: int,
               dtype) -> dict[str, Any]:
  """An empty KV cache for `max_length` slots, layer i keeping `layer_lengths[i]` of them (fewer: a rolling buffer
  of the most recent slots). Slots fill left to right; `key_valid` marks non-padding slots."""
  shapes = [(batch_size, n, kv_heads, head_dim) for n in layer_lengths]
  return {
      "layers": [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for shape in shapes],
      "index": jnp.zeros((), jnp.int32),
      "key_valid": jnp.zeros((batch_size, max_length), bool),
      "next_position": jnp.zeros((batch_size,), jnp.int32),
  }


def cache_length(window: int | None, max_length: int) -> int:
  """Slots a layer's cache keeps: a sliding layer only its window (a rolling buffer), when that is shorter."""
  return window if window is not None and window < max_length else max_length


def updated_cache(cache: dict, layer_caches: list, inputs: AttentionInputs, attention_mask: jax.Array) -> dict:
  return {
      "layers": layer_caches,
      "index": inputs.cache_index + attention_mask.shape[1],
      "key_valid": inputs.key_valid,
      "next_position": cache["next_position"] + attention_mask.sum(axis=1).astype(jnp.int32),
  }


class RollingBuffer:
  """The `cache_index` of a layer whose cache is a rolling buffer: this call's K/V go after the slots it holds and
  the oldest fall out, so it keeps only the most recent ones (a sliding layer never looks further back)."""


ROLLING = RollingBuffer()


def write_cache(layer_cache, k, v, cache_index):
  """Writes this call's K/V [B, T, KV, H] into the layer's cache at `cache_index` (or rolls them into a rolling
  buffer: `ROLLING`); returns the K/V to attend over (all the cache's slots; the buffer's and this call's) and the
  new layer cache."""
  k, v = k.astype(layer_cache["k"].dtype), v.astype(layer_cache["v"].dtype)
  if isinstance(cache_index, RollingBuffer):
    keep = layer_cache["k"].shape[1]
    k, v = jnp.concatenate([layer_cache["k"], k], axis=1), jnp.concatenate([layer_cache["v"], v], axis=1)
    return k, v, {"k": k[:, -keep:], "v": v[:, -keep:]}
  k = jax.lax.dynamic_update_slice_in_dim(layer_cache["k"], k, cache_index, axis=1)
  v = jax.lax.dynamic_update_slice_in_dim(layer_cache["v"], v, cache_index, axis=1)
  return k, v, {"k": k, "v": v}


def cached_attention(q, k, v, mask, layer_cache, cache_index, *, attention_impl: str, dropout_rate: float,
                     dropout_key, scale: float | None = None, softcap: float | None = None):
  """This call's K/V written into the layer cache (when there is one), then attention over all the cache's slots.
  Returns the heads' outputs flattened to [B, T, N * H] and the new layer cache (None without a cache)."""
  new_cache = None
  if layer_cache is not None:
    k, v, new_cache = write_cache(layer_cache, k, v, cache_index)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
  out = attend(q, k, v, mask, attention_impl=attention_impl, dropout_rate=dropout_rate, dropout_key=dropout_key,
               scale=scale, softcap=softcap)
  return out.reshape(*q.shape[:2], -1), new_cache


def feed_forward(up: nnx.Module, down: nnx.Module, activation: str, x: jax.Array, dropout_key) -> jax.Array:
  """down(activation(up(x))): the two-matrix MLP of OPT, GPT-2 and GPT-NeoX."""
  keys = split_key(dropout_key, 2)
  return project(down, ACTIVATIONS[activation](project(up, x, keys[0])), keys[1])


def gated_feed_forward(gate: nnx.Module, up: nnx.Module, down: nnx.Module, activation: str, x: jax.Array,
                       dropout_key) -> jax.Array:
  """down(activation(gate(x)) · up(x)): the gated MLP of Llama (SwiGLU) and Gemma (GeGLU)."""
  keys = split_key(dropout_key, 3)
  gated = ACTIVATIONS[activation](project(gate, x, keys[0])) * project(up, x, keys[1])
  return project(down, gated, keys[2])


def attention_implementation(attention_impl: str, dtype) -> str:
  """The implementation `jax.nn.dot_product_attention` is given for this setting and compute dtype."""
  if attention_impl != "auto":
    return attention_impl
  # cuDNN flash attention exists only on GPU and only in half precision.
  if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "xla"


def attend(q, k, v, mask, *, attention_impl: str, dropout_rate: float = 0.0, dropout_key=None,
           scale: float | None = None, softcap: float | None = None):
  """Scaled dot-product attention, q [B, T, N, H], k / v [B, S, K, H] with K dividing N (grouped-query attention:
  `jax.nn.dot_product_attention` shares each K/V head over N/K query heads without copying it). `scale` defaults
  to 1/sqrt(H); `softcap` (Gemma 2) bounds the scores to (-softcap, softcap) by softcap · tanh(score / softcap)."""
  scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
  if softcap is not None or (dropout_rate > 0.0 and dropout_key is not None):
    return _explicit_attention(q, k, v, mask, scale, softcap, dropout_rate, dropout_key)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                      implementation=attention_implementation(attention_impl, q.dtype))


def _explicit_attention(q, k, v, mask, scale, softcap, rate, key):
  """Softmax attention written out, for what `jax.nn.dot_product_attention` does not offer: a soft-cap on the
  scores and dropout on the attention probabilities (off by default everywhere)."""
  batch, length, heads, head_dim = q.shape
  groups = heads // k.shape[2]
  q = q.reshape(batch, length, k.shape[2], groups, head_dim)
  scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    scores = softcap * jnp.tanh(scores / softcap)
  scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
  probs = dropout(jax.nn.softmax(scores, axis=-1), rate, key).astype(v.dtype)
  return jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(batch, length, heads, head_dim)


def linear(config, rngs: nnx.Rngs, d_in: int, d_out: int, use_bias: bool = True) -> nnx.Linear:
  """A projection in the config's compute / parameter dtypes, initialised N(0, initializer_range)."""
  return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=config.dtype, param_dtype=config.param_dtype,
                    kernel_init=nnx.initializers.normal(config.initializer_range), rngs=rngs)


def layer_norm(size: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(size, epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class RMSNorm(nnx.Module):
  """x / sqrt(mean(x²) + eps) · weight, normalised in fp32 and cast back before the weight (as transformers'
  LlamaRMSNorm). Over the last axis, so it also serves Qwen3's per-head q/k norms.

  `plus_one` (Gemma): the weight is stored as its offset from 1 (starting at 0) and scales by (1 + weight) in fp32,
  cast back after it (transformers' Gemma2RMSNorm)."""

  def __init__(self, size: int, *, eps: float, dtype, param_dtype, plus_one: bool = False):
    self.scale = nnx.Param((jnp.zeros if plus_one else jnp.ones)((size,), param_dtype))
    self.eps = eps
    self.dtype = dtype
    self.plus_one = plus_one

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.plus_one:
      return (normed * (1.0 + self.scale[...].astype(jnp.float32))).astype(self.dtype)
    return self.scale[...].astype(self.dtype) * normed.astype(self.dtype)


# ---------------------------------------------------------------------------------------------------------- RoPE


def rope_inverse_frequencies(rotary_dim: int, theta: float, rope_type: str = "default",
                             scaling: dict | None = None) -> np.ndarray:
  """RoPE's inverse frequencies [rotary_dim / 2] (float32), with linear or Llama 3 frequency scaling."""
  inv_freq = 1.0 / (theta ** (np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / rotary_dim))
  scaling = scaling or {}
  if rope_type == "default":
    return inv_freq
  if rope_type == "linear":
    return inv_freq / scaling["factor"]
  if rope_type == "llama3":
    # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  if rope_type == "yarn":
    return _yarn_inverse_frequencies(rotary_dim, theta, scaling)
  raise ValueError(f"rope_type {rope_type!r} not supported; one of {list(ROPE_TYPES)}")


ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _yarn_inverse_frequencies(rotary_dim: int, theta: float, scaling: dict) -> np.ndarray:
  """YaRN (Peng et al., 2023): frequencies that turn fewer than `beta_slow` times over the original context are
  slowed by `factor` (interpolated), those turning more than `beta_fast` times are kept (extrapolated), a linear ramp
  over the dimensions between."""
  factor, old_context = scaling["factor"], scaling["original_max_position_embeddings"]
  beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

  def dimension_of(rotations):  # the dimension whose frequency turns `rotations` times over the old context
    return rotary_dim * np.log(old_context / (rotations * 2 * np.pi)) / (2 * np.log(theta))

  low, high = float(dimension_of(beta_fast)), float(dimension_of(beta_slow))
  if scaling.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, rotary_dim - 1)
  high = high + 0.001 if low == high else high  # no zero-width ramp
  ramp = np.clip((np.arange(rotary_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
  keep = 1 - ramp  # 1: extrapolated (the frequency as trained), 0: interpolated
  wavelengths = theta ** (np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / rotary_dim)
  return (1.0 / (factor * wavelengths) * (1 - keep) + 1.0 / wavelengths * keep).astype(np.float32)


def rope_attention_factor(rope_type: str, scaling: dict | None = None) -> float:
  """What cos and sin are multiplied by (YaRN's attention temperature: `attention_factor`, or 0.1 ln(factor) + 1
  (`mscale`, `mscale_all_dim` adjusting it as DeepSeek's configs do)); 1 for the other rope types."""
  if rope_type != "yarn":
    return 1.0
  if scaling.get("attention_factor") is not None:
    return float(scaling["attention_factor"])

  def mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * np.log(scale) + 1.0

  factor, m, m_all = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
  return float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else float(mscale(factor))


def rope_from_hf(hf: dict[str, Any], *, default_theta: float, theta_key: str = "rope_theta",
                 partial_key: str = "partial_rotary_factor", default_partial: float = 1.0) -> dict[str, Any]:
  """RoPE settings of a transformers config.json in either form: transformers 5's `rope_parameters`, or 4's
  `rope_theta` (`theta_key`) / `rope_scaling` / `partial_rotary_factor` (`partial_key`); 4's `rope_scaling`
  wins, as it does in transformers 5. Returns rope_theta, rope_type, rope_scaling (sorted pairs, hashable) and
  partial_rotary_factor."""
  rope = dict(hf.get("rope_parameters") or {})
  legacy = dict(hf.get("rope_scaling") or {})
  if legacy:  # {"type" or "rope_type": …, "factor": …}
    rope = {k: v for k, v in legacy.items() if k != "type"}
    rope["rope_type"] = legacy.get("rope_type", legacy.get("type"))
  theta = rope.pop("rope_theta", hf.get(theta_key) or default_theta)
  partial = rope.pop("partial_rotary_factor", hf.get(partial_key) or default_partial)
  rope_type = rope.pop("rope_type", "default")
  scaling = tuple(sorted((k, frozen(v)) for k, v in rope.items())) if rope_type != "default" else ()
  return dict(rope_theta=float(theta), rope_type=rope_type, rope_scaling=scaling, partial_rotary_factor=partial)


def rope_to_hf(rope_theta: float, rope_type: str, rope_scaling: tuple, **extra) -> dict[str, Any]:
  """RoPE fields for a config.json in both forms: `rope_parameters` (transformers 5) and `rope_scaling` (4).
  `extra`: more entries of `rope_parameters` (e.g. partial_rotary_factor)."""
  scaling = dict(rope_scaling)
  return dict(rope_scaling={"rope_type": rope_type, **scaling} if scaling else None,
              rope_parameters={"rope_type": rope_type, "rope_theta": rope_theta, **extra, **scaling})


def fields_from_hf(hf: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
  """The config.json fields named, lists as tuples; a null field is left out (the default), except special-token
  ids (null there means "none")."""
  return {k: frozen(hf[k]) for k in names if k in hf and (hf[k] is not None or k.endswith("token_id"))}


def hf_fields(config, names: tuple[str, ...]) -> dict[str, Any]:
  """The named fields of a config for config.json, tuples as lists."""
  return {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(config, k)) for k in names)}


def frozen(value):
  """Lists as tuples, so configs stay hashable (they are static under jit)."""
  return tuple(value) if isinstance(value, list) else value


def rope_tables(positions: jax.Array, inv_freq: np.ndarray, attention_factor: float = 1.0
                ) -> tuple[jax.Array, jax.Array]:
  """cos and sin [B, T, 1, rotary_dim] (fp32) for integer positions [B, T], times `attention_factor` (YaRN)."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  if attention_factor == 1.0:
    return jnp.cos(angles), jnp.sin(angles)
  return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
  """Rotates the first rotary_dim features of each head of x [B, T, N, H] (the rest pass through: partial rotary),
  in the rotate-half layout of transformers' Llama / GPT-NeoX; computed in fp32, returned in x's dtype."""
  cos, sin = rope
  rotary_dim = cos.shape[-1]
  rot, rest = x[..., :rotary_dim].astype(jnp.float32), x[..., rotary_dim:]
  half = rotary_dim // 2
  rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
  out = (rot * cos + rotated * sin).astype(x.dtype)
  return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


# --------------------------------------------------------------------------------------------- stack and head


@dataclasses.dataclass(frozen=True)
class AttentionKind:
  """Attention settings shared by the layers of one kind, turned into tensors once per forward pass: the mask
  (sliding over `window` slots, or full causal) and the rotary table (from `inv_freq`); a sliding kind's KV cache
  keeps only its window (a rolling buffer). Settings that need no per-call tensor (a logit soft-cap, a score
  scale) live in the blocks themselves, which are built per layer."""

  window: int | None = None
  inv_freq: np.ndarray | None = None  # RoPE inverse frequencies; None: the layers get no rotary table (None)
  rope_attention_factor: float = 1.0  # what cos and sin are multiplied by (YaRN's temperature)


def layer_call(inputs: AttentionInputs, kind: AttentionKind, cache: dict | None) -> tuple[jax.Array, Any, Any]:
  """What a layer of `kind` is called with: its mask, its context (the rotary table, or None) and where its cache
  is written (a sliding layer's cache is a rolling buffer when its window is shorter than the cache)."""
  rope = (rope_tables(inputs.positions, kind.inv_freq, kind.rope_attention_factor) if kind.inv_freq is not None
          else None)
  if cache is not None and cache_length(kind.window, inputs.key_valid.shape[1]) < inputs.key_valid.shape[1]:
    return inputs.rolling_mask(kind.window), rope, ROLLING
  return inputs.mask(kind.window), rope, inputs.cache_index


def run_stack(layers, x, calls, cache: dict | None, dropout_key, *, remat: bool):
  """Runs the blocks in order; block i is called `layer(x, mask, context, layer_cache, cache_index, dropout_key)`
  with (mask, context, cache_index) = `calls[i]` (see `layer_call`) and returns (x, new layer cache). With `remat`
  (and no cache) each block is recomputed in the backward pass."""
  layer_caches = []
  for i, (layer, (mask, context, cache_index)) in enumerate(zip(layers, calls, strict=True)):
    key = layer_key(dropout_key, i)
    if cache is not None:
      x, layer_cache = layer(x, mask, context, cache["layers"][i], cache_index, key)
      layer_caches.append(layer_cache)
    elif remat:
      x = _run_layer_remat(layer, x, mask, context, key)
    else:
      x = _run_layer(layer, x, mask, context, key)
  return x, layer_caches


def _run_layer(layer, x, mask, context, dropout_key):
  return layer(x, mask, context, None, None, dropout_key)[0]


# Rematerialised layer call: keeps only each block's input for the backward pass.
_run_layer_remat = nnx.remat(_run_layer)


def lm_logits(hidden: jax.Array, weight: jax.Array, dtype, *, vocab_first: bool) -> jax.Array:
  """hidden [B, T, D] times the head's weight ([V, D] tied embeddings, or a [D, V] kernel), multiplied in the
  compute dtype and accumulated and returned in fp32."""
  spec = "btd,vd->btv" if vocab_first else "btd,dv->btv"
  return jnp.einsum(spec, hidden.astype(dtype), weight.astype(dtype), preferred_element_type=jnp.float32)


def head_weight(lm_head: nnx.Linear | None, embed: nnx.Embed, config) -> tuple[jax.Array, bool]:
  """(weight, vocab_first) of a family's LM head: its own `lm_head` Linear's [D, V] kernel, or when tied
  (`config.tie_word_embeddings`) the [V, D] embedding table."""
  if lm_head is not None:
    return lm_head.kernel[...], False
  if not config.tie_word_embeddings:
    raise ValueError("this model was built without its LM head (lm_head=False): it gives hidden states only")
  return embed.embedding[...], True


def head_logits(hidden: jax.Array, lm_head: nnx.Linear | None, embed: nnx.Embed, config) -> jax.Array:
  """The LM head of a family whose head is tied or its own `lm_head` Linear (None when built with lm_head=False)."""
  weight, vocab_first = head_weight(lm_head, embed, config)
  return lm_logits(hidden, weight, config.dtype, vocab_first=vocab_first)


class CausalLM(nnx.Module):
  """The forward template of every family's causal LM: embeddings, the blocks (`self.layers`), a final norm and
  the head; the KV cache of `kv_heads` heads per slot.

  A family defines `embed(input_ids, positions, dropout_key)`, `final_norm(x)` and `logits(hidden)` (and `head()`
  when its head is a plain product); its blocks are
  called `block(x, mask, context, layer_cache, cache_index, dropout_key) -> (x, new layer cache)`. Attention
  settings come by kind: `attention_kinds()` names each kind's settings (default: one kind, full causal, no rotary
  table) and `layer_kinds()` gives each layer's kind (default: all the one kind), so layers may differ (Gemma's
  sliding and global layers, each with its own rotary base) and each kind's mask and table are built once per call.
  """

  kv_heads_field = "num_attention_heads"  # the config field with the number of K/V heads
  embedding_dropout = False  # True: `embed` gets a key of its own, split from the call's dropout key

  def attention_kinds(self) -> dict[str, AttentionKind]:
    return {"global": AttentionKind()}

  def layer_kinds(self) -> tuple[str, ...]:
    (kind,) = self.attention_kinds()
    return (kind,) * len(self.layers)

  def init_cache(self, batch_size: int, max_length: int, dtype=None) -> dict[str, Any]:
    """An empty KV cache for `max_length` slots. Slots fill left to right; `key_valid` marks non-padding slots.
    A sliding layer whose window is shorter keeps only its window (a rolling buffer)."""
    cfg, kinds = self.config, self.attention_kinds()
    lengths = [cache_length(kinds[kind].window, max_length) for kind in self.layer_kinds()]
    return init_cache(batch_size, max_length, layer_lengths=lengths, kv_heads=getattr(cfg, self.kv_heads_field),
                      head_dim=cfg.head_dim, dtype=dtype or cfg.dtype)

  def hidden_states(
      self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *, positions: jax.Array | None = None,
      segment_ids: jax.Array | None = None, mask: jax.Array | None = None, cache: dict | None = None,
      dropout_key: jax.Array | None = None,
  ) -> tuple[jax.Array, dict | None]:
    """Final hidden states [B, T, width] and the updated cache (None without a cache).

    input_ids [B, T]; attention_mask [B, T] (1 = real token; default all ones); positions [B, T] 0-based
      (default: counted over real tokens, continuing from the cache); segment_ids [B, T] for packed rows
      (attention only within equal ids; pass positions restarting per segment); mask [B, T, S] an extra boolean
      attention mask ANDed with the causal/padding/segment mask (S = T without a cache); dropout_key enables dropout.
    """
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    inputs = attention_inputs(attention_mask, positions=positions, segment_ids=segment_ids, mask=mask, cache=cache)
    embed_key, stack_key = split_key(dropout_key, 2) if self.embedding_dropout else (None, dropout_key)
    x = self.embed(input_ids, inputs.positions, embed_key)
    by_kind = {name: layer_call(inputs, kind, cache) for name, kind in self.attention_kinds().items()}
    calls = [by_kind[kind] for kind in self.layer_kinds()]
    x, layer_caches = run_stack(self.layers, x, calls, cache, stack_key, remat=self.config.remat)
    x = self.final_norm(x)
    new_cache = updated_cache(cache, layer_caches, inputs, attention_mask) if cache is not None else None
    return x, new_cache

  def head(self) -> tuple[jax.Array, bool] | None:
    """(weight, vocab_first) when `logits(hidden)` is exactly `lm_logits(hidden, weight, config.dtype,
    vocab_first=...)`, so the log-probs may walk the head's vocabulary (`logprobs.fused_head`); None (the default)
    when the family's head does more (soft-capping, scaling) and only `logits` computes it."""
    return None

  def __call__(self, input_ids, attention_mask=None, **kwargs) -> jax.Array:
    """fp32 logits [B, T, vocab]. Keyword arguments as in `hidden_states` (without a cache)."""
    hidden, _ = self.hidden_states(input_ids, attention_mask, **kwargs)
    return self.logits(hidden)


def count_params(model: nnx.Module) -> int:
  """Number of parameters (a tied head counted once, as it is stored once)."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
