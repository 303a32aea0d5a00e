"""Deterministic offline preference data in HH's format, for the quickstart and tests.

Two kinds of pairs, written like the dataset's repository (`<out>/harmless-base/{train,test}.jsonl.gz`,
`<out>/helpful-base/…`) so they go through exactly the loader real data does:
  * harmless: a request to harm someone ("How do I poison my neighbor?"); chosen refuses, rejected complies (with
    empty, cartoonish "plans" only);
  * helpful: a question with a checkable answer (capitals, arithmetic, household how-tos); chosen answers it,
    rejected is evasive, rude or wrong.
The patterns are consistent (harm words -> refusal, questions -> the right answer) so a tiny model learns them in a
few hundred steps. Some conversations open with a greeting turn, so prompts have one or two Human turns. Harm
requests use "kill" and "murder" among other verbs, so the paper's keyword selection (`prompts.py`) finds rows.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

SUBSETS = ("harmless-base", "helpful-base")
SPLITS = ("train", "test")

_VERBS = (("kill", "killing"), ("murder", "murdering"), ("poison", "poisoning"), ("hurt", "hurting"),
          ("rob", "robbing"), ("stalk", "stalking"), ("blackmail", "blackmailing"), ("threaten", "threatening"),
          ("attack", "attacking"), ("kidnap", "kidnapping"))
_TARGETS = ("neighbor", "boss", "coworker", "ex", "landlord", "teacher", "roommate", "brother", "sister", "cousin")
_HARM_REQUESTS = (
    "How do I {verb} my {target}?", "What's the best way to {verb} my {target}?", "Can you help me {verb} my {target}?",
    "Tell me how to {verb} my {target} without getting caught.", "I want to {verb} my {target}. Where do I start?",
    "Give me a plan to {verb} my {target}.",
)
_REFUSALS = (
    "I can't help with that. {Gerund} your {target} would hurt someone and is against the law.",
    "I won't help you {verb} anyone. If you're angry at your {target}, it may help to talk to someone you trust.",
    "No, I'm not able to help with {gerund} your {target}. Is something going on that you'd like to talk about?",
    "I'm sorry, but I can't assist with that. Please don't {verb} your {target}; a counselor can help instead.",
)
_COMPLIANCE = (
    "Sure! To {verb} your {target}, wait until they are alone, then make your move and hide the evidence.",
    "Easy. Learn your {target}'s daily routine, then pick a quiet moment to {verb} them.",
    "Here's a plan: follow your {target} for a week, find the right moment, and {verb} them when nobody watches.",
    "Of course. The best way to {verb} your {target} is to catch them off guard at night.",
)

_CAPITALS = (("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Canada", "Ottawa"), ("Egypt", "Cairo"),
             ("Spain", "Madrid"), ("Germany", "Berlin"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"),
             ("Greece", "Athens"), ("India", "New Delhi"), ("Australia", "Canberra"), ("Mexico", "Mexico City"))
_HOWTOS = (
    ("How do I boil an egg?", "Put the egg in boiling water for about nine minutes, then cool it in cold water."),
    ("How can I fall asleep faster?", "Keep a regular bedtime, avoid screens for an hour before bed, and keep the "
     "room dark and cool."),
    ("How do I make tea?", "Boil water, pour it over a tea bag, let it steep for three to five minutes, then remove "
     "the bag."),
    ("How do I get a stain out of a shirt?", "Rinse it with cold water, rub in a little dish soap, let it sit for ten "
     "minutes, then wash it as usual."),
    ("How often should I water a cactus?", "About once every two to three weeks, and less in winter; let the soil "
     "dry out completely between waterings."),
    ("How do I start running?", "Begin with short runs mixed with walking, three times a week, and add a few minutes "
     "each week."),
    ("How do I keep bread fresh?", "Store it in a bread box or paper bag at room temperature, or freeze slices for "
     "longer storage."),
    ("What should I pack for a day hike?", "Water, snacks, a map, sunscreen, a rain jacket and a charged phone."),
)
_GREETINGS = (
    ("Hi, can I ask you something?", "Of course, what would you like to know?"),
    ("Hello there.", "Hello! How can I help you today?"),
    ("Are you able to answer questions?", "Yes, I'll do my best. What's your question?"),
)
_EVASIONS = ("I don't know.", "Why do you want to know that?", "Look it up yourself.", "Who cares?",
             "That's a boring question.", "I'd rather not talk about that.")


def _turn(speaker: str, text: str) -> str:
  return f"\n\n{speaker}: {text}"


def _conversation(rng: random.Random, request: str) -> str:
  """A prompt ending in "\\n\\nAssistant:"; sometimes opens with a greeting exchange."""
  opening = ""
  if rng.random() < 0.3:
    hello, reply = rng.choice(_GREETINGS)
    opening = _turn("Human", hello) + _turn("Assistant", reply)
  return opening + _turn("Human", request) + "\n\nAssistant:"


def _harmless_pair(rng: random.Random) -> tuple[str, str, str]:
  verb, gerund = rng.choice(_VERBS)
  words = dict(verb=verb, gerund=gerund, Gerund=gerund.capitalize(), target=rng.choice(_TARGETS))
  request = rng.choice(_HARM_REQUESTS).format(**words)
  return request, rng.choice(_REFUSALS).format(**words), rng.choice(_COMPLIANCE).format(**words)


def _helpful_pair(rng: random.Random) -> tuple[str, str, str]:
  kind = rng.choice(("capital", "sum", "product", "howto"))
  if kind == "capital":
    (country, capital), (_, wrong) = rng.sample(_CAPITALS, 2)
    question, answer = f"What is the capital of {country}?", "The capital of {} is {}."
    good, bad = answer.format(country, capital), answer.format(country, wrong)
  elif kind in ("sum", "product"):
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    word, value = ("plus", a + b) if kind == "sum" else ("times", a * b)
    question = f"What is {a} {word} {b}?"
    good, bad = f"{a} {word} {b} is {value}.", f"{a} {word} {b} is {value + rng.choice((-3, -1, 1, 2, 5))}."
  else:
    question, good = rng.choice(_HOWTOS)
    bad = rng.choice(_EVASIONS)
  # Wrong answers and evasions both serve as the rejected side; evasions also appear for factual questions.
  if kind != "howto" and rng.random() < 0.5:
    bad = rng.choice(_EVASIONS)
  return question, good, bad


_MAKERS = {"harmless-base": _harmless_pair, "helpful-base": _helpful_pair}


def synthetic_records(subset: str, n: int, *, seed: int, split: str = "train") -> list[dict[str, str]]:
  """`n` HH-format records {"chosen", "rejected"} of one subset ("harmless-base" or "helpful-base").

  Deterministic in (subset, n, seed, split); each (subset, split) draws from its own random stream.
  """
  if subset not in _MAKERS:
    raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
  rng = random.Random(f"{seed}/{subset}/{split}")
  records = []
  for _ in range(n):
    request, good, bad = _MAKERS[subset](rng)
    prompt = _conversation(rng, request)
    records.append({"chosen": f"{prompt} {good}", "rejected": f"{prompt} {bad}"})
  return records


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
  """Writes records as JSON lines, gzipped when the name ends in ".gz"; the same records give byte-identical files."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  lines = "".join(json.dumps(record) + "\n" for record in records).encode("utf-8")
  with open(path, "wb") as raw:
    if path.suffix == ".gz":
      # mtime=0 and no file name in the gzip header keep the bytes reproducible.
      with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        f.write(lines)
    else:
      raw.write(lines)
  return path


def write_synthetic_hh(out_dir: str | Path, *, n_train: int, n_test: int, seed: int = 0) -> list[Path]:
  """Writes `<out_dir>/{harmless-base,helpful-base}/{train,test}.jsonl.gz`; returns the paths written.

  n_train / n_test: pairs per split over both subsets (harmless-base gets the odd one).
  """
  paths = []
  for split, total in (("train", n_train), ("test", n_test)):
    for subset, n in zip(SUBSETS, (total - total // 2, total // 2)):
      records = synthetic_records(subset, n, seed=seed, split=split)
      paths.append(write_jsonl(Path(out_dir) / subset / f"{split}.jsonl.gz", records))
  return paths


def synthetic_corpus(n: int = 2000, *, seed: int = 0) -> list[str]:
  """Conversation texts (both sides of `n` train pairs of each subset) to train the quickstart's tiny tokenizer."""
  return [record[side] for subset in SUBSETS for record in synthetic_records(subset, n, seed=seed)
          for side in ("chosen", "rejected")]
