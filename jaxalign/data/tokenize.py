"""Preference pairs to token ids: exact prompt/response boundary, truncation, an on-disk cache, SFT examples, packing.

The boundary contract, for every pair before truncation (tests check it on the real OPT tokenizer):

    prompt_ids + chosen_ids[:-1] == tokenizer(prompt + chosen).input_ids     (likewise for rejected)

i.e. the ids are those of the whole conversation as the tokenizer encodes it (with OPT's leading `</s>`), cut at a
token boundary, with EOS appended to each response. BPE can merge characters across the text boundary; then the
merged token, and anything after it, belongs to the responses (counted as `boundary_adjusted`).

Speed: texts are encoded in batches by the Rust tokenizer, on all cores. With GPT-2-style byte-level BPE (OPT) the
prompt up to its final turn is encoded once for both responses (see `splits_at_newlines`), so the shared text is
not encoded twice.

Chat templates: conversations (`formats.Conversation`) are rendered with the tokenizer's own `apply_chat_template`
(`render_pairs`); then prompt = the prompt turns plus the assistant cue, a response = what the template writes for
it through its end-of-turn token, and the same contract holds with `add_special_tokens=False` (the template places
the special tokens) and no EOS appended (the end-of-turn token ends each response; EOS only where the template has
none). SFT on conversations (`conversation_sft_examples`) encodes the whole rendered text once and scores the
assistant turns only (or the final response, or everything).

Truncation follows the reference DPO preprocessing: when the prompt plus the longer response exceeds `max_length`,
the prompt is cut to `max_prompt_length` (keeping its end by default, and always its leading special tokens); if
still too long, both responses are cut to the room left (`max_length - len(prompt)`), losing their EOS.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from jaxalign import cache
from jaxalign.data.formats import Conversation, hh_messages
from jaxalign.data.hh import PreferencePair, SkipReport, UnusableRecord
from jaxalign.tokenizer import end_of_turn

log = logging.getLogger(__name__)

TRUNCATION_MODES = ("keep_end", "keep_start")
LOSS_ON = ("conversation", "assistant", "completion")
TEXT_LOSS_ON = ("conversation", "completion")
# Pairs encoded per call: big enough for the Rust encoder's threads, small enough to bound the Encoding objects.
_CHUNK = 4096
# Bump when the tokenization output changes, so stale caches are not reused.
_CACHE_VERSION = 1


@dataclasses.dataclass
class TokenizedPairs:
  """Per-pair int32 id arrays (same order as the pairs) and per-pair flags.

  prompt_ids: starts with the tokenizer's special prefix (OPT: `</s>`, id 2); chosen_ids / rejected_ids: the
  responses, ending with EOS unless cut by truncation. prompt_truncated / response_truncated / boundary_adjusted:
  bool [N].
  """

  prompt_ids: list[np.ndarray]
  chosen_ids: list[np.ndarray]
  rejected_ids: list[np.ndarray]
  prompt_truncated: np.ndarray
  response_truncated: np.ndarray
  boundary_adjusted: np.ndarray

  def __len__(self) -> int:
    return len(self.prompt_ids)

  @property
  def lengths(self) -> np.ndarray:
    """Tokens a DPO row needs per pair: prompt plus the longer response."""
    return np.array([len(p) + max(len(c), len(r))
                     for p, c, r in zip(self.prompt_ids, self.chosen_ids, self.rejected_ids)], np.int64)

  @property
  def shared_lengths(self) -> np.ndarray:
    """Tokens a prefix-shared DPO row needs per pair: prompt + chosen + rejected."""
    return np.array([len(p) + len(c) + len(r) for p, c, r in zip(self.prompt_ids, self.chosen_ids, self.rejected_ids)],
                    np.int64)

  def subset(self, indices) -> TokenizedPairs:
    """The pairs at `indices`, in that order."""
    return TokenizedPairs([self.prompt_ids[i] for i in indices], [self.chosen_ids[i] for i in indices],
                          [self.rejected_ids[i] for i in indices], self.prompt_truncated[indices],
                          self.response_truncated[indices], self.boundary_adjusted[indices])

  def counts(self) -> dict[str, int]:
    return {"pairs": len(self), "prompt_truncated": int(self.prompt_truncated.sum()),
            "response_truncated": int(self.response_truncated.sum()),
            "boundary_adjusted": int(self.boundary_adjusted.sum())}


@dataclasses.dataclass
class SFTExamples:
  """SFT sequences: int32 `input_ids` and float32 `loss_mask` per example (or packed row).

  loss_mask[t] = 1 marks token t as a target: the loss scores predicting token t from tokens < t (so position 0,
  the leading `</s>`, is never a target). Packed rows also carry `segment_ids` (1, 2, 3… per example in the row)
  and `positions` (0-based, restarting at each example; the model adds OPT's offset of 2). Rows are not padded
  here; `batches` pads them (pad id, loss 0, segment 0, position 0). counts: what was truncated or dropped.
  """

  input_ids: list[np.ndarray]
  loss_mask: list[np.ndarray]
  segment_ids: list[np.ndarray] | None = None
  positions: list[np.ndarray] | None = None
  counts: dict[str, int] = dataclasses.field(default_factory=dict)

  def __len__(self) -> int:
    return len(self.input_ids)

  @property
  def lengths(self) -> np.ndarray:
    return np.array([len(ids) for ids in self.input_ids], np.int64)

  def subset(self, indices) -> SFTExamples:
    """The (unpacked) examples at `indices`, in that order."""
    if self.segment_ids is not None:
      raise ValueError("subset of packed SFT rows: take the subset before packing")
    return SFTExamples([self.input_ids[i] for i in indices], [self.loss_mask[i] for i in indices],
                       counts=dict(self.counts, examples=len(indices)))


def _backend(tokenizer):
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is None:
    raise TypeError(f"{type(tokenizer).__name__} is not a fast (Rust) tokenizer; batched tokenization with offsets "
                    "needs one: load it with jaxalign.tokenizer.load_tokenizer / AutoTokenizer")
  return backend


def special_prefix_ids(tokenizer) -> list[int]:
  """The ids the tokenizer puts before every text: OPT's `[2]` (its leading `</s>`), `[]` for GPT-2."""
  probe = "Hello"
  with_special = tokenizer(probe).input_ids
  plain = tokenizer(probe, add_special_tokens=False).input_ids
  for start in range(len(with_special) - len(plain) + 1):
    if with_special[start:start + len(plain)] == plain:
      return with_special[:start]
  raise ValueError(f"Could not find the special-token prefix of {type(tokenizer).__name__}: {probe!r} encodes to "
                   f"{with_special} with special tokens and {plain} without")


def splits_at_newlines(backend) -> bool:
  """Whether a text may be encoded in two pieces at a newline that follows a non-space character.

  True for byte-level BPE with GPT-2's pre-tokenizer regex and no normalizer (GPT-2, OPT, RoBERTa, our tiny BPE): no
  pre-token of that regex holds both a non-space character and a newline, and nothing before such a point depends on
  what follows it, so the ids of the whole text are the ids of the two pieces, concatenated. Other tokenizers (e.g.
  SentencePiece's dummy prefix, or regexes that join punctuation with the newlines after it) get no split.
  """
  spec = json.loads(backend.to_str())
  pre = spec.get("pre_tokenizer") or {}
  return (spec.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
          and not pre.get("add_prefix_space", False))


def _head_length(prompt: str, splittable: bool) -> int:
  """How much of the prompt to encode once for both conversations: up to its last newline after a non-space
  character (for HH, the start of the final "\n\nAssistant:"); 0 when the tokenizer allows no split."""
  if not splittable:
    return 0
  cut = prompt.rfind("\n")
  # str.isspace is a superset of the regex's \s, so this errs on the safe side.
  while cut > 0 and prompt[cut - 1].isspace():
    cut = prompt.rfind("\n", 0, cut)
  return max(cut, 0)


def _prompt_token_count(encoding, prompt_chars: int, text_chars: int) -> tuple[int, bool]:
  """Tokens of an encoded text that come before its first response character (at `prompt_chars`), and whether the
  token holding that character starts inside the prompt (BPE merged across the boundary)."""
  if prompt_chars == 0:
    return 0, False
  # Step over characters no token covers (some tokenizers trim whitespace from offsets).
  for char in range(prompt_chars, text_chars):
    token = encoding.char_to_token(char)
    if token is not None:
      start, _ = encoding.token_to_chars(token)
      return token, start < prompt_chars
  return len(encoding), False


def _shared_prompt_length(chosen, chosen_ids: list[int], rejected_ids: list[int], prompt_chars: int,
                          text_chars: int) -> tuple[int, bool]:
  """Leading tokens that both texts give the prompt, and whether the boundary had to move off the text boundary.

  chosen: the Encoding (with offsets) of the chosen text; *_ids: the ids of both texts (every `Encoding.ids` access
  builds a new list, so the caller fetches them once). The rejected text needs no offsets: its first tokens equal
  the chosen text's, which lie inside the shared prompt, up to where the two id lists part.
  """
  n_chosen, merged = _prompt_token_count(chosen, prompt_chars, text_chars)
  n = n_chosen
  if chosen_ids[:n] != rejected_ids[:n]:
    n = next(i for i in range(n) if i == len(rejected_ids) or chosen_ids[i] != rejected_ids[i])
  return n, merged or n != n_chosen


def _truncate(prompt: list[int], chosen: list[int], rejected: list[int], *, max_length: int | None,
              max_prompt_length: int | None, keep_end: bool, n_prefix: int):
  """Reference-DPO truncation; returns (prompt, chosen, rejected, prompt_cut, responses_cut)."""
  if max_length is None:
    return prompt, chosen, rejected, False, False
  longer = max(len(chosen), len(rejected))
  prompt_cut = len(prompt) + longer > max_length and len(prompt) > max_prompt_length
  if prompt_cut:
    # The special prefix stays: OPT always sees `</s>` first.
    body = prompt[n_prefix:]
    keep = max_prompt_length - n_prefix
    prompt = prompt[:n_prefix] + (body[-keep:] if keep_end else body[:keep])
  room = max_length - len(prompt)
  responses_cut = longer > room
  if responses_cut:
    chosen, rejected = chosen[:room], rejected[:room]
  return prompt, chosen, rejected, prompt_cut, responses_cut


def _check_lengths(max_length, max_prompt_length, truncation_mode, n_prefix) -> None:
  if truncation_mode not in TRUNCATION_MODES:
    raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
  if max_length is None:
    if max_prompt_length is not None:
      raise ValueError("max_prompt_length needs max_length (None means no truncation at all)")
    return
  if max_prompt_length is None or not n_prefix < max_prompt_length < max_length:
    raise ValueError(f"need {n_prefix} (special prefix) < max_prompt_length < max_length, got max_prompt_length="
                     f"{max_prompt_length}, max_length={max_length}")


def _fingerprint(pairs: list[PreferencePair], backend, settings: tuple) -> str:
  """Hash of the pairs' text, the whole tokenizer definition and the settings: the cache key."""
  digest = hashlib.blake2b(digest_size=16)
  digest.update(repr((_CACHE_VERSION, settings)).encode())
  digest.update(backend.to_str().encode())
  for pair in pairs:
    for text in (pair.prompt, pair.chosen, pair.rejected):
      digest.update(f"{len(text)}:{text}".encode())
  return digest.hexdigest()


_ID_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")
_FLAG_FIELDS = ("prompt_truncated", "response_truncated", "boundary_adjusted")


def _save(tokenized: TokenizedPairs, path: Path) -> None:
  arrays = {name: getattr(tokenized, name) for name in _FLAG_FIELDS}
  for name in _ID_FIELDS:
    ragged = getattr(tokenized, name)
    arrays[name] = np.concatenate(ragged) if ragged else np.zeros(0, np.int32)
    arrays[name + "_lengths"] = np.array([len(ids) for ids in ragged], np.int64)
  # Atomic, so concurrent hosts sharing the cache folder never read half a file; checksummed, so a damaged one heals.
  cache.write(path, cache.npz_bytes(**arrays))


def _load(path: Path) -> TokenizedPairs | None:
  """The cached pairs at `path`, or None when absent or damaged (a damaged entry is logged and deleted)."""

  def decode(payload: bytes) -> TokenizedPairs:
    arrays = cache.npz_arrays(payload)
    fields = {name: arrays[name] for name in _FLAG_FIELDS}
    for name in _ID_FIELDS:
      fields[name] = np.split(arrays[name], np.cumsum(arrays[name + "_lengths"])[:-1])
    return TokenizedPairs(**fields)

  return cache.read(path, decode, "tokenization cache")


def _encode(pairs: list[PreferencePair], backend, prefix: list[int], suffix: list[int], kept_bos: int | None,
            **truncation) -> TokenizedPairs:
  ids = {name: [] for name in _ID_FIELDS}
  flags = {name: np.zeros(len(pairs), bool) for name in _FLAG_FIELDS}
  splittable = splits_at_newlines(backend)
  for begin in range(0, len(pairs), _CHUNK):
    chunk = pairs[begin:begin + _CHUNK]
    # The prompt's head is encoded once; each text's tail (rest of the prompt + response) separately. Only the
    # chosen tails need offsets (`encode_batch_fast` skips them).
    cuts = [_head_length(p.prompt, splittable) for p in chunk]
    heads = backend.encode_batch_fast([p.prompt[:cut] for p, cut in zip(chunk, cuts)], add_special_tokens=False)
    chosen = backend.encode_batch([p.prompt[cut:] + p.chosen for p, cut in zip(chunk, cuts)], add_special_tokens=False)
    rejected = backend.encode_batch_fast([p.prompt[cut:] + p.rejected for p, cut in zip(chunk, cuts)],
                                         add_special_tokens=False)
    for i, pair, cut, head, c, r in zip(range(begin, begin + len(chunk)), chunk, cuts, heads, chosen, rejected):
      c_ids, r_ids = c.ids, r.ids
      tail_prompt_chars = len(pair.prompt) - cut
      n, flags["boundary_adjusted"][i] = _shared_prompt_length(c, c_ids, r_ids, tail_prompt_chars,
                                                               tail_prompt_chars + len(pair.chosen))
      prompt = prefix + head.ids + c_ids[:n]
      # What truncation never cuts: the tokenizer's special prefix, or the BOS a chat template starts with.
      n_prefix = len(prefix) or int(kept_bos is not None and prompt[:1] == [kept_bos])
      prompt, chosen_ids, rejected_ids, flags["prompt_truncated"][i], flags["response_truncated"][i] = _truncate(
          prompt, c_ids[n:] + suffix, r_ids[n:] + suffix, n_prefix=n_prefix, **truncation)
      for name, values in zip(_ID_FIELDS, (prompt, chosen_ids, rejected_ids)):
        ids[name].append(np.array(values, np.int32))
  return TokenizedPairs(**ids, **flags)


def tokenize_pairs(
    pairs: list[PreferencePair], tokenizer, *, max_length: int | None, max_prompt_length: int | None,
    truncation_mode: str = "keep_end", cache_dir: str | os.PathLike | None = None, rendered: bool = False,
) -> TokenizedPairs:
  """Tokenizes preference pairs (batched, in Rust) with the exact boundary and truncation of the module docstring.

  max_length / max_prompt_length: token budgets (both None: no truncation); truncation_mode: "keep_end" (the
  prompt keeps its last tokens, as in the paper) or "keep_start". cache_dir: when given, the result is stored as
  `pairs-<fingerprint>.npz`, keyed by the pairs' text, the tokenizer and these settings, and reused on the next call.
  rendered: the pairs are chat-template text (`render_pairs`): the template, not the tokenizer, places the special
  tokens (a BOS it starts the prompt with survives truncation), and a response ends with the template's end-of-turn
  token, so EOS is appended only where the template has no such token.
  """
  backend = _backend(tokenizer)
  prefix = [] if rendered else special_prefix_ids(tokenizer)
  suffix = [tokenizer.eos_token_id] if not rendered or end_of_turn(tokenizer) is None else []
  kept_bos = tokenizer.bos_token_id if rendered else None
  _check_lengths(max_length, max_prompt_length, truncation_mode, len(prefix))
  truncation = dict(max_length=max_length, max_prompt_length=max_prompt_length,
                    keep_end=truncation_mode == "keep_end")
  path = None
  if cache_dir is not None:
    settings = (tuple(prefix), tuple(suffix), kept_bos, tuple(sorted(truncation.items())))
    path = Path(cache_dir) / f"pairs-{_fingerprint(pairs, backend, settings)}.npz"
    cached = _load(path)
    if cached is not None:
      log.info("tokenized pairs loaded from cache %s", path)
      return cached
  tokenized = _encode(pairs, backend, prefix, suffix, kept_bos, **truncation)
  log.info("tokenized %s", tokenized.counts())
  if path is not None:
    _save(tokenized, path)
    log.info("tokenized pairs cached in %s", path)
  return tokenized


def sft_examples(tokenized: TokenizedPairs, *, loss_on: str = "conversation",
                 max_length: int | None = None) -> SFTExamples:
  """SFT sequences from the chosen side: prompt ids + chosen ids (ending with EOS).

  loss_on: "conversation" (the paper: every token after the leading `</s>` is a target) or "completion" (only the
  final assistant response). max_length: sequences longer than this keep their start (as TRL's SFTTrainer does);
  a completion example whose response is cut away entirely has no target and is dropped. Both are counted.
  """
  if loss_on not in TEXT_LOSS_ON:
    raise ValueError(f"loss_on must be one of {TEXT_LOSS_ON} for text (loss on assistant turns needs a chat "
                     f"template), got {loss_on!r}")
  sequences = []
  for prompt, chosen in zip(tokenized.prompt_ids, tokenized.chosen_ids):
    ids = np.concatenate([prompt, chosen])
    mask = np.ones(len(ids), np.float32)
    mask[: 1 if loss_on == "conversation" else len(prompt)] = 0
    sequences.append((ids, mask))
  return _cut_sft_examples(sequences, max_length, loss_on)


def _cut_sft_examples(sequences, max_length: int | None, loss_on: str, **extra_counts) -> SFTExamples:
  """SFTExamples from (ids, loss mask) pairs: those longer than max_length keep their start; those left without a
  target are dropped; both counted."""
  input_ids, loss_mask = [], []
  counts = {"examples": 0, "truncated": 0, "dropped_no_target": 0, **extra_counts}
  for ids, mask in sequences:
    if max_length is not None and len(ids) > max_length:
      ids, mask = ids[:max_length], mask[:max_length]
      counts["truncated"] += 1
    if not mask.any():
      counts["dropped_no_target"] += 1
      continue
    input_ids.append(ids)
    loss_mask.append(mask)
  counts["examples"] = len(input_ids)
  log.info("SFT examples (loss on %s): %s", loss_on, counts)
  return SFTExamples(input_ids, loss_mask, counts=counts)


# ------------------------------------------------------------------------------------------- chat templates

# Skip reasons of conversations the chat template cannot render (counted like hh's).
TEMPLATE_ERROR = "template_error"  # the template raised (e.g. roles that do not alternate, a system turn refused)
TEMPLATE_NOT_PREFIX = "template_not_prefix"  # the rendered prompt is not where the rendered conversation starts
NO_END_OF_TURN = "no_end_of_turn"  # an assistant turn rendered without the template's end-of-turn token


def set_chat_template(tokenizer, spec: str) -> None:
  """Makes `tokenizer` render with the chat template `spec`: "tokenizer" (its own; an error when it has none) or a
  Jinja file, which replaces the tokenizer's (and so is saved with it, e.g. into a run's exported model folder)."""
  if spec != "tokenizer":
    path = Path(spec).expanduser()
    if not path.is_file():
      raise FileNotFoundError(f"data.chat_template = {spec!r}: expected 'tokenizer' or a Jinja template file")
    tokenizer.chat_template = path.read_text()
  elif not tokenizer.chat_template:
    raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template; give one with "
                     "data.chat_template=<file.jinja> (or use a plain-text format with data.chat_template='')")


