"""A reward model: the OPT decoder with a linear scalar head (or one per criterion) read at the last real token.

It is transformers' `OPTForSequenceClassification` layout (`score.weight` [num_heads, word_embed_proj_dim], no
bias, read at the rightmost non-padding token), so exports load there too. With two heads (harmless, helpful) one
model scores both criteria, each head trained on its own HH subsets.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.models import hub, opt


class OPTRewardModel(nnx.Module):

  def __init__(self, config: opt.OPTConfig, heads: tuple[str, ...] = ("reward",), *, rngs: nnx.Rngs):
    self.config = config
    self.heads = tuple(heads)
    self.backbone = opt.OPTForCausalLM(config, rngs=rngs)
    self.score = nnx.Linear(config.word_embed_proj_dim, len(self.heads), use_bias=False, dtype=config.dtype,
                            param_dtype=config.param_dtype,
                            kernel_init=nnx.initializers.normal(config.init_std), rngs=rngs)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, *,
               dropout_key: jax.Array | None = None) -> jax.Array:
    """Rewards [B, num_heads] (fp32) read at each row's rightmost real token (left or right padding)."""
    hidden, _ = self.backbone.hidden_states(input_ids, attention_mask, dropout_key=dropout_key)
    last = jnp.argmax(attention_mask * jnp.arange(attention_mask.shape[1]), axis=1)
    return self.scores(hidden, last[:, None])[:, 0]

  def scores(self, hidden: jax.Array, read_at: jax.Array) -> jax.Array:
    """Rewards [B, M, num_heads] (fp32) from the hidden states [B, T, D] at slots `read_at` [B, M] (several
    sequences per row: prefix-shared or packed pairs)."""
    return self.score(jnp.take_along_axis(hidden, read_at[..., None], axis=1)).astype(jnp.float32)


def _param_map(config: opt.OPTConfig, prefix: str = "model.") -> hub.ParamMap:
  mapping = {("backbone", *path): name for path, name in hub.opt_param_map(config, prefix).items()}
  mapping[("score", "kernel")] = ("score.weight", "transpose")
  return mapping


def from_pretrained(name_or_path: str, *, revision: str | None = None, heads: tuple[str, ...] | None = None,
                    seed: int = 0, shardings_fn=None, **compute) -> OPTRewardModel:
  """Loads an exported reward model, or starts one from a causal-LM OPT (the head then starts random)."""
  model_dir = hub.resolve_model_dir(name_or_path, revision=revision)
  hf_config = hub.load_config(model_dir)
  config = opt.OPTConfig.from_hf_dict(hf_config, **compute)
  reader = hub.CheckpointReader(model_dir)
  if "score.weight" in reader.names():
    saved_heads = tuple(hf_config["id2label"][str(i)] for i in range(len(hf_config["id2label"])))
    if heads is not None and tuple(heads) != saved_heads:
      raise ValueError(f"{name_or_path!r} has reward heads {saved_heads}, but heads {tuple(heads)} were asked for")
    abstract = nnx.eval_shape(lambda: OPTRewardModel(config, saved_heads, rngs=nnx.Rngs(0)))
    shardings = shardings_fn(abstract) if shardings_fn else None
    return hub.load_into(abstract, reader, _param_map(config, hub.opt_prefix(reader)), shardings)
  model = OPTRewardModel(config, heads or ("reward",), rngs=nnx.Rngs(seed))
  model.backbone = hub.from_pretrained(model_dir, shardings_fn=shardings_fn, **compute)
  return model


def save_pretrained(model: OPTRewardModel, out_dir: str) -> None:
  """Writes an `OPTForSequenceClassification` folder (num_labels = heads, id2label = head names)."""
  tensors = hub.export_tensors(model, _param_map(model.config))
  if jax.process_index() != 0:
    return
  os.makedirs(out_dir, exist_ok=True)
  hf_config = model.config.to_hf_dict()
  hf_config.update(architectures=["OPTForSequenceClassification"], num_labels=len(model.heads),
                   id2label={str(i): name for i, name in enumerate(model.heads)},
                   label2id={name: i for i, name in enumerate(model.heads)})
  with open(os.path.join(out_dir, hub.CONFIG_FILE), "w") as f:
    json.dump(hf_config, f, indent=2)
  hub.write_safetensors(tensors, out_dir)
