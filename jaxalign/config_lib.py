"""Config validation (before anything compiles) and study-stage resolution.

Every error names the field by its dotted path, the value found and what is allowed.
"""

from __future__ import annotations

import ml_collections

from jaxalign.losses import DPO_LOSS_TYPES
from jaxalign.models import registry

STAGE_PREFIX = "stage:"
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
  pass


def _one_of(config, path: str, allowed) -> None:
  value = _get(config, path)
  if value not in allowed:
    raise ConfigError(f"config.{path} = {value!r} is not allowed; choose one of {list(allowed)}")


def _check(config, path: str, ok: bool, expected: str) -> None:
  if not ok:
    raise ConfigError(f"config.{path} = {_get(config, path)!r} is invalid: expected {expected}")


def _get(config, path: str):
  value = config
  for part in path.split("."):
    value = value[part]
  return value


def validate(config: ml_collections.ConfigDict, *, stage_names: tuple[str, ...] = ()) -> None:
  """Raises `ConfigError` on the first invalid field. `stage_names`: earlier stages a "stage:<name>" may name."""
  if config.stages:
    _validate_study(config)
    return
  _one_of(config, "task", ("sft", "dpo", "reward"))
  _check(config, "tokenizer", bool(config.tokenizer), "a Hub id, a tokenizer folder, or 'synthetic'")
  if config.init_from.startswith(STAGE_PREFIX):
    _one_of(config, "init_from", [STAGE_PREFIX + name for name in stage_names])
  if not config.init_from:
    _one_of(config, "model.preset", registry.preset_names())
  _one_of(config, "model.dtype", DTYPES)
  _one_of(config, "model.attention_impl", ("auto", "xla", "cudnn"))

  _check(config, "data.max_length", config.data.max_length > 0, "a positive number of tokens")
  _check(config, "data.max_prompt_length", 0 < config.data.max_prompt_length < config.data.max_length,
         f"between 1 and data.max_length - 1 ({config.data.max_length - 1})")
  _one_of(config, "data.truncation_mode", ("keep_end", "keep_start"))
  _one_of(config, "data.loss_on", ("conversation", "completion"))
  _one_of(config, "data.sft_responses", ("chosen", "rejected", "both"))
  buckets = tuple(config.data.buckets)
  _check(config, "data.buckets", bool(buckets) and all(b > 0 for b in buckets) and list(buckets) == sorted(buckets),
         "increasing positive row lengths")
  _check(config, "data.eval_pairs", config.data.eval_pairs >= 0, "a count >= 0")
  _check(config, "data.prefix_sharing", not (config.data.prefix_sharing and config.task == "sft"),
         "prefix sharing only for the pair tasks 'dpo' and 'reward'")
  _check(config, "data.packing",
         not config.data.packing or config.task == "sft" or config.data.prefix_sharing,
         "packing only for task 'sft', or a pair task with data.prefix_sharing = True (pairs are packed as "
         "prefix-shared sequences)")

  _one_of(config, "optimizer.name", ("adamw", "rmsprop"))
  _one_of(config, "optimizer.schedule", ("linear", "cosine", "constant"))
  _check(config, "optimizer.lr", config.optimizer.lr > 0, "a positive learning rate")
  _check(config, "optimizer.warmup_steps", config.optimizer.warmup_steps >= 0, "a step count >= 0")
  _check(config, "optimizer.weight_decay", config.optimizer.weight_decay >= 0, "a number >= 0")
  _check(config, "optimizer.grad_clip", config.optimizer.grad_clip >= 0, "a global norm >= 0 (0 = off)")

  training = config.training
  _check(config, "training.batch_size", training.batch_size > 0, "a positive number of examples per step")
  _check(config, "training.grad_accum",
         training.grad_accum >= 1 and training.batch_size % training.grad_accum == 0,
         f"a divisor of training.batch_size ({training.batch_size})")
  _check(config, "training.num_epochs", training.num_epochs > 0, "a positive number of epochs")
  _check(config, "training.max_steps", training.max_steps == -1 or training.max_steps > 0, "-1 or a positive count")
  _check(config, "training.log_every", training.log_every >= 1, "a step count >= 1")
  _check(config, "training.eval_every", training.eval_every >= 0, "a step count >= 0 (0 = only at the end)")

  _check(config, "dpo.beta", config.dpo.beta > 0, "a positive number")
  _one_of(config, "dpo.loss_type", DPO_LOSS_TYPES)
  _check(config, "dpo.label_smoothing", 0 <= config.dpo.label_smoothing < 0.5, "a number in [0, 0.5)")
  _one_of(config, "dpo.reference", ("model", "precomputed"))
  _one_of(config, "dpo.reference_dtype", DTYPES)

  if config.lora.enabled:
    _check(config, "lora.rank", config.lora.rank >= 1, "an integer >= 1")
    _check(config, "lora.targets", set(config.lora.targets) <= set(registry.ALL_LORA_TARGETS),
           f"() for the model family's default, or projection names from {list(registry.ALL_LORA_TARGETS)} "
           "(which ones a model has depends on its family)")
    _check(config, "lora.dropout", 0 <= config.lora.dropout < 1, "a rate in [0, 1)")
  heads = tuple(config.reward.heads)
  _check(config, "reward.heads", bool(heads) and len(set(heads)) == len(heads), "distinct head names")
  _check(config, "checkpoint.every_steps", config.checkpoint.every_steps >= 0, "a step count >= 0 (0 = at the end)")
  _check(config, "checkpoint.keep", config.checkpoint.keep >= 1, "a count >= 1")
  _check(config, "mesh.num_devices", config.mesh.num_devices == -1 or config.mesh.num_devices >= 1,
         "-1 (all) or a device count")
  _check(config, "mesh.data", config.mesh.data == -1 or config.mesh.data >= 1, "-1 or a device count")
  _check(config, "mesh.fsdp", config.mesh.fsdp == -1 or config.mesh.fsdp >= 1, "-1 or a device count")
  _one_of(config, "mesh.distributed", ("auto", "on", "off"))
  _one_of(config, "export.dtype", ("",) + DTYPES)


def _validate_study(config: ml_collections.ConfigDict) -> None:
  names = tuple(config.stages)
  for i, name in enumerate(names):
    if name not in config.stage_configs:
      raise ConfigError(f"config.stages names {name!r}, but config.stage_configs has only "
                        f"{sorted(config.stage_configs.keys())}")
    try:
      validate(config.stage_configs[name], stage_names=names[:i])
    except ConfigError as e:
      raise ConfigError(str(e).replace("config.", f"config.stage_configs.{name}.", 1)) from None


def resolve_stage(config: ml_collections.ConfigDict, name: str, exports: dict[str, str]) -> ml_collections.ConfigDict:
  """The stage's config with "stage:<earlier>" references replaced by that stage's exported model folder."""
  stage = ml_collections.ConfigDict(config.stage_configs[name].to_dict())
  for field in ("init_from", "tokenizer"):
    if stage[field].startswith(STAGE_PREFIX):
      stage[field] = exports[stage[field][len(STAGE_PREFIX):]]
  return stage
