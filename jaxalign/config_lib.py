"""Config validation (before anything compiles) and study-stage resolution.

Every error names the field by its dotted path, the value found and what is allowed.
"""

from __future__ import annotations

import os
import re

import ml_collections

from jaxalign import losses, tasks
from jaxalign.data.formats import FORMATS
from jaxalign.data.pair_filter import PAIR_FILTERS
from jaxalign.data.tokenize import LOSS_ON
from jaxalign.errors import ConfigError
from jaxalign.models import registry

STAGE_PREFIX = "stage:"
DTYPES = ("float32", "bfloat16", "float16")




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


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
  """"80GB" (10^9), "79.6GiB" (2^30), "1e9" -> bytes; ValueError naming the accepted forms otherwise."""
  match = re.fullmatch(r"\s*(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)\s*([A-Za-z]*)\s*", str(text))
  unit = match.group(2).upper() if match else None
  if unit not in _UNITS:
    raise ValueError(f"{text!r} is not a memory size: expected a number with an optional unit B, KB, MB, GB, TB "
                     "(powers of 10) or KiB, MiB, GiB, TiB (powers of 2), e.g. 80GB")
  return int(float(match.group(1)) * _UNITS[unit])


def _is_bytes(text: str) -> bool:
  try:
    parse_bytes(text)
  except ValueError:
    return False
  return True


def _check_dpo_loss(dpo) -> None:
  """The DPO loss's options together (types, weights, f-divergence, label smoothing), as `losses` defines them."""
  try:
    losses.check_dpo_options(tasks.dpo_loss_type(dpo), loss_weights=dpo.loss_weights or None,
                             label_smoothing=dpo.label_smoothing, f_divergence_type=dpo.f_divergence_type,
                             discopop_tau=dpo.discopop_tau)
  except ValueError as error:
    raise ConfigError(f"config.dpo.loss_type = {dpo.loss_type!r} with its options is invalid: {error}") from None


