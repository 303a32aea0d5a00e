"""Judges: reward models that score (prompt, response) pairs for the evaluator. Higher is better.

The paper's judge is OpenAssistant/reward-model-deberta-v3-large-v2 (`DebertaJudge`): the pair is encoded as a text
pair by the judge's own tokenizer and the score is the classifier's single logit. `load_judge` picks the judge class
from a model folder's `config.json`.

Scoring runs in fixed-size batches padded to a few bucket lengths, so a whole evaluation compiles a handful of
programs; pairs are sorted by length so each batch is padded little, and the scores come back in the caller's order.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign import config_lib, shapes, workdirs
from jaxalign.errors import ConfigError
from jaxalign.models import deberta, hub, registry, reward

DEFAULT_JUDGE = "OpenAssistant/reward-model-deberta-v3-large-v2"


class Judge(abc.ABC):
  """Scores (prompt, response) pairs: one fp32 score per pair, in the order given."""

  @abc.abstractmethod
  def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """fp32 scores [len(prompts)] for the pairs (prompts[i], responses[i])."""


class BucketedJudge(Judge):
  """A judge over tokenized rows: sorted by length, padded to a bucket length and to `batch_size` rows, scored by a
  compiled forward, then put back in the caller's order.

  Subclasses say how a pair becomes a row of token features (`encode`: dicts of equal-length int lists, at least
  "input_ids"; truncation is theirs to do) and how a padded batch becomes scores (`forward`). Rows are padded on the
  right: "input_ids" with `pad_id`, every other feature with 0, and an "attention_mask" is added. A row longer than
  the last bucket is padded to a multiple of it.
  """

  def __init__(self, *, batch_size: int, pad_id: int, buckets: Sequence[int]):
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not buckets or min(buckets) < 1:
      raise ValueError(f"buckets must be positive lengths, got {buckets}")
    self.batch_size, self.pad_id, self.buckets = batch_size, pad_id, tuple(sorted(set(buckets)))

  @abc.abstractmethod
  def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> list[dict[str, list[int]]]:
    """One row of token features per pair."""

  @abc.abstractmethod
  def forward(self, batch: dict[str, np.ndarray]) -> jax.Array:
    """Scores [batch_size] for a padded batch ([batch_size, bucket] int32 features, "attention_mask" included)."""

  def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    if len(prompts) != len(responses):
      raise ValueError(f"Got {len(prompts)} prompts but {len(responses)} responses; score needs one per prompt")
    if not prompts:
      return np.zeros(0, np.float32)
    rows = self.encode(prompts, responses)
    lengths = [len(row["input_ids"]) for row in rows]
    # Longest first: the first batch compiles the largest program. Dispatched without waiting: the host pads the
    # next batch while the device scores this one.
    chunks = shapes.sorted_chunks(lengths, self.batch_size, longest_first=True)
    pending = [self.forward(self._pad([rows[i] for i in chunk],
                                      shapes.fit(max(lengths[i] for i in chunk), self.buckets, beyond=True)))
               for chunk in chunks]
    return shapes.scatter(chunks, [np.asarray(scores, np.float32) for scores in pending], len(rows))

  def _pad(self, rows: list[dict[str, list[int]]], length: int) -> dict[str, np.ndarray]:
    batch = {name: np.full((self.batch_size, length), self.pad_id if name == "input_ids" else 0, np.int32)
             for name in rows[0]}
    batch["attention_mask"] = np.zeros((self.batch_size, length), np.int32)
    # Filler rows (a partial last batch) are a single real pad token, so no row has every key masked.
    batch["attention_mask"][len(rows):, 0] = 1
    for r, row in enumerate(rows):
      for name, values in row.items():
        batch[name][r, :len(values)] = values
      batch["attention_mask"][r, :len(row["input_ids"])] = 1
    return batch


class DebertaJudge(BucketedJudge):
  """A DeBERTa-v2/v3 sequence classifier with one output as a judge: score = the logit of (prompt, response) encoded
  as a text pair by the judge's tokenizer ("[CLS] prompt [SEP] response [SEP]") exactly as the paper's evaluation
  does, `tokenizer(prompt, response, truncation=True, max_length=max_length)`: longest-first truncation to
  `max_length`, or with `max_length=None` to the tokenizer's `model_max_length`, or none at all when the tokenizer
  declares no limit (DeBERTa-v3 has only relative positions, so longer pairs are scored whole, as transformers does).

  `matmul_precision` is JAX's matmul precision for the forward; "highest" keeps fp32 matmuls true fp32 on GPUs
  (not TF32), as PyTorch computes them, because HmR/HpR threshold the raw scores.
  """

  def __init__(self, model: deberta.DebertaForSequenceClassification, tokenizer, *, batch_size: int = 16,
               max_length: int | None = None, buckets: Sequence[int] | None = None,
               matmul_precision: str = "highest"):
    config = model.config
    if config.num_labels != 1:
      raise ValueError(f"A judge needs a single-output model (num_labels 1); this one has {config.num_labels}")
    if config.position_biased_input and max_length is not None and max_length > config.max_position_embeddings:
      raise ValueError(f"max_length ({max_length}) exceeds the judge's max_position_embeddings "
                       f"({config.max_position_embeddings})")
    if tokenizer.pad_token_id is None:
      raise ValueError("The judge's tokenizer has no pad token")
    super().__init__(batch_size=batch_size, pad_id=tokenizer.pad_token_id,
                     buckets=buckets or shapes.power_ladder(max_length))
    self.model, self.tokenizer, self.max_length, self.matmul_precision = model, tokenizer, max_length, matmul_precision
    graphdef, self._state = nnx.split(model)

    @jax.jit
    def logits(state, input_ids, attention_mask, token_type_ids):
      return nnx.merge(graphdef, state)(input_ids, attention_mask, token_type_ids)[:, 0]

    self._logits = logits

  @classmethod
  def from_pretrained(cls, name_or_path: str = DEFAULT_JUDGE, *, batch_size: int = 16,
                      max_length: int | None = None, dtype: str = "float32",
                      buckets: Sequence[int] | None = None, matmul_precision: str = "highest",
                      revision: str | None = None) -> DebertaJudge:
    """Loads the model and its tokenizer from a Hub id or a local folder. `dtype` is the compute dtype."""
    from transformers import AutoTokenizer

    model_dir = hub.resolve_model_dir(name_or_path, revision=revision)
    model = deberta.from_pretrained(model_dir, dtype=dtype)
    return cls(model, AutoTokenizer.from_pretrained(model_dir), batch_size=batch_size, max_length=max_length,
               buckets=buckets, matmul_precision=matmul_precision)

  def encode(self, prompts, responses):
    encoded = self.tokenizer(list(prompts), list(responses), truncation=True, max_length=self.max_length,
                             return_token_type_ids=True)
    return [{"input_ids": ids, "token_type_ids": types}
            for ids, types in zip(encoded["input_ids"], encoded["token_type_ids"])]

  def forward(self, batch):
    with jax.default_matmul_precision(self.matmul_precision):
      return self._logits(self._state, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                          jnp.asarray(batch["token_type_ids"]))


def hh_text(prompt: str, response: str) -> str:
  """A (prompt, response) pair as an HH conversation: the prompt's turns (with or without their leading blank
  line and final "Assistant:" cue), then "\n\nAssistant: " and the response."""
  conversation = "\n\n" + prompt.strip()
  if not conversation.endswith("Assistant:"):
    conversation += "\n\nAssistant:"
  return f"{conversation} {response.strip()}"


class RewardModelJudge(BucketedJudge):
  """One of our reward models (`models/reward.py`, any model family) as a judge: the pair is tokenized as its
  training pairs were (an HH conversation, then the response and EOS; the model's own tokenizer, so OPT's leading
  `</s>`), the end kept if it is longer than `max_length`, and the score is the reward of `head` at the last token.
  """

  def __init__(self, model: reward.RewardModel, tokenizer, *, head: str | None = None, batch_size: int = 16,
               max_length: int = 512, buckets: Sequence[int] | None = None, _compiled=None):
    if head is None and len(model.heads) > 1:
      raise ValueError(f"this reward model has heads {model.heads}: name the one to judge with")
    self.head = head or model.heads[0]
    if self.head not in model.heads:
      raise ValueError(f"head {self.head!r} is not one of the reward model's heads {model.heads}")
    # No position beyond the model's own: an out-of-range position embedding would read NaN.
    max_length = min(max_length, model.config.max_position_embeddings)
    super().__init__(batch_size=batch_size, pad_id=tokenizer.pad_token_id,
                     buckets=buckets or shapes.power_ladder(max_length))
    self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
    self._settings = dict(batch_size=batch_size, max_length=max_length, buckets=buckets)
    if _compiled is None:
      graphdef, state = nnx.split(model)
      _compiled = (state, jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask)))
    self._compiled = _compiled

  @property
  def heads(self) -> tuple[str, ...]:
    return self.model.heads

  @classmethod
  def from_pretrained(cls, name_or_path: str, *, head: str | None = None, dtype: str = "float32",
                      revision: str | None = None, **kwargs) -> RewardModelJudge:
    from jaxalign.tokenizer import load_tokenizer

    model_dir = hub.resolve_model_dir(name_or_path, revision=revision)
    model = reward.from_pretrained(model_dir, dtype=dtype)
    return cls(model, load_tokenizer(model_dir), head=head or model.heads[0], **kwargs)

  def for_head(self, head: str) -> RewardModelJudge:
    """The same model (and compiled forward) judging with another head."""
    return RewardModelJudge(self.model, self.tokenizer, head=head, _compiled=self._compiled, **self._settings)

  def encode(self, prompts, responses):
    texts = [hh_text(p, r) for p, r in zip(prompts, responses)]
    eos = [self.tokenizer.eos_token_id]
    return [{"input_ids": (ids + eos)[-self.max_length:]} for ids in self.tokenizer(texts)["input_ids"]]

  def forward(self, batch):
    state, rewards = self._compiled
    return rewards(state, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]))[
        :, self.model.heads.index(self.head)]


# The tensor a trained judge of each model type has and a plain language model (or bare encoder) lacks.
# Our reward models of every family carry `score.weight` (their sequence-classification head).
SCORING_HEADS = {"deberta-v2": "classifier.weight", **dict.fromkeys(registry.FAMILIES, "score.weight")}


def _check_scoring_head(name_or_path: str, model_dir: str, hf_config: dict) -> None:
  """Refuses a checkpoint without a trained scoring head: its head would start random and score noise."""
  head = SCORING_HEADS[hf_config["model_type"]]
  names = hub.CheckpointReader(model_dir).names()
  if head in names:
    return
  backbone = ("model.", "decoder.", "deberta.")
  others = sorted(n for n in names if not n.startswith(backbone)) or ["only backbone tensors"]
  raise ConfigError(f"{name_or_path!r} cannot be a judge: it has no trained scoring head (no {head!r} tensor). Found "
                    f"architectures {hf_config.get('architectures')} with {len(names)} tensors, outside the backbone "
                    f"{others[:5]}. Give a reward model: a sequence classifier such as {DEFAULT_JUDGE!r}, or one "
                    "trained with configs/reward.py")


def load_judge(name_or_path: str = DEFAULT_JUDGE, *, revision: str | None = None, **kwargs) -> Judge:
  """The judge for a Hub id or local folder, chosen by its config.json `model_type`; `kwargs` go to its loader."""
  model_dir = hub.resolve_model_dir(name_or_path, revision=revision)
  hf_config = hub.load_config(model_dir)
  model_type = hf_config.get("model_type")
  if model_type in SCORING_HEADS:
    _check_scoring_head(name_or_path, model_dir, hf_config)
  if model_type == "deberta-v2":
    return DebertaJudge.from_pretrained(model_dir, **kwargs)
  if model_type in registry.FAMILIES:
    return RewardModelJudge.from_pretrained(model_dir, **kwargs)
  raise ConfigError(f"No judge for model_type {model_type!r} in {model_dir!r}; supported: 'deberta-v2', "
                    f"{', '.join(repr(t) for t in sorted(registry.FAMILIES))} (our reward models)")


# --------------------------------------------------------------------------------- several judges, per prompt set

SINGLE_JUDGE_NAME = "judge"


def parse_judges(judges: str, judge: str = DEFAULT_JUDGE) -> dict[str, str]:
  """The judges to score with, {name: path}, in order: "name=path,name=path" (config `judges`), or when that is
  empty the one `judge` under the name "judge". A path may be a Hub id, a model folder or a training workdir."""
  named = config_lib.parse_named(judges, "judges")
  return named or {SINGLE_JUDGE_NAME: judge}


def load_set_judges(name_or_path: str, sets: Sequence[str], set_heads: dict[str, str], **kwargs) -> dict[str, Judge]:
  """The judge of each prompt set from one model: a two-head reward model scores each set with the head
  `set_heads` names for it (e.g. harmful -> harmless); any other judge scores every set. `name_or_path` may be a
  training workdir (its exported model); `kwargs` go to `load_judge`."""
  judge = load_judge(workdirs.resolve_init_path(name_or_path), **kwargs)
  if isinstance(judge, RewardModelJudge) and len(judge.heads) > 1:
    missing = [s for s in sets if s not in set_heads]
    if missing:
      raise ConfigError(f"{name_or_path}: a reward model with heads {judge.heads} needs a head for the prompt sets "
                        f"{missing} (config judge_heads, e.g. harmful=harmless,helpful=helpful)")
    return {s: judge.for_head(set_heads[s]) for s in sets}
  return dict.fromkeys(sets, judge)
