"""Rewards for the online methods: several at once, each a function with TRL's signature

  f(prompts, completions, completion_ids, **columns) -> list[float | None]

called on a batch of completions (one row each; a prompt's row repeated for each of its completions), `columns`
holding the prompt records' extra columns (e.g. the arithmetic task's `answer`), one value per row. None (or NaN)
means "no reward from this function for that completion".

Kinds (`make_rewards` builds them by name from a spec):
  * a Python function named "module:function" (`load_function`);
  * a reward model (`model_rewards`): a Hub id, model folder or training workdir, scored through `judges.py` (the
    paper's DeBERTa judge, any sequence-classification reward model of a registered family, or ours). Each head of
    a several-head reward model is a reward of its own ("<name>/<head>"); with `set_heads` ({prompt set: head}, as
    the evaluator chooses heads) a head scores only the prompts of its sets (the `prompt_set` column) and gives
    None elsewhere, so the weighted sum uses the head of each prompt's set;
  * built-in rule rewards (BUILTIN_REWARDS): "exact_answer" and "answer_format" for the arithmetic task
    (`data/arithmetic.py`), "soft_overlong" (DAPO's soft over-length penalty, TRL's `get_soft_overlong_punishment`).

`score` runs the rewards and checks what they return: a function that raises, returns the wrong number of values,
or a value that is not a number (or is infinite) fails with a RewardError naming the reward and the completion.
`combine` is TRL's weighted sum: `nansum` over the rewards of each completion, NaN for a completion no reward
scored (it then gets advantage 0), with TRL's metrics rewards/<name>/mean|std, reward and reward_std.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from jaxalign import config_lib, judges, workdirs
from jaxalign.data import arithmetic
from jaxalign.data.prompts import SET_COLUMN  # a prompt's evaluator set (harmful / helpful): head routing

RewardFunction = Callable[..., list]
_FUNCTION_NAME = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


class RewardError(ValueError):
  """A reward function failed or returned something that is not one number (or None) per completion."""


@dataclasses.dataclass(frozen=True)
class Reward:
  """A named reward function and its weight in the sum."""

  name: str
  function: RewardFunction
  weight: float = 1.0


# ------------------------------------------------------------------------------------------------- rule rewards


def exact_answer_reward(prompts, completions, completion_ids=None, *, answer, **columns) -> list[float]:
  """1 for a completion in the arithmetic task's format with exactly the `answer` column's value, else 0."""
  return [float(arithmetic.is_correct(_completion_text(c), a)) for c, a in zip(completions, answer)]


def answer_format_reward(prompts, completions, completion_ids=None, **columns) -> list[float]:
  """1 for a completion in the arithmetic task's answer format ("Answer: <integer>"), right or wrong, else 0."""
  return [float(arithmetic.parse_answer(_completion_text(c)) is not None) for c in completions]


def soft_overlong_punishment(max_completion_length: int, soft_punish_cache: int) -> RewardFunction:
  """DAPO's soft over-length penalty (its Eq. 13; TRL's `get_soft_overlong_punishment`) on the completion's token
  count n: 0 up to max_completion_length - soft_punish_cache, then falling linearly to -1 at max_completion_length,
  and -1 beyond."""
  if not 0 < soft_punish_cache <= max_completion_length:
    raise ValueError(f"soft_punish_cache {soft_punish_cache}: expected 1 to max_completion_length "
                     f"{max_completion_length}")
  free = max_completion_length - soft_punish_cache

  def penalty(n: int) -> float:
    if n <= free:
      return 0.0
    return (free - n) / soft_punish_cache if n <= max_completion_length else -1.0

  def soft_overlong(prompts, completions, completion_ids, **columns) -> list[float]:
    return [penalty(len(ids)) for ids in completion_ids]

  return soft_overlong


BUILTIN_REWARDS = {"exact_answer": exact_answer_reward, "answer_format": answer_format_reward}


# ---------------------------------------------------------------------------------------- functions and models


def load_function(spec: str) -> RewardFunction:
  """The function named "module:function" (the module importable from the current environment)."""
  if not _FUNCTION_NAME.fullmatch(spec):
    raise ValueError(f"reward function {spec!r}: expected 'module:function', e.g. 'my_rewards:length_reward'")
  module_name, function_name = spec.split(":")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"reward function {spec!r}: cannot import module {module_name!r} ({e})") from e
  function = getattr(module, function_name, None)
  if not callable(function):
    raise ValueError(f"reward function {spec!r}: module {module_name!r} has no function {function_name!r}")
  return function


