"""The model a stage trains: the Hugging Face config it starts from, checked against the tokenizer and the devices
before anything is tokenized or compiled, built (from a folder, the Hub or a preset; a reward model for a task that
trains one; LoRA adapters when configured) with its parameters placed on the mesh, and exported in Hugging Face
format at the end.
"""

from __future__ import annotations

import os
from typing import Any

import jax
from flax import nnx

from jaxalign import config_lib, parallel, tasks
from jaxalign.models import hub, lora, registry, reward
from jaxalign.tokenizer import embedding_rows
from jaxalign.workdirs import resolve_init_path


def compute_options(config) -> dict[str, Any]:
  """The model config fields the stage's compute settings override (dtype, remat, attention, dropout)."""
  options = dict(dtype=config.model.dtype, remat=config.model.remat, attention_impl=config.model.attention_impl)
  if config.model.dropout >= 0:
    options["dropout"] = config.model.dropout
  return options


def model_hf_config(config) -> dict[str, Any]:
  """The Hugging Face config dict of the model a stage starts from (only config.json is read or fetched)."""
  if not config.init_from:
    return registry.preset(config.model.preset, **config.model.arch.to_dict()).to_hf_dict()
  path = resolve_init_path(config.init_from)
  if os.path.isdir(path):
    return hub.load_config(path)
  from huggingface_hub import hf_hub_download

  try:
    return hub.load_config(os.path.dirname(hf_hub_download(path, hub.CONFIG_FILE)))
  except Exception as e:  # not on the Hub, offline, gated: all say the same to the user
    raise config_lib.ConfigError(
        f"config.init_from = {config.init_from!r} is neither an existing local folder nor a model found on the "
        f"Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the path, or the "
        "Hub id and network access") from e


def check_inputs(config, tokenizer) -> None:
  """Checks the tokenizer, the starting model and the devices against each other and the config, before any data is
  tokenized or anything compiles (config_lib.check_inputs says what is compared)."""
  # A pad token the tokenizer needed gets a new embedding row (build_model), so it is not an id past the table.
  added_pad = 1 if embedding_rows(tokenizer) else 0
  config_lib.check_inputs(config, tokenizer_size=len(tokenizer) - added_pad, model_config=model_hf_config(config),
                          devices=jax.device_count())


def build_model(config, mesh, vocab_size: int = 0) -> nnx.Module:
  """The model the task trains, its parameters placed on the mesh by the FSDP rule; with at least `vocab_size`
  token rows (`tokenizer.embedding_rows`: a pad token the tokenizer needed; new rows start at the mean)."""
  compute = compute_options(config)
  reward_model = tasks.spec(config.task).reward_model
  shardings_fn = lambda abstract: parallel.tree_shardings(nnx.state(abstract), mesh, config.mesh.min_fsdp_size)
  if config.init_from:
    path = resolve_init_path(config.init_from)
    if reward_model:
      model = reward.from_pretrained(path, heads=tuple(config.reward.heads), seed=config.seed,
                                     shardings_fn=shardings_fn, vocab_size=vocab_size, **compute)
    else:
      model = hub.from_pretrained(path, shardings_fn=shardings_fn, vocab_size=vocab_size, **compute)
  else:
    arch = registry.preset(config.model.preset, **config.model.arch.to_dict()).replace(**compute)
    arch, _ = hub.with_vocab_size(arch, vocab_size)
    if reward_model:
      make = lambda: reward.RewardModel(arch, tuple(config.reward.heads), rngs=nnx.Rngs(config.seed))
    else:
      make = lambda: registry.build_causal_lm(arch, rngs=nnx.Rngs(config.seed))
    graphdef, abstract_state = nnx.split(nnx.eval_shape(make))
    shardings = parallel.tree_shardings(abstract_state, mesh, config.mesh.min_fsdp_size)
    state = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)()
    model = nnx.merge(graphdef, state)
  if config.lora.enabled:
    model = lora.apply_lora(model, targets=tuple(config.lora.targets), rank=config.lora.rank,
                            alpha=config.lora.alpha, dropout=config.lora.dropout, seed=config.seed)
  return model


def export_model(model: nnx.Module, out_dir: str, dtype: str = "", pad_token_id: int | None = None) -> None:
  """The trained model as a Hugging Face folder (a reward model scored at the last token that is not
  `pad_token_id`)."""
  if isinstance(model, reward.RewardModel):
    reward.save_pretrained(model, out_dir, pad_token_id=pad_token_id)
  else:
    hub.save_pretrained(lora.merge_lora(model) if lora.has_lora(model) else model, out_dir, dtype=dtype or None)