def validate(config: ml_collections.ConfigDict, *, stage_names: tuple[str, ...] = ()) -> None:
  """Raises `ConfigError` on the first invalid field. `stage_names`: earlier stages a "stage:<name>" may name."""
  _check(config, "dry_run_memory", not config.dry_run_memory or _is_bytes(config.dry_run_memory),
         "a memory size such as '80GB' or '79.6GiB' (units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
  _check(config, "dry_run_memory", not config.dry_run_memory or config.dry_run,
         "'' unless config.dry_run = True (the batch-size search is part of the dry run)")
  if config.stages:
    _validate_study(config)
    return
  _one_of(config, "task", tuple(tasks.TASKS))
  _check(config, "tokenizer", bool(config.tokenizer or config.init_from),
         "a Hub id, a tokenizer folder or 'synthetic' for a random init (init_from = ''): there is no starting model "
         "whose own tokenizer to use")
  if config.init_from.startswith(STAGE_PREFIX):
    _one_of(config, "init_from", [STAGE_PREFIX + name for name in stage_names])
  if not config.init_from:
    _one_of(config, "model.preset", registry.preset_names())
  _one_of(config, "model.dtype", DTYPES)
  _one_of(config, "model.attention_impl", ("auto", "xla", "cudnn"))
  for field, what in (("logprob_chunk", "scored positions per row, >= 0 (0 = off)"),
                      ("logprob_vocab_chunk", "vocabulary columns, >= 0 (0 = off)"),
                      ("logprob_chunk_above_mib", "MiB of float32 logits, >= 0 (0 = always chunk)")):
    value = config.model[field]
    _check(config, f"model.{field}", isinstance(value, int) and value >= 0, f"a whole number of {what}")
  _validate_data(config)
  _validate_training(config)
  _check(config, "dpo.beta", config.dpo.beta > 0, "a positive number")
  _check_dpo_loss(config.dpo)
  _one_of(config, "dpo.reference", ("model", "precomputed"))
  _one_of(config, "dpo.reference_dtype", DTYPES)
  _validate_methods(config)
  _validate_online_losses(config)
  if tasks.spec(config.task).batch_kind == "prompts":
    _validate_online(config, stage_names)
  _validate_model_and_run(config)


def _validate_data(config: ml_collections.ConfigDict) -> None:
  """The data.* section, against the task's batch kind."""
  _check(config, "data.max_length", config.data.max_length > 0, "a positive number of tokens")
  _check(config, "data.max_prompt_length", 0 < config.data.max_prompt_length < config.data.max_length,
         f"between 1 and data.max_length - 1 ({config.data.max_length - 1})")
  _one_of(config, "data.truncation_mode", ("keep_end", "keep_start"))
  _one_of(config, "data.format", FORMATS)
  _check(config, "data.chat_template", config.data.chat_template in ("", "tokenizer")
         or config.data.chat_template.endswith((".jinja", ".j2")),
         "'' (plain text), 'tokenizer' (its own chat template) or a .jinja template file")
  _one_of(config, "data.loss_on", LOSS_ON)
  _check(config, "data.loss_on", config.data.loss_on != "assistant" or bool(config.data.chat_template),
         "'conversation' or 'completion' for plain text: loss on assistant turns needs data.chat_template")
  batch_kind = tasks.spec(config.task).batch_kind
  _check(config, "data.format", config.data.format != "messages" or batch_kind == "sft",
         f"a preference format for task {config.task!r} ('messages' records have no rejected response)")
  _check(config, "data.format", config.data.format not in ("messages", "conversational")
         or bool(config.data.chat_template), "a text format, or set data.chat_template: messages need a template")
  _one_of(config, "data.sft_responses", ("chosen", "rejected", "both"))
  buckets = tuple(config.data.buckets)
  _check(config, "data.buckets", bool(buckets) and all(b > 0 for b in buckets) and list(buckets) == sorted(buckets),
         "increasing positive row lengths")
  _check(config, "data.eval_pairs", config.data.eval_pairs >= 0, "a count >= 0")
  _check(config, "data.eval_share", 0 < config.data.eval_share < 1,
         "a share in (0, 1) of a single data file's records to hold out")
  _check(config, "data.eval_source", os.path.normpath(config.data.eval_source) != os.path.normpath(config.data.source),
         "another file, folder or Hub id than data.source ('' = data.source's eval_split, or a seeded share of a "
         "single file): held-out records are never training records")
  _check(config, "data.warn_skipped_share", 0 <= config.data.warn_skipped_share <= 1, "a share in [0, 1]")
  _check(config, "data.prefix_sharing", not (config.data.prefix_sharing and batch_kind == "sft"),
         f"prefix sharing only for the pair tasks {[t.name for t in tasks.TASKS.values() if t.batch_kind != 'sft']}")
  _check(config, "data.packing",
         not config.data.packing or batch_kind == "sft" or config.data.prefix_sharing,
         "packing only for task 'sft', or a pair task with data.prefix_sharing = True (pairs are packed as "
         "prefix-shared sequences)")

  _one_of(config, "data.pair_filter", PAIR_FILTERS)
  _check(config, "data.pair_filter_margin", config.data.pair_filter_margin >= 0,
         "a margin >= 0 (how far the judge must prefer the rejected response)")
  _check(config, "data.pair_scores", config.data.pair_filter == "keep" or os.path.isfile(config.data.pair_scores),
         "the scored-<split>.jsonl written by `python evaluate.py --config configs/score_pairs.py` (needed by "
         f"data.pair_filter = {config.data.pair_filter!r})")


def _validate_training(config: ml_collections.ConfigDict) -> None:
  """The optimizer.* and training.* sections."""
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


def _validate_model_and_run(config: ml_collections.ConfigDict) -> None:
  """The lora.*, reward.*, checkpoint.*, mesh.* and export.* sections."""
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


def _validate_methods(config: ml_collections.ConfigDict) -> None:
  """The cpo.*, orpo.* and kto.* sections (checked whatever the task, so a study's shared defaults stay valid)."""
  _one_of(config, "cpo.loss_type", losses.CPO_LOSS_TYPES)
  _check(config, "cpo.beta", config.cpo.beta > 0, "a positive number")
  _check(config, "cpo.alpha", config.cpo.alpha >= 0, "a weight >= 0 (0 = no NLL term, as SimPO)")
  _check(config, "cpo.simpo_gamma", config.cpo.simpo_gamma >= 0, "a margin >= 0")
  _check(config, "cpo.label_smoothing", 0 <= config.cpo.label_smoothing < 0.5, "a number in [0, 0.5)")
  _check(config, "orpo.beta", config.orpo.beta > 0, "a positive number (the ORPO paper's lambda)")
  _one_of(config, "kto.loss_type", losses.KTO_LOSS_TYPES)
  _check(config, "kto.beta", config.kto.beta > 0, "a positive number")
  _check(config, "kto.desirable_weight", config.kto.desirable_weight > 0, "a positive weight")
  _check(config, "kto.undesirable_weight", config.kto.undesirable_weight > 0, "a positive weight")


def _validate_online_losses(config: ml_collections.ConfigDict) -> None:
  """The grpo.*, rloo.* and online_dpo.* sections (checked whatever the task, as the other methods')."""
  grpo = config.grpo
  _one_of(config, "grpo.loss_type", losses.GRPO_LOSS_TYPES)
  _one_of(config, "grpo.importance_sampling_level", losses.IMPORTANCE_SAMPLING_LEVELS)
  _one_of(config, "grpo.scale_rewards", losses.SCALE_REWARDS)
  _check(config, "grpo.beta", grpo.beta >= 0, "a number >= 0 (0 = no KL term and no reference)")
  _check(config, "grpo.epsilon", 0 <= grpo.epsilon < 1, "a clip range in [0, 1)")
  _check(config, "grpo.epsilon_high", grpo.epsilon_high is None or grpo.epsilon_high >= 0,
         "None (= grpo.epsilon) or a number >= 0 (DAPO: 0.28)")
  _check(config, "grpo.delta", grpo.delta is None or grpo.delta > 1, "None (off) or a bound above 1")
  _check(config, "rloo.beta", config.rloo.beta >= 0, "a number >= 0 (0 = no KL and no reference)")
  _check(config, "rloo.epsilon", 0 <= config.rloo.epsilon < 1, "a clip range in [0, 1)")
  _check(config, "rloo.epsilon_high", config.rloo.epsilon_high is None or config.rloo.epsilon_high >= 0,
         "None (= rloo.epsilon) or a number >= 0")
  clip = tuple(config.rloo.reward_clip_range)
  _check(config, "rloo.reward_clip_range", not clip or (len(clip) == 2 and clip[0] < clip[1]),
         "() or (low, high) with low < high")
  _check(config, "online_dpo.beta", config.online_dpo.beta > 0, "a positive number")
  try:
    losses.check_dpo_options(tasks.dpo_loss_type(config.online_dpo))
  except ValueError as error:
    raise ConfigError(f"config.online_dpo.loss_type = {config.online_dpo.loss_type!r} is invalid: {error}") from None


def _validate_online(config: ml_collections.ConfigDict, stage_names: tuple[str, ...]) -> None:
  """The online.* section, for an online task: generation, rewards and the batch's fit to the groups."""
  online, task = config.online, config.task
  _check(config, "online.rewards", bool(online.rewards.strip()),
         "name=spec items, e.g. 'correct=exact_answer' or 'rm=<reward model folder>' (an online task needs one)")
  try:
    specs = parse_named(online.rewards, "online.rewards")
    parse_named(online.reward_set_heads, "online.reward_set_heads")
  except ValueError as error:
    raise ConfigError(str(error)) from None
  earlier = [STAGE_PREFIX + name for name in stage_names]
  _check(config, "online.rewards", all(s in earlier for s in specs.values() if s.startswith(STAGE_PREFIX)),
         f"reward models named 'stage:<name>' of earlier stages of the study ({earlier})")
  least = {"grpo": 1, "rloo": 2}.get(task, 2)
  _check(config, "online.num_generations", online.num_generations >= least and
         (task != "online_dpo" or online.num_generations == 2),
         "2 (online DPO compares two completions)" if task == "online_dpo" else f"a count >= {least}")
  _check(config, "online.max_completion_length", online.max_completion_length >= 1, "a token count >= 1")
  _check(config, "online.temperature", online.temperature > 0, "a temperature > 0 (training samples)")
  _check(config, "online.top_p", 0 < online.top_p <= 1, "a share in (0, 1] (1 = off)")
  _check(config, "online.top_k", online.top_k >= 0, "a count >= 0 (0 = off)")
  _check(config, "online.steps_per_generation", online.steps_per_generation >= 1, "a step count >= 1")
  _check(config, "online.num_iterations", online.num_iterations >= 1, "a count >= 1")
  _check(config, "online.dynamic_sampling_max_rounds", online.dynamic_sampling_max_rounds >= 1, "a count >= 1")
  _check(config, "online.soft_punish_cache", 0 <= online.soft_punish_cache <= online.max_completion_length,
         "a token count from 0 to online.max_completion_length")
  prompts, accum = config.training.batch_size // online.num_generations, config.training.grad_accum
  _check(config, "training.batch_size", config.training.batch_size % online.num_generations == 0
         and prompts % accum == 0, f"completions per step: a multiple of online.num_generations "
         f"({online.num_generations}) x training.grad_accum ({accum})")
  _check(config, "dpo.reference", config.dpo.reference == "model",
         "'model' for an online task (its completions are new every step: nothing to precompute)")


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


def parse_named(spec: str, what: str) -> dict[str, str]:
  """"name=value,name=value" -> {name: value}, in order; a clear error naming config.`what` for a malformed item or a
  repeated name."""
  named = {}
  for item in filter(None, (part.strip() for part in spec.split(","))):
    name, sep, value = item.partition("=")
    if not sep or not name.strip() or not value.strip():
      raise ConfigError(f"config.{what}: expected name=value items separated by commas, got {item!r}")
    if name.strip() in named:  # the later one would silently replace the earlier one's results
      raise ConfigError(f"config.{what}: the name {name.strip()!r} is given twice ({named[name.strip()]!r} and "
                        f"{value.strip()!r}); give each a distinct name")
    named[name.strip()] = value.strip()
  return named


def stage_header(config: ml_collections.ConfigDict, name: str, stage: ml_collections.ConfigDict) -> str:
  """The log line opening a study's stage: its place in the study, its name, task and starting model (`stage` as
  `resolve_stage` returns it)."""
  start = stage.init_from or f"a random init of {stage.model.preset}"
  return f"=== stage {list(config.stages).index(name) + 1} of {len(config.stages)}: {name} (task {stage.task}, from " \
         f"{start}) ==="


def resolve_stage(config: ml_collections.ConfigDict, name: str, exports: dict[str, str]) -> ml_collections.ConfigDict:
  """The stage's config with "stage:<earlier>" references replaced by that stage's exported model folder."""
  stage = ml_collections.ConfigDict(config.stage_configs[name].to_dict())
  resolve = lambda value: exports[value[len(STAGE_PREFIX):]] if value.startswith(STAGE_PREFIX) else value
  for field in ("init_from", "tokenizer"):
    stage[field] = resolve(stage[field])
  rewards = parse_named(stage.online.rewards, "online.rewards")  # reward models of earlier stages, too
  stage.online.rewards = ",".join(f"{name}={resolve(spec)}" for name, spec in rewards.items())
  return stage


def check_inputs(config: ml_collections.ConfigDict, *, tokenizer_size: int, model_config: dict,
                 devices: int) -> None:
  """Checks a stage's inputs against each other, before data is tokenized or anything compiles; raises ConfigError.

  tokenizer_size: the tokenizer's number of ids (added tokens included); model_config: the starting model's Hugging
  Face config dict (`vocab_size`, `max_position_embeddings`); devices: how many devices this run can see.
  Ids past the embedding table or positions past the position table do not fail in XLA (gathers clamp), they train
  into garbage and NaN; so they are refused here.
  """
  model = f"the model ({'config.init_from = ' + repr(config.init_from) if config.init_from else 'model.preset/arch'})"
  vocab = model_config.get("vocab_size")
  if vocab is not None and tokenizer_size > vocab:
    tokenizer = (f"config.tokenizer = {config.tokenizer!r}" if config.tokenizer else
                 f"the model's own tokenizer (config.init_from = {config.init_from!r})")
    raise ConfigError(f"{tokenizer} has {tokenizer_size} token ids but {model} has "
                      f"vocab_size {vocab}: ids {vocab}..{tokenizer_size - 1} have no embedding. Use the model's own "
                      "tokenizer, or (random init) set model.arch.vocab_size >= the tokenizer's size")
  positions = model_config.get("max_position_embeddings") or model_config.get("n_positions")  # GPT-2: n_positions
  if positions is not None and config.data.max_length > positions:
    raise ConfigError(f"config.data.max_length = {config.data.max_length} is more than the {positions} positions of "
                      f"{model} (max_position_embeddings): lower data.max_length to at most {positions}")
  if config.mesh.num_devices > devices:
    raise ConfigError(f"config.mesh.num_devices = {config.mesh.num_devices} but only {devices} device(s) are "
                      "present: lower it, or -1 for all of them")


# Fields a resumed (or rerun finished) stage may change freely: they change what is logged, evaluated, stored or how
# the work is laid out, chunked and compiled, or how many steps run (a new step count stretches or shortens the
# learning-rate schedule from the resumed step on). Every other field changes the math of training and is compared (see
# `check_unchanged`); a field added later is compared too, so this list names what is safe, not what is risky.
RESUME_FREE_FIELDS = ("resume", "resume_allow_changes", "training.num_epochs", "training.max_steps",
                      "training.log_every", "training.eval_every", "training.progress_bar", "training.precompile",
                      "data.eval_split", "data.eval_pairs", "data.cache_dir", "data.warn_skipped_share", "model.remat",
                      "model.attention_impl", "model.logprob_chunk", "model.logprob_vocab_chunk",
                      "model.logprob_chunk_above_mib", "checkpoint", "logging", "export", "mesh", "compilation_cache",
                      "stages", "stage_configs")


def _flat(tree: dict, prefix: str = "") -> dict:
  """{dotted field: value} of a nested config dict (tuples as lists, as JSON stores them)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  return out


def _covered(field: str, names) -> bool:
  return any(field == name or field.startswith(name + ".") for name in names)


def changed_fields(config: ml_collections.ConfigDict, saved: dict) -> list[str]:
  """"field: saved -> now" for each field that changes the math and differs from `saved` (a config dict as stored
  with a checkpoint or in done.json), except those `config.resume_allow_changes` allows. A field the saved config
  lacks (written by an older jaxalign) cannot be compared and is left out."""
  allowed = [name.strip() for name in config.get("resume_allow_changes", "").split(",") if name.strip()]
  if "all" in allowed:
    return []
  now, before = _flat(config.to_dict()), _flat(saved)
  return [f"{field}: {before[field]!r} -> {now[field]!r}" for field in sorted(now)
          if field in before and now[field] != before[field]
          and not _covered(field, RESUME_FREE_FIELDS) and not _covered(field, allowed)]


def check_unchanged(config: ml_collections.ConfigDict, saved: dict | None, what: str) -> None:
  """Raises ConfigError listing the fields that change the math where `config` differs from the config `what`
  (a checkpoint, a finished stage) was made with; nothing to compare (`saved` None: an older jaxalign) passes."""
  changes = changed_fields(config, saved) if saved is not None else []
  if changes:
    names = ",".join(change.split(":")[0] for change in changes)
    raise ConfigError(f"the config differs from the one {what} was made with, in fields that change the math of "
                      f"training: {'; '.join(changes)}. Continuing would mix two trainings in one model: rerun with "
                      f"the saved values, use another --workdir, or allow it with "
                      f"--config.resume_allow_changes={names}")