def render(tokenizer, messages, *, generation_prompt: bool = False) -> str:
  """The chat template's text of `messages` (with the assistant cue when `generation_prompt`)."""
  import jinja2  # transformers' template engine

  try:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
  except jinja2.TemplateError as e:
    raise UnusableRecord(TEMPLATE_ERROR) from e


def _turn_text(before: str, after: str, eot: str | None) -> str:
  """What rendering one more assistant turn added to `before`, through the template's end-of-turn token (the
  template's text after it, e.g. ChatML's newline, is no part of the answer)."""
  if not after.startswith(before):
    raise UnusableRecord(TEMPLATE_NOT_PREFIX)
  turn = after[len(before):]
  if eot is None:
    return turn
  end = turn.rfind(eot)
  if end < 0:
    raise UnusableRecord(NO_END_OF_TURN)
  return turn[:end + len(eot)]


def _render_pair(tokenizer, conversation: Conversation, eot: str | None) -> PreferencePair:
  prompt = render(tokenizer, conversation.prompt, generation_prompt=True)
  chosen, rejected = (_turn_text(prompt, render(tokenizer, conversation.prompt + response), eot)
                      for response in (conversation.chosen, conversation.rejected))
  return PreferencePair(prompt, chosen, rejected, conversation.source, conversation.index)


