"""LoRA (Hu et al., 2021): a frozen Linear plus a trainable low-rank update, y = xW + b + (alpha/r) · drop(x) A B.

`apply_lora` swaps chosen projections of every block of a causal LM or reward model of any family (by attribute name,
anywhere inside the block, as PEFT's `target_modules`; default: the family's, from the registry) for `LoRALinear`s
that keep the wrapped layer's `kernel`/`bias` (same parameter paths, so checkpoints and exports still line up).
Only `nnx.LoRAParam` variables are trained. B starts at zero, so a fresh adapter leaves the model unchanged; zeroing the LoRA params gives back the base model
(the DPO reference "with adapters off", without a second copy of the weights). `merge_lora` folds the update into
the kernels for export.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.models import layers, registry


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
    update = layers.dropout(x, self.dropout, dropout_key) @ self.lora_a[...].astype(dtype)
    return y + (self.scale * update) @ self.lora_b[...].astype(dtype)


def _blocks(model: nnx.Module):
  """The decoder blocks of a causal LM, or of a reward model's backbone."""
  return getattr(model, "backbone", model).layers


def _linears(module: nnx.Module):
  """(parent, attribute name, layer) of every Linear / LoRALinear inside a block, depth first."""
  for name, child in list(vars(module).items()):
    if isinstance(child, (nnx.Linear, LoRALinear)):
      yield module, name, child
    elif isinstance(child, nnx.Module):
      yield from _linears(child)


def apply_lora(model: nnx.Module, *, targets: tuple[str, ...] = (), rank: int = 8, alpha: float = 16.0,
               dropout: float = 0.05, seed: int = 0) -> nnx.Module:
  """Wraps the target projections of every block in place (empty `targets`: the family's default, q_proj and
  v_proj for OPT and Llama-like models as in the paper: r=8, alpha=16, dropout 0.05)."""
  if rank < 1:
    raise ValueError(f"lora.rank must be >= 1, got {rank}")
  family = registry.family_of(model.config)
  targets = tuple(targets) or family.default_lora_targets
  unknown = set(targets) - set(family.lora_targets)
  if unknown:
    raise ValueError(f"lora.targets: {sorted(unknown)} are not projections of a {family.model_type} model; choose "
                     f"from {family.lora_targets}")
  rngs = nnx.Rngs(seed)
  for block in _blocks(model):
    for parent, name, linear in list(_linears(block)):
      if name in targets and isinstance(linear, nnx.Linear):
        setattr(parent, name, LoRALinear(linear, rank=rank, alpha=alpha, dropout=dropout, rngs=rngs))
  return model


def _lora_modules(model: nnx.Module):
  """(parent, attribute name, LoRALinear) for every adapter in the model."""
  for block in _blocks(model):
    for parent, name, module in _linears(block):
      if isinstance(module, LoRALinear):
        yield parent, name, module


def merge_lora(model: nnx.Module) -> nnx.Module:
  """A plain model (a copy) whose kernels include the adapters' updates, for export and fast inference."""
  merged = nnx.clone(model)
  for parent, name, module in list(_lora_modules(merged)):
    kernel = module.kernel[...]
    linear = nnx.Linear(*kernel.shape, use_bias=module.bias is not None, dtype=module.dtype,
                        param_dtype=kernel.dtype, rngs=nnx.Rngs(0))
    linear.kernel.set_value(kernel + (module.scale * (module.lora_a[...] @ module.lora_b[...])).astype(kernel.dtype))
    if module.bias is not None:
      linear.bias.set_value(module.bias[...])
    setattr(parent, name, linear)
  return merged


def has_lora(model: nnx.Module) -> bool:
  return any(True for _ in _lora_modules(model))