def _prompt_text(prompt) -> str:
  """A prompt as text for a judge: a string as it is, messages as HH turns (system and user as Human)."""
  if isinstance(prompt, str):
    return prompt
  return "".join(f"\n\n{'Assistant' if m['role'] == 'assistant' else 'Human'}: {m['content']}" for m in prompt)


def _completion_text(completion) -> str:
  """A completion as text: a string as it is, messages (a conversational completion) by their contents."""
  return completion if isinstance(completion, str) else "".join(m["content"] for m in completion)


def judge_reward(judge: judges.Judge, *, prompt_sets: frozenset[str] | None = None) -> RewardFunction:
  """A judge's score of each (prompt, completion) as a reward; with `prompt_sets`, only for the completions whose
  `prompt_set` column is one of them (None for the others)."""

  def reward(prompts, completions, completion_ids=None, **columns) -> list[float | None]:
    rows = list(range(len(prompts)))
    if prompt_sets is not None:
      if SET_COLUMN not in columns:
        raise ValueError(f"this reward scores the prompt sets {sorted(prompt_sets)} and needs each prompt's "
                         f"{SET_COLUMN!r} column; the prompts have columns {sorted(columns)}")
      rows = [i for i in rows if columns[SET_COLUMN][i] in prompt_sets]
    scores = judge.score([_prompt_text(prompts[i]) for i in rows], [_completion_text(completions[i]) for i in rows])
    out: list[float | None] = [None] * len(prompts)
    for i, value in zip(rows, scores):
      out[i] = float(value)
    return out

  return reward


def model_rewards(name: str, path: str, *, set_heads: Mapping[str, str] | None = None,
                  **judge_kwargs) -> dict[str, RewardFunction]:
  """The rewards of one reward model (Hub id, folder or training workdir; `judge_kwargs` go to `judges.load_judge`):
  {name: reward}, or for a several-head model of ours {"<name>/<head>": reward} per head, each head scoring the
  prompt sets `set_heads` ({set: head}) gives it (every prompt when set_heads is None)."""
  judge = judges.load_judge(workdirs.resolve_init_path(path), **judge_kwargs)
  if not isinstance(judge, judges.RewardModelJudge) or len(judge.heads) == 1:
    return {name: judge_reward(judge)}
  unknown = sorted(set((set_heads or {}).values()) - set(judge.heads))
  if unknown:
    raise ValueError(f"reward {name!r}: set_heads names heads {unknown}, but {path} has heads {judge.heads}")
  sets_of = lambda head: None if set_heads is None else frozenset(s for s, h in set_heads.items() if h == head)
  return {f"{name}/{head}": judge_reward(judge.for_head(head), prompt_sets=sets_of(head)) for head in judge.heads}


def is_reward_model(spec: str) -> bool:
  """Whether a reward spec names a reward model (neither a built-in rule reward nor a "module:function");
  "stage:<name>" (a study's stage) is one, though it is spelt like a function."""
  return spec.startswith(config_lib.STAGE_PREFIX) or (
      spec != "soft_overlong" and spec not in BUILTIN_REWARDS and not _FUNCTION_NAME.fullmatch(spec))


def make_rewards(specs: Mapping[str, str], *, weights: Sequence[float] | None = None,
                 max_completion_length: int | None = None, soft_punish_cache: int | None = None,
                 set_heads: Mapping[str, str] | None = None, judge_kwargs: Mapping | None = None) -> list[Reward]:
  """Rewards from {name: spec}, in order; spec is a built-in name (BUILTIN_REWARDS, or "soft_overlong" with
  `max_completion_length` and `soft_punish_cache`), "module:function", or a reward model's path (each head of a
  several-head model a reward, `model_rewards`). `weights`: one per resulting reward (default 1 each)."""
  functions: dict[str, RewardFunction] = {}
  for name, spec in specs.items():
    if spec == "soft_overlong":
      if max_completion_length is None or soft_punish_cache is None:
        raise ValueError(f"reward {name!r}: soft_overlong needs max_completion_length and soft_punish_cache")
      functions[name] = soft_overlong_punishment(max_completion_length, soft_punish_cache)
    elif spec in BUILTIN_REWARDS:
      functions[name] = BUILTIN_REWARDS[spec]
    elif _FUNCTION_NAME.fullmatch(spec):
      functions[name] = load_function(spec)
    elif not (Path(spec).expanduser().exists() or "/" in spec or spec.startswith(config_lib.STAGE_PREFIX)):
      raise ValueError(f"reward {name!r}: {spec!r} is not a built-in reward ({[*BUILTIN_REWARDS, 'soft_overlong']}), "
                       "a 'module:function', nor a reward model (a folder, a training workdir or a Hub id)")
    else:
      functions.update(model_rewards(name, spec, set_heads=set_heads, **(judge_kwargs or {})))
  if not functions:
    raise ValueError("no rewards: give at least one")
  weights = [1.0] * len(functions) if weights is None else [float(w) for w in weights]
  if len(weights) != len(functions):
    raise ValueError(f"reward_weights {weights}: expected one weight per reward of {list(functions)}")
  return [Reward(name, function, weight) for (name, function), weight in zip(functions.items(), weights)]