def render_pairs(conversations: list[Conversation], tokenizer) -> tuple[list[PreferencePair], SkipReport]:
  """Preference pairs of text rendered with the tokenizer's chat template, for `tokenize_pairs(rendered=True)`.

  prompt: the prompt messages with the assistant cue (e.g. "<|im_start|>assistant\n"); chosen / rejected: what the
  template renders for each response after it, through its end-of-turn token, so that prompt + response is the
  template's text of the whole conversation. Conversations the template cannot render that way are skipped and
  counted (TEMPLATE_ERROR, TEMPLATE_NOT_PREFIX, NO_END_OF_TURN); none rendered is an error.
  """
  eot = end_of_turn(tokenizer)
  pairs, report = [], SkipReport(total=len(conversations))
  for conversation in conversations:
    if not conversation.is_pair:
      raise ValueError(f"{conversation.source}#{conversation.index}: a `messages` conversation has no rejected "
                       "response; DPO and reward models need preference pairs (data.format conversational, "
                       "preference or hh)")
    try:
      pairs.append(_render_pair(tokenizer, conversation, eot))
    except UnusableRecord as e:
      report.note(e.args[0], conversation.source, conversation.index)
  report.used = len(pairs)
  _log_rendering(report, conversations)
  return pairs, report


def _log_rendering(report: SkipReport, conversations: list[Conversation]) -> None:
  if report.skipped:
    log.warning("chat template: %s", report.summary())
    for reason, where in report.examples.items():
      log.warning("  %s, e.g. %s", reason, ", ".join(where))
  if not report.used:
    source = conversations[0].source if conversations else "the data"
    raise ValueError(f"{source}: the chat template rendered none of its {report.total} conversations "
                     f"({report.summary()})")


