"""Data formats beside HH text: TRL's standard preference format, conversational pairs, `messages` for SFT, and HH
converted to messages. Every record is accounted for in a `hh.SkipReport`, as for HH text.

Formats (`data.format`; "auto" tells them apart per record by its fields and value types, so one file may mix HH,
preference and conversational pairs; SFT `messages` mixed with pairs is refused, naming records on each side):
  * "hh": `{"chosen": text, "rejected": text}`, whole HH conversations ("\\n\\nHuman: … \\n\\nAssistant: …");
  * "preference": TRL's standard format with strings, `{"prompt": text, "chosen": text, "rejected": text}`;
  * "conversational": TRL's standard format with messages (`[{"role": …, "content": …}, …]`): `chosen` / `rejected`
    are the responses after an explicit `prompt` (a list of messages, or a string: one user message), or, with no
    usable prompt field, whole conversations whose common leading messages are the prompt (TRL's "implicit prompt";
    UltraFeedback-binarized carries both a prompt string and whole conversations);
  * "messages": `{"messages": [...]}` (or ShareGPT's `{"conversations": [...]}`), one conversation for SFT (the
    responses are its assistant turns).
A message is `{"role": …, "content": text}` or ShareGPT's `{"from": "human" | "gpt" | "system", "value": text}`
(read as user / assistant / system); a record with any other message is skipped as `not_messages`, and the first
such record is reported with what was found.
Text records go to `hh.PreferencePair`s (plain text, as today) unless a chat template renders them: then HH text is
split into messages at its "\\n\\nHuman:" / "\\n\\nAssistant:" markers, and a preference prompt string becomes one
user message (an HH-style prompt string is split like HH). Message records always need a chat template.
Pairs whose responses span several turns (they diverge before the last turn) are used and counted as hh.FALLBACK.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re

from jaxalign.data import hh
from jaxalign.errors import DataError

log = logging.getLogger(__name__)

FORMATS = ("auto", "hh", "preference", "conversational", "messages")
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's speakers ({"from": …, "value": …} messages, often under "conversations"), as roles.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
MESSAGES_FIELDS = ("messages", "conversations")
MESSAGE_SHAPE = (f'{{"role": one of {list(ROLES)}, "content": text}} (or ShareGPT\'s {{"from": "human" / "gpt" / '
                 '"system", "value": text})')
HUMAN = "\n\nHuman:"
# The HH turn markers, with or without the leading blank line (the paper's prompt files start with "Human:").
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}

# Skip reasons beside hh's.
NOT_MESSAGES = "not_messages"  # a field that should be a list of {"role", "content"} messages is not
NO_RESPONSE = "no_assistant_response"  # no assistant message to learn from where the responses should start


@dataclasses.dataclass(frozen=True)
class Conversation:
  """One usable record as messages (each a dict with string "role" and "content", and whatever else it carried).

  prompt: the messages before the responses; chosen / rejected: the responses (usually one assistant message; several
  when a pair diverges earlier); rejected is None for an SFT-only `messages` record, whose `chosen` is its final
  assistant message and what follows it. source / index: where the record came from, as in `hh.PreferencePair`.
  """

  prompt: tuple[dict, ...]
  chosen: tuple[dict, ...]
  rejected: tuple[dict, ...] | None
  source: str
  index: int

  @property
  def is_pair(self) -> bool:
    return self.rejected is not None


def record_format(record) -> str | None:
  """The format of one record from its fields and the type of its `chosen` value (None: it fits none)."""
  if not isinstance(record, dict):
    return None
  if not record.keys() & {"chosen", "rejected"}:
    return "messages" if record.keys() & set(MESSAGES_FIELDS) else None
  if isinstance(record.get("chosen"), list) or isinstance(record.get("rejected"), list):
    return "conversational"
  return "preference" if "prompt" in record else "hh"


def detect_formats(records: list, source: str) -> collections.Counter:
  """How many of one file's records are in each format (decided per record: a file may mix HH, preference and
  conversational pairs). Raises ValueError naming the file when no record fits a format, or when SFT conversations
  (`messages`) and preference pairs are mixed (naming records on each side: which of them to train on is a choice)."""
  both = next((i for i, r in enumerate(records) if isinstance(r, dict) and r.keys() & set(MESSAGES_FIELDS)
               and r.keys() & {"chosen", "rejected"}), None)
  if both is not None:
    raise DataError(f"{source}: record {both} has both 'messages' and 'chosen'/'rejected' fields; set data.format to "
                     "'messages' (SFT on the conversations) or 'conversational' (the preference pairs)")
  found = collections.Counter(record_format(r) for r in records)
  if not found.keys() - {None}:
    columns = sorted({key for record in records if isinstance(record, dict) for key in record})
    raise DataError(f"{source}: records have fields {columns}; expected {{chosen, rejected}} (HH), {{prompt, chosen, "
                     "rejected}} (TRL preference, strings or lists of messages) or {messages} (SFT)")
  if found["messages"] and found.keys() - {"messages", None}:
    first = lambda kinds: next(i for i, r in enumerate(records) if record_format(r) in kinds)
    pairs = sum(n for kind, n in found.items() if kind not in ("messages", None))
    raise DataError(f"{source}: mixes {found['messages']} SFT conversations ('messages' records, e.g. record "
                     f"{first({'messages'})}) with {pairs} preference pairs ('chosen'/'rejected' records, e.g. record "
                     f"{first({'hh', 'preference', 'conversational'})}); set data.format to 'messages' (SFT on the "
                     "conversations) or to the pairs' format, or split the file")
  return found


def _describe_formats(found: collections.Counter) -> str:
  return ", ".join(f"{kind} {n}" if len(found) > 1 else kind for kind, n in sorted(found.items(), key=str) if kind)


def _per_record(splitters: dict, fixed: str | None):
  """A split function: `fixed`'s, or (auto) the one of each record's own format (a record that fits no format is
  skipped as missing_field)."""
  if fixed is not None:
    return splitters[fixed]

  def split(record):
    kind = record_format(record)
    if kind is None:
      raise hh.UnusableRecord(hh.MISSING_FIELD)
    return splitters[kind](record)
  return split


def _shown(value, limit: int = 80) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + "..."


def _message(m) -> dict:
  """One message as a dict with "role" and string "content" (ShareGPT's {"from", "value"} mapped: human -> user,
  gpt -> assistant); empty extra keys dropped; raises UnusableRecord saying what a message must look like."""
  if isinstance(m, dict) and "from" in m and "role" not in m:
    extra = {key: item for key, item in m.items() if key not in ("from", "value")}
    m = {"role": SHAREGPT_ROLES.get(m["from"], m["from"]), "content": m.get("value"), **extra}
  if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
    raise hh.UnusableRecord(NOT_MESSAGES, f"found the message {_shown(m)}; a message must be {MESSAGE_SHAPE}")
  return {key: item for key, item in m.items() if item is not None}


def check_messages(value) -> tuple[dict, ...]:
  """The messages of a field (each with a known role and string content; other keys, e.g. "tool_calls", go to the
  template too, except empty ones, which `datasets` adds to every message of a file where one has them); raises
  UnusableRecord otherwise."""
  if value is None:
    raise hh.UnusableRecord(hh.MISSING_FIELD)
  if not isinstance(value, list):
    raise hh.UnusableRecord(NOT_MESSAGES, f"found {type(value).__name__} {_shown(value)}; expected a list of "
                                          f"messages, each {MESSAGE_SHAPE}")
  return tuple(_message(m) for m in value)


def hh_messages(text: str, *, prompt: bool = False) -> tuple[dict, ...]:
  """HH text ("\\n\\nHuman: … \\n\\nAssistant: …", or the paper's "Human: …" form) as messages, contents stripped.

  Text before the first marker is dropped when blank and is an error otherwise (HH has none). prompt: the text is a
  prompt, so a trailing "Assistant:" with nothing after it is the cue for an answer, not an (empty) message.
  """
  parts = _HH_TURN.split(text)
  if parts[0].strip():
    raise hh.UnusableRecord(hh.NO_ASSISTANT_MARKER)
  messages = [{"role": _HH_ROLE[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]
  if prompt and messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
    messages.pop()
  return tuple(messages)


def _split_responses(prompt: tuple[dict, ...], chosen: tuple[dict, ...], rejected: tuple[dict, ...]):
  for response in (chosen, rejected):
    if not response or response[0]["role"] != "assistant":
      raise hh.UnusableRecord(NO_RESPONSE)
    if not response[0]["content"].strip():
      raise hh.UnusableRecord(hh.EMPTY_RESPONSE)
  if chosen == rejected:
    raise hh.UnusableRecord(hh.IDENTICAL)
  return prompt, chosen, rejected


def implicit_prompt(chosen: tuple[dict, ...], rejected: tuple[dict, ...]):
  """(prompt, chosen response, rejected response) of two whole conversations: the prompt is their common leading
  messages, and both responses must start with an assistant message (TRL's implicit-prompt rule, per message)."""
  if chosen == rejected:
    raise hh.UnusableRecord(hh.IDENTICAL)
  common = next((i for i, (c, r) in enumerate(zip(chosen, rejected)) if c != r), min(len(chosen), len(rejected)))
  if common == 0:
    raise hh.UnusableRecord(hh.NO_SHARED_PROMPT)
  return _split_responses(chosen[:common], chosen[common:], rejected[common:])


def _prompt_messages(prompt) -> tuple[dict, ...]:
  if isinstance(prompt, str):
    return hh_messages(prompt, prompt=True) if _HH_TURN.match(prompt) else ({"role": "user", "content": prompt},)
  return check_messages(prompt)


def split_conversational(record: dict) -> tuple:
  """(prompt, chosen, rejected) messages of a conversational record; raises UnusableRecord."""
  chosen, rejected = check_messages(record.get("chosen")), check_messages(record.get("rejected"))
  prompt = record.get("prompt")
  if chosen and chosen[0]["role"] != "assistant":  # whole conversations (a prompt field, if any, repeats them)
    return implicit_prompt(chosen, rejected)
  if prompt is None:
    raise hh.UnusableRecord(hh.MISSING_FIELD)
  return _split_responses(_prompt_messages(prompt), chosen, rejected)


def split_hh_as_messages(record: dict) -> tuple:
  """(prompt, chosen, rejected) messages of an HH text record (the common turns are the prompt)."""
  hh._check_strings(record, ("chosen", "rejected"))
  if record["chosen"] == record["rejected"]:
    raise hh.UnusableRecord(hh.IDENTICAL)
  return implicit_prompt(hh_messages(record["chosen"]), hh_messages(record["rejected"]))


def split_preference_as_messages(record: dict) -> tuple:
  """(prompt, chosen, rejected) messages of a TRL preference record of strings."""
  hh.split_generic_record(record)  # the string checks and skip reasons of the text path
  return _split_responses(_prompt_messages(record["prompt"]), ({"role": "assistant", "content": record["chosen"]},),
                          ({"role": "assistant", "content": record["rejected"]},))


def split_messages(record: dict) -> tuple:
  """(messages before the last assistant turn, that turn and what follows, None) of an SFT `messages` record."""
  messages = check_messages(next((record[f] for f in MESSAGES_FIELDS if f in record), None))
  last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
  if last < 0:
    raise hh.UnusableRecord(NO_RESPONSE)
  return messages[:last], messages[last:], None


_TEXT_SPLITTERS = {"hh": hh.split_hh_record, "preference": hh.split_generic_record}
_MESSAGE_SPLITTERS = {"hh": split_hh_as_messages, "preference": split_preference_as_messages,
                      "conversational": split_conversational, "messages": split_messages}


def conversations_from_records(records: list[dict], source: str, data_format: str = "auto"):
  """Splits one file's records into Conversations (format `data_format`, or with "auto" each record's own); returns
  them and their SkipReport."""
  split = _per_record(_MESSAGE_SPLITTERS, None if data_format == "auto" else data_format)
  out, report = [], hh.SkipReport(total=len(records))
  for index, record in enumerate(records):
    try:
      if isinstance(record, hh.BadLine):
        raise hh.UnusableRecord(record.reason)
      prompt, chosen, rejected = split(record)
    except hh.UnusableRecord as e:
      report.note(e.args[0], source, index, e.detail)
      continue
    if rejected is not None and max(len(chosen), len(rejected)) > 1:
      report.note(hh.FALLBACK, source, index)  # the pair diverges before the last turn: a response of several turns
    out.append(Conversation(prompt, chosen, rejected, source, index))
  report.used = len(out)
  if not out:
    raise DataError(f"{source}: no usable {data_format} record among its {len(records)} records "
                     f"({report.explained()})")
  return out, report


def load_examples(source: str, *, data_format: str = "auto", chat: bool, split: str = "train",
                  subsets: list[str] | None = None, warn_skipped_share: float = hh.WARN_SKIPPED_SHARE):
  """Loads `source` (as `hh.load_records`: Hub id, folder, JSONL or Parquet file) in `data_format`.

  chat: whether a chat template will render the records; then every record becomes a `Conversation`, otherwise a
  `hh.PreferencePair` of text (message formats then raise ValueError naming the file). Returns (examples in source
  order, SkipReport over every record read), logging the summary per file and in total.
  """
  if data_format not in FORMATS:
    raise DataError(f"data format must be one of {FORMATS}, got {data_format!r}")
  examples, report = [], hh.SkipReport()
  for label, records in hh.load_records(source, split=split, subsets=subsets):
    found = detect_formats(records, label) if data_format == "auto" else collections.Counter({data_format: 1})
    if chat:
      file_examples, file_report = conversations_from_records(records, label, data_format)
    elif found.keys() & {"conversational", "messages"}:
      raise DataError(f"{label}: {_describe_formats(found)} records are lists of messages and need a chat template; set "
                       "data.chat_template ('tokenizer' or a .jinja file)")
    else:
      splitter = _per_record(_TEXT_SPLITTERS, None if data_format == "auto" else data_format)
      file_examples, file_report = hh.pairs_from_records(records, label, splitter)
    log.info("%s (%s): %s", label, _describe_formats(found), file_report.summary())
    hh.warn_if_mostly_skipped(label, file_report, warn_skipped_share)
    examples.extend(file_examples)
    report.merge(file_report)
  hh.log_report(report, source, split)
  return examples, report
