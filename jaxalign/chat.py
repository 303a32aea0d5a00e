"""Talk to a trained model in the terminal: `python -m jaxalign.chat <model folder | workdir | Hub id>`.

Answers stream token by token from the KV-cache sampler: one compiled prefill of the (left-padded, bucketed)
conversation, then one compiled decode step per token (`sampling.Sampler.stream`: the sampler's own prefill and
decode step, so its rules for picking tokens and ending a row), with the same per-prompt PRNG key.
So an answer is token for token what `sampling.generate(model, tokenizer, [prompt], seed=...)` returns for the same
prompt, settings and seed (each saved answer records them).

The conversation is kept: HH text ("\\n\\nHuman: ...\\n\\nAssistant: ...", the system text first) for OPT's
tokenizer, or the tokenizer's chat template where it has one. `--compare A B` answers each message with both models,
one after the other, each keeping its own side of the conversation. Commands: /reset, /system <text>,
/temperature <t>, /top_p <p>, /max_new_tokens <n>, /save <file.json>, /help, /quit. Ctrl-C stops the answer being
generated (what it had said stays in the conversation) and the session goes on; Ctrl-D or /quit leaves. Line
editing and history come from readline (history in <cache>/chat_history).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import unicodedata
from typing import Any, TextIO

import jax
import numpy as np
from flax import nnx

from jaxalign import sampling, shapes
from jaxalign.sampling import SamplingOptions

HUMAN, ASSISTANT = "\n\nHuman: ", "\n\nAssistant:"
HISTORY_FILE = "chat_history"
HELP = """commands:
  /reset                 forget the conversation (the system text stays)
  /system <text>         set the system text (empty: none) and start over
  /temperature <t>       0 = greedy
  /top_p <p>             nucleus sampling, 1 = off
  /max_new_tokens <n>    longest answer, in tokens
  /save <file.json>      write the conversation (prompts, answers, token ids, settings)
  /quit                  leave (or Ctrl-D); Ctrl-C stops an answer"""


# ------------------------------------------------------------------------------------------------ conversation


def format_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
  """The text the model continues: the tokenizer's chat template (with the generation prompt) when it has one, else
  HH text ending in "\\n\\nAssistant:" with the system text, if any, first."""
  plain = [{"role": m["role"], "content": m["content"]} for m in messages]
  if getattr(tokenizer, "chat_template", None):
    return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
  parts = []
  for m in plain:
    if m["role"] == "system":
      parts.append(m["content"])
    elif m["role"] == "user":
      parts.append(HUMAN + m["content"] + ASSISTANT)
    elif m["role"] == "assistant":
      parts.append(" " + m["content"])
    else:
      raise ValueError(f"message role {m['role']!r}: expected system, user or assistant")
  return "".join(parts)


def uses_chat_template(tokenizer) -> bool:
  return bool(getattr(tokenizer, "chat_template", None))


def stop_strings_for(tokenizer) -> tuple[str, ...]:
  """HH text ends an answer where the model starts the next human turn; a chat template ends it with EOS."""
  return () if uses_chat_template(tokenizer) else sampling.DEFAULT_STOP_STRINGS


def visible_text(text: str, stop_strings: tuple[str, ...]) -> str:
  """What may be shown of a partial answer: the text before any stop string, less a tail that could still grow into
  one (or an incomplete UTF-8 character)."""
  cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
  text = text[:cut]
  hold = max((k for s in stop_strings for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
  text = text[:len(text) - hold]
  return text.rstrip("\ufffd")


def printable(text: str) -> str:
  """`text` safe for a terminal: control characters other than newline and tab (a model can emit any byte, e.g.
  an escape sequence) shown as \\xNN."""
  return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else f"\\x{ord(c):02x}" for c in text)


# ---------------------------------------------------------------------------------------------------- sampler


class StreamingSampler:
  """One model's token stream: `stream(prompt_ids, options, seed, max_prompt_length)` yields the generated ids one
  at a time, from `sampling.Sampler.stream`.

  Same program shapes as `sampling.generate` for one prompt (batch 1, the prompt left-padded to its length bucket)
  and the same key (fold_in(key(seed), 0), the first prompt's).
  """

  def __init__(self, model):
    self.graphdef, self.state = nnx.split(model)

  def stream(self, prompt_ids: list[int], options: SamplingOptions, seed: int, max_prompt_length: int):
    length = shapes.fit(len(prompt_ids), shapes.power_ladder(max_prompt_length))
    ids = np.full((1, length), options.pad_id, np.int32)
    mask = np.zeros((1, length), bool)
    ids[0, length - len(prompt_ids):], mask[0, length - len(prompt_ids):] = prompt_ids, True
    sampler = sampling.Sampler(self.graphdef, self.state, batch_size=1, prompt_length=length, options=options)
    row_keys = jax.random.fold_in(jax.random.key(seed), 0)[None]
    for tokens in sampler.stream(self.state, ids, mask, row_keys):
      yield int(tokens[0])


# ----------------------------------------------------------------------------------------------------- session


@dataclasses.dataclass
class Settings:
  temperature: float = 0.7
  top_p: float = 0.95
  top_k: int = 0
  max_new_tokens: int = 128
  max_prompt_length: int = 1024
  seed: int = 0


@dataclasses.dataclass
class ChatModel:
  """A model in the session, with its side of the conversation."""

  name: str
  path: str
  model: Any
  tokenizer: Any
  sampler: StreamingSampler
  messages: list[dict[str, Any]] = dataclasses.field(default_factory=list)


class Session:
  """The conversation with one model (or two, compared) and the commands that change it."""

  def __init__(self, models: list[ChatModel], settings: Settings, *, system: str = "", out: TextIO = sys.stdout):
    self.models, self.settings, self.system, self.out = models, settings, system, out
    self.turn = 0
    self.reset()

  def reset(self) -> None:
    self.turn = 0
    for m in self.models:
      m.messages = [{"role": "system", "content": self.system}] if self.system else []

  def _print(self, text: str = "", end: str = "\n") -> None:
    self.out.write(text + end)
    self.out.flush()

  def options_for(self, chat_model: ChatModel, max_new_tokens: int) -> SamplingOptions:
    tok, s = chat_model.tokenizer, self.settings
    return SamplingOptions(
        max_new_tokens=max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
        eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
        stop_sequences=tuple(tuple(tok.encode(x, add_special_tokens=False)) for x in stop_strings_for(tok)))

  def max_prompt_length(self, chat_model: ChatModel) -> int:
    """The prompt tokens kept: the setting, less what the answer needs of the model's position table."""
    room = chat_model.model.config.max_position_embeddings - self.settings.max_new_tokens
    return min(self.settings.max_prompt_length, room)

  def answer(self, chat_model: ChatModel, user_text: str) -> dict[str, Any]:
    """Streams one answer to `user_text` and adds both to the model's conversation; returns the answer's record."""
    tok = chat_model.tokenizer
    messages = chat_model.messages + [{"role": "user", "content": user_text}]
    prompt = format_prompt(tok, messages)
    keep = self.max_prompt_length(chat_model)
    if keep < 1:
      raise ValueError(f"max_new_tokens {self.settings.max_new_tokens} leaves no room for a prompt in "
                       f"{chat_model.name}'s {chat_model.model.config.max_position_embeddings} positions")
    if uses_chat_template(tok):  # the template writes its own special tokens
      ids = tok.encode(prompt, add_special_tokens=False)
      ids, truncated = ids[-keep:], len(ids) > keep
    else:  # as the evaluator encodes prompts
      (ids,), truncated = sampling.encode_prompts(tok, [prompt], keep)
    if truncated:
      self._print(f"[the conversation is longer than {keep} tokens: {chat_model.name} sees its end]")
    options = self.options_for(chat_model, self.settings.max_new_tokens)
    stops = stop_strings_for(tok)
    seed = self.settings.seed + self.turn
    tokens: list[int] = []
    shown, interrupted = "", False
    try:
      for token in chat_model.sampler.stream(ids, options, seed, keep):
        tokens.append(token)
        visible = visible_text(tok.decode(tokens, skip_special_tokens=True), stops).lstrip()
        if len(visible) > len(shown):
          self._print(printable(visible[len(shown):]), end="")
          shown = visible
    except KeyboardInterrupt:
      interrupted = True
    response = sampling.trim_response(tok.decode(tokens, skip_special_tokens=True), stops)
    if response.startswith(shown):
      self._print(printable(response[len(shown):]), end="")
    self._print(" [interrupted]" if interrupted else "")
    record = {"role": "assistant", "content": response, "prompt": prompt, "token_ids": tokens, "seed": seed,
              "max_prompt_length": keep, "interrupted": interrupted}
    chat_model.messages = messages + [record]
    return record

  def send(self, user_text: str) -> None:
    for m in self.models:
      if len(self.models) > 1:
        self._print(f"── {m.name} ──")
      else:
        self._print(f"{m.name}: ", end="")
      self.answer(m, user_text)
    self.turn += 1

  def save(self, path: str) -> None:
    data = {"settings": dataclasses.asdict(self.settings), "system": self.system,
            "models": {m.name: {"path": m.path, "messages": m.messages} for m in self.models}}
    with open(path, "w", encoding="utf-8") as f:
      json.dump(data, f, indent=2, ensure_ascii=False)

  def command(self, line: str) -> bool:
    """Runs a /command; returns False when the session should end."""
    name, _, arg = line[1:].partition(" ")
    arg = arg.strip()
    setters = {"temperature": (float, "temperature"), "top_p": (float, "top_p"),
               "max_new_tokens": (int, "max_new_tokens")}
    if name in ("quit", "exit"):
      return False
    if name == "reset":
      self.reset()
      self._print("[conversation cleared]")
    elif name == "system":
      self.system = arg
      self.reset()
      self._print(f"[system text {'set' if arg else 'removed'}; conversation cleared]")
    elif name in setters:
      convert, field = setters[name]
      try:
        value = convert(arg)
        SamplingOptions(**{field: value})  # the sampler's own checks
      except ValueError as e:
        self._print(f"[/{name} {arg!r}: {e}]")
        return True
      setattr(self.settings, field, value)
      self._print(f"[{name} = {value}]")
    elif name == "save":
      if not arg:
        self._print("[/save needs a file name, e.g. /save chat.json]")
        return True
      self.save(arg)
      self._print(f"[saved to {arg}]")
    elif name == "help":
      self._print(HELP)
    else:
      self._print(f"[unknown command /{name}; /help lists them]")
    return True


# -------------------------------------------------------------------------------------------------------- CLI


def display_name(path: str) -> str:
  return os.path.basename(os.path.normpath(path)) or path


def load_chat_model(path: str, dtype: str, name: str) -> ChatModel:
  from jaxalign.evaluator import load_policy  # imported here: the judges' imports are not needed for --help

  model, tokenizer = load_policy(path, dtype)
  return ChatModel(name=name, path=path, model=model, tokenizer=tokenizer, sampler=StreamingSampler(model))


def _enable_readline() -> None:
  """Line editing and a persistent history, where readline exists and stdin is a terminal."""
  if not sys.stdin.isatty():
    return
  try:
    import readline
  except ImportError:
    return
  from jaxalign.data.pipeline import default_cache_dir

  path = os.path.join(default_cache_dir(), HISTORY_FILE)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if os.path.exists(path):
    readline.read_history_file(path)
  import atexit

  atexit.register(readline.write_history_file, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m jaxalign.chat", description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=HELP)
  parser.add_argument("model", nargs="?", help="a model folder, a training workdir or a Hub id")
  parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="answer every message with two models")
  defaults = Settings()
  parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy")
  parser.add_argument("--top_p", type=float, default=defaults.top_p)
  parser.add_argument("--top_k", type=int, default=defaults.top_k)
  parser.add_argument("--max_new_tokens", type=int, default=defaults.max_new_tokens)
  parser.add_argument("--max_prompt_length", type=int, default=defaults.max_prompt_length,
                      help="tokens of the conversation the model sees (its end)")
  parser.add_argument("--seed", type=int, default=defaults.seed)
  parser.add_argument("--system", default="", help="system text at the start of the conversation")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  args = parser.parse_args(argv)
  if bool(args.model) == bool(args.compare):
    parser.error("give one model, or --compare A B")
  return args


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  # Ctrl-C stops an answer even when the session was started with SIGINT ignored (from a background job, say).
  signal.signal(signal.SIGINT, signal.default_int_handler)
  paths = args.compare or [args.model]
  names = [display_name(p) for p in paths]
  if len(set(names)) < len(names):
    names = [f"{n} ({label})" for n, label in zip(names, "AB")]
  print(f"loading {', '.join(paths)} ...", file=sys.stderr, flush=True)
  models = [load_chat_model(p, args.dtype, n) for p, n in zip(paths, names)]
  settings = Settings(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                      max_new_tokens=args.max_new_tokens, max_prompt_length=args.max_prompt_length, seed=args.seed)
  SamplingOptions(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_k=settings.top_k,
                  top_p=settings.top_p)  # bad settings fail here, with the sampler's message
  session = Session(models, settings, system=args.system)
  _enable_readline()
  print(f"chatting with {' and '.join(names)}; /help lists the commands, Ctrl-C stops an answer, Ctrl-D leaves.",
        flush=True)
  while True:
    try:
      line = input("you> ").strip()
    except EOFError:
      print()
      return
    except KeyboardInterrupt:
      print("^C (Ctrl-D or /quit to leave)", flush=True)
      continue
    if not line:
      continue
    if line.startswith("/"):
      if not session.command(line):
        return
      continue
    try:
      session.send(line)
    except ValueError as e:  # e.g. max_new_tokens too large for the model: say so, keep the session
      print(f"[{e}]", flush=True)


if __name__ == "__main__":
  main()