def render_prompts(tokenizer, prompts: list[str]) -> tuple[list[str], tuple[str, ...]]:
  """Evaluation prompts rendered with the chat template, and the stop strings of its answers.

  An HH-style prompt ("Human: …\n\nAssistant: …\n\nHuman: …", with or without a final "Assistant:" cue) becomes
  its turns, any other text one user message; each ends with the template's assistant cue. Stop strings: the
  template's end-of-turn token (or EOS), for `sampling.generate(..., add_special_tokens=False)`.
  """
  rendered = []
  for i, prompt in enumerate(prompts):
    try:
      messages = hh_messages(prompt, prompt=True) if prompt.lstrip().startswith(("Human:", "Assistant:")) else ()
    except UnusableRecord:
      messages = ()
    messages = messages or ({"role": "user", "content": prompt.strip()},)
    try:
      rendered.append(render(tokenizer, messages, generation_prompt=True))
    except UnusableRecord as e:
      raise ValueError(f"prompt {i} ({prompt[:60]!r}…): the chat template cannot render it") from e.__cause__
  return rendered, (end_of_turn(tokenizer) or tokenizer.eos_token,)


def _render_with_targets(tokenizer, messages: tuple[dict, ...], first_response: int, eot: str | None):
  """(the template's text of `messages` through the last assistant turn's end, [(start, end, is_response)] character
  spans of every assistant turn, is_response marking those at message index >= first_response)."""
  full = render(tokenizer, messages)
  spans = []
  for i, message in enumerate(messages):
    if message["role"] == "assistant":
      before = render(tokenizer, messages[:i], generation_prompt=True)
      after = render(tokenizer, messages[:i + 1])
      if not full.startswith(after):
        raise UnusableRecord(TEMPLATE_NOT_PREFIX)
      spans.append((len(before), len(before) + len(_turn_text(before, after, eot)), i >= first_response))
  return full[:spans[-1][1]], spans


