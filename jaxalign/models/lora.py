"""LoRA (Hu et al., 2021): a frozen Linear plus a trainable low-rank update, y = xW + b + (alpha/r) · drop(x) A B.

`apply_lora` swaps chosen projections of an OPT for `LoRALinear`s that keep the wrapped layer's `kernel`/`bias`
(same parameter paths, so checkpoints and exports still line up). Only `nnx.LoRAParam` variables are trained.
B starts at zero, so a fresh adapter leaves the model unchanged; zeroing the LoRA params gives back the base model
(the DPO reference "with adapters off", without a second copy of the weights). `merge_lora` folds the update into
the kernels for export.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.models import opt

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
MLP_TARGETS = ("fc1", "fc2")


class LoRALinear(nnx.Module):
  """A Linear's kernel and bias (frozen by the trainer) with a rank-r adapter (A: [in, r], B: [r, out])."""

  def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, dropout: float, rngs: nnx.Rngs):
    self.kernel = base.kernel
    self.bias = base.bias
    self.dtype = base.dtype
    d_in, d_out = base.kernel.shape
    param_dtype = base.kernel[...].dtype
    # A as in the paper's reference code (Kaiming-uniform); B zero so training starts from the base model.
    self.lora_a = nnx.LoRAParam(nnx.initializers.he_uniform()(rngs.params(), (d_in, rank), param_dtype))
    self.lora_b = nnx.LoRAParam(jnp.zeros((rank, d_out), param_dtype))
    self.scale = alpha / rank
    self.dropout = dropout

  def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    dtype = self.dtype or x.dtype
    x = x.astype(dtype)
    y = x @ self.kernel[...].astype(dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    update = opt.dropout(x, self.dropout, dropout_key) @ self.lora_a[...].astype(dtype)
    return y + (self.scale * update) @ self.lora_b[...].astype(dtype)


def _targets(model: opt.OPTForCausalLM, names: tuple[str, ...]):
  """(parent module, attribute name) of each projection named in `names`, over all layers."""
  unknown = set(names) - set(ATTENTION_TARGETS + MLP_TARGETS)
  if unknown:
    raise ValueError(f"lora.targets: unknown modules {sorted(unknown)}; choose from {ATTENTION_TARGETS + MLP_TARGETS}")
  for layer in model.layers:
    for name in names:
      yield (layer.self_attn if name in ATTENTION_TARGETS else layer), name


def apply_lora(model: opt.OPTForCausalLM, *, targets=("q_proj", "v_proj"), rank: int = 8, alpha: float = 16.0,
               dropout: float = 0.05, seed: int = 0) -> opt.OPTForCausalLM:
  """Wraps the target projections of every layer in place (the paper: r=8, alpha=16, dropout 0.05 on q, v)."""
  if rank < 1:
    raise ValueError(f"lora.rank must be >= 1, got {rank}")
  rngs = nnx.Rngs(seed)
  for parent, name in _targets(model, tuple(targets)):
    setattr(parent, name, LoRALinear(getattr(parent, name), rank=rank, alpha=alpha, dropout=dropout, rngs=rngs))
  return model


def _lora_modules(model: opt.OPTForCausalLM):
  """(parent, attribute name, LoRALinear) for every adapter in the model."""
  for layer in model.layers:
    for parent in (layer.self_attn, layer):
      for name, module in list(vars(parent).items()):
        if isinstance(module, LoRALinear):
          yield parent, name, module


def merge_lora(model: opt.OPTForCausalLM) -> opt.OPTForCausalLM:
  """A plain OPT (a copy) whose kernels include the adapters' updates, for export and fast inference."""
  merged = nnx.clone(model)
  for parent, name, module in _lora_modules(merged):
    kernel = module.kernel[...]
    linear = nnx.Linear(*kernel.shape, use_bias=module.bias is not None, dtype=module.dtype,
                        param_dtype=kernel.dtype, rngs=nnx.Rngs(0))
    linear.kernel.set_value(kernel + (module.scale * (module.lora_a[...] @ module.lora_b[...])).astype(kernel.dtype))
    if module.bias is not None:
      linear.bias.set_value(module.bias[...])
    setattr(parent, name, linear)
  return merged


def has_lora(model: opt.OPTForCausalLM) -> bool:
  return any(True for _ in _lora_modules(model))