# --------------------------------------------------------------------------------------------- scoring, summing


def _where(i: int, prompts: Sequence, num_generations: int) -> str:
  prompt = _prompt_text(prompts[i])
  return (f"completion {i} (prompt {i // num_generations}: "
          f"{prompt[:60]!r}{'…' if len(prompt) > 60 else ''})")


def _call(reward: Reward, prompts, completions, completion_ids, columns, num_generations: int) -> list:
  """The reward's values for the batch; when it raises, the first completion it raises on alone is named."""
  try:
    return reward.function(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
  except Exception as batch_error:
    for i in range(len(prompts)):
      try:
        reward.function(prompts=prompts[i:i + 1], completions=completions[i:i + 1],
                        completion_ids=completion_ids[i:i + 1], **{k: v[i:i + 1] for k, v in columns.items()})
      except Exception as e:
        raise RewardError(f"reward {reward.name!r} raised {type(e).__name__}: {e}, on "
                          f"{_where(i, prompts, num_generations)}") from e
    raise RewardError(f"reward {reward.name!r} raised {type(batch_error).__name__}: {batch_error}, on the batch "
                      f"of {len(prompts)} completions (on none of them alone)") from batch_error


def _checked_value(reward: Reward, value, i: int, prompts, num_generations: int) -> float:
  """A returned value as a float (None and NaN: NaN); raises RewardError for anything else."""
  if value is None:
    return math.nan
  if not isinstance(value, numbers.Real) or math.isinf(value):
    raise RewardError(f"reward {reward.name!r} returned {value!r} ({type(value).__name__}) for "
                      f"{_where(i, prompts, num_generations)}; expected a finite number, or None for no reward")
  return float(value)


def score(rewards: Sequence[Reward], prompts: Sequence, completions: Sequence, completion_ids: Sequence,
          columns: Mapping[str, Sequence] | None = None, *, num_generations: int = 1) -> np.ndarray:
  """Each reward of each completion: [completions, rewards] fp32, NaN where a reward gave None. Rows are
  prompt-major with `num_generations` completions per prompt (for the messages); `columns`: one value per row."""
  columns = dict(columns or {})
  for name, values in columns.items():
    if len(values) != len(prompts):
      raise ValueError(f"column {name!r} has {len(values)} values for {len(prompts)} completions")
  out = np.zeros((len(prompts), len(rewards)), np.float32)
  for r, reward in enumerate(rewards):
    values = _call(reward, prompts, completions, completion_ids, columns, num_generations)
    if not isinstance(values, (list, tuple, np.ndarray)) or len(values) != len(prompts):
      got = f"{len(values)} values" if isinstance(values, (list, tuple, np.ndarray)) else repr(values)[:80]
      raise RewardError(f"reward {reward.name!r} returned {got} for {len(prompts)} completions; expected one "
                        "number (or None) per completion, in order")
    out[:, r] = [_checked_value(reward, v, i, prompts, num_generations) for i, v in enumerate(values)]
  return out


def _nanstat(values: np.ndarray, stat) -> float:
  present = values[~np.isnan(values)]
  return float(stat(present)) if present.size else math.nan


def combine(rewards: Sequence[Reward], per_reward: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
  """The weighted sum of each completion's rewards ([completions, rewards], NaN = none) ignoring NaNs, NaN where no
  reward scored the completion (TRL's rule); and TRL's metrics: rewards/<name>/mean|std over the completions each
  reward scored, reward / reward_std over the scored completions (std with Bessel's correction, NaN below two)."""
  weights = np.array([r.weight for r in rewards], np.float32)
  combined = np.nansum(per_reward * weights, axis=1)
  combined[np.isnan(per_reward).all(axis=1)] = np.nan
  std = lambda x: np.std(x, ddof=1) if x.size > 1 else math.nan
  metrics = {}
  for r, reward in enumerate(rewards):
    metrics[f"rewards/{reward.name}/mean"] = _nanstat(per_reward[:, r], np.mean)
    metrics[f"rewards/{reward.name}/std"] = _nanstat(per_reward[:, r], std)
  metrics.update(reward=_nanstat(combined, np.mean), reward_std=_nanstat(combined, std))
  return combined, metrics