def _token_span(encoding, start: int, end: int, text_chars: int) -> tuple[int, int, bool]:
  """The tokens [first, last) of a character span; whether BPE merged a token across one of its ends."""
  first, merged_start = _prompt_token_count(encoding, start, text_chars)
  last, merged_end = _prompt_token_count(encoding, end, text_chars)
  return first, last, merged_start or merged_end


def conversation_sft_examples(conversations: list[Conversation], tokenizer, *, loss_on: str = "assistant",
                              responses: str = "chosen", max_length: int | None = None) -> SFTExamples:
  """SFT sequences of conversations rendered with the tokenizer's chat template (special tokens as it places them).

  loss_on: "assistant" (every assistant turn, through its end-of-turn token), "completion" (the final response
  only: the pair's chosen or rejected messages, a `messages` record's last assistant turn) or "conversation" (every
  token after the first). The text ends with the last assistant turn's end-of-turn token; where the template has
  none, EOS is appended (a target). A target token merged by BPE across a turn's edge counts as a target
  (`boundary_adjusted`). responses: "chosen", "rejected" or "both" (pairs only). Conversations the template cannot
  render are skipped and counted, as in `render_pairs`; truncation and dropping as in `sft_examples`.
  """
  if loss_on not in LOSS_ON:
    raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
  sides = {"chosen": ("chosen",), "rejected": ("rejected",), "both": ("chosen", "rejected")}[responses]
  eot = end_of_turn(tokenizer)
  texts, target_spans = [], []
  report = SkipReport()
  for conversation in conversations:
    for side in sides:
      response = getattr(conversation, side)
      if response is None:
        raise ValueError(f"{conversation.source}#{conversation.index}: a `messages` conversation has no rejected "
                         f"response for data.sft_responses={responses!r}")
      report.total += 1
      try:
        text, spans = _render_with_targets(tokenizer, conversation.prompt + response, len(conversation.prompt), eot)
      except UnusableRecord as e:
        report.note(e.args[0], conversation.source, conversation.index)
        continue
      texts.append(text)
      target_spans.append([(start, end) for start, end, is_response in spans
                           if loss_on != "completion" or is_response])
  report.used = len(texts)
  _log_rendering(report, conversations)
  backend, suffix = _backend(tokenizer), [] if eot is not None else [tokenizer.eos_token_id]
  sequences, adjusted = [], 0
  for begin in range(0, len(texts), _CHUNK):
    chunk = texts[begin:begin + _CHUNK]
    for text, spans, encoding in zip(chunk, target_spans[begin:], backend.encode_batch(chunk,
                                                                                       add_special_tokens=False)):
      ids = np.array(encoding.ids + suffix, np.int32)
      mask = np.zeros(len(ids), np.float32)
      if loss_on == "conversation":
        mask[1:] = 1
      for start, end in spans:
        first, last, merged = _token_span(encoding, start, end, len(text))
        mask[first:last] = 1
        adjusted += merged
      mask[len(encoding.ids):] = 1  # the appended EOS ends the final response
      sequences.append((ids, mask))
  return _cut_sft_examples(sequences, max_length, loss_on, boundary_adjusted=adjusted,
                           template_skipped=sum(report.skipped.values()))


