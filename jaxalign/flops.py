"""Model FLOPs per token and model-FLOPs utilisation (MFU) against the device's dense peak.

Counting follows the PaLM appendix: a multiply-add is 2 FLOPs; a forward pass costs 2 FLOPs per matmul weight per
token plus attention's two T x T products (4 · T · d per layer per token, counted for the full, non-causal square);
a backward pass costs twice the forward. Embedding lookups are free; the LM head (tied or not) is a matmul and
counts where it runs (the trainer runs it only at scored positions).

Any registered family: the matmul weights are the kernels of its decoder (found in the abstract model, so fused
projections, grouped-query K/V, SwiGLU's three matrices and OPT's project_in/out count as they are), attention's
width is query heads × head_dim.
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

from jaxalign.models import registry

# Dense bf16 peak FLOP/s by device kind (substring match, first hit wins; most specific first).
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
)


@functools.lru_cache(maxsize=None)
def matmul_weights(config) -> int:
  """Weights of the decoder's matrix multiplications (every kernel but the LM head; embeddings are lookups)."""
  body = registry.abstract_causal_lm(config, lm_head=False)
  flat = nnx.to_flat_state(nnx.state(body, nnx.Param))
  return sum(variable.size for path, variable in flat if path[-1] == "kernel")


def body_flops_per_token(config, seq_len: int) -> float:
  """Forward FLOPs per token of everything but the LM head, for rows of `seq_len` tokens."""
  attention_width = config.num_attention_heads * config.head_dim
  return 2.0 * matmul_weights(config) + config.num_hidden_layers * 4 * seq_len * attention_width


def head_flops_per_token(config) -> float:
  """Forward FLOPs of the LM head for one position."""
  return 2.0 * config.vocab_size * registry.family_of(config).hidden_width(config)


def training_flops(config, seq_len: int, tokens: float, scored: float, *, extra_forwards: int = 0) -> float:
  """Forward + backward (3 forwards) over `tokens` tokens whose LM head runs at `scored` positions only (as the
  trainer computes it), plus `extra_forwards` such forwards (1 for a live DPO reference model)."""
  forward = tokens * body_flops_per_token(config, seq_len) + scored * head_flops_per_token(config)
  return (3 + extra_forwards) * forward


def device_peak_flops(device=None, override_tflops: float = 0.0) -> float | None:
  """Dense bf16 peak of one device in FLOP/s: the override if given, else from the table; None if unknown (CPU)."""
  if override_tflops:
    return override_tflops * 1e12
  kind = (device or jax.devices()[0]).device_kind
  return next((peak for name, peak in PEAK_FLOPS if name.lower() in kind.lower()), None)


def mfu(flops_per_second: float, num_devices: int, peak_per_device: float | None) -> float | None:
  """Achieved fraction of the mesh's peak, or None when the peak is unknown."""
  if not peak_per_device:
    return None
  return flops_per_second / (num_devices * peak_per_device)
