"""A reward model: the decoder of any registered family with a linear scalar head (or one per criterion) read at the
last real token.

It is transformers' `<Family>ForSequenceClassification` layout (`score.weight` [num_heads, hidden], no bias, the
decoder's tensors under the family's usual prefix, read at the rightmost non-padding token), so exports load there
too (`OPTForSequenceClassification`, `LlamaForSequenceClassification`, `GPTNeoXForSequenceClassification`…). With
two heads (harmless, helpful) one model scores both criteria, each head trained on its own HH subsets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.models import hub, registry

SCORE = "score.weight"


class RewardModel(nnx.Module):
  """`backbone`: the family's causal LM without its LM head (hidden states only); `score`: the scalar heads."""

  def __init__(self, config, heads: tuple[str, ...] = ("reward",), *, rngs: nnx.Rngs):
    self.config = config
    self.heads = tuple(heads)
    self.backbone = registry.build_causal_lm(config, rngs=rngs, lm_head=False)
    self.score = _score_head(config, len(self.heads), rngs)

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


def _score_head(config, num_heads: int, rngs: nnx.Rngs) -> nnx.Linear:
  init_std = getattr(config, "initializer_range", getattr(config, "init_std", 0.02))
  return nnx.Linear(registry.family_of(config).hidden_width(config), num_heads, use_bias=False, dtype=config.dtype,
                    param_dtype=config.param_dtype, kernel_init=nnx.initializers.normal(init_std), rngs=rngs)

_SCORE_MAP = {("score", "kernel"): (SCORE, "transpose")}


def from_pretrained(name_or_path: str, *, revision: str | None = None, heads: tuple[str, ...] | None = None,
                    seed: int = 0, shardings_fn=None, vocab_size: int = 0, **compute) -> RewardModel:
  """Loads an exported reward model, or starts one from a causal LM of any family (the head then starts random);
  `vocab_size` as in `hub.from_pretrained`."""
  model_dir = hub.resolve_model_dir(name_or_path, revision=revision)
  hf_config = hub.load_config(model_dir)
  config, vocab_rows = hub.with_vocab_size(registry.config_from_hf(hf_config, **compute), vocab_size)
  family = registry.family_of(config)
  reader = hub.CheckpointReader(model_dir)
  if SCORE in reader.names():
    saved_heads = tuple(hf_config["id2label"][str(i)] for i in range(len(hf_config["id2label"])))
    if heads is not None and tuple(heads) != saved_heads:
      raise ValueError(f"{name_or_path!r} has reward heads {saved_heads}, but heads {tuple(heads)} were asked for")
    abstract = nnx.eval_shape(lambda: RewardModel(config, saved_heads, rngs=nnx.Rngs(0)))
    shardings = shardings_fn(abstract) if shardings_fn else None
    return hub.load_model(abstract, reader, family, shardings, under=("backbone",), extra=_SCORE_MAP,
                          vocab_rows=vocab_rows)
  heads = tuple(heads or ("reward",))
  model = nnx.eval_shape(lambda: RewardModel(config, heads, rngs=nnx.Rngs(0)))
  abstract_backbone = registry.abstract_causal_lm(config, lm_head=False)
  shardings = shardings_fn(abstract_backbone) if shardings_fn else None
  model.backbone = hub.load_model(abstract_backbone, reader, family, shardings, vocab_rows=vocab_rows)
  model.score = _score_head(config, len(heads), nnx.Rngs(seed))
  return model


def save_pretrained(model: RewardModel, out_dir: str, *, pad_token_id: int | None = None) -> None:
  """Writes a `<Family>ForSequenceClassification` folder (num_labels = heads, id2label = head names).

  transformers scores at the last token that is not `pad_token_id`: pass the tokenizer's (default: the config's).
  """
  family = registry.family_of(model.config)
  tensors = hub.export_tensors(model, registry.param_map(model, family, under=("backbone",)) | _SCORE_MAP)
  hf_config = model.config.to_hf_dict()
  hf_config.update(architectures=[family.hf_sequence_classification], num_labels=len(model.heads),
                   id2label={str(i): name for i, name in enumerate(model.heads)},
                   label2id={name: i for i, name in enumerate(model.heads)})
  if pad_token_id is not None:
    hf_config["pad_token_id"] = pad_token_id
  hub.write_model(out_dir, hf_config, tensors)