def _best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
  """Groups item indices into rows of at most `capacity` tokens: longest first, each into the fullest row it fits.
  An item longer than `capacity` gets a row of its own."""
  rows: list[list[int]] = []
  free: list[int] = []
  # rows_with_free[s]: the rows with exactly s free tokens; counts mirrors their sizes for a vectorised search.
  rows_with_free: list[list[int]] = [[] for _ in range(capacity + 1)]
  counts = np.zeros(capacity + 1, np.int64)
  for item in np.argsort(-lengths, kind="stable"):
    n = int(lengths[item])
    if n > capacity:
      rows.append([int(item)])
      free.append(0)
      continue
    fits = np.flatnonzero(counts[n:])
    if fits.size:
      space = n + int(fits[0])
      row = rows_with_free[space].pop()
      counts[space] -= 1
    else:
      row, space = len(rows), capacity
      rows.append([])
      free.append(capacity)
    rows[row].append(int(item))
    free[row] = space - n
    rows_with_free[free[row]].append(row)
    counts[free[row]] += 1
  return rows


def pack_examples(examples: SFTExamples, *, seq_len: int) -> SFTExamples:
  """Packs SFT examples into rows of at most `seq_len` tokens (best-fit decreasing; deterministic).

  Each row carries `segment_ids` (1, 2, 3… per example) and `positions` (0-based, restarting per example), so with
  a segment-aware attention mask no token attends across examples and each example sees the positions it would see
  alone. Targets never cross examples because every example's first token has loss_mask 0.
  """
  lengths = examples.lengths
  too_long = np.flatnonzero(lengths > seq_len)
  if too_long.size:
    raise ValueError(f"pack_examples: {too_long.size} examples are longer than seq_len={seq_len} (e.g. example "
                     f"{too_long[0]} has {lengths[too_long[0]]} tokens); cut them with sft_examples(max_length=...)")
  fields = {"input_ids": [], "loss_mask": [], "segment_ids": [], "positions": []}
  for row in _best_fit_decreasing(lengths, seq_len):
    fields["input_ids"].append(np.concatenate([examples.input_ids[i] for i in row]))
    fields["loss_mask"].append(np.concatenate([examples.loss_mask[i] for i in row]))
    fields["segment_ids"].append(np.repeat(np.arange(1, len(row) + 1, dtype=np.int32), lengths[row]))
    fields["positions"].append(np.concatenate([np.arange(lengths[i], dtype=np.int32) for i in row]))
  counts = dict(examples.counts, rows=len(fields["input_ids"]),
                fill=round(float(lengths.sum()) / max(1, len(fields["input_ids"]) * seq_len), 4))
  log.info("packed %d examples into %d rows of %d tokens (%.1f%% full)", len(examples), counts["rows"], seq_len,
           100 * counts["fill"])
  return SFTExamples(**fields, counts=counts)


@dataclasses.dataclass
class PackedPairs:
  """Preference pairs packed for prefix-shared DPO: each row holds whole pairs, each as prompt + chosen + rejected.

  rows[r]: the pair indices of row r, in row order; pair_index [rows, K] the same, -1-padded to K =
  `max_pairs_per_row`; lengths: each row's tokens. counts: pairs, rows, fill (tokens / the rows' room, a row's
  room being the capacity or its oversize pair) and oversize (pairs longer than the capacity, alone in a row).
  """

  pairs: TokenizedPairs
  rows: list[np.ndarray]
  capacity: int
  counts: dict[str, float]

  def __len__(self) -> int:
    return len(self.rows)

  # Derived once: the collate step reads pair_index for every batch.
  @functools.cached_property
  def lengths(self) -> np.ndarray:
    pair_lengths = self.pairs.shared_lengths
    return np.array([pair_lengths[row].sum() for row in self.rows], np.int64)

  @functools.cached_property
  def max_pairs_per_row(self) -> int:
    return max(len(row) for row in self.rows)

  @functools.cached_property
  def pair_index(self) -> np.ndarray:
    out = np.full((len(self.rows), self.max_pairs_per_row), -1, np.int64)
    for r, row in enumerate(self.rows):
      out[r, :len(row)] = row
    return out


def pack_pairs(pairs: TokenizedPairs, *, capacity: int) -> PackedPairs:
  """Packs preference pairs, each as one prefix-shared sequence (prompt + chosen + rejected), into rows of at most
  `capacity` tokens (best-fit decreasing; deterministic). A pair longer than `capacity` (both responses can reach
  max_length - prompt) keeps a row of its own; batching pads it to a longer bucket. Every pair is in exactly one row.
  """
  lengths = pairs.shared_lengths
  packed = PackedPairs(pairs, [np.array(row, np.int64) for row in _best_fit_decreasing(lengths, capacity)], capacity,
                       {})
  row_lengths = packed.lengths
  packed.counts = {"pairs": len(pairs), "rows": len(packed.rows),
                   "fill": round(float(row_lengths.sum() / max(1, np.maximum(row_lengths, capacity).sum())), 4),
                   "oversize": int((lengths > capacity).sum()), "max_pairs_per_row": packed.max_pairs_per_row}
  log.info("packed %d pairs into %d prefix-shared rows of %d tokens (%.1f%% full; %d longer pairs alone in a row)",
           len(pairs), len(packed.rows), capacity, 100 * packed.counts["fill"], packed.counts["oversize"])
  return packed
